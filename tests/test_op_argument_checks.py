"""Argument checks shared by the ops: strided bias, layout and cu_seqlens checks of every attention backend, dtype checks of the explicit-noise assembly."""
import os

import pytest
import torch

import stop_kernels as sk

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _gen():
    return torch.Generator().manual_seed(3)


def test_stop_embed_non_contiguous_bias():
    """The Triton kernel reads bias at ``b_ptr + dcol`` (unit stride assumed, stop_embed.py:204), so a
    strided bias view gives wrong values (off by ~1 here); the reference backend and a contiguous copy agree."""
    torch.manual_seed(0)
    P, D, E = 10, 6, 5
    pos = torch.randn(P, D, device=DEV)
    w = torch.randn(D, E, device=DEV)
    bias = torch.randn(2 * D, device=DEV)[::2]  # non-contiguous [D]
    idx = torch.randint(0, P, (2, 3), device=DEV)
    ref = sk.stop_embed(pos, idx, w, bias, noise_std=0.5, generator=_gen(), backend="reference")
    out = sk.stop_embed(pos, idx, w, bias, noise_std=0.5, generator=_gen(), backend="triton")
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["learned", "isotropic"])
def test_assemble_non_contiguous_bias(mode):
    """Same unit-stride bias read in the context-projection launch of assemble_predictor_input."""
    torch.manual_seed(0)
    B, Nc, Nt, E, D, P, npred = 2, 3, 2, 5, 6, 12, 3
    ctx = torch.randn(B, Nc, E, device=DEV)
    w = torch.randn(D, E, device=DEV)
    bias = torch.randn(D, 2, device=DEV)[:, 0]  # non-contiguous [D]
    pos = torch.randn(P, D, device=DEV)
    ci = torch.randint(0, P, (B, Nc), device=DEV)
    ti = torch.randint(0, P, (npred, B, Nt), device=DEV)
    ref = sk.assemble_predictor_input(ctx, ci, ti, w, bias, pos, noise_mode=mode, generator=_gen(),
                                      backend="reference")
    out = sk.assemble_predictor_input(ctx, ci, ti, w, bias, pos, noise_mode=mode, generator=_gen(),
                                      backend="triton")
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cu", [[0, 6, 4, 10], [0, 4, 8], [1, 4, 10]])
def test_dispatch_reference_rejects_bad_cu_seqlens(cu):
    """dispatch_attention(backend="reference") hands cu_seqlens to reference.attention unchecked: a
    decreasing / short / non-zero-start cu_seqlens returns 12, 8 or 9 rows for T = 10 instead of ValueError."""
    q = torch.randn(10, 2, 16, device=DEV)
    with pytest.raises(ValueError, match="cu_seqlens"):
        sk.dispatch_attention(q, q, q, cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=DEV),
                              backend="reference")


@pytest.mark.parametrize("backend", ["sdpa", "auto"])
@pytest.mark.parametrize("case", ["packed-without-cu_seqlens", "5d", "k-batch-mismatch", "k-heads-mismatch"])
def test_dispatch_sdpa_checks_layout(backend, case):
    """Without cu_seqlens the SDPA branch of dispatch_attention checks nothing: a [T, H, Dh] input is
    transposed to [T, Dh, H] and attends over the head dim (a same-shaped, meaningless result), a 5-D
    input attends over H, and k/v with batch or heads 1 are broadcast; backend="triton" raises ValueError."""
    q = torch.randn(2, 5, 2, 16, device=DEV)
    k = v = q
    if case == "packed-without-cu_seqlens":
        q = k = v = q.reshape(10, 2, 16)
    elif case == "5d":
        q = k = v = q[None]
    elif case == "k-batch-mismatch":
        k = v = q[:1]
    else:
        k = v = q[:, :, :1]
    with pytest.raises(ValueError):
        sk.dispatch_attention(q, k, v, backend=backend)


def test_assemble_explicit_noise_dtype_mismatch_is_type_error():
    """With ``noise=`` the call skips the ctx/weight dtype check of the fused path (predictor_input.py:174)
    and F.linear raises an unnamed RuntimeError ("mat1 and mat2 must have the same dtype")."""
    B, Nc, Nt, E, D, P, npred = 1, 2, 2, 4, 4, 8, 1
    ctx = torch.randn(B, Nc, E, dtype=torch.float64)
    w = torch.randn(D, E)
    pos = torch.randn(P, D)
    ci = torch.randint(0, P, (B, Nc))
    ti = torch.randint(0, P, (npred, B, Nt))
    with pytest.raises(TypeError, match="ctx"):
        sk.assemble_predictor_input(ctx, ci, ti, w, None, pos, noise=torch.randn(npred, B, Nt, E))


@pytest.mark.parametrize("value", ["1", "true", "On", "yes", "y", "0", "false", "", " 1", "t"])
def test_interpreter_flag_is_read_as_triton_reads_it(value, monkeypatch):
    from triton import knobs
    from stop_kernels.backends import triton_interpreting
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert triton_interpreting() == bool(knobs.runtime.interpret)


@pytest.mark.parametrize("scale", [0.0, -0.5, float("inf"), float("nan")])
def test_attention_kernel_needs_a_positive_scale_and_auto_falls_back(scale):
    """The Triton forward takes the running max of the unscaled scores, valid for a positive scale only:
    attention() refuses other scales by name; dispatch_attention("auto") routes them to SDPA."""
    from stop_kernels.ops.attention import _resolve_auto
    q = torch.randn(1, 5, 2, 16, device=DEV, dtype=torch.float16 if DEV == "cuda" else torch.float32)
    if DEV == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        with pytest.raises(ValueError, match="^scale: "):
            sk.attention(q, q, q, scale=scale)
    assert _resolve_auto(q, q, q, scale) == "sdpa"
