"""The reference ops against explicit loops (the official code's formulation), and their bad inputs."""
import math

import pytest
import torch
import torch.nn.functional as F

from stop_kernels import reference as R

DT = torch.float64


def rand_idx(shape, P, g):
    return torch.randint(0, P, shape, generator=g)


def test_stop_embed_matches_loop():
    g = torch.Generator().manual_seed(1)
    P, D, E = 17, 6, 5
    pos = torch.randn(P, D, dtype=DT, generator=g)
    W = torch.randn(D, E, dtype=DT, generator=g)
    b = torch.randn(D, dtype=DT, generator=g)
    idx = rand_idx((2, 3, 4), P, g)
    n = torch.randn(2, 3, 4, E, dtype=DT, generator=g)
    out = R.stop_embed(pos, idx, W, b, n)
    assert out.shape == (2, 3, 4, D)
    for i in range(2):
        for j in range(3):
            for m in range(4):
                for d in range(D):
                    want = pos[idx[i, j, m], d] + b[d] + sum(n[i, j, m, e] * W[d, e] for e in range(E))
                    assert math.isclose(out[i, j, m, d].item(), want.item(), rel_tol=1e-12, abs_tol=1e-12)
    # bias None
    torch.testing.assert_close(R.stop_embed(pos, idx, W, None, n), out - b)


def official_assembly(ctx, ctx_idx, tgt_list, W, b, pos, masked_fn):
    """The official predictor's input code, written out with apply_masks / repeat / cat."""
    B = ctx.shape[0]

    def apply_masks(x, masks):
        return torch.cat([torch.gather(x, 1, m.unsqueeze(-1).repeat(1, 1, x.size(-1))) for m in masks], 0)

    x = F.linear(ctx, W, b)
    x = x + apply_masks(pos.unsqueeze(0).repeat(B, 1, 1), [ctx_idx])
    pos_embs = apply_masks(pos.unsqueeze(0).repeat(B, 1, 1), tgt_list)
    pred_tokens = masked_fn(pos_embs)
    x = x.repeat(len(tgt_list), 1, 1)
    return torch.cat([x, pred_tokens], dim=1)


@pytest.mark.parametrize("mode", ["learned", "isotropic", "none"])
@pytest.mark.parametrize("npred", [1, 4])
def test_assembly_matches_official_formulation(mode, npred):
    g = torch.Generator().manual_seed(2)
    B, Nc, Nt, E, D, P = 3, 5, 4, 7, 6, 25
    ctx = torch.randn(B, Nc, E, dtype=DT, generator=g)
    ctx_idx = rand_idx((B, Nc), P, g)
    tgt = [rand_idx((B, Nt), P, g) for _ in range(npred)]
    W = torch.randn(D, E, dtype=DT, generator=g)
    b = torch.randn(D, dtype=DT, generator=g)
    pos = torch.randn(P, D, dtype=DT, generator=g)
    tok = torch.randn(1, 1, D, dtype=DT, generator=g)
    noise = torch.randn(npred, B, Nt, E if mode == "learned" else D, dtype=DT, generator=g)
    fns = {
        "learned": lambda pe: F.linear(noise.reshape(npred * B, Nt, E), W, b) + pe,
        "isotropic": lambda pe: pe + noise.reshape(npred * B, Nt, D),
        "none": lambda pe: tok.repeat(pe.shape[0], pe.shape[1], 1) + pe,
    }
    want = official_assembly(ctx, ctx_idx, tgt, W, b, pos, fns[mode])
    got = R.assemble_predictor_input(ctx, ctx_idx, tgt, W, b, pos, noise_mode=mode, mask_token=tok,
                                     noise=None if mode == "none" else noise)
    assert got.shape == (npred * B, Nc + Nt, D)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # stacked [npred, B, Nt] indices give the same result
    got2 = R.assemble_predictor_input(ctx, ctx_idx, torch.stack(tgt), W, b, pos, noise_mode=mode, mask_token=tok,
                                      noise=None if mode == "none" else noise)
    torch.testing.assert_close(got2, got, rtol=0, atol=0)


