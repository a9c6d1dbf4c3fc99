"""Fused StoP embedding: ``out = ψ[idx] + n·Wᵀ + b`` with the noise n generated in registers.

Shapes: ``pos_embed`` ψ ``[P, D]``, ``idx`` ``[..., M]``, ``weight`` W ``[D, E]``, ``bias`` b ``[D]``,
n ``[R, E]`` with ``R = idx.numel()`` (rows flattened row-major over ``idx``), ``out`` ``[..., M, D]``.
The noise is the Philox stream of :mod:`.philox` (``n = philox_normal(seed, R, E, σ)``); the seed is
drawn per call from a CPU generator, saved for backward, and n is regenerated there.

Kernels (every block shape a constexpr):

* :func:`_project_kernel` ``out[r] = A[r]·Wᵀ + b + ψ[idx[r]]`` where A is either the Philox noise
  (``NOISE=True``) or rows of a tensor in memory (the context projection of the predictor input).
  Its K loop walks the quarter columns ``q`` of E in steps of ``BLOCK_K``; each step produces the
  four ``[BLOCK_M, BLOCK_K]`` tiles at columns ``q, q+E4, q+2E4, q+3E4`` and multiplies them with
  the matching ``[BLOCK_K, BLOCK_D]`` slices of Wᵀ on tensor cores (fp32 accumulation). Output rows
  are addressed as ``(r // G)·stride_og + (r % G)·stride_or`` and stored ``N_COPIES`` times, so the
  predictor input is written in place without concatenation or repetition.
* :func:`_noise_weight_grad_kernel` ``dW[:, e] = Σ_r g[r]ᵀ n[r, e]``: a grid over D tiles × quarter
  column tiles × row splits; each program regenerates its noise tiles and reduces its rows; the
  per-split fp32 partials are summed afterwards (deterministic, no atomics).
* :func:`_pos_noise_kernel` ``out[r] = ψ[idx[r]] + v + σ·n_D[r]`` (isotropic / mask-token modes of
  the predictor input; noise in width D).

``db = Σ g`` and ``dψ = scatter-add of g by idx`` (only when ψ requires grad) are plain reductions.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _checks as chk
from .. import reference
from .philox import draw_seed, normal_quarters, philox_normal, quarter_width, seed_key_args

BACKENDS = ("auto", "triton", "reference", "cuda")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _cfg(**kw):
    warps, stages = kw.pop("w"), kw.pop("s")
    return triton.Config(kw, num_warps=warps, num_stages=stages)


# Small autotune lists for the GPU (shared memory per stage ≈ 4 quarter slices of A and Wᵀ; the
# 64×64 forward config fits fp32 operands at 2 stages). The interpreter bypasses autotuning (it
# would time every config) and takes tiles sized to the problem (see _launch): its cost is per program.
_FWD_CONFIGS = [_cfg(BLOCK_M=128, BLOCK_D=128, BLOCK_K=32, w=8, s=3),
                _cfg(BLOCK_M=64, BLOCK_D=128, BLOCK_K=32, w=4, s=3),
                _cfg(BLOCK_M=64, BLOCK_D=256, BLOCK_K=32, w=8, s=2),
                _cfg(BLOCK_M=64, BLOCK_D=64, BLOCK_K=32, w=4, s=2)]
_DW_CONFIGS = [_cfg(BLOCK_M=64, BLOCK_D=128, BLOCK_K=32, w=8, s=3),
               _cfg(BLOCK_M=64, BLOCK_D=64, BLOCK_K=32, w=4, s=2),
               _cfg(BLOCK_M=32, BLOCK_D=128, BLOCK_K=64, w=8, s=2)]
_POS_CONFIGS = [_cfg(BLOCK_M=32, BLOCK_K=32, w=4, s=1), _cfg(BLOCK_M=64, BLOCK_K=64, w=8, s=1)]


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_a(a_ptr, stride_am, stride_ak, rows, row_ok, e, e_ok):
    """A tile ``[BLOCK_M, BLOCK_K]`` = ``A[rows, e]`` from memory, zero outside."""
    ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_am + e[None, :] * stride_ak
    return tl.load(ptrs, mask=row_ok[:, None] & e_ok[None, :], other=0.0)


@triton.jit
def _load_wt(w_ptr, stride_wd, stride_we, e, e_ok, dcol, d_ok):
    """Wᵀ slice ``[BLOCK_K, BLOCK_D]`` = ``W[dcol, e]ᵀ``, zero outside (so padded columns add nothing)."""
    ptrs = w_ptr + dcol[None, :] * stride_wd + e[:, None] * stride_we
    return tl.load(ptrs, mask=e_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _mma(a, b, acc, like_ptr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a·b on tensor cores with both operands rounded to the element type of ``like_ptr``.

    UPCAST (interpreter only, whose bf16 dot is wrong) multiplies the rounded values in fp32.
    """
    dt = like_ptr.dtype.element_ty
    a = a.to(dt)
    b = b.to(dt)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.autotune(configs=_FWD_CONFIGS, key=["E", "D", "NOISE"])
