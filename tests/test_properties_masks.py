"""Property-based tests (hypothesis) of the I-JEPA multi-block masks and the packed (varlen) layout.

The collator's settings (grid side, patch size, scales, aspect ratios, npred, nenc, min_keep, allow_overlap,
seed, batch size) are drawn by hypothesis; every property is checked against the contract of
``stop_kernels/data/masks.py`` (the official ``MaskCollator``'s rules, kept), of ``stop_kernels/models/packing.py``
(ragged masks packed along one token axis with ``cu_seqlens``) and of the index helpers of
``stop_kernels/reference.py``. The examples (the profile in ``conftest.py``) are the same on every run (CI is
reproducible); grids are small so the file runs in well under a minute on two CPU cores.
"""
import logging
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from conftest import skip_unless_installed

skip_unless_installed("hypothesis", module_level=True)
from hypothesis import assume, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from stop_kernels import _checks as chk
from stop_kernels import reference
from stop_kernels.data import MultiBlockMaskCollator
from stop_kernels.models.packing import (_cu, check_ragged, encode_packed, is_ragged, mean_tokens, packed_targets,
                                         predict_packed, predictor_layout)
from stop_kernels.models.predictor import VisionTransformerPredictor
from stop_kernels.models.vit import VisionTransformer
from stop_kernels.ops.attention import dispatch_attention
from test_masks import _official_block_size, _rect, batch


# ------------------------------------------------------------------------------------------------ strategies
def _pair(draw, lo: float, hi: float):
    """A (min, max) pair of floats in [lo, hi] (the ends included: scale 0 and 1 are valid settings)."""
    a, b = draw(st.floats(lo, hi)), draw(st.floats(lo, hi))
    return (min(a, b), max(a, b))


@st.composite
def collator_settings(draw, max_grid: int = 8, allow_overlap=None, pred_max: float = 1.0,
                      aspect=(0.2, 5.0), min_grid: int = 2):
    """Keyword arguments of a valid ``MultiBlockMaskCollator`` (without ``truncate``): a grid of min_grid..max_grid
    patches per side, any scales in [0, 1], and a ``min_keep`` below the smallest block either mask can draw
    (the constructor refuses the others, see ``test_bad_settings_are_refused_and_named``)."""
    grid = draw(st.integers(min_grid, max_grid))
    patch = draw(st.sampled_from([1, 2, 4]))
    kw = dict(input_size=grid * patch, patch_size=patch, enc_mask_scale=_pair(draw, 0.0, 1.0),
              pred_mask_scale=_pair(draw, 0.0, pred_max), aspect_ratio=_pair(draw, *aspect),
              nenc=draw(st.integers(1, 2)), npred=draw(st.integers(1, 4)),
              allow_overlap=draw(st.booleans()) if allow_overlap is None else allow_overlap,
              seed=draw(st.integers(0, 2 ** 40)))
    probe = MultiBlockMaskCollator(min_keep=0, **kw)
    smallest = min(h * w for h, w in (probe.smallest_block(probe.pred_mask_scale, probe.aspect_ratio),
                                      probe.smallest_block(probe.enc_mask_scale, (1.0, 1.0))))
    kw["min_keep"] = draw(st.integers(0, smallest - 1))
    return kw