@pytest.mark.parametrize("mode,std", [("learned", 0.3), ("isotropic", 0.2), ("isotropic", 0.5)])
def test_assembly_draws_noise_with_std(mode, std):
    """Masked rows carry n ~ N(0, σ² I) with the σ given: the learned mode's n·Wᵀ seen through W = I, the
    isotropic ablation's n (in the predictor width) through a random W; the context rows carry no noise."""
    g = torch.Generator().manual_seed(3)
    B, Nc, Nt, npred, E, D, P = 32, 2, 50, 2, 8, 8, 60
    ctx = torch.randn(B, Nc, E, dtype=DT, generator=g)
    ctx_idx = rand_idx((B, Nc), P, g)
    tgt = rand_idx((npred, B, Nt), P, g)
    pos = torch.randn(P, D, dtype=DT, generator=g)
    W = torch.eye(D, dtype=DT) if mode == "learned" else torch.randn(D, E, dtype=DT, generator=g)
    out = R.assemble_predictor_input(ctx, ctx_idx, tgt, W, None, pos, noise_mode=mode, noise_std=std, generator=g)
    n = out[:, Nc:] - pos[tgt.reshape(npred * B, Nt)]
    # 2·32·50·8 = 25600 samples: the std estimate has relative error ~ 1/sqrt(2·25600) ≈ 0.4%; allow 5 sigma
    assert abs(n.std().item() / std - 1) < 5 / math.sqrt(2 * n.numel())
    assert abs(n.mean().item()) < 5 * std / math.sqrt(n.numel())
    torch.testing.assert_close(out[:B, :Nc], F.linear(ctx, W) + pos[ctx_idx], rtol=1e-12, atol=1e-12)


def test_attention_matches_loop():
    g = torch.Generator().manual_seed(4)
    B, N, H, Dh = 2, 5, 3, 4
    q, k, v = (torch.randn(B, N, H, Dh, dtype=DT, generator=g) for _ in range(3))
    out = R.attention(q, k, v)
    for b in range(B):
        for h in range(H):
            s = q[b, :, h] @ k[b, :, h].T / math.sqrt(Dh)
            p = torch.exp(s - s.max(1, keepdim=True).values)
            p = p / p.sum(1, keepdim=True)
            torch.testing.assert_close(out[b, :, h], p @ v[b, :, h], rtol=1e-12, atol=1e-12)
    # float32 inputs are computed in float32 and returned in their dtype
    assert R.attention(q.float(), k.float(), v.float()).dtype == torch.float32
    assert R.attention(q.bfloat16(), k.bfloat16(), v.bfloat16()).dtype == torch.bfloat16


def test_attention_varlen_is_block_diagonal():
    g = torch.Generator().manual_seed(5)
    lens = [1, 4, 3]
    T, H, Dh = sum(lens), 2, 8
    q, k, v = (torch.randn(T, H, Dh, dtype=DT, generator=g) for _ in range(3))
    cu = torch.tensor([0, 1, 5, 8], dtype=torch.int32)
    out = R.attention(q, k, v, cu_seqlens=cu)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        torch.testing.assert_close(out[a:b], R.attention(q[None, a:b], k[None, a:b], v[None, a:b])[0])


def test_gather_and_targets():
    g = torch.Generator().manual_seed(6)
    h = torch.randn(3, 10, 4, dtype=DT, generator=g)
    masks = [rand_idx((3, 2), 10, g) for _ in range(2)]
    out = R.target_features(h, masks)
    hn = F.layer_norm(h, (4,))
    for k in range(2):
        for b in range(3):
            torch.testing.assert_close(out[k * 3 + b], hn[b, masks[k][b]])


