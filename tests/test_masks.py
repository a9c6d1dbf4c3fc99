"""The multi-block mask collator: counts, disjointness, scales, truncation, determinism."""
import math

import pytest
import torch
from torch.utils.data import DataLoader

from stop_kernels.data import MultiBlockMaskCollator, SyntheticImages


def batch(n=8, size=32):
    return [(torch.randn(3, size, size), i) for i in range(n)]


def test_counts_and_shapes():
    c = MultiBlockMaskCollator(input_size=224, patch_size=16, seed=3)
    (imgs, labels), enc, pred = c(batch(8, 224))
    assert imgs.shape == (8, 3, 224, 224) and labels.shape == (8,)
    assert len(enc) == 1 and len(pred) == 4
    assert all(m.shape == pred[0].shape and m.dtype == torch.int64 for m in pred)
    assert enc[0].shape[0] == 8 and enc[0].shape[1] > c.min_keep
    for m in enc + pred:
        assert int(m.min()) >= 0 and int(m.max()) < 14 * 14


def test_disjoint_and_scales_ragged():
    g = 14
    c = MultiBlockMaskCollator(input_size=224, patch_size=16, seed=0, truncate=False)
    for _ in range(5):
        _, enc, pred = c(batch(16, 224))
        per_batch = set()  # target sizes of the whole batch
        for b in range(16):
            ctx = set(enc[0][b].tolist())
            sizes = []
            for k in range(4):
                t = pred[k][b]
                assert not ctx & set(t.tolist()), "context and targets overlap"
                # a target block is a rectangle of scale ≤ 0.2 of the grid
                rows, cols = t // g, t % g
                h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
                assert h * w == len(t)
                assert len(t) <= 0.2 * g * g
                sizes.append(len(t))
            per_batch |= set(sizes)
            # the context block (keep ≥ int(0.85·g²) patches, square: h = w = round(√keep), capped at g − 1)
            # covers ≥ (√keep − ½)² > keep − √keep ≥ keep − g patches (the cap gives (g−1)² ≥ that here);
            # only target patches are removed from it, so context + targets ≥ int(0.85·g²) − g
            assert len(ctx) + sum(sizes) >= int(0.85 * g * g) - g
            assert len(ctx) > c.min_keep
            assert list(enc[0][b]) == sorted(enc[0][b].tolist())
        # one target size per batch (the official collator draws it once per batch), not one per image: checked
        # per image only, sizes drawn for each image passed
        assert len(per_batch) == 1, "one target size per batch"


def test_truncated_to_batch_minimum():
    c_r = MultiBlockMaskCollator(input_size=224, patch_size=16, seed=5, truncate=False)
    c_t = MultiBlockMaskCollator(input_size=224, patch_size=16, seed=5)
    _, enc_r, pred_r = c_r(batch(8, 224))
    _, enc_t, pred_t = c_t(batch(8, 224))
    k_enc = min(len(m) for m in enc_r[0])
    assert enc_t[0].shape[1] == k_enc
    for b in range(8):
        assert enc_t[0][b].tolist() == enc_r[0][b][:k_enc].tolist()
        for k in range(4):
            assert pred_t[k][b].tolist() == pred_r[k][b][: pred_t[k].shape[1]].tolist()


def test_deterministic_and_varies_per_batch():
    a = MultiBlockMaskCollator(input_size=224, patch_size=16, seed=1)
    b = MultiBlockMaskCollator(input_size=224, patch_size=16, seed=1)
    x1, x2 = a(batch()), a(batch())
    y1 = b(batch())
    # same seed, same batch: identical context and target masks
    assert all(torch.equal(u, v) for u, v in zip(x1[1] + x1[2], y1[1] + y1[2]))
    # the next batch draws new masks (torch.equal is False for different shapes, so no separate shape case)
    assert not torch.equal(x1[1][0], x2[1][0])
    assert not all(torch.equal(u, v) for u, v in zip(x1[2], x2[2]))
    # another seed: other masks for the same first batch
    o1 = MultiBlockMaskCollator(input_size=224, patch_size=16, seed=2)(batch())
    assert not torch.equal(x1[1][0], o1[1][0])
    # resume: a fresh collator told to start at batch 1 reproduces the second batch
    c = MultiBlockMaskCollator(input_size=224, patch_size=16, seed=1)
    c.set_epoch(0, start_batch=1)
    z2 = c(batch())
    assert all(torch.equal(u, v) for u, v in zip(x2[1] + x2[2], z2[1] + z2[2]))