@triton.jit(do_not_specialize=["key0", "key1", "sigma", "R", "G", "N_COPIES"])
def _project_kernel(a_ptr, stride_am, stride_ak,
                    idx_ptr, pos_ptr, stride_pp, stride_pd,
                    w_ptr, stride_wd, stride_we, b_ptr,
                    out_ptr, stride_og, stride_or, stride_od, stride_oc,
                    R, E, D, G, N_COPIES, key0, key1, sigma,
                    NOISE: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[r, d] = Σ_e A[r, e]·W[d, e] + b[d] + ψ[idx[r], d] for one [BLOCK_M, BLOCK_D] output tile."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dcol = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    kk = tl.arange(0, BLOCK_K)
    row_ok = rows < R
    d_ok = dcol < D
    E4 = (E + 3) // 4
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # main loop over quarter columns q: A tiles at q + j·E4 (j = 0..3), Wᵀ slices at the same columns
    for q0 in range(0, E4, BLOCK_K):
        q = q0 + kk
        e0, e1, e2, e3 = q, q + E4, q + 2 * E4, q + 3 * E4
        q_ok = q < E4
        ok0, ok1, ok2, ok3 = q_ok & (e0 < E), q_ok & (e1 < E), q_ok & (e2 < E), q_ok & (e3 < E)
        if NOISE:
            # noise: one Philox call per (row, q) gives the four quarter tiles, in registers only
            a0, a1, a2, a3 = normal_quarters(rows[:, None], q[None, :], key0, key1, sigma)
        else:
            # memory: the same four column slices of A (e.g. the context tokens)
            a0 = _load_a(a_ptr, stride_am, stride_ak, rows, row_ok, e0, ok0)
            a1 = _load_a(a_ptr, stride_am, stride_ak, rows, row_ok, e1, ok1)
            a2 = _load_a(a_ptr, stride_am, stride_ak, rows, row_ok, e2, ok2)
            a3 = _load_a(a_ptr, stride_am, stride_ak, rows, row_ok, e3, ok3)
        acc = _mma(a0, _load_wt(w_ptr, stride_wd, stride_we, e0, ok0, dcol, d_ok), acc, w_ptr, PRECISION, UPCAST)
        acc = _mma(a1, _load_wt(w_ptr, stride_wd, stride_we, e1, ok1, dcol, d_ok), acc, w_ptr, PRECISION, UPCAST)
        acc = _mma(a2, _load_wt(w_ptr, stride_wd, stride_we, e2, ok2, dcol, d_ok), acc, w_ptr, PRECISION, UPCAST)
        acc = _mma(a3, _load_wt(w_ptr, stride_wd, stride_we, e3, ok3, dcol, d_ok), acc, w_ptr, PRECISION, UPCAST)
    # epilogue: + bias + ψ[idx[r]] (gathered), in fp32
    if HAS_BIAS:
        acc += tl.load(b_ptr + dcol, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    p = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    tile_ok = row_ok[:, None] & d_ok[None, :]
    acc += tl.load(pos_ptr + p[:, None] * stride_pp + dcol[None, :] * stride_pd, mask=tile_ok,
                   other=0.0).to(tl.float32)
    # store: row r lands at (r // G)·stride_og + (r % G)·stride_or, N_COPIES times stride_oc apart
    r64 = rows.to(tl.int64)
    out_ptrs = out_ptr + ((r64 // G) * stride_og + (r64 % G) * stride_or)[:, None] + dcol[None, :] * stride_od
    val = acc.to(out_ptr.dtype.element_ty)
    for c in range(N_COPIES):
        tl.store(out_ptrs + c * stride_oc, val, mask=tile_ok)


@triton.autotune(configs=_DW_CONFIGS, key=["E", "D"])
@triton.jit(do_not_specialize=["key0", "key1", "sigma", "R", "G", "rows_per_split"])
def _noise_weight_grad_kernel(g_ptr, stride_gg, stride_gr, stride_gd, w_ptr, dw_ptr,
                              R, E, D, G, rows_per_split, key0, key1, sigma,
                              PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """partial[s, d, q + j·E4] = Σ_{r in split s} g[r, d]·n[r, q + j·E4] for one [BLOCK_D, BLOCK_K] quarter tile."""
    dcol = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    q = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(2)
    d_ok = dcol < D
    E4 = (E + 3) // 4
    dt = w_ptr.dtype.element_ty
    acc0 = tl.zeros([BLOCK_D, BLOCK_K], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_D, BLOCK_K], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_D, BLOCK_K], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_D, BLOCK_K], dtype=tl.float32)
    r_begin = split * rows_per_split
    r_end = tl.minimum(r_begin + rows_per_split, R)
    # reduction over this split's rows: load gᵀ [BLOCK_D, BLOCK_M], regenerate the noise tiles
    # [BLOCK_M, BLOCK_K] of the same rows, and accumulate the four quarter products
    for m0 in range(r_begin, r_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < r_end
        r64 = rows.to(tl.int64)
        g_ptrs = g_ptr + ((r64 // G) * stride_gg + (r64 % G) * stride_gr)[:, None] + dcol[None, :] * stride_gd
        g = tl.load(g_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(dt)
        gt = tl.trans(g)
        n0, n1, n2, n3 = normal_quarters(rows[:, None], q[None, :], key0, key1, sigma)
        acc0 = _mma(gt, n0, acc0, w_ptr, PRECISION, UPCAST)
        acc1 = _mma(gt, n1, acc1, w_ptr, PRECISION, UPCAST)
        acc2 = _mma(gt, n2, acc2, w_ptr, PRECISION, UPCAST)
        acc3 = _mma(gt, n3, acc3, w_ptr, PRECISION, UPCAST)
    # store the four quarter tiles of this split's fp32 partial [D, E]
    q_ok = q < E4
    base = dw_ptr + split.to(tl.int64) * D * E + dcol[:, None] * E
    dmask = d_ok[:, None]
    tl.store(base + q[None, :], acc0, mask=dmask & (q_ok & (q < E))[None, :])
    tl.store(base + (q + E4)[None, :], acc1, mask=dmask & (q_ok & (q + E4 < E))[None, :])
    tl.store(base + (q + 2 * E4)[None, :], acc2, mask=dmask & (q_ok & (q + 2 * E4 < E))[None, :])
    tl.store(base + (q + 3 * E4)[None, :], acc3, mask=dmask & (q_ok & (q + 3 * E4 < E))[None, :])


@triton.jit
def _store_pos_plus(out_ptrs, pos_ptrs, vec_ptr, col, D, row_ok, n, HAS_VEC: tl.constexpr):
    """Store ψ[idx, col] + v[col] + n at the columns ``col`` (< D) of the tile."""
    col_ok = col < D
    ok = row_ok[:, None] & col_ok[None, :]
    val = tl.load(pos_ptrs + col[None, :], mask=ok, other=0.0).to(tl.float32) + n
    if HAS_VEC:
        val += tl.load(vec_ptr + col, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptrs + col[None, :], val.to(out_ptrs.dtype.element_ty), mask=ok)


@triton.autotune(configs=_POS_CONFIGS, key=["D", "NOISE"])
@triton.jit(do_not_specialize=["key0", "key1", "sigma", "R", "G"])
def _pos_noise_kernel(idx_ptr, pos_ptr, stride_pp, vec_ptr,
                      out_ptr, stride_og, stride_or, R, D, G, key0, key1, sigma,
                      NOISE: tl.constexpr, HAS_VEC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[r, d] = ψ[idx[r], d] + v[d] + n_D[r, d] for rows × quarter columns of D (ψ, out unit stride in d)."""
    # stage 1: rows, their positions, and this program's quarter columns of D
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < R
    D4 = (D + 3) // 4
    p = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    r64 = rows.to(tl.int64)
    out_ptrs = out_ptr + ((r64 // G) * stride_og + (r64 % G) * stride_or)[:, None]
    pos_ptrs = pos_ptr + (p * stride_pp)[:, None]
    # stage 2: the four quarter noise tiles (width D), or zeros
    if NOISE:
        n0, n1, n2, n3 = normal_quarters(rows[:, None], q[None, :], key0, key1, sigma)
    else:
        n0 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        n1, n2, n3 = n0, n0, n0
    # stage 3: ψ[idx] + v + n at columns q + j·D4, stored
    qq = tl.where(q < D4, q, D)  # quarter columns beyond D4 are pushed out of range (masked)
    _store_pos_plus(out_ptrs, pos_ptrs, vec_ptr, qq, D, row_ok, n0, HAS_VEC)
    _store_pos_plus(out_ptrs, pos_ptrs, vec_ptr, qq + D4, D, row_ok, n1, HAS_VEC)
    _store_pos_plus(out_ptrs, pos_ptrs, vec_ptr, qq + 2 * D4, D, row_ok, n2, HAS_VEC)
    _store_pos_plus(out_ptrs, pos_ptrs, vec_ptr, qq + 3 * D4, D, row_ok, n3, HAS_VEC)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _launch(kernel, grid, args, kwargs, interp_meta):
    """Launch an autotuned kernel; under TRITON_INTERPRET=1 run its plain jit function with ``interp_meta``."""
    if interpreting():
        kernel.fn[grid(interp_meta)](*args, **kwargs, **interp_meta)
    else:
        kernel[grid](*args, **kwargs)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _rows3(t: torch.Tensor):
    """(G, stride_og, stride_or, stride_od) of a ``[groups, G, D]`` view: row r = group·G + i."""
    return t.shape[1], t.stride(0), t.stride(1), t.stride(2)


def launch_project(out3: torch.Tensor, idx: torch.Tensor, pos_embed: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor], *, a: Optional[torch.Tensor] = None, seed: int = 0,
                   noise_std: float = 0.0, copies: int = 1, stride_copy: int = 0) -> None:
    """Write ``A·Wᵀ + b + ψ[idx]`` into the rows of ``out3`` (``[groups, G, D]``, any strides).

    A is ``a`` (``[R, E]``) when given, else the Philox noise of ``seed`` scaled by ``noise_std``.
    ``idx`` is a flat ``[R]`` index tensor, ``R = groups·G``. With ``copies > 1`` every row is also
    stored at ``+c·stride_copy`` elements (c < copies).
    """
    R = idx.numel()
    D, E = weight.shape
    if R == 0 or D == 0:
        return
    idx = idx.reshape(-1).contiguous()
    G, s_og, s_or, s_od = _rows3(out3)
    noise = a is None
    a_arg = weight if noise else a
    s_am, s_ak = (0, 0) if noise else a.stride()
    key0, key1 = seed_key_args(seed)
    grid = lambda meta: (triton.cdiv(R, meta["BLOCK_M"]), triton.cdiv(D, meta["BLOCK_D"]))  # noqa: E731
    args = (a_arg, s_am, s_ak, idx, pos_embed, pos_embed.stride(0), pos_embed.stride(1),
            weight, weight.stride(0), weight.stride(1), bias if bias is not None else weight,
            out3, s_og, s_or, s_od, stride_copy, R, E, D, G, copies, key0, key1, float(noise_std))
    interp = dict(BLOCK_M=_pow2(R, 16, 1024), BLOCK_D=_pow2(D, 16, 128), BLOCK_K=_pow2(quarter_width(E), 16, 64))
    _launch(_project_kernel, grid, args, dict(NOISE=noise, HAS_BIAS=bias is not None,
                                              PRECISION=_precision(weight.dtype), UPCAST=interpreting()), interp)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def noise_weight_grad(g3: torch.Tensor, weight: torch.Tensor, seed: int, noise_std: float) -> torch.Tensor:
    """``dW = Σ_r g[r]ᵀ n[r]`` (fp32 ``[D, E]``) with n regenerated; ``g3`` is ``[groups, G, D]`` (any strides)."""
    D, E = weight.shape
    R = g3.shape[0] * g3.shape[1]
    if R == 0 or noise_std == 0.0:
        return torch.zeros((D, E), dtype=torch.float32, device=weight.device)
    G, s_gg, s_gr, s_gd = _rows3(g3)
    E4 = quarter_width(E)
    # row splits: about two waves of programs at the nominal 64×32 tile, at least 256 rows each
    tiles = triton.cdiv(D, 64) * triton.cdiv(E4, 32)
    split = max(1, min(triton.cdiv(R, 256), triton.cdiv(2 * _num_sms(weight.device), tiles)))
    rows_per_split = triton.cdiv(R, split)
    partial = torch.empty((split, D, E), dtype=torch.float32, device=weight.device)
    key0, key1 = seed_key_args(seed)
    grid = lambda meta: (triton.cdiv(D, meta["BLOCK_D"]), triton.cdiv(E4, meta["BLOCK_K"]), split)  # noqa: E731
    args = (g3, s_gg, s_gr, s_gd, weight, partial, R, E, D, G, rows_per_split, key0, key1, float(noise_std))
    interp = dict(BLOCK_M=_pow2(rows_per_split, 16, 1024), BLOCK_D=_pow2(D, 16, 128),
                  BLOCK_K=_pow2(E4, 16, 64))
    _launch(_noise_weight_grad_kernel, grid, args,
            dict(PRECISION=_precision(weight.dtype), UPCAST=interpreting()), interp)
    return partial[0] if split == 1 else partial.sum(0)


def launch_pos_noise(out3: torch.Tensor, idx: torch.Tensor, pos_embed: torch.Tensor, vec: Optional[torch.Tensor],
                     *, seed: int = 0, noise_std: Optional[float] = None) -> None:
    """Write ``ψ[idx] + vec + σ·n_D`` into ``out3`` (``[groups, G, D]``, unit stride in D); no noise when σ is None."""
    R = idx.numel()
    D = pos_embed.shape[1]
    if R == 0 or D == 0:
        return
    assert out3.stride(2) == 1 and pos_embed.stride(1) == 1
    idx = idx.reshape(-1).contiguous()
    G, s_og, s_or, _ = _rows3(out3)
    key0, key1 = seed_key_args(seed)
    grid = lambda meta: (triton.cdiv(R, meta["BLOCK_M"]), triton.cdiv(quarter_width(D), meta["BLOCK_K"]))  # noqa: E731
    args = (idx, pos_embed, pos_embed.stride(0), vec if vec is not None else pos_embed,
            out3, s_og, s_or, R, D, G, key0, key1, float(noise_std or 0.0))
    interp = dict(BLOCK_M=_pow2(R, 16, 1024), BLOCK_K=_pow2(quarter_width(D), 16, 64))
    _launch(_pos_noise_kernel, grid, args, dict(NOISE=noise_std is not None, HAS_VEC=vec is not None), interp)


def scatter_rows(grad_rows: torch.Tensor, idx: torch.Tensor, P: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dψ: fp32 ``[P, D]`` scatter-add of the rows of ``grad_rows`` (``[..., D]``) by ``idx`` (``[...]``)."""
    D = grad_rows.shape[-1]
    if out is None:
        out = torch.zeros((P, D), dtype=torch.float32, device=grad_rows.device)
    return out.index_add_(0, idx.reshape(-1), grad_rows.reshape(-1, D).float())


# ----------------------------------------------------------------------------------------------
# torch.library ops (work under torch.compile; the seed is a CPU int64 scalar tensor)
# ----------------------------------------------------------------------------------------------
def _out_dtype(weight: torch.Tensor, pos_embed: torch.Tensor) -> torch.dtype:
    return torch.promote_types(weight.dtype, pos_embed.dtype)


@torch.library.custom_op("stop_kernels::stop_embed", mutates_args=())
def _stop_embed_op(pos_embed: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   seed: torch.Tensor, noise_std: float) -> torch.Tensor:
    D = weight.shape[0]
    out = torch.empty(idx.shape + (D,), dtype=_out_dtype(weight, pos_embed), device=weight.device)
    launch_project(out.view(1, -1, D), idx.reshape(-1), pos_embed, weight, bias,
                   seed=int(seed), noise_std=noise_std)
    return out


@_stop_embed_op.register_fake
def _(pos_embed, idx, weight, bias, seed, noise_std):
    return weight.new_empty(idx.shape + (weight.shape[0],), dtype=_out_dtype(weight, pos_embed))


@torch.library.custom_op("stop_kernels::noise_weight_grad", mutates_args=())
def _noise_weight_grad_op(grad: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, noise_std: float) -> torch.Tensor:
    """fp32 ``[D, E]`` = Σ_r grad[r]ᵀ n[r]; ``grad`` is ``[groups, G, D]`` (rows r = group·G + i)."""
    return noise_weight_grad(grad, weight, int(seed), noise_std)


@_noise_weight_grad_op.register_fake
def _(grad, weight, seed, noise_std):
    return weight.new_empty(weight.shape, dtype=torch.float32)


def _stop_setup(ctx, inputs, output):
    pos_embed, idx, weight, bias, seed, noise_std = inputs
    ctx.save_for_backward(idx, weight, seed)
    ctx.noise_std = noise_std
    ctx.pos_meta = (pos_embed.shape[0], pos_embed.dtype)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _stop_backward(ctx, grad):
    idx, weight, seed = ctx.saved_tensors
    D = weight.shape[0]
    g = grad.reshape(-1, D)
    dpos = dweight = dbias = None
    if ctx.needs_input_grad[2]:
        dweight = _noise_weight_grad_op(g.unsqueeze(0), weight, seed, ctx.noise_std).to(weight.dtype)
    if ctx.needs_input_grad[3]:
        dbias = g.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    if ctx.needs_input_grad[0]:
        P, pdtype = ctx.pos_meta
        dpos = scatter_rows(g, idx, P).to(pdtype)
    return dpos, None, dweight, dbias, None, None


torch.library.register_autograd("stop_kernels::stop_embed", _stop_backward, setup_context=_stop_setup)


# ----------------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------------
def check_backend(backend: str, device: torch.device, dtypes, name: str = "backend") -> str:
    """Resolve ``backend`` to "triton", "reference" or "cuda"."""
    chk.choice(name, backend, BACKENDS)
    supported = all(d in TRITON_DTYPES for d in dtypes)
    if backend == "auto":
        return "triton" if (device.type == "cuda" or interpreting()) and supported else "reference"
    if backend == "triton":
        if not supported:
            raise TypeError(f"{name}: the triton backend takes float16, bfloat16 or float32 tensors, got "
                            f"{sorted({str(d).replace('torch.', '') for d in dtypes})}")
        if device.type != "cuda" and not interpreting():
            raise ValueError(f"{name}: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device {device}")
    return backend


def load_cuda_backend():
    """The CUDA C++ backend module (:mod:`stop_kernels.ops.cuda_backend`), or a clear RuntimeError."""
    try:
        from . import cuda_backend  # noqa: PLC0415
    except Exception as exc:  # not written / broken
        raise RuntimeError(f"backend='cuda': stop_kernels.ops.cuda_backend is unavailable ({exc!r})") from exc
    if hasattr(cuda_backend, "available") and not cuda_backend.available():
        raise RuntimeError(f"backend='cuda': the CUDA extension is not built or does not load "
                           f"({cuda_backend.load_error()})")
    return cuda_backend


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The CUDA autocast dtype when autocast is on for ``device``, else None."""
    if device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return None


def check_stop_args(pos_embed, idx, weight, bias, noise_std, generator) -> float:
    """Validate the arguments of :func:`stop_embed` (names the argument in every error)."""
    chk.float_tensor("pos_embed", pos_embed, ndim=2)
    chk.float_tensor("weight", weight, ndim=2)
    chk.tensor("idx", idx, min_ndim=1, dtypes=chk.INDEX_DTYPES)
    if bias is not None:
        chk.float_tensor("bias", bias, ndim=1)
        chk.dim_equals("bias", bias, 0, weight.shape[0], "predictor width D = weight.shape[0]")
    chk.dim_equals("pos_embed", pos_embed, 1, weight.shape[0], "predictor width D = weight.shape[0]")
    chk.same_device(pos_embed=pos_embed, idx=idx, weight=weight, bias=bias)
    sigma = chk.non_negative("noise_std", noise_std)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator: expected a CPU torch.Generator (the seed is drawn on the host), got one on "
                         f"{generator.device}")
    if not torch.compiler.is_compiling():  # data-dependent: checked eagerly
        P = pos_embed.shape[0]
        chk.index_tensor("idx", idx, upper=P, what=f"pos_embed has {P} rows")
    return sigma


@torch.compiler.disable
def _checked_seed(pos_embed, idx, weight, bias, noise_std, generator):
    """Validate, then draw the call's seed as a CPU int64 scalar tensor (runs eagerly under torch.compile)."""
    sigma = check_stop_args(pos_embed, idx, weight, bias, noise_std, generator)
    return sigma, torch.tensor(draw_seed(generator), dtype=torch.int64)


def stop_embed(pos_embed: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
               bias: Optional[torch.Tensor] = None, *, noise_std: float = 0.25,
               generator: Optional[torch.Generator] = None, backend: str = "auto") -> torch.Tensor:
    """Stochastic positional embedding ``ψ[idx] + n·Wᵀ + b`` with n ~ N(0, noise_std² I_E) from Philox.

    Args:
        pos_embed: ``[P, D]`` positional table ψ (gradient scatter-added only if it requires grad).
        idx: ``[..., M]`` int32/int64 positions in ``[0, P)``, any batch rank, any strides.
        weight: ``[D, E]`` projection W; bias: ``[D]`` or None.
        noise_std: σ ≥ 0. generator: CPU ``torch.Generator`` the per-call seed is drawn from
            (default generator when None), so ``torch.manual_seed`` reproduces the noise.
        backend: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else "reference"),
            "triton", "reference" (same seed and Philox noise, computed with
            :func:`stop_kernels.reference.stop_embed`), or "cuda" (the CUDA C++ backend).
    Returns:
        ``[..., M, D]`` in ``promote(weight.dtype, pos_embed.dtype)``. Under CUDA autocast W and b
        are taken in the autocast dtype (fp32 accumulation).
    Noise row r is row r of ``idx.reshape(-1)``: ``n = philox_normal(seed, idx.numel(), E, σ)``.
    """
    chk.choice("backend", backend, BACKENDS)
    if backend == "cuda":
        return load_cuda_backend().stop_embed_cuda(pos_embed, idx, weight, bias, noise_std=noise_std,
                                                  generator=generator)
    sigma, seed = _checked_seed(pos_embed, idx, weight, bias, noise_std, generator)
    amp = autocast_dtype(weight.device)
    if amp is not None:
        weight = weight.to(amp)
        bias = bias.to(amp) if bias is not None else None
    dtypes = [pos_embed.dtype, weight.dtype] + ([bias.dtype] if bias is not None else [])
    resolved = check_backend(backend, weight.device, dtypes)
    if resolved == "reference":
        E = weight.shape[1]
        noise = philox_normal(int(seed), idx.numel(), E, sigma).to(device=weight.device, dtype=weight.dtype)
        b = bias.to(weight.dtype) if bias is not None else None
        return reference.stop_embed(pos_embed, idx, weight, b, noise.reshape(idx.shape + (E,)))
    return _stop_embed_op(pos_embed, idx, weight, bias, seed, sigma)


__all__ = ["stop_embed", "launch_project", "launch_pos_noise", "noise_weight_grad", "scatter_rows",
           "check_stop_args", "check_backend", "load_cuda_backend", "autocast_dtype", "interpreting"]