def test_sincos_table_formula():
    emb = R.sincos_pos_embed_2d(8, 3)
    assert emb.shape == (9, 8) and emb.dtype == torch.float32
    # position (row 1, col 2) = index 5: first half encodes the column, second the row
    omega = [1.0, 0.01]
    col, row = 2.0, 1.0
    want = [math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega] + \
           [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega]
    torch.testing.assert_close(emb[5], torch.tensor(want), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------ bad input
def _assembly_args(**over):
    g = torch.Generator().manual_seed(7)
    B, Nc, Nt, E, D, P = 2, 3, 2, 5, 4, 9
    a = dict(ctx=torch.randn(B, Nc, E, generator=g), ctx_idx=rand_idx((B, Nc), P, g),
             tgt_idx=[rand_idx((B, Nt), P, g)], weight=torch.randn(D, E, generator=g),
             bias=torch.randn(D, generator=g), pos_embed=torch.randn(P, D, generator=g))
    kw = dict(noise_mode="learned", noise_std=0.25, mask_token=None)
    for k, v in over.items():
        (kw if k in kw else a)[k] = v
    return a, kw


@pytest.mark.parametrize("over, exc, name", [
    (dict(ctx=torch.randn(2, 3)), ValueError, "ctx"),
    (dict(ctx_idx=torch.zeros(2, 3)), TypeError, "ctx_idx"),
    (dict(ctx_idx=torch.full((2, 3), 9)), ValueError, "ctx_idx"),
    (dict(ctx_idx=torch.full((2, 3), -1)), ValueError, "ctx_idx"),
    (dict(ctx_idx=torch.zeros(2, 4, dtype=torch.long)), ValueError, "ctx_idx"),
    (dict(tgt_idx=[torch.full((2, 2), 9)]), ValueError, "tgt_idx"),
    (dict(tgt_idx=[torch.zeros(3, 2, dtype=torch.long)]), ValueError, "tgt_idx"),
    (dict(tgt_idx=[]), TypeError, "tgt_idx"),
    (dict(weight=torch.randn(4, 6)), ValueError, "weight"),
    (dict(pos_embed=torch.randn(9, 5)), ValueError, "pos_embed"),
    (dict(bias=torch.randn(5)), ValueError, "bias"),
    (dict(noise_std=-0.1), ValueError, "noise_std"),
    (dict(noise_std=float("nan")), ValueError, "noise_std"),
    (dict(noise_mode="gaussian"), ValueError, "noise_mode"),
    (dict(noise_mode="none"), ValueError, "mask_token"),
    (dict(noise_mode="none", mask_token=torch.randn(3)), ValueError, "mask_token"),
])
def test_assembly_bad_input(over, exc, name):
    a, kw = _assembly_args(**over)
    with pytest.raises(exc, match=f"^{name}:"):
        R.assemble_predictor_input(**a, **kw)


def test_assembly_device_mismatch():
    a, kw = _assembly_args()
    a["weight"] = a["weight"].to("meta")
    with pytest.raises(ValueError, match="^weight:"):
        R.assemble_predictor_input(**a, **kw)


def test_assembly_isotropic_noise_on_another_device():
    a, kw = _assembly_args(noise_mode="isotropic")
    npred, (B, Nt) = len(a["tgt_idx"]), a["tgt_idx"][0].shape
    noise = torch.randn(npred, B, Nt, a["weight"].shape[0], device="meta")
    with pytest.raises(ValueError, match="^noise: expected device cpu"):
        R.assemble_predictor_input(**a, **kw, noise=noise)


@pytest.mark.parametrize("tgt, exc, msg", [
    ([torch.tensor([[0, 9]])], ValueError, r"^tgt_idx: values must lie in \[0, 8\)"),
    ([torch.tensor([[0, -1]])], ValueError, r"^tgt_idx: values must lie"),  # would wrap to the last token
    ([torch.tensor([[0, 1]])], ValueError, r"^tgt_idx: expected size 2 at dim 1"),  # would broadcast over the batch
    ([torch.tensor([[0.0, 1.0]] * 2)], TypeError, "^tgt_idx"),
])
def test_target_features_bad_indices(tgt, exc, msg):
    h = torch.randn(2, 8, 4)
    with pytest.raises(exc, match=msg):
        R.target_features(h, tgt)


@pytest.mark.parametrize("bad, exc, name", [
    (dict(idx=torch.tensor([[0, 9]])), ValueError, "idx"),
    (dict(idx=torch.tensor([[0.0, 1.0]])), TypeError, "idx"),
    (dict(noise=torch.randn(1, 2, 4)), ValueError, "noise"),
    (dict(weight=torch.randn(3, 5)), ValueError, "weight"),  # pos_embed and bias agree on D = 4: the weight is off
    (dict(weight=torch.randn(3, 5), bias=None), ValueError, "pos_embed"),  # D from the weight alone: ψ is named
    (dict(bias=torch.randn(2)), ValueError, "bias"),
    (dict(pos_embed=[1, 2]), TypeError, "pos_embed"),
])
def test_stop_embed_bad_input(bad, exc, name):
    a = dict(pos_embed=torch.randn(9, 4), idx=torch.tensor([[0, 8]]), weight=torch.randn(4, 5),
             bias=torch.randn(4), noise=torch.randn(1, 2, 5))
    a.update(bad)
    with pytest.raises(exc, match=f"^{name}:"):
        R.stop_embed(**a)


def test_attention_bad_input():
    q = torch.randn(1, 3, 2, 4)
    with pytest.raises(ValueError, match="^k, v:"):
        R.attention(q, torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8))
    with pytest.raises(TypeError, match="^q:"):
        R.attention(q.long(), q, q)
    for bad in (torch.randn(1, 3, 2, 0), torch.randn(3, 4)):  # no head dim: ZeroDivisionError / unpacking before
        with pytest.raises(ValueError, match="^q: expected"):
            R.attention(bad, bad, bad)