class _Drops(logging.Handler):
    """Counts the collator's "dropping an acceptable region" warnings (one per region dropped, for one mask),
    with the collator's logger let through at WARNING whatever another test set (a level, ``logging.disable``)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0
        self.logger = logging.getLogger("stop_kernels.data.masks")

    def emit(self, record):
        self.count += "dropping an acceptable region" in record.getMessage()

    def __enter__(self):
        self.saved = self.logger.level, self.logger.disabled, logging.root.manager.disable
        self.logger.setLevel(logging.WARNING)
        self.logger.disabled = False
        logging.disable(logging.NOTSET)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        level, self.logger.disabled, disable = self.saved
        self.logger.setLevel(level)
        logging.disable(disable)


def _replayed(c, batch_index: int):
    """(target size, context size) of a batch: the first two uniform draws of its generator through the official
    formula (target first), as ``test_masks._replayed_sizes``, for a square grid. ``max(·, 1)``: where the
    official formula gives a side of 0 its loop never ends (an empty block never keeps more than min_keep); the
    module keeps one row / column there."""
    g = c.generator_for(batch_index)
    r_pred, r_enc = torch.rand(1, generator=g).item(), torch.rand(1, generator=g).item()
    side = c.height
    p = _official_block_size(r_pred, c.pred_mask_scale, c.aspect_ratio, side)
    e = _official_block_size(r_enc, c.enc_mask_scale, (1.0, 1.0), side)
    return tuple(max(v, 1) for v in p), tuple(max(v, 1) for v in e)


def _block(top: int, left: int, h: int, w: int, width: int) -> set:
    return {(top + i) * width + left + j for i in range(h) for j in range(w)}


def _context_drops(ctx: set, targets, e_size, H: int, W: int):
    """The fewest acceptable regions (targets, the last first) that must have been dropped for ``ctx`` to be the
    official context mask: an ``e_size`` block placed as the official sampler places it (top in [0, H − h), left in
    [0, W − w): the last row and column are never drawn) minus the targets still acceptable. None when no
    placement and no number of drops gives ``ctx`` (a patch dropped or added that the official code keeps)."""
    h, w = e_size
    rows, cols = {i // W for i in ctx}, {i % W for i in ctx}
    best = None
    for top in range(max(0, max(rows) - h + 1), min(min(rows), H - h - 1) + 1):
        for left in range(max(0, max(cols) - w + 1), min(min(cols), W - w - 1) + 1):
            square = _block(top, left, h, w, W)
            for d in range(len(targets) + 1):
                kept = set().union(*targets[:len(targets) - d])
                if square - kept == ctx:
                    best = d if best is None else min(best, d)
                    break
    return best


# ------------------------------------------------------------------------------------------------ the collator
@settings(max_examples=200)
@given(kw=collator_settings(), bs=st.integers(1, 4), calls=st.integers(1, 2))
def test_ragged_masks_are_the_official_blocks(kw, bs, calls):
    """Ragged masks (``truncate=False``), any valid settings: ``nenc`` context and ``npred`` target lists of ``B``
    1-D int64 tensors each; every mask sorted strictly ascending (so no duplicate) within [0, H·W) and keeping
    more than ``min_keep`` patches; every target block of the batch the full rectangle of the batch's one target
    size (the replayed first draw of its generator); every context mask the batch's one context block (the
    second draw, square) minus the targets of its image, nothing else dropped. With ``allow_overlap`` the
    context block is whole; without, it is disjoint from its image's targets unless a region was dropped (the
    official fallback after 20 failed draws, logged), and at least as many drops were logged as the masks
    need to explain their overlaps."""
    c = MultiBlockMaskCollator(truncate=False, **kw)
    H, W = c.height, c.width
    for i in range(calls):
        with _Drops() as drops:
            _, enc, pred = c(batch(bs, 4))
        p_size, e_size = _replayed(c, i)
        assert len(enc) == kw["nenc"] and len(pred) == kw["npred"]
        assert all(len(m) == bs for m in enc + pred)
        for m in [t for masks in enc + pred for t in masks]:
            assert m.dtype == torch.int64 and m.dim() == 1
            assert len(m) > kw["min_keep"], "a mask keeps more than min_keep patches (the official rule)"
            assert bool((m[1:] > m[:-1]).all()), "sorted ascending, no duplicate"
            assert 0 <= int(m.min()) and int(m.max()) < H * W
        needed = 0
        for b in range(bs):
            targets = [set(pred[k][b].tolist()) for k in range(kw["npred"])]
            for k in range(kw["npred"]):
                assert _rect(pred[k][b], W) == p_size, (i, k, b)  # one target size per batch
                assert max(t // W for t in targets[k]) < H - 1 and max(t % W for t in targets[k]) < W - 1
            for j in range(kw["nenc"]):
                ctx = set(enc[j][b].tolist())
                if kw["allow_overlap"]:
                    assert _rect(enc[j][b], W) == e_size, (i, j, b)
                    continue
                d = _context_drops(ctx, targets, e_size, H, W)
                assert d is not None, f"batch {i} image {b} context {j}: not the {e_size} block minus targets"
                needed += d
        # each drop is logged once: the masks cannot need more than were logged (none logged: all disjoint)
        assert needed <= drops.count, (needed, drops.count)


@settings(max_examples=120)
@given(kw=collator_settings(allow_overlap=False), bs=st.integers(1, 5))
def test_truncated_masks_are_the_ragged_ones_cut_to_the_batch_minimum(kw, bs):
    """``truncate=True`` (the official collation): each mask list is one ``[B, K]`` int64 tensor per block, K the
    shortest mask of its kind over the whole batch and all its blocks (``nenc`` context, ``npred`` target
    blocks), and row b is the first K indices of the ragged mask that ``truncate=False`` returns for the same
    seed and batch: truncation drops only the tail, and nothing else differs between the two modes. (Without
    overlap: only the targets cut the contexts, so only then do lengths differ and truncation cut anything.)"""
    ragged = MultiBlockMaskCollator(truncate=False, **kw)
    trunc = MultiBlockMaskCollator(truncate=True, **kw)
    for _ in range(2):
        _, enc_r, pred_r = ragged(batch(bs, 4))
        _, enc_t, pred_t = trunc(batch(bs, 4))
        for rag, tru in ((enc_r, enc_t), (pred_r, pred_t)):
            keep = min(len(m) for masks in rag for m in masks)
            assert len(tru) == len(rag)
            for masks, t in zip(rag, tru):
                assert t.dtype == torch.int64 and tuple(t.shape) == (bs, keep)
                assert keep > kw["min_keep"]
                for b in range(bs):
                    assert t[b].tolist() == masks[b][:keep].tolist()


@settings(max_examples=60)
@given(kw=collator_settings(), bs=st.integers(1, 3), epoch=st.integers(0, 1000), start=st.integers(0, 5),
       truncate=st.booleans())
def test_masks_are_a_function_of_seed_epoch_and_batch_index(kw, bs, epoch, start, truncate):
    """Reproducibility (module docstring): batch i of an epoch is ``sample_masks(B, generator_for(i))``, whatever
    collated it: two collators of the same settings give the same masks call after call; a fresh collator told
    ``set_epoch(epoch, start_batch=start)`` gives batch ``start`` of that epoch; and ``sample_masks`` on two
    generators in the same state gives the same masks (all randomness comes from that generator)."""
    a = MultiBlockMaskCollator(truncate=truncate, **kw)
    b = MultiBlockMaskCollator(truncate=truncate, **kw)
    a.set_epoch(epoch)
    b.set_epoch(epoch)
    seq_a = [a(batch(bs, 4)) for _ in range(start + 1)]
    seq_b = [b(batch(bs, 4)) for _ in range(start + 1)]
    for (_, ea, pa), (_, eb, pb) in zip(seq_a, seq_b):
        assert _same(ea + pa, eb + pb)
    resumed = MultiBlockMaskCollator(truncate=truncate, **kw)
    resumed.set_epoch(epoch, start_batch=start)
    _, e_r, p_r = resumed(batch(bs, 4))
    assert _same(seq_a[start][1] + seq_a[start][2], e_r + p_r)
    # the ragged masks of that batch are sample_masks on the batch's generator, blocks regrouped
    enc, pred = a.sample_masks(bs, a.generator_for(start))
    ragged = [[img[j] for img in enc] for j in range(kw["nenc"])] + [[img[k] for img in pred]
                                                                      for k in range(kw["npred"])]
    if truncate:
        ragged = [torch.stack([m[:t.shape[1]] for m in masks]) for masks, t in
                  zip(ragged, seq_a[start][1] + seq_a[start][2])]
    assert _same(ragged, seq_a[start][1] + seq_a[start][2])
    # the generator is the only source of randomness: the same state, the same masks, whatever the global RNG
    # (the official collator placed the blocks with it)
    g1 = torch.Generator().manual_seed(kw["seed"])
    g2 = torch.Generator()
    g2.set_state(g1.get_state())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        m1 = a.sample_masks(bs, g1)
        torch.manual_seed(2)
        m2 = a.sample_masks(bs, g2)
    assert all(_same(x, y) for x, y in zip(m1[0] + m1[1], m2[0] + m2[1]))


@settings(max_examples=40)
@given(kw=collator_settings(max_grid=5), workers=st.integers(1, 4), start=st.integers(0, 5),
       epoch=st.integers(0, 3), calls=st.integers(1, 3))
def test_a_workers_batches_are_the_global_batches_it_takes(kw, workers, start, epoch, calls):
    """Worker numbering (module docstring: "workers take batches round-robin"): in worker w of n, after
    ``set_epoch(epoch, start)``, the j-th batch the worker collates has the masks of global batch
    ``start + w + j·n``, those a single process collates as its batch of that index; so the masks do not
    depend on the number of workers, and a resume at ``start`` continues the sequence."""
    single = MultiBlockMaskCollator(truncate=False, **kw)
    single.set_epoch(epoch)
    sequence = [single(batch(2, 4))[1:] for _ in range(start + workers * calls)]
    for w in range(workers):
        c = MultiBlockMaskCollator(truncate=False, **kw)  # the worker's copy, as the main process held it
        c.set_epoch(epoch, start_batch=start)
        info = SimpleNamespace(id=w, num_workers=workers)
        with mock.patch("stop_kernels.data.masks.get_worker_info", lambda: info):
            for j in range(calls):
                assert _same(list(c(batch(2, 4))[1:]), list(sequence[start + w + j * workers])), (w, j)


def _same(xs, ys) -> bool:
    """Equal lists of masks: tensors (``torch.equal``) or lists of tensors, nested alike."""
    if isinstance(xs, torch.Tensor):
        return isinstance(ys, torch.Tensor) and torch.equal(xs, ys)
    return len(xs) == len(ys) and all(_same(x, y) for x, y in zip(xs, ys))


@settings(max_examples=40)
@given(kw=collator_settings(min_grid=6, max_grid=10, pred_max=0.25, aspect=(0.5, 2.0)),
       bs=st.integers(2, 4))
def test_consecutive_batches_epochs_and_seeds_draw_other_masks(kw, bs):
    """Masks vary: four consecutive batches are not all the same, nor batch 0 of two epochs, nor of two seeds.
    Only where blocks have room to move: on a grid of 6+ patches per side, target blocks of at most a quarter
    of it (aspect ratio in [0.5, 2]: each side leaves >= 2 positions), so each batch places >= 2 targets with
    >= 4 positions each (a 2x2 grid has one position per block: every batch is the same there)."""
    kw["npred"] = max(kw["npred"], 2)
    c = MultiBlockMaskCollator(truncate=False, **kw)
    runs = [c(batch(bs, 4))[2] for _ in range(4)]
    assert not all(_same(runs[0], r) for r in runs[1:]), "every batch drew the same target masks"
    other_epoch = MultiBlockMaskCollator(truncate=False, **kw)
    other_epoch.set_epoch(1)
    other_seed = MultiBlockMaskCollator(truncate=False, **{**kw, "seed": kw["seed"] + 1})
    assert not _same(runs[0], other_epoch(batch(bs, 4))[2])
    assert not _same(runs[0], other_seed(batch(bs, 4))[2])


@settings(max_examples=150)
@given(kw=collator_settings(max_grid=16), r=st.integers(0, 2 ** 24 - 1))
def test_smallest_block_bounds_every_draw_and_min_keep_is_checked_against_it(kw, r):
    """``smallest_block`` (README: min_keep is "checked at start-up against the smallest block the mask scales can
    draw") is no larger than the block of any draw ``torch.rand`` can return (multiples of 2⁻²⁴ in [0, 1)), for
    both the target and the context settings; and the constructor accepts ``min_keep`` just below the smaller of
    the two smallest blocks and refuses it (ValueError naming min_keep) at that size."""
    c = MultiBlockMaskCollator(**{**kw, "min_keep": 0})
    u = r / 2 ** 24
    for scale, ar in ((c.pred_mask_scale, c.aspect_ratio), (c.enc_mask_scale, (1.0, 1.0))):
        sh, sw = c.smallest_block(scale, ar)
        h, w = c._block_size(u, scale, ar)
        assert 1 <= h < c.height and 1 <= w < c.width
        assert h * w >= sh * sw, (u, (h, w), (sh, sw))
    smallest = min(h * w for h, w in (c.smallest_block(c.pred_mask_scale, c.aspect_ratio),
                                      c.smallest_block(c.enc_mask_scale, (1.0, 1.0))))
    MultiBlockMaskCollator(**{**kw, "min_keep": smallest - 1})
    if smallest < c.height * c.width:  # (min_keep >= H·W is refused by the range check, also naming min_keep)
        with pytest.raises(ValueError, match="^min_keep: the smallest"):
            MultiBlockMaskCollator(**{**kw, "min_keep": smallest})


def _smallest_over_every_draw(c, scale, ar, chunk: int = 2 ** 20):
    """The fewest patches of a block over every draw ``torch.rand`` can return (the 2²⁴ multiples of 2⁻²⁴ in
    [0, 1)): the official formula vectorised in float64 (the same IEEE operations as the scalar code; torch.round
    and Python's round both round half to even), independent of ``smallest_block``'s breakpoint search."""
    best = None
    for lo in range(0, 2 ** 24, chunk):
        r = torch.arange(lo, lo + chunk, dtype=torch.float64) / 2 ** 24
        keep = torch.floor(c.height * c.width * (scale[0] + r * (scale[1] - scale[0])))
        a = ar[0] + r * (ar[1] - ar[0])
        h = torch.round(torch.sqrt(keep * a)).clamp_(1, c.height - 1)
        w = torch.round(torch.sqrt(keep / a)).clamp_(1, c.width - 1)
        area = int((h * w).min())
        best = area if best is None else min(best, area)
    return best


@settings(max_examples=3)
@given(kw=collator_settings(max_grid=16, aspect=(0.1, 10.0)))
# where the draw 0 is not the smallest block: a 3x9 piece about 1e-4 wide between 3x10 ones (test_masks), and
# random settings rarely (~8 %) have a dip at all
@example(kw=dict(input_size=224, patch_size=16, pred_mask_scale=(0.15, 0.4), aspect_ratio=(0.3, 1.0)))
def test_smallest_block_is_the_smallest_block_of_any_draw(kw):
    """Exhaustively (every float32 uniform draw), the target block ``smallest_block`` reports is the smallest
    any batch can draw: not larger (a narrow piece missed would let a run fail hours in, at the first batch that
    draws it), and not smaller (the constructor would refuse a min_keep no batch can violate). The context
    block (aspect ratio 1) grows with the draw: its smallest is the draw 0's."""
    c = MultiBlockMaskCollator(**{**kw, "min_keep": 0})
    sh, sw = c.smallest_block(c.pred_mask_scale, c.aspect_ratio)
    assert sh * sw == _smallest_over_every_draw(c, c.pred_mask_scale, c.aspect_ratio)
    assert c.smallest_block(c.enc_mask_scale, (1.0, 1.0)) == c._block_size(0.0, c.enc_mask_scale, (1.0, 1.0))


@settings(max_examples=100)
@given(kw=collator_settings(max_grid=8), H=st.integers(2, 9), W=st.integers(2, 9), bs=st.integers(1, 3))
def test_the_sampler_handles_rectangular_grids(kw, H, W, bs):
    """The official collator takes an (H, W) input size; this module's constructor takes square images only,
    but its sampler works per axis (``height``, ``width``: caps, positions, row-major indices). On an H x W grid
    (set on a built collator): indices in [0, H·W), one target rectangle per batch within the grid (neither
    the last row nor the last column), contexts its block minus the targets, each mask above min_keep."""
    c = MultiBlockMaskCollator(truncate=False, **kw)
    c.height, c.width = H, W
    smallest = min(h * w for h, w in (c.smallest_block(c.pred_mask_scale, c.aspect_ratio),
                                      c.smallest_block(c.enc_mask_scale, (1.0, 1.0))))
    c.min_keep = min(kw["min_keep"], smallest - 1)
    g = c.generator_for(0)
    p_size = c._block_size(torch.rand(1, generator=g).item(), c.pred_mask_scale, c.aspect_ratio)
    e_size = c._block_size(torch.rand(1, generator=g).item(), c.enc_mask_scale, (1.0, 1.0))
    with _Drops() as drops:
        enc, pred = c.sample_masks(bs, c.generator_for(0))
    needed = 0
    for b in range(bs):
        for m in enc[b] + pred[b]:
            assert len(m) > c.min_keep and 0 <= int(m.min()) and int(m.max()) < H * W
        targets = [set(m.tolist()) for m in pred[b]]
        for m in pred[b]:
            assert _rect(m, W) == p_size
            assert int((m // W).max()) < H - 1 and int((m % W).max()) < W - 1
        for m in enc[b]:
            d = _context_drops(set(m.tolist()), targets, e_size, H, W)
            assert d is not None
            needed += 0 if kw["allow_overlap"] else d
    assert needed <= drops.count


_SCALES = ("enc_mask_scale", "pred_mask_scale")


@settings(max_examples=150)
@given(which=st.sampled_from(["scale", "aspect", "count", "min_keep", "grid", "type"]), data=st.data())
def test_bad_settings_are_refused_and_named(which, data):
    """Settings outside the documented ranges raise at construction, ``ValueError`` (a value) or ``TypeError`` (a
    kind), the message starting with the argument's name: a scale pair outside [0, 1] or reversed, an aspect
    ratio pair outside [1e-3, 1e3] or reversed, ``npred`` / ``nenc`` < 1, ``min_keep`` negative or not below
    H·W, a patch grid below 2x2 or an image size that is not a multiple of the patch size, and settings of the
    wrong kind (a scalar scale, a float count, a bool min_keep, a non-bool flag)."""
    name, kw, exc = None, {}, ValueError
    if which == "scale":
        name = data.draw(st.sampled_from(_SCALES))
        out = data.draw(st.one_of(st.floats(max_value=0.0, exclude_max=True),
                                  st.floats(min_value=1.0, exclude_min=True), st.just(float("nan"))))
        a, b = data.draw(st.floats(0.0, 1.0)), data.draw(st.floats(0.0, 1.0))
        assume(a != b)
        kw[name] = data.draw(st.sampled_from([(out, a), (a, out), (out, out), (max(a, b), min(a, b))]))
    elif which == "aspect":
        name = "aspect_ratio"
        lo, hi = data.draw(st.floats(1e-3, 1e3)), data.draw(st.floats(1e-3, 1e3))
        assume(lo != hi)
        kw[name] = data.draw(st.sampled_from([(max(lo, hi), min(lo, hi)), (0.0, hi), (lo, 1e4), (-1.0, hi)]))
    elif which == "count":
        name = data.draw(st.sampled_from(["npred", "nenc"]))
        kw[name] = data.draw(st.integers(max_value=0))
    elif which == "min_keep":
        name = "min_keep"
        grid = data.draw(st.integers(2, 8))
        kw = dict(input_size=grid * 4, patch_size=4,
                  min_keep=data.draw(st.one_of(st.integers(max_value=-1), st.integers(min_value=grid * grid))))
    elif which == "grid":
        name = "input_size"
        patch = data.draw(st.integers(1, 16))
        size = data.draw(st.one_of(st.integers(1, 2 * patch - 1), st.integers(1, 64).map(lambda k: k * patch + 1)))
        assume(size % patch or size // patch < 2)
        kw = dict(input_size=size, patch_size=patch)
    else:
        exc = TypeError
        name, value = data.draw(st.sampled_from([
            ("enc_mask_scale", 0.9), ("pred_mask_scale", (0.1,)), ("aspect_ratio", ("a", 1.0)),
            ("pred_mask_scale", (True, 0.2)), ("npred", 2.0), ("nenc", True), ("min_keep", True),
            ("min_keep", 1.5), ("seed", 0.5), ("seed", "1"), ("allow_overlap", 1), ("truncate", "no")]))
        kw[name] = value
    with pytest.raises(exc, match=f"^{name}:"):
        MultiBlockMaskCollator(**kw)


@settings(max_examples=80)
@given(kw=collator_settings(), bs=st.integers(1, 4), truncate=st.booleans(), image=st.integers(0, 3),
       above=st.booleans())
def test_collated_masks_pass_the_packed_checks(kw, bs, truncate, image, above):
    """The collator's ragged output is what the packed path takes: ``is_ragged``, every block accepted by
    ``check_ragged`` (B non-empty 1-D index tensors within [0, H·W)), ``mean_tokens`` the mean length per
    image of the first mask; truncated output is not ragged and its ``mean_tokens`` is the row length. One
    index moved out of range (H·W or −1) is refused by ``check_ragged``, naming the image."""
    c = MultiBlockMaskCollator(truncate=truncate, **kw)
    P = c.height * c.width
    _, enc, pred = c(batch(bs, 4))
    assert is_ragged(enc) is (not truncate) and is_ragged(pred) is (not truncate)
    if truncate:
        assert mean_tokens(enc) == enc[0].shape[1]
        return
    assert mean_tokens(enc) == pytest.approx(sum(len(m) for m in enc[0]) / bs)
    for k, masks in enumerate(enc + pred):
        assert check_ragged(f"m{k}", masks, bs, P) == list(masks)
    b = image % bs
    bad = list(pred[0])
    bad[b] = bad[b].clone()
    bad[b][-1] = P if above else -1
    with pytest.raises(ValueError, match=rf"^tgt\[{b}\]: values"):
        check_ragged("tgt", bad, bs, P)


# ------------------------------------------------------------------------------------------------ packing
_LENGTHS = st.lists(st.integers(0, 6), min_size=0, max_size=8)


@settings(max_examples=100)
@given(lengths=_LENGTHS)
def test_cu_seqlens_are_the_running_sums(lengths):
    """``cu_seqlens`` of any lengths (zeros included): int32, ``n + 1`` offsets starting at 0 and ending at the
    token count, consecutive differences the lengths (strictly increasing over a non-empty sequence, flat over
    an empty one), and accepted by the attention kernels' offset check, which returns the longest length."""
    cu = _cu(lengths, "cpu")
    assert cu.dtype == torch.int32 and cu.shape == (len(lengths) + 1,)
    offs = cu.tolist()
    assert offs[0] == 0 and offs[-1] == sum(lengths)
    assert [b - a for a, b in zip(offs, offs[1:])] == lengths
    assert chk.packed_offsets("cu_seqlens", offs, sum(lengths)) == max(lengths, default=0)


@st.composite
def ragged_lengths(draw, min_len: int = 1):
    """(context lengths per image, target lengths [npred][B]) of a ragged batch."""
    B = draw(st.integers(1, 4))
    npred = draw(st.integers(1, 3))
    ctx = draw(st.lists(st.integers(min_len, 6), min_size=B, max_size=B))
    tgt = [draw(st.lists(st.integers(min_len, 5), min_size=B, max_size=B)) for _ in range(npred)]
    return ctx, tgt


@settings(max_examples=100)
@given(lens=ragged_lengths(), D=st.integers(1, 3))
def test_predictor_layout_packs_and_unpacks_the_sequences(lens, D):
    """Pack then unpack is the identity: with rows ``cat([context rows of every image, masked rows in (k, b, t)
    order])``, the packed tokens ``rows[src]`` split at ``cu_seqlens`` are, for sequence ``s = k·B + b``, image
    b's context followed by its k-th block's masked rows; ``tgt_rows`` picks every masked row back, once each,
    in order; ``cu_seqlens`` holds the ``nc + nt`` lengths and ``max_seqlen`` the longest. When no length
    is ragged the packed tokens are the rectangular predictor input (``join_predictor_rows``) flattened."""
    ctx_len, tgt_len = lens
    B, npred = len(ctx_len), len(tgt_len)
    # every row its own values (its number): a row put in the wrong place, or twice, shows
    n_ctx, n_tgt = sum(ctx_len), sum(n for blocks in tgt_len for n in blocks)
    rows = torch.arange((n_ctx + n_tgt) * D, dtype=torch.float64).reshape(-1, D)
    ctx = list(rows[:n_ctx].split(ctx_len))
    flat = list(rows[n_ctx:].split([n for blocks in tgt_len for n in blocks]))
    masked = [flat[k * B:(k + 1) * B] for k in range(npred)]
    lay = predictor_layout(ctx_len, tgt_len, "cpu")
    z = rows[lay.src]
    offs = lay.cu_seqlens.tolist()
    assert lay.cu_seqlens.dtype == torch.int32 and len(offs) == npred * B + 1
    assert chk.packed_offsets("cu", offs, z.shape[0]) == lay.max_seqlen
    for k in range(npred):
        for b in range(B):
            s = k * B + b
            assert torch.equal(z[offs[s]:offs[s + 1]], torch.cat([ctx[b], masked[k][b]]))
    assert torch.equal(z[lay.tgt_rows], torch.cat([m for blocks in masked for m in blocks]))
    assert lay.max_seqlen == max(ctx_len[b] + tgt_len[k][b] for k in range(npred) for b in range(B))
    if len(set(ctx_len)) == 1 and len({n for blocks in tgt_len for n in blocks}) == 1:
        x = torch.stack(ctx)
        m = torch.stack([torch.stack(blocks) for blocks in masked])
        want = reference.join_predictor_rows(x, m)
        assert torch.equal(z, want.reshape(-1, D))


@settings(max_examples=30)
@given(lens=ragged_lengths())
def test_predictor_layout_refuses_a_block_list_of_another_batch(lens):
    """A target block listing another number of images than the context is refused, naming that block."""
    ctx_len, tgt_len = lens
    k = len(tgt_len) - 1
    tgt_len = tgt_len[:k] + [tgt_len[k] + [1]]
    with pytest.raises(ValueError, match=rf"^tgt_idx\[{k}\]: expected {len(ctx_len)} per-image masks"):
        predictor_layout(ctx_len, tgt_len, "cpu")


_MODELS = {}


def _models(grid: int):
    """A small float64 encoder and mask-token predictor (one block each, widths 16 and 8) on a ``grid`` x ``grid``
    patch grid of 4 px patches, built once per grid: the properties need their arithmetic, not their scale."""
    if grid not in _MODELS:
        with torch.random.fork_rng(devices=[]):  # (the same weights whichever test builds them first)
            torch.manual_seed(0)
            enc = VisionTransformer(img_size=grid * 4, patch_size=4, embed_dim=16, depth=1, num_heads=2)
            pred = VisionTransformerPredictor(num_patches=grid * grid, embed_dim=16, predictor_embed_dim=8, depth=1,
                                              num_heads=2, noise_mode="none")
        _MODELS[grid] = enc.double().eval(), pred.double().eval()
    return _MODELS[grid]


@settings(max_examples=20)
@given(kw=collator_settings(max_grid=6), bs=st.integers(1, 3))
def test_packed_encoder_and_predictor_equal_each_sequence_alone(kw, bs):
    """On ragged masks from the collator (no patch dropped), the packed encoder (block-diagonal attention) gives
    each image's tokens exactly as the rectangular encoder run on that image and its mask alone, with
    ``cu_seqlens``, ``lengths`` and ``max_seqlen`` describing the masks; the packed predictor gives, in
    (k, b, t) order, the rectangular predictor's output for each (image, target block) alone. Where the masks
    happen to be of one length the packed tokens are the rectangular batch, flattened."""
    grid = kw["input_size"] // kw["patch_size"]
    enc, pred = _models(grid)
    c = MultiBlockMaskCollator(truncate=False, **{**kw, "input_size": grid * 4, "patch_size": 4})
    g = torch.Generator().manual_seed(kw["seed"])
    (imgs, _), menc, mpred = c([(torch.randn(3, grid * 4, grid * 4, dtype=torch.float64, generator=g), 0)
                                for _ in range(bs)])
    ctx = menc[0]
    with torch.no_grad():
        packed = encode_packed(enc, imgs, ctx)
        lengths = [len(m) for m in ctx]
        assert packed.lengths == tuple(lengths) and packed.max_seqlen == max(lengths)
        assert packed.cu_seqlens.tolist() == _cu(lengths, "cpu").tolist()
        offs = packed.cu_seqlens.tolist()
        alone = [enc(imgs[b:b + 1], ctx[b][None]) for b in range(bs)]
        for b in range(bs):
            torch.testing.assert_close(packed.tokens[offs[b]:offs[b + 1]], alone[b][0])
        if len(set(lengths)) == 1:
            torch.testing.assert_close(packed.tokens, enc(imgs, torch.stack(ctx)).reshape(-1, 16))
        out = predict_packed(pred, packed, ctx, mpred)
        want = torch.cat([pred(alone[b], [ctx[b][None]], [blocks[b][None]])[0]
                          for blocks in mpred for b in range(bs)])
        torch.testing.assert_close(out, want)


@st.composite
def ragged_masks(draw, P_max: int = 16):
    """(h[B, P, E], ragged target blocks [npred][B] of distinct indices < P, or, with ``rect``, of one length)."""
    B, P, E = draw(st.integers(1, 3)), draw(st.integers(1, P_max)), draw(st.integers(1, 4))
    npred = draw(st.integers(1, 3))
    rect = draw(st.booleans())
    n = draw(st.integers(1, P))
    blocks = []
    for _ in range(npred):
        blocks.append([torch.tensor(sorted(draw(st.sets(st.integers(0, P - 1), min_size=1 if not rect else n,
                                                        max_size=P if not rect else n))), dtype=torch.int64)
                       for _ in range(B)])
    seed = draw(st.integers(0, 2 ** 31))
    h = torch.randn(B, P, E, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return h, blocks, rect


@settings(max_examples=80)
@given(case=ragged_masks())
def test_packed_targets_equal_the_per_image_target_features(case):
    """``packed_targets`` over ragged blocks is, in (k, b, t) order, ``target_features`` of each image and block
    alone; when every block has one length it is ``target_features`` of the stacked ``[npred]`` x ``[B, Nt]``
    masks, flattened (the packed and the rectangular targets are the same rows)."""
    h, blocks, rect = case
    E = h.shape[-1]
    got = packed_targets(h, blocks)
    want = torch.cat([reference.target_features(h[b:b + 1], [m[None]])[0]
                      for masks in blocks for b, m in enumerate(masks)])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if rect:
        stacked = [torch.stack(masks) for masks in blocks]
        torch.testing.assert_close(got, reference.target_features(h, stacked).reshape(-1, E), rtol=0, atol=0)


@settings(max_examples=80)
@given(B=st.integers(1, 3), N=st.integers(1, 8), C=st.integers(1, 3), npred=st.integers(1, 3),
       K=st.integers(0, 5), seed=st.integers(0, 2 ** 31))
def test_gather_tokens_puts_block_k_of_image_b_at_row_k_B_plus_b(B, N, C, npred, K, seed):
    """``gather_tokens(x, idx[npred, B, K])`` row ``k·B + b`` is ``x[b, idx[k, b]]`` (the official ``apply_masks``,
    any K, 0 included); a 2-D ``idx[B, K]`` is the one-block case; ``stack_target_indices`` stacks a list of
    ``[B, K]`` blocks into that ``[npred, B, K]`` tensor and returns a stacked tensor as is; ``target_features``
    is the same gather of the LayerNorm'd features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, C, dtype=torch.float64, generator=g)
    idx = torch.randint(0, N, (npred, B, K), generator=g)
    out = reference.gather_tokens(x, idx)
    assert out.shape == (npred * B, K, C)
    for k in range(npred):
        for b in range(B):
            assert torch.equal(out[k * B + b], x[b, idx[k, b]])
    assert torch.equal(reference.gather_tokens(x, idx[0]), reference.gather_tokens(x, idx[:1]))
    assert torch.equal(reference.stack_target_indices(list(idx)), idx)
    assert reference.stack_target_indices(idx) is idx
    ln = torch.nn.functional.layer_norm(x, (C,))
    torch.testing.assert_close(reference.target_features(x, list(idx)), reference.gather_tokens(ln, idx),
                               rtol=0, atol=0)


@settings(max_examples=40)
@given(npred=st.integers(2, 4), B=st.integers(1, 3), K=st.integers(1, 4), data=st.data())
def test_stack_target_indices_refuses_blocks_that_do_not_stack(npred, B, K, data):
    """Target blocks of different shapes, or of a float dtype, or no block at all are refused naming the first
    offending block (``tgt_idx[i]``), not a bare ``torch.stack`` error."""
    blocks = [torch.zeros(B, K, dtype=torch.int64) for _ in range(npred)]
    i = data.draw(st.integers(1, npred - 1))
    how = data.draw(st.sampled_from(["shape", "dtype"]))
    if how == "shape":
        blocks[i] = torch.zeros(B, K + data.draw(st.integers(1, 3)), dtype=torch.int64)
        with pytest.raises(ValueError, match=rf"^tgt_idx\[{i}\]: expected shape"):
            reference.stack_target_indices(blocks)
    else:
        blocks[i] = blocks[i].float()
        with pytest.raises(TypeError, match=rf"^tgt_idx\[{i}\]: expected dtype"):
            reference.stack_target_indices(blocks)
    with pytest.raises(TypeError, match="^tgt_idx: expected a non-empty list"):
        reference.stack_target_indices([])


@settings(max_examples=60)
@given(lengths=st.lists(st.integers(0, 5), min_size=1, max_size=5), H=st.integers(1, 2), Dh=st.integers(1, 4),
       seed=st.integers(0, 2 ** 31))
def test_packed_attention_equals_each_sequence_alone(lengths, H, Dh, seed):
    """Attention over a packed ``[T, H, Dh]`` layout with ``cu_seqlens`` (empty sequences included, even all) is each
    sequence's own attention, as a batch of one: the reference and the models' dispatch (SDPA on the CPU) agree
    with that; and when every sequence has one length the packed result is the batched ``[B, N, H, Dh]``
    attention flattened."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(T, H, Dh, dtype=torch.float64, generator=g) for _ in range(3))
    cu = _cu(lengths, "cpu")
    offs = cu.tolist()
    # (no sequence with a token, T = 0: an empty result)
    want = torch.cat([reference.attention(q[None, a:b], k[None, a:b], v[None, a:b])[0]
                      for a, b in zip(offs, offs[1:]) if b > a] or [q.new_zeros(0, H, Dh)])
    torch.testing.assert_close(reference.attention(q, k, v, cu_seqlens=cu), want)
    torch.testing.assert_close(dispatch_attention(q, k, v, cu_seqlens=cu, max_seqlen=max(lengths), backend="sdpa"),
                               want)
    if len(set(lengths)) == 1 and T:
        n = lengths[0]
        batched = reference.attention(*(t.reshape(len(lengths), n, H, Dh) for t in (q, k, v)))
        torch.testing.assert_close(reference.attention(q, k, v, cu_seqlens=cu), batched.reshape(T, H, Dh))