def test_same_masks_with_workers():
    ds = SyntheticImages(length=12, img_size=32, seed=0)
    masks = []
    for workers in (0, 2):
        c = MultiBlockMaskCollator(input_size=32, patch_size=4, seed=9, min_keep=2)
        dl = DataLoader(ds, batch_size=3, collate_fn=c, num_workers=workers)
        masks.append([(e[0], p[0]) for _, e, p in dl])
    assert len(masks[0]) == 4
    for (e0, p0), (e1, p1) in zip(*masks):
        assert torch.equal(e0, e1) and torch.equal(p0, p1)


def test_block_size_formula():
    c = MultiBlockMaskCollator(input_size=224, patch_size=16)
    g = torch.Generator().manual_seed(0)
    r = torch.rand(1, generator=torch.Generator().manual_seed(0)).item()
    h, w = c._sample_block_size(g, (0.15, 0.2), (0.75, 1.5))
    keep = int(196 * (0.15 + r * 0.05))
    ar = 0.75 + r * 0.75
    assert (h, w) == (round(math.sqrt(keep * ar)), round(math.sqrt(keep / ar)))


@pytest.mark.parametrize("kw, name", [
    (dict(input_size=225, patch_size=16), "input_size"),
    (dict(input_size=0), "input_size"),
    (dict(patch_size=0), "patch_size"),
    (dict(pred_mask_scale=(0.3, 0.2)), "pred_mask_scale"),
    (dict(enc_mask_scale=(0.5, 1.5)), "enc_mask_scale"),
    (dict(npred=0), "npred"),
    (dict(min_keep=10_000), "min_keep"),
])
def test_bad_config(kw, name):
    with pytest.raises((ValueError, TypeError), match=f"^{name}:"):
        MultiBlockMaskCollator(**kw)


def test_unsatisfiable_min_keep_is_an_error_not_a_hang():
    # refused when the collator is built (config time), not at the first batch that draws a small block
    with pytest.raises(ValueError, match="^min_keep: the smallest target block"):
        MultiBlockMaskCollator(input_size=32, patch_size=8, min_keep=12, pred_mask_scale=(0.15, 0.2))
    with pytest.raises(ValueError, match="^min_keep: the smallest context block"):
        MultiBlockMaskCollator(input_size=32, patch_size=8, min_keep=1, pred_mask_scale=(0.5, 0.5),
                               enc_mask_scale=(0.1, 0.1))
    # and the sampler's own guard still stops the official loop from spinning forever
    c = MultiBlockMaskCollator(input_size=32, patch_size=8, min_keep=0, pred_mask_scale=(0.15, 0.2))
    c.min_keep = 12
    with pytest.raises(ValueError, match="^min_keep"):
        c(batch(2, 32))


def test_smallest_block_finds_narrow_pieces():
    """224 px / patch 16, target scale (0.15, 0.4), aspect ratio (0.3, 1.0): the draws in about
    [0.09379, 0.09388] give a 3x9 block between 3x10 ones, a piece narrower than 1/4096. The smallest
    block (and so the min_keep check at construction) must see it; a fixed grid of draws did not."""
    kw = dict(input_size=224, patch_size=16, seed=0, pred_mask_scale=(0.15, 0.4), aspect_ratio=(0.3, 1.0))
    c = MultiBlockMaskCollator(min_keep=4, **kw)
    assert c._block_size(0.09383, c.pred_mask_scale, c.aspect_ratio) == (3, 9)
    assert c.smallest_block(c.pred_mask_scale, c.aspect_ratio) == (3, 9)
    with pytest.raises(ValueError, match="3x9 = 27"):
        MultiBlockMaskCollator(min_keep=28, **kw)
    # and no draw anywhere is smaller than what it reports
    h, w = c.smallest_block(c.pred_mask_scale, c.aspect_ratio)
    assert all(a * b >= h * w for a, b in (c._block_size(i / 20000, c.pred_mask_scale, c.aspect_ratio)
                                           for i in range(20001)))