@pytest.mark.parametrize("cu,msg", [([0, 3], "end at"), ([1, 5], "start at 0"), ([0, 4, 2, 5], "non-decreasing"),
                                    ([0, 7], "end at"), ([], "at least one element")])
def test_attention_bad_cu_seqlens(cu, msg):
    """The twin refuses what the kernels refuse: a cu_seqlens that leaves tokens out, repeats them or reads past
    T gave an output of another length than q (3, 4 or 7 rows for T = 5; q + k + v itself for no offsets)."""
    q = torch.randn(5, 2, 8)
    with pytest.raises(ValueError, match=f"^cu_seqlens: .*{msg}"):
        R.attention(q, q, q, cu_seqlens=torch.tensor(cu, dtype=torch.int32))


def test_attention_layout_must_match_the_mode():
    """[B, N, H, Dh] without cu_seqlens, [T, H, Dh] with it: the other rank was an einsum RuntimeError."""
    packed, batched = torch.randn(5, 2, 8), torch.randn(1, 5, 2, 8)
    with pytest.raises(ValueError, match=r"^q: expected \[B, N, H, Dh\]"):
        R.attention(packed, packed, packed)
    with pytest.raises(ValueError, match=r"^q: expected \[T, H, Dh\]"):
        R.attention(batched, batched, batched, cu_seqlens=torch.tensor([0, 5]))


def test_trusted_device_indices_keeps_cpu_checks():
    from stop_kernels import trusted_device_indices
    pos, W = torch.randn(4, 3), torch.randn(3, 2)
    with trusted_device_indices():
        with pytest.raises(ValueError, match="idx"):
            R.stop_embed(pos, torch.tensor([4]), W, None, torch.randn(1, 2))
    # outside the context the device check is on again (meta tensors cannot be read: shape checks only)
    from stop_kernels import _checks
    assert _checks._DEVICE_RANGE_CHECKS


def test_jepa_loss_refuses_shapes_that_would_broadcast():
    with pytest.raises(ValueError, match="^target: expected the shape of pred"):
        R.jepa_loss(torch.randn(4, 3, 8), torch.randn(1, 3, 8))


def test_noise_std_takes_numpy_scalars_and_refuses_bools():
    import numpy as np
    from stop_kernels import _checks as chk
    assert chk.non_negative("noise_std", np.float32(0.25)) == 0.25
    assert chk.non_negative("noise_std", np.float64(0.2)) == 0.2 and chk.non_negative("noise_std", 1) == 1.0
    for bad, exc in ((True, TypeError), ("0.2", TypeError), (np.float32("nan"), ValueError), (-0.1, ValueError)):
        with pytest.raises(exc, match="^noise_std:"):
            chk.non_negative("noise_std", bad)


# ------------------------------------------------------------------------------------------------ mutation audit
def test_attention_in_low_precision_accumulates_in_float32():
    """bf16 inputs are computed in float32 and rounded once at the end (a bf16 softmax and P·V lose
    about 2 digits), so the result equals the float32 computation on the same bf16 values, rounded."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 33, 2, 16, generator=g).bfloat16() for _ in range(3))
    want = R.attention(q.float(), k.float(), v.float()).bfloat16()
    assert torch.equal(R.attention(q, k, v), want)


def test_attention_varlen_covers_every_sequence():
    """Every packed sequence is attended, the last one too, and alone (values outside it change nothing)."""
    g = torch.Generator().manual_seed(10)
    lens = [3, 2, 4]
    q, k, v = (torch.randn(sum(lens), 2, 4, dtype=DT, generator=g) for _ in range(3))
    cu = torch.tensor([0, 3, 5, 9], dtype=torch.int32)
    out = R.attention(q, k, v, cu_seqlens=cu)
    assert out.shape == q.shape
    torch.testing.assert_close(out[5:], R.attention(q[None, 5:], k[None, 5:], v[None, 5:])[0], rtol=0, atol=0)
    # no tokens at all: an empty result through which every input still gets a (zero) gradient
    e = [torch.randn(0, 2, 4, requires_grad=True) for _ in range(3)]
    R.attention(*e, cu_seqlens=torch.tensor([0], dtype=torch.int32)).sum().backward()
    assert all(t.grad is not None and t.grad.shape == (0, 2, 4) for t in e)


def test_target_features_use_the_official_layer_norm_eps():
    """Targets are F.layer_norm with its default eps 1e-5 (the encoders' own LayerNorms use 1e-6):
    features of small variance show the difference."""
    g = torch.Generator().manual_seed(11)
    h = torch.randn(2, 6, 16, dtype=DT, generator=g) * 3e-3  # variance ≈ 1e-5, comparable to eps
    tgt = [rand_idx((2, 3), 6, g)]
    mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
    want = (h - mu) / torch.sqrt(var + 1e-5)
    got = R.target_features(h, tgt)
    for b in range(2):
        torch.testing.assert_close(got[b], want[b, tgt[0][b]], rtol=1e-10, atol=1e-10)


def test_target_index_list_is_checked_entry_by_entry():
    """A list of target blocks must agree in shape and device, the entry named (torch.stack raised an
    unnamed RuntimeError for the shape, and nothing caught the device)."""
    a = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"^tgt_idx\[1\]: expected shape \(2, 3\)"):
        R.stack_target_indices([a, torch.zeros(2, 4, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"^tgt_idx\[1\]: expected device cpu"):
        R.stack_target_indices([a, a.to("meta")])
    assert torch.equal(R.stack_target_indices([a, a + 1]), torch.stack([a, a + 1]))


def test_assembly_dtype_rules():
    """ctx must have the weight's dtype (named TypeError, not F.linear's RuntimeError); explicit
    learned noise too; a bias of another dtype is cast to the weight's, as the fused op takes it."""
    a, kw = _assembly_args()
    with pytest.raises(TypeError, match="^ctx: expected the dtype of weight"):
        R.assemble_predictor_input(**{**a, "ctx": a["ctx"].double()}, **kw)
    npred, (B, Nt) = len(a["tgt_idx"]), a["tgt_idx"][0].shape
    noise = torch.randn(npred, B, Nt, a["weight"].shape[1], dtype=DT)
    with pytest.raises(TypeError, match="^noise: expected the dtype of weight"):
        R.assemble_predictor_input(**a, **kw, noise=noise)
    got = R.assemble_predictor_input(**{**a, "bias": a["bias"].double()}, **kw, noise=noise.float())
    torch.testing.assert_close(got, R.assemble_predictor_input(**a, **kw, noise=noise.float()), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["learned", "isotropic", "none"])
def test_assembly_gradients_match_official_formulation(mode):
    """Gradients too: in StoP the context projection A receives the gradient of the masked rows through
    n·Aᵀ as well as the context's (the tie that keeps σ²AAᵀ from collapsing); the mask token gets its own."""
    g = torch.Generator().manual_seed(12)
    B, Nc, Nt, E, D, P, npred = 2, 3, 4, 5, 6, 16, 3
    leaf = lambda *s: torch.randn(*s, dtype=DT, generator=g).requires_grad_()  # noqa: E731
    ctx, W, b, pos, tok = leaf(B, Nc, E), leaf(D, E), leaf(D), leaf(P, D), leaf(1, 1, D)
    ctx_idx = rand_idx((B, Nc), P, g)
    tgt = [rand_idx((B, Nt), P, g) for _ in range(npred)]
    noise = torch.randn(npred, B, Nt, E if mode == "learned" else D, dtype=DT, generator=g)
    fns = {
        "learned": lambda pe: F.linear(noise.reshape(npred * B, Nt, E), W, b) + pe,
        "isotropic": lambda pe: pe + noise.reshape(npred * B, Nt, D),
        "none": lambda pe: tok.repeat(pe.shape[0], pe.shape[1], 1) + pe,
    }
    up = torch.randn(npred * B, Nc + Nt, D, dtype=DT, generator=g)
    leaves = (ctx, W, b, pos, tok)
    want = torch.autograd.grad((official_assembly(ctx, ctx_idx, tgt, W, b, pos, fns[mode]) * up).sum(), leaves,
                               allow_unused=True)
    got = R.assemble_predictor_input(ctx, ctx_idx, tgt, W, b, pos, noise_mode=mode, mask_token=tok,
                                     noise=None if mode == "none" else noise)
    got = torch.autograd.grad((got * up).sum(), leaves, allow_unused=True)
    for name, a, w in zip(("ctx", "weight", "bias", "pos_embed", "mask_token"), got, want):
        if w is None:
            assert a is None, name
        else:
            torch.testing.assert_close(a, w, rtol=1e-12, atol=1e-12, msg=name)