def test_every_drawn_block_keeps_more_than_min_keep():
    """The smallest block found at construction bounds every block the batches draw."""
    c = MultiBlockMaskCollator(input_size=64, patch_size=8, min_keep=8, seed=3, allow_overlap=True)
    smallest = c.smallest_block(c.pred_mask_scale, c.aspect_ratio)
    assert smallest[0] * smallest[1] > 8
    for i in range(60):
        _, _, pred = c(batch(2, 64))
        assert pred[0].shape[1] >= smallest[0] * smallest[1] and pred[0].shape[1] > c.min_keep


def test_context_block_is_square():
    """The context block's aspect ratio is 1 (the official collator); only the targets use aspect_ratio.
    With overlap allowed nothing is cut from it: every context mask is a full h × h square."""
    c = MultiBlockMaskCollator(input_size=224, patch_size=16, seed=4, allow_overlap=True, aspect_ratio=(0.3, 3.0))
    for b in range(5):
        enc, _ = c.sample_masks(3, c.generator_for(b))
        for img in enc:
            rows, cols = img[0] // 14, img[0] % 14
            h, w = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
            assert h == w and h * w == len(img[0]), (b, h, w)


def test_regions_are_dropped_from_the_last_one(caplog):
    """After 20 failed draws the official loop drops the *last* acceptable region and tries again with
    the others: with region 0 forbidding column 0 and region 1 forbidding everything, the context block
    must still avoid column 0 (it is cut by region 0 only), and one region drop is logged."""
    c = MultiBlockMaskCollator(input_size=64, patch_size=8, seed=0, min_keep=4)
    allow_but_col0 = torch.ones(8, 8, dtype=torch.int32)
    allow_but_col0[:, 0] = 0
    nothing = torch.zeros(8, 8, dtype=torch.int32)
    with caplog.at_level("WARNING"):
        idx, _ = c._sample_block_mask(torch.Generator().manual_seed(1), (7, 7), [allow_but_col0, nothing])
    assert len(idx) > 4 and not (idx % 8 == 0).any()
    assert sum("dropping an acceptable region [1]" in r.getMessage() for r in caplog.records) == 1