def test_the_official_paths_noise_is_randn_times_sigma_on_the_generator():
    """The unfused (official) path's StoP noise: ``torch.randn(shape, generator=g) * σ`` exactly, as the official
    code draws it (mutation run, session 31: σ·1.01 there passed every test)."""
    from stop_kernels import reference as R
    g, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    n = R.draw_noise((3, 4, 7), noise_std=0.25, dtype=torch.float64, device="cpu", generator=g)
    torch.testing.assert_close(n, torch.randn((3, 4, 7), dtype=torch.float64, generator=g2) * 0.25, rtol=0, atol=0)
    big = R.draw_noise((200_000,), noise_std=0.2, dtype=torch.float64, device="cpu",
                       generator=torch.Generator().manual_seed(6))
    assert abs(big.std().item() - 0.2) < 4 * 0.2 / (2 * 200_000) ** 0.5  # (std of a sample std: σ/sqrt(2n))


def test_the_twins_dtypes_follow_the_fused_ops_with_mixed_inputs():
    """Mixed dtypes on the twins (mutation runs, session 31: both casts could be dropped without a failing test):
    ``stop_embed`` takes the bias in W's dtype, as the fused ops do (an fp32 b with bf16 W is rounded to bf16
    first); ``join_predictor_rows`` returns x's dtype whatever the masked rows' (no promotion to fp32)."""
    from stop_kernels import reference as R
    g = torch.Generator().manual_seed(4)
    pos, w = torch.randn(6, 8, generator=g), torch.randn(8, 5, generator=g).bfloat16()
    b, idx = torch.randn(8, generator=g) * 3, torch.tensor([[0, 5, 2]])
    noise = torch.randn(1, 3, 5, generator=g).bfloat16()
    got = R.stop_embed(pos, idx, w, b, noise)
    assert got.dtype == torch.float32
    assert torch.equal(got, R.stop_embed(pos, idx, w, b.bfloat16(), noise))
    assert not torch.equal(b.bfloat16().float(), b)  # (the rounding is visible)
    x, masked = torch.randn(2, 3, 4, generator=g).bfloat16(), torch.randn(2, 2, 1, 4, generator=g)
    joined = R.join_predictor_rows(x, masked)
    assert joined.dtype == torch.bfloat16 and joined.shape == (4, 4, 4)
    assert torch.equal(joined[3, 3], masked[1, 1, 0].bfloat16()) and torch.equal(joined[3, :3], x[1])


def test_sincos_table_of_a_rectangular_grid_is_row_major():
    """A grid of 2 rows and 3 columns: row r·3 + c encodes column c in the first half and row r in the second
    (mutation run, session 31: a meshgrid over (w, h) passed, since every other test used a square grid)."""
    from stop_kernels import reference as R
    t = R.sincos_pos_embed_2d(8, 2, 3)
    assert t.shape == (6, 8)
    one = lambda v: R.sincos_pos_embed_1d(4, torch.tensor([float(v)], dtype=torch.float64)).float()[0]  # noqa: E731
    for r in range(2):
        for c in range(3):
            torch.testing.assert_close(t[r * 3 + c], torch.cat([one(c), one(r)]), rtol=0, atol=1e-7)


def test_the_peak_table_names_each_card():
    """The MFU divisor by card name: an NVL or PCIe card must not match the SXM's shorter key first (mutation run,
    session 31: the H200 NVL's 835 changed to 989 passed every test)."""
    from stop_kernels.models.flops import PEAK_BF16_TFLOPS, peak_tflops
    assert peak_tflops("NVIDIA H200 NVL") == 835.0 and peak_tflops("NVIDIA H100 NVL") == 835.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("Some GPU") == 989.0
    keys = list(PEAK_BF16_TFLOPS)
    assert all(not (a in b) for i, a in enumerate(keys) for b in keys[i + 1:]), "a shorter key before a longer one"