def test_target_blocks_never_touch_the_last_row_or_column():
    """The official sampler draws top in [0, H − h) and left in [0, W − w) (exclusive): kept as is."""
    c = MultiBlockMaskCollator(input_size=224, patch_size=16, seed=0, truncate=False)
    for b in range(20):
        _, pred = c.sample_masks(8, c.generator_for(b))
        for img in pred:
            for m in img:
                assert int((m // 14).max()) < 13 and int((m % 14).max()) < 13


def test_epochs_with_set_epoch_are_the_same_for_any_number_of_workers():
    """The documented contract (set_epoch before every pass): each epoch's masks are the same with 0 and 2
    workers, and the epochs differ. (Without set_epoch a second pass with workers repeats the first's masks,
    while one process numbers on: the module docstring says so.)"""
    ds = SyntheticImages(length=6, img_size=32, seed=0)
    masks = {}
    for workers in (0, 2):
        c = MultiBlockMaskCollator(input_size=32, patch_size=4, seed=9, min_keep=2)
        dl = DataLoader(ds, batch_size=3, collate_fn=c, num_workers=workers)
        masks[workers] = []
        for epoch in range(2):
            c.set_epoch(epoch)
            masks[workers].append([p[0] for _, _, p in dl])
    for epoch in range(2):
        assert all(torch.equal(a, b) for a, b in zip(masks[0][epoch], masks[2][epoch]))
    assert not all(torch.equal(a, b) for a, b in zip(masks[2][0], masks[2][1]))


@pytest.mark.parametrize("kw, exc, name", [
    (dict(seed="abc"), TypeError, "seed"), (dict(seed=1.5), TypeError, "seed"),
    (dict(npred=True), TypeError, "npred"), (dict(nenc=2.0), TypeError, "nenc"),
    (dict(min_keep=True), TypeError, "min_keep"),
    (dict(truncate="no"), TypeError, "truncate"), (dict(allow_overlap=None), TypeError, "allow_overlap"),
])
def test_settings_of_the_wrong_type_are_named(kw, exc, name):
    """Review finding: seed='abc' failed in int() unnamed, seed=1.5 ran as seed 1, npred=True as one block,
    min_keep=True as 1, and truncate='no' truncated (a truthy string)."""
    with pytest.raises(exc, match=f"^{name}:"):
        MultiBlockMaskCollator(**kw)


def test_synthetic_images_refuse_an_empty_label_set():
    """Review finding: num_classes=0 built a dataset whose every item raised ZeroDivisionError, and -1 one whose
    labels were all 0."""
    for bad in (0, -1):
        with pytest.raises(ValueError, match="^num_classes:"):
            SyntheticImages(length=4, img_size=8, num_classes=bad)


def test_a_block_keeping_exactly_min_keep_is_refused_for_20_draws(caplog, monkeypatch):
    """The official acceptance rule is ``len(mask) > min_keep`` (strict), and a region is dropped only after
    20 refused draws. A 7x7 block on the 8x8 grid can only sit at (0, 0); the one acceptable region leaves it
    exactly min_keep = 4 patches (the centre 2x2): refused 20 times (2 position draws each), then the region
    is dropped and the whole 49-patch block is kept on the 21st draw."""
    c = MultiBlockMaskCollator(input_size=64, patch_size=8, seed=0, min_keep=4)
    centre = torch.zeros(8, 8, dtype=torch.int32)
    centre[3:5, 3:5] = 1
    draws = []
    randint = torch.randint
    monkeypatch.setattr(torch, "randint", lambda *a, **k: draws.append(1) or randint(*a, **k))
    with caplog.at_level("WARNING"):
        idx, _ = c._sample_block_mask(torch.Generator().manual_seed(0), (7, 7), [centre])
    assert len(idx) == 49 and len(draws) == 2 * 21
    assert sum("dropping an acceptable region [1]" in r.getMessage() for r in caplog.records) == 1


# -- block sizing: the sizes sample_masks places are the per-batch draws of the official collator ----------

def _official_block_size(r, scale, aspect_ratio, grid):
    """The official I-JEPA ``_sample_block_size`` for the uniform draw ``r`` (written out here, independent of
    the module's ``_block_size``): scale and aspect ratio (h / w) both linear in the one draw, h and w capped
    below the grid side."""
    keep = int(grid * grid * (scale[0] + r * (scale[1] - scale[0])))
    ar = aspect_ratio[0] + r * (aspect_ratio[1] - aspect_ratio[0])
    h, w = int(round(math.sqrt(keep * ar))), int(round(math.sqrt(keep / ar)))
    while h >= grid:
        h -= 1
    while w >= grid:
        w -= 1
    return h, w


def _replayed_sizes(c, batch_index, grid):
    """(target size, context size) of batch ``batch_index``: the first two uniform draws of the collator's
    generator for that batch, target first (the official order)."""
    g = c.generator_for(batch_index)
    r_pred = torch.rand(1, generator=g).item()
    r_enc = torch.rand(1, generator=g).item()
    return (_official_block_size(r_pred, c.pred_mask_scale, c.aspect_ratio, grid),
            _official_block_size(r_enc, c.enc_mask_scale, (1.0, 1.0), grid))


def _rect(idx, grid):
    """(h, w) of the block whose patch indices are ``idx``; asserts the indices fill that rectangle exactly."""
    idx = sorted(int(i) for i in idx)
    rows, cols = [i // grid for i in idx], [i % grid for i in idx]
    top, left = min(rows), min(cols)
    h, w = max(rows) - top + 1, max(cols) - left + 1
    assert idx == [(top + i) * grid + left + j for i in range(h) for j in range(w)], "not a full rectangle"
    return h, w


# wide context scale range and a 14x14 grid: the context size varies from batch to batch (with the default
# (0.85, 1.0) every context block is 13x13 on this grid, so a pinned scale would not show)
_SIZING = dict(input_size=224, patch_size=16, enc_mask_scale=(0.25, 0.9), pred_mask_scale=(0.1, 0.25),
               aspect_ratio=(0.5, 2.0), allow_overlap=True, truncate=False, min_keep=4)


@pytest.mark.parametrize("seed, nenc, npred", [(0, 1, 4), (11, 2, 3)])
def test_block_sizes_are_the_replayed_per_batch_draws(seed, nenc, npred):
    """Every target block is p_size and every context block e_size (uncut: overlap allowed), where p_size and
    e_size are the first two draws of the batch's seeded generator passed through the official formula; the
    collator's own numbering (``__call__``) and ``sample_masks`` on ``generator_for(b)`` agree."""
    grid = 14
    c = MultiBlockMaskCollator(seed=seed, nenc=nenc, npred=npred, **_SIZING)
    ref = MultiBlockMaskCollator(seed=seed, nenc=nenc, npred=npred, **_SIZING)
    for b in range(25):
        p_size, e_size = _replayed_sizes(ref, b, grid)
        _, enc, pred = c(batch(4, 8))
        assert len(enc) == nenc and len(pred) == npred
        for k in range(npred):
            for img in range(4):
                assert _rect(pred[k][img], grid) == p_size, (b, k, img)
        for j in range(nenc):
            for img in range(4):
                assert _rect(enc[j][img], grid) == e_size, (b, j, img)
        enc_s, pred_s = ref.sample_masks(4, ref.generator_for(b))
        assert all(_rect(m, grid) == p_size for masks in pred_s for m in masks)
        assert all(_rect(m, grid) == e_size for masks in enc_s for m in masks)


def test_one_context_size_and_one_target_size_per_batch():
    """The official collator draws both block sizes once per batch: within a batch every image has the same
    context extent and the same target extent, while the sizes change between batches."""
    grid, bs = 14, 8
    c = MultiBlockMaskCollator(seed=5, **_SIZING)
    ctx_sizes, tgt_sizes = set(), set()
    for b in range(20):
        enc, pred = c.sample_masks(bs, c.generator_for(b))
        ctx = {_rect(img[0], grid) for img in enc}
        tgt = {_rect(m, grid) for img in pred for m in img}
        assert len(ctx) == 1, f"batch {b}: context sizes {ctx}"
        assert len(tgt) == 1, f"batch {b}: target sizes {tgt}"
        ctx_sizes |= ctx
        tgt_sizes |= tgt
    assert len(ctx_sizes) > 3 and len(tgt_sizes) > 3


def test_targets_use_the_aspect_ratio_and_the_context_the_whole_scale_range():
    """Across batches: target blocks come both taller than wide and wider than tall (aspect_ratio (0.5, 2)
    straddles 1), and the context blocks (square) reach both ends of enc_mask_scale: some within the lowest
    fifth of the possible side lengths, some within the highest fifth."""
    grid = 14
    c = MultiBlockMaskCollator(seed=2, **_SIZING)
    lo_side = _official_block_size(0.0, c.enc_mask_scale, (1.0, 1.0), grid)[0]   # 7 (int(0.25·196) = 49)
    hi_side = _official_block_size(1.0, c.enc_mask_scale, (1.0, 1.0), grid)[0]   # 13 (int(0.9·196) = 176)
    assert hi_side - lo_side >= 5
    tall = wide = 0
    sides = []
    for b in range(60):
        enc, pred = c.sample_masks(2, c.generator_for(b))
        h, w = _rect(pred[0][0], grid)
        tall += h > w
        wide += h < w
        eh, ew = _rect(enc[0][0], grid)
        assert eh == ew and lo_side <= eh <= hi_side
        sides.append(eh)
    assert tall >= 5 and wide >= 5, (tall, wide)
    span = hi_side - lo_side
    assert min(sides) <= lo_side + 0.2 * span and max(sides) >= hi_side - 0.2 * span, sorted(sides)
    # and the default aspect ratio (0.75, 1.5) also gives non-square targets
    d = MultiBlockMaskCollator(input_size=224, patch_size=16, seed=0, allow_overlap=True)
    shapes = {_rect(d.sample_masks(1, d.generator_for(b))[1][0][0], 14) for b in range(30)}
    assert any(h != w for h, w in shapes), shapes
