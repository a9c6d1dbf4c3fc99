"""Fused StoP embedding: ``out = ψ[idx] + n·Wᵀ + b`` with the noise n generated in registers.

Shapes: ``pos_embed`` ψ ``[P, D]``, ``idx`` ``[..., M]``, ``weight`` W ``[D, E]``, ``bias`` b ``[D]``,
n ``[R, E]`` with ``R = idx.numel()`` (rows flattened row-major over ``idx``), ``out`` ``[..., M, D]``.
The noise is the Philox stream of :mod:`.philox` (``n = philox_normal(seed, R, E, σ)``); the seed is
drawn per call from a CPU generator, saved for backward, and n is regenerated there.

Kernels (every block shape a constexpr):

* :func:`_project_kernel` ``out[r] = A[r]·Wᵀ + b + ψ[idx[r]]`` where A is either the Philox noise
  (``NOISE=True``) or rows of a tensor in memory (the context projection of the predictor input).
  Its K loop walks the quarter columns ``q`` of E in steps of ``BLOCK_K``; each step produces the
  four ``[BLOCK_M, BLOCK_K]`` tiles at columns ``q, q+E4, q+2E4, q+3E4`` as one ``[BLOCK_M,
  4·BLOCK_K]`` operand (:func:`_cat4`) and multiplies it with the Wᵀ rows of the same columns on
  tensor cores (fp32 accumulation), one MMA per D tile per step; the ``SWAP_AB`` configs compute each tile
  transposed (W·Aᵀ), so the noise is the MMA's shared-memory operand. Output rows
  are addressed as ``(r // G)·stride_og + (r % G)·stride_or`` and stored ``N_COPIES`` times, so the
  predictor input is written in place without concatenation or repetition. With ``NOISE_ROWS`` one launch
  holds two row segments (the predictor input's context rows from memory, then its StoP rows).
* :func:`_noise_weight_grad_kernel` ``dW[:, e] = Σ_r g[r]ᵀ n[r, e]``: a grid over D tiles × quarter
  column tiles × row splits; each program regenerates its noise tiles (again one concatenated
  ``[BLOCK_M, 4·BLOCK_K]`` operand) and reduces its rows (with ``HAS_CTX`` first rows read from memory:
  the predictor input's context rows); the per-split fp32 partials are summed afterwards (deterministic,
  no atomics).
* :func:`_pos_noise_kernel` ``out[r] = ψ[idx[r]] + v + σ·n_D[r]`` (isotropic / mask-token modes of
  the predictor input; noise in width D).

``db = Σ g`` and ``dψ = scatter-add of g by idx`` (only when ψ requires grad) are plain reductions.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _checks as chk
from ..backends import (INTERPRET_LATE, custom_op_bypass_ok, eager_twin, first_order_backward, functorch_transforming,
                        interpreter_set_after_import, on_device, refuse_under_func_grad, sm_count, triton_interpreting)
from .. import reference
from .philox import check_generator, draw_seed, normal_quarters, philox_normal, quarter_width, seed_key_args

BACKENDS = ("auto", "triton", "reference", "cuda")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """Triton kernels run through the CPU interpreter here (``TRITON_INTERPRET=1``)."""
    return triton_interpreting()


def _cfg(**kw):
    warps, stages = kw.pop("w"), kw.pop("s")
    return triton.Config(kw, num_warps=warps, num_stages=stages)


def _fwd(swap_ab=False, **kw):
    """A forward config; ``swap_ab``: the accumulators hold ``W·Aᵀ`` (see :func:`_project_rows`)."""
    return _cfg(SWAP_AB=swap_ab, **kw)


# Autotune lists for the GPU. D_TILES Wᵀ column tiles of width BLOCK_D are covered by one program
# (forward: the A / noise tile of a K step is generated once and multiplied into D_TILES
# accumulators; dW: the noise tile of a row block is regenerated once and reduced into all D
# tiles), so with D = 384 = 3·128 a single program spans all of D and the Philox noise is not
# regenerated per D tile; the D_TILES = 1 configs regenerate it per D tile but run more programs
# (R = 10752 rows are only 168 row blocks of 64 for 132 SMs). Shared memory per stage ≈ the Wᵀ rows
# [4·BLOCK_K, BLOCK_D] per D tile (+ the A tile); configs over ~227 KB for the call's dtype are
# pruned before tuning (_prune_fwd / _prune_dw), as are configs whose last D tile would lie entirely
# beyond D (D_TILES = 4 is for D = 512). ptxas for sm_90a at ViT-H sizes (bf16, E4 = 320; `python
# benchmarks/ptxas_report.py --kernels stop`, no GPU needed): no config spills (tests/test_ptxas_report.py
# keeps the full-D ones so); BLOCK_M = 32 runs mma.sync instead of wgmma (wgmma needs 64 rows per warp group).
# float32 W (no autocast) gets its own lists (_FWD_CONFIGS_FP32 / _DW_CONFIGS_FP32, chosen by the prune from
# W's element size): its dots are IEEE fp32 FMA loops, not tensor-core MMAs, and every thread holds whole
# 4·BLOCK_K-wide rows / columns of both operands in registers, so the 16-bit tiles above spilled 0.8–10 KB
# of local memory per thread with fp32 W (benchmarks/compile_check.py, triton 3.6 and 3.8). The fp32 tiles
# are smaller in K (4·BLOCK_K = 16–64) and compile without spills with both (97–212 registers, sm_90a);
# that is a compiler fact, their speed is not measured (no GPU timing).
# The interpreter bypasses autotuning (it would time every config) and takes tiles sized to the
# problem (see _launch): its cost is per program. ``pin_configs`` forces one config (tests, tuning).
# On the GPU each kernel's timings are cached on disk (``cache_results``: Triton's cache directory, keyed by
# Triton's version, the GPU target, the kernel's source, the tuning key and the config list), so a new process,
# a resumed run or each path of benchmarks/e2e_step.py does not compile and time every config again (part of the
# fused path's longer warm-up in run 5: 57 s against the reference path's 39).
_FWD_CONFIGS = [_fwd(BLOCK_M=128, BLOCK_D=128, D_TILES=1, BLOCK_K=32, w=8, s=3),
                _fwd(BLOCK_M=64, BLOCK_D=128, D_TILES=1, BLOCK_K=32, w=4, s=3),
                _fwd(BLOCK_M=64, BLOCK_D=256, D_TILES=1, BLOCK_K=32, w=8, s=2),
                _fwd(BLOCK_M=64, BLOCK_D=64, D_TILES=1, BLOCK_K=32, w=4, s=2),
                # all of D ≤ 384 (3 × 128) / ≤ 512 (2 × 256, 4 × 128) in one program
                _fwd(BLOCK_M=64, BLOCK_D=128, D_TILES=3, BLOCK_K=16, w=8, s=2),
                _fwd(BLOCK_M=64, BLOCK_D=128, D_TILES=3, BLOCK_K=16, w=8, s=3),
                _fwd(BLOCK_M=32, BLOCK_D=128, D_TILES=3, BLOCK_K=16, w=8, s=2),
                # 16 warps (4 warp groups split D): twice the warps to hide the Philox chain's latency, 116 registers;
                # like the 8-warp configs its wgmmas are serialised by ptxas (C7515: a wait 0 after each of the 12
                # wgmmas per step, the noise being their register operand), which SWAP_AB below avoids
                _fwd(BLOCK_M=64, BLOCK_D=128, D_TILES=3, BLOCK_K=16, w=16, s=2),
                # SWAP_AB: each D tile computed as W·nᵀ, so the noise is the MMA's second operand and lies in shared
                # memory, and the wgmmas stay asynchronous: sm_90a SASS, triton 3.6 and 3.8, one wgmma wait per D
                # tile and step (3) instead of one per wgmma (12, C7515 above). BLOCK_M = 32 keeps wgmma here (the
                # rows are the MMA's N) and fits two CTAs per SM (113 registers, 100 KB, 8 warps) or three (168,
                # 74 KB, 4 warps with BLOCK_K = 8), so one CTA's Philox overlaps another's MMAs
                _fwd(swap_ab=True, BLOCK_M=64, BLOCK_D=128, D_TILES=3, BLOCK_K=16, w=8, s=3),
                _fwd(swap_ab=True, BLOCK_M=64, BLOCK_D=128, D_TILES=3, BLOCK_K=16, w=16, s=2),
                _fwd(swap_ab=True, BLOCK_M=32, BLOCK_D=128, D_TILES=3, BLOCK_K=16, w=8, s=2),
                _fwd(swap_ab=True, BLOCK_M=32, BLOCK_D=128, D_TILES=3, BLOCK_K=8, w=4, s=3),
                # all of D ≤ 512 in one dot per step (a quarter of its MMA wasted at D = 384): one wgmma wait per
                # step instead of three; 110-151 registers (BLOCK_M 32, the BLOCK_K 8 one two CTAs per SM) and 109-117
                # (BLOCK_M 64, 16 warps: W read once per 64 rows)
                _fwd(swap_ab=True, BLOCK_M=32, BLOCK_D=512, D_TILES=1, BLOCK_K=16, w=8, s=2),
                _fwd(swap_ab=True, BLOCK_M=32, BLOCK_D=512, D_TILES=1, BLOCK_K=8, w=8, s=3),
                _fwd(swap_ab=True, BLOCK_M=64, BLOCK_D=512, D_TILES=1, BLOCK_K=16, w=16, s=2),
                _fwd(swap_ab=True, BLOCK_M=64, BLOCK_D=512, D_TILES=1, BLOCK_K=8, w=16, s=3),
                _fwd(BLOCK_M=64, BLOCK_D=128, D_TILES=4, BLOCK_K=16, w=8, s=2)]  # (last: D = 512 only)
_DW_CONFIGS = [_cfg(BLOCK_M=64, BLOCK_D=128, D_TILES=1, BLOCK_K=32, w=8, s=3),
               _cfg(BLOCK_M=64, BLOCK_D=64, D_TILES=1, BLOCK_K=32, w=4, s=2),
               _cfg(BLOCK_M=32, BLOCK_D=128, D_TILES=1, BLOCK_K=64, w=8, s=2),
               # noise regenerated once per row block, reduced into all D tiles
               _cfg(BLOCK_M=64, BLOCK_D=128, D_TILES=3, BLOCK_K=16, w=8, s=2),
               _cfg(BLOCK_M=32, BLOCK_D=128, D_TILES=3, BLOCK_K=16, w=8, s=3),
               _cfg(BLOCK_M=64, BLOCK_D=128, D_TILES=4, BLOCK_K=16, w=8, s=2),
               # 16 warps: 96 registers, half the loop instructions per warp (529 against 951, sm_90a)
               _cfg(BLOCK_M=64, BLOCK_D=128, D_TILES=3, BLOCK_K=16, w=16, s=2)]
# float32 W: see above (registers per config, sm_90a, triton 3.8: forward 108–212, dW 97–126; the
# forward's 64 x 128 x (4·16) spilled 24 B with a bf16 ψ)
_FWD_CONFIGS_FP32 = [_fwd(BLOCK_M=64, BLOCK_D=128, D_TILES=1, BLOCK_K=8, w=8, s=2),
                     _fwd(BLOCK_M=64, BLOCK_D=64, D_TILES=1, BLOCK_K=8, w=4, s=2),
                     _fwd(BLOCK_M=32, BLOCK_D=128, D_TILES=1, BLOCK_K=16, w=8, s=2),
                     # all of D ≤ 384 in one program (the noise generated once per row block)
                     _fwd(BLOCK_M=32, BLOCK_D=128, D_TILES=3, BLOCK_K=4, w=8, s=2)]
_DW_CONFIGS_FP32 = [_cfg(BLOCK_M=64, BLOCK_D=64, D_TILES=1, BLOCK_K=8, w=4, s=2),
                    _cfg(BLOCK_M=16, BLOCK_D=128, D_TILES=1, BLOCK_K=16, w=8, s=2),
                    _cfg(BLOCK_M=32, BLOCK_D=64, D_TILES=3, BLOCK_K=8, w=8, s=2),
                    _cfg(BLOCK_M=16, BLOCK_D=128, D_TILES=3, BLOCK_K=8, w=8, s=2)]
# ψ[idx] + v + σ·n: 8 elements per thread per quarter tile in both (64 x 64 with 8 warps, 16, spilled 24 B of
# registers with noise, triton 3.8; 64 x 32 fits D = 384's D4 = 96 quarter columns in 3 programs exactly)
_POS_CONFIGS = [_cfg(BLOCK_M=32, BLOCK_K=32, w=4, s=1), _cfg(BLOCK_M=64, BLOCK_K=32, w=8, s=1)]
_SMEM_BUDGET = 227 * 1024


def _elt(t) -> int:
    return t.element_size() if hasattr(t, "element_size") else 4


def _config_id(c):
    return tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages


def _tiles_used(meta, D) -> bool:
    """False when a program's last D tile lies entirely beyond D (its MMAs would be wasted)."""
    return meta["D_TILES"] == 1 or (meta["D_TILES"] - 1) * meta["BLOCK_D"] < D


def _prune(configs, named_args, fp32_configs, stage_bytes):
    """The configs of ``configs`` meant for W's element size (those of ``fp32_configs`` for float32 W, the
    others for 16-bit W) whose pipelined operand tiles (``stage_bytes(meta, element size)`` per stage) fit
    the shared memory of an H100/H200 and whose last D tile is used; the first one meant for W's element
    size when none is left."""
    wb = _elt(named_args["w_ptr"])
    fp32_ids = {_config_id(c) for c in fp32_configs}
    own = [c for c in configs if (_config_id(c) in fp32_ids) == (wb == 4)]
    keep = [c for c in own if stage_bytes(c.kwargs, wb) * max(c.num_stages, 1) <= _SMEM_BUDGET
            and _tiles_used(c.kwargs, named_args["D"])]
    return keep or (own or configs)[:1]


def _prune_fwd(configs, named_args, **kw):
    """Per stage: the Wᵀ rows [4·BLOCK_K, D_TILES·BLOCK_D] and the A tile [BLOCK_M, 4·BLOCK_K]."""
    return _prune(configs, named_args, _FWD_CONFIGS_FP32,
                  lambda m, wb: 4 * m["BLOCK_K"] * wb * (m["D_TILES"] * m["BLOCK_D"] + m["BLOCK_M"]))


def _prune_dw(configs, named_args, **kw):
    """Per stage: gᵀ [D_TILES·BLOCK_D, BLOCK_M] and the noise tile [BLOCK_M, 4·BLOCK_K]."""
    return _prune(configs, named_args, _DW_CONFIGS_FP32,
                  lambda m, wb: m["BLOCK_M"] * wb * (m["D_TILES"] * m["BLOCK_D"] + 4 * m["BLOCK_K"]))


_PINNED: dict = {}


@contextlib.contextmanager
def pin_configs(**configs):
    """Force kernel configs (``fwd=``, ``dw=``, ``pos=``: a :class:`triton.Config`) inside the block.

    Used by the tests to run every autotune config (also under the interpreter) and by tuning scripts.
    """
    old = dict(_PINNED)
    _PINNED.update({k: v for k, v in configs.items() if v is not None})
    try:
        yield
    finally:
        _PINNED.clear()
        _PINNED.update(old)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_a(a_ptr, stride_am, stride_ak, rows, row_ok, e, e_ok):
    """A tile ``[BLOCK_M, len(e)]`` = ``A[rows, e]`` from memory, zero outside."""
    ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_am + e[None, :] * stride_ak
    return tl.load(ptrs, mask=row_ok[:, None] & e_ok[None, :], other=0.0)


@triton.jit
def _load_wt(w_ptr, stride_wd, stride_we, e, e_ok, dcol, d_ok):
    """Wᵀ rows ``[len(e), BLOCK_D]`` = ``W[dcol, e]ᵀ``, zero outside (so padded columns add nothing)."""
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


@triton.jit
def _mma_wt(a, wt, acc, like_ptr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, SWAP_AB: tl.constexpr):
    """One K step of a D tile: ``acc + a·wt`` (``a`` [M, K], ``wt`` [K, BLOCK_D]), or with SWAP_AB its
    transpose ``acc + wtᵀ·a`` (``a`` [K, M], ``acc`` [BLOCK_D, M])."""
    if SWAP_AB:
        acc = _mma(tl.trans(wt), a, acc, like_ptr, PRECISION, UPCAST)
    else:
        acc = _mma(a, wt, acc, like_ptr, PRECISION, UPCAST)
    return acc


@triton.jit
def _group_rows(rows, G, stride_g, stride_r, GROUPED: tl.constexpr):
    """int64 element offsets of the rows ``rows`` (int32, < 2**31: ``_checks.MAX_NOISE_ROWS``) of a
    ``[groups, G, ...]`` view, for the dW kernel's main loop: row r = group·G + i at
    ``(r // G)·stride_g + (r % G)·stride_r``.

    The division is in int32: in int64 it was a call to a 64-bit division routine per row, four per step.
    Without GROUPED (the wrapper's ``_grouped``: one group, or groups exactly G rows apart, as the contiguous
    bf16 copy of g under autocast) the offset is ``r·stride_r`` and there is no division at all: the main loop
    fell by 7–18 % of its SASS instructions (sm_90a, triton 3.6, every config). (The forward's epilogue and
    the isotropic kernel divide once per program, in int64 as before: int32 there cost a 4-warp forward
    config 4 registers and a CTA per SM.)"""
    if GROUPED:
        return (rows // G).to(tl.int64) * stride_g + (rows % G).to(tl.int64) * stride_r
    else:
        return rows.to(tl.int64) * stride_r


@triton.jit
def _quarter_cols(q0, E4, E, BLOCK_K: tl.constexpr):
    """The E columns of a concatenated K step: column ``c = j·BLOCK_K + k`` is ``e = q0 + k + j·E4``.

    Returns ``(e, e_ok)`` of shape ``[4·BLOCK_K]``; ``e_ok`` is False past the quarter (``q ≥ E4``)
    or past E.
    """
    c = tl.arange(0, 4 * BLOCK_K)
    q = q0 + c % BLOCK_K
    e = q + (c // BLOCK_K) * E4
    return e, (q < E4) & (e < E)


@triton.jit
def _cat4(a0, a1, a2, a3, AXIS: tl.constexpr):
    """The four quarter tiles of a K step as one operand, in the order of :func:`_quarter_cols`:
    ``AXIS=1``: ``[M, K]`` tiles → ``[M, 4K]`` (column ``j·K + k`` holds ``a_j[:, k]``);
    ``AXIS=0``: ``[K, M]`` tiles → ``[4K, M]`` (row ``j·K + k`` holds ``a_j[k, :]``).

    One ``[M, 4K]`` operand per K step means one MMA per accumulator per step. Four chained
    quarter MMAs into one accumulator made Triton give the chain two different wgmma layouts
    (``warpsPerCTA`` [8, 1] for a dot that feeds another dot, [4, 2] for the last) and convert the
    fp32 accumulators between them through shared memory twice per D tile per step, with every
    wgmma waited on (TTGIR/SASS, sm_90a).
    """
    t = tl.join(tl.join(a0, a1), tl.join(a2, a3))    # [.., .., 2, 2]: t[x, y, i, j] = a_{i+2j}[x, y]
    if AXIS == 1:
        t = tl.permute(t, (0, 3, 2, 1))                # [M, 2, 2, K]: [m, j, i, k], block 2j + i
        return tl.reshape(t, (t.shape[0], 4 * t.shape[3]))
    else:
        t = tl.permute(t, (3, 2, 0, 1))                # [2, 2, K, M]: [j, i, k, m], block 2j + i
        return tl.reshape(t, (4 * t.shape[2], t.shape[3]))


@triton.jit
def _project_epilogue(acc, dcol, D, b_ptr, p, pos_ptr, stride_pp, stride_pd, row_ok, out_rows, stride_od,
                      stride_oc, N_COPIES, HAS_BIAS: tl.constexpr, SWAP_AB: tl.constexpr):
    """acc + b + ψ[p] stored at ``out_rows + dcol·stride_od`` (N_COPIES times, stride_oc apart); ``acc`` is
    ``[BLOCK_M, BLOCK_D]``, or its transpose with SWAP_AB."""
    if SWAP_AB:
        acc = tl.trans(acc)
    d_ok = dcol < D
    if HAS_BIAS:
        acc += tl.load(b_ptr + dcol, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    tile_ok = row_ok[:, None] & d_ok[None, :]
    acc += tl.load(pos_ptr + p[:, None] * stride_pp + dcol[None, :] * stride_pd, mask=tile_ok,
                   other=0.0).to(tl.float32)
    out_ptrs = out_rows[:, None] + dcol[None, :] * stride_od
    val = acc.to(out_rows.dtype.element_ty)
    for c in range(N_COPIES):  # (the pointer advances: c·stride_oc in int32 would wrap past 2^31 elements)
        tl.store(out_ptrs, val, mask=tile_ok)
        out_ptrs += stride_oc


@triton.jit
def _halves(acc):
    """The first and the second half of the rows of ``acc`` ``[2H, M]``: two ``[H, M]`` tiles."""
    return tl.split(tl.permute(tl.reshape(acc, (2, acc.shape[0] // 2, acc.shape[1])), (1, 2, 0)))


@triton.jit
def _project_epilogue_halves(acc, dcol0, D, b_ptr, p, pos_ptr, stride_pp, stride_pd, row_ok, out_rows, stride_od,
                             stride_oc, N_COPIES, HAS_BIAS: tl.constexpr):
    """:func:`_project_epilogue` of a transposed tile ``[2H, M]`` (columns ``dcol0 + [0, 2H)``) in two halves."""
    lo, hi = _halves(acc)
    dcol = dcol0 + tl.arange(0, acc.shape[0] // 2)
    _project_epilogue(lo, dcol, D, b_ptr, p, pos_ptr, stride_pp, stride_pd, row_ok, out_rows, stride_od,
                      stride_oc, N_COPIES, HAS_BIAS, True)
    _project_epilogue(hi, dcol + acc.shape[0] // 2, D, b_ptr, p, pos_ptr, stride_pp, stride_pd, row_ok, out_rows,
                      stride_od, stride_oc, N_COPIES, HAS_BIAS, True)


@triton.jit
def _project_rows(pid_m, pid_d, a_ptr, stride_am, stride_ak,
                  idx_ptr, pos_ptr, stride_pp, stride_pd,
                  w_ptr, stride_wd, stride_we, b_ptr,
                  out_ptr, stride_og, stride_or, stride_od, stride_oc,
                  R, E, E4, D, G, N_COPIES, key0, key1, sigma,
                  NOISE: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, D_TILES: tl.constexpr, BLOCK_K: tl.constexpr,
                  SWAP_AB: tl.constexpr):
    """out[r, d] = Σ_e A[r, e]·W[d, e] + b[d] + ψ[idx[r], d] for the [BLOCK_M, D_TILES·BLOCK_D] output tile
    (pid_m, pid_d) of one row segment.

    The A tiles of a K step (Philox noise or memory) are produced once and multiplied into the
    D_TILES accumulators (1 ≤ D_TILES ≤ 4), so the noise is generated once per row block. With SWAP_AB
    each accumulator holds the transposed tile ``[BLOCK_D, BLOCK_M] = W·Aᵀ``: A's tile is then the MMA's
    second operand, which the tensor cores read from shared memory (on sm_90 a first operand made in
    registers stays in registers, and ptxas serialized those wgmmas).
    """
    tl.static_assert(D_TILES >= 1 and D_TILES <= 4)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcol0 = pid_d * (BLOCK_D * D_TILES) + tl.arange(0, BLOCK_D)
    dcol1 = dcol0 + BLOCK_D
    dcol2 = dcol0 + 2 * BLOCK_D
    dcol3 = dcol0 + 3 * BLOCK_D
    kk = tl.arange(0, BLOCK_K)
    row_ok = rows < R
    if SWAP_AB:
        acc0 = tl.zeros([BLOCK_D, BLOCK_M], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_D, BLOCK_M], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_D, BLOCK_M], dtype=tl.float32)
        acc3 = tl.zeros([BLOCK_D, BLOCK_M], dtype=tl.float32)
    else:
        acc0 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        acc3 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # main loop over quarter columns q0: the A tile [BLOCK_M, 4·BLOCK_K] of a step holds the columns
    # q0 + k + j·E4 (j = 0..3, _quarter_cols), multiplied with the Wᵀ rows of the same columns
    for q0 in range(0, E4, BLOCK_K):
        e, e_ok = _quarter_cols(q0, E4, E, BLOCK_K)
        if NOISE:
            # noise: one Philox call per (row, q) gives the four quarters, in registers only; padded
            # columns (e_ok False) meet zero Wᵀ rows. Generated as [K, M] tiles and transposed: with the
            # tile made in the MMA's own register layout, triton 3.6 (the GPU image) had both warp
            # groups compute all of it (each holds all rows of A); the transpose sends it through shared
            # memory once (SASS, sm_90a: 16 → 8 cos per thread per step, 1312 → 804 loop instructions)
            q = q0 + kk
            a0, a1, a2, a3 = normal_quarters(rows[None, :], q[:, None], key0, key1, sigma)  # [K, M] tiles
            dt = w_ptr.dtype.element_ty
            if SWAP_AB:
                # the quarters stacked as the [4K, M] second operand: no transpose, and the MMA reads the
                # tile from shared memory, where the first operand (W's tile) also lies
                a = _cat4(a0.to(dt), a1.to(dt), a2.to(dt), a3.to(dt), 0)
            elif D_TILES > 1:
                # the quarters stacked as one [4K, M] tile, then one transpose: the barriers of the
                # main loop fall from 9 to 3 (triton 3.6) and from 29 to 3 (3.8), sm_90a SASS of the
                # D_TILES = 3 configs; the shared-memory round trips of four transposes and _cat4's
                # permute were most of the noise's cost in the loop (benchmarks/NOTES.md, GPU run 6)
                a = tl.trans(_cat4(a0.to(dt), a1.to(dt), a2.to(dt), a3.to(dt), 0))
            else:
                # (one program per D tile: the same SASS either way in bf16, and the stacked form
                # gives the fp32 configs a 264-344 B stack frame, triton 3.8)
                a = _cat4(tl.trans(a0.to(dt)), tl.trans(a1.to(dt)), tl.trans(a2.to(dt)), tl.trans(a3.to(dt)), 1)
        else:
            # memory: the same columns of A (e.g. the context tokens)
            a = _load_a(a_ptr, stride_am, stride_ak, rows, row_ok, e, e_ok)
            if SWAP_AB:
                a = tl.trans(a)
        acc0 = _mma_wt(a, _load_wt(w_ptr, stride_wd, stride_we, e, e_ok, dcol0, dcol0 < D), acc0, w_ptr,
                       PRECISION, UPCAST, SWAP_AB)
        if D_TILES > 1:
            acc1 = _mma_wt(a, _load_wt(w_ptr, stride_wd, stride_we, e, e_ok, dcol1, dcol1 < D), acc1, w_ptr,
                           PRECISION, UPCAST, SWAP_AB)
        if D_TILES > 2:
            acc2 = _mma_wt(a, _load_wt(w_ptr, stride_wd, stride_we, e, e_ok, dcol2, dcol2 < D), acc2, w_ptr,
                           PRECISION, UPCAST, SWAP_AB)
        if D_TILES > 3:
            acc3 = _mma_wt(a, _load_wt(w_ptr, stride_wd, stride_we, e, e_ok, dcol3, dcol3 < D), acc3, w_ptr,
                           PRECISION, UPCAST, SWAP_AB)
    # epilogue: + bias + ψ[idx[r]] (gathered), in fp32; row r lands at (r // G)·stride_og + (r % G)·stride_or,
    # N_COPIES times stride_oc apart
    p = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    r64 = rows.to(tl.int64)
    out_rows = out_ptr + ((r64 // G) * stride_og + (r64 % G) * stride_or)
    if SWAP_AB and BLOCK_D == 512:
        # in 64-column parts: the epilogue of a whole [512, BLOCK_M] tile held [BLOCK_M, 512] pointer and ψ tiles beside
        # it, and the 64-row configs spilled (sm_90a, triton 3.6 and 3.8; 128-column parts still did with an fp32 ψ)
        d0 = pid_d * BLOCK_D
        lo, hi = _halves(acc0)
        t0, t1 = _halves(lo)
        t2, t3 = _halves(hi)
        QD: tl.constexpr = BLOCK_D // 4
        _project_epilogue_halves(t0, d0, D, b_ptr, p, pos_ptr, stride_pp, stride_pd, row_ok, out_rows, stride_od,
                                 stride_oc, N_COPIES, HAS_BIAS)
        _project_epilogue_halves(t1, d0 + QD, D, b_ptr, p, pos_ptr, stride_pp, stride_pd, row_ok, out_rows,
                                 stride_od, stride_oc, N_COPIES, HAS_BIAS)
        _project_epilogue_halves(t2, d0 + 2 * QD, D, b_ptr, p, pos_ptr, stride_pp, stride_pd, row_ok, out_rows,
                                 stride_od, stride_oc, N_COPIES, HAS_BIAS)
        _project_epilogue_halves(t3, d0 + 3 * QD, D, b_ptr, p, pos_ptr, stride_pp, stride_pd, row_ok, out_rows,
                                 stride_od, stride_oc, N_COPIES, HAS_BIAS)
    else:
        _project_epilogue(acc0, dcol0, D, b_ptr, p, pos_ptr, stride_pp, stride_pd, row_ok, out_rows, stride_od,
                          stride_oc, N_COPIES, HAS_BIAS, SWAP_AB)
    if D_TILES > 1:
        _project_epilogue(acc1, dcol1, D, b_ptr, p, pos_ptr, stride_pp, stride_pd, row_ok, out_rows, stride_od,
                          stride_oc, N_COPIES, HAS_BIAS, SWAP_AB)
    if D_TILES > 2:
        _project_epilogue(acc2, dcol2, D, b_ptr, p, pos_ptr, stride_pp, stride_pd, row_ok, out_rows, stride_od,
                          stride_oc, N_COPIES, HAS_BIAS, SWAP_AB)
    if D_TILES > 3:
        _project_epilogue(acc3, dcol3, D, b_ptr, p, pos_ptr, stride_pp, stride_pd, row_ok, out_rows, stride_od,
                          stride_oc, N_COPIES, HAS_BIAS, SWAP_AB)


@triton.autotune(configs=_FWD_CONFIGS + _FWD_CONFIGS_FP32, key=["E", "D", "NOISE", "NOISE_ROWS"],
                 prune_configs_by={"early_config_prune": _prune_fwd}, cache_results=True)
@triton.jit(do_not_specialize=["key0", "key1", "sigma", "R", "G", "N_COPIES", "R2", "G2"])
def _project_kernel(a_ptr, stride_am, stride_ak,
                    idx_ptr, pos_ptr, stride_pp, stride_pd,
                    w_ptr, stride_wd, stride_we, b_ptr,
                    out_ptr, stride_og, stride_or, stride_od, stride_oc,
                    R, E, E4, D, G, N_COPIES, key0, key1, sigma,
                    idx2_ptr, out2_ptr, stride_og2, stride_or2, stride_od2, R2, G2,
                    NOISE: tl.constexpr, NOISE_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, D_TILES: tl.constexpr,
                    BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr):
    """One or two row segments of ``A·Wᵀ + b + ψ[idx]`` (:func:`_project_rows`), one program per output tile.

    The first R rows take A from memory or the noise (NOISE); with NOISE_ROWS the programs past their
    row blocks write R2 more rows of Philox noise (rows numbered from 0, as a launch of their own would),
    indices ``idx2``, stored once into ``out2``: the predictor input's context and masked rows in one launch.
    """
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    if NOISE_ROWS:
        first = tl.cdiv(R, BLOCK_M)
        if pid_m >= first:
            _project_rows(pid_m - first, pid_d, a_ptr, 0, 0, idx2_ptr, pos_ptr, stride_pp, stride_pd,
                          w_ptr, stride_wd, stride_we, b_ptr, out2_ptr, stride_og2, stride_or2, stride_od2, 0,
                          R2, E, E4, D, G2, 1, key0, key1, sigma,
                          True, HAS_BIAS, PRECISION, UPCAST, BLOCK_M, BLOCK_D, D_TILES, BLOCK_K, SWAP_AB)
        else:
            _project_rows(pid_m, pid_d, a_ptr, stride_am, stride_ak, idx_ptr, pos_ptr, stride_pp, stride_pd,
                          w_ptr, stride_wd, stride_we, b_ptr, out_ptr, stride_og, stride_or, stride_od, stride_oc,
                          R, E, E4, D, G, N_COPIES, key0, key1, sigma,
                          NOISE, HAS_BIAS, PRECISION, UPCAST, BLOCK_M, BLOCK_D, D_TILES, BLOCK_K, SWAP_AB)
    else:
        _project_rows(pid_m, pid_d, a_ptr, stride_am, stride_ak, idx_ptr, pos_ptr, stride_pp, stride_pd,
                      w_ptr, stride_wd, stride_we, b_ptr, out_ptr, stride_og, stride_or, stride_od, stride_oc,
                      R, E, E4, D, G, N_COPIES, key0, key1, sigma,
                      NOISE, HAS_BIAS, PRECISION, UPCAST, BLOCK_M, BLOCK_D, D_TILES, BLOCK_K, SWAP_AB)


@triton.jit
def _dw_step(g_rows, stride_gd, row_ok, dcol, D, a, acc, w_ptr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc ``[BLOCK_D, 4·BLOCK_K]`` + gᵀ·a for one row block and one D tile (a: the row block's A tile)."""
    g = tl.load(g_rows[:, None] + dcol[None, :] * stride_gd, mask=row_ok[:, None] & (dcol < D)[None, :], other=0.0)
    return _mma(tl.trans(g.to(w_ptr.dtype.element_ty)), a, acc, w_ptr, PRECISION, UPCAST)


@triton.jit
def _dw_steps(g_rows, stride_gd, row_ok, dcol0, D, a, acc0, acc1, acc2, acc3, w_ptr, PRECISION: tl.constexpr,
              UPCAST: tl.constexpr, BLOCK_D: tl.constexpr, D_TILES: tl.constexpr):
    """gᵀ·a of one row block into each of the program's D_TILES accumulators (a: ``[BLOCK_M, 4·BLOCK_K]``)."""
    acc0 = _dw_step(g_rows, stride_gd, row_ok, dcol0, D, a, acc0, w_ptr, PRECISION, UPCAST)
    if D_TILES > 1:
        acc1 = _dw_step(g_rows, stride_gd, row_ok, dcol0 + BLOCK_D, D, a, acc1, w_ptr, PRECISION, UPCAST)
    if D_TILES > 2:
        acc2 = _dw_step(g_rows, stride_gd, row_ok, dcol0 + 2 * BLOCK_D, D, a, acc2, w_ptr, PRECISION, UPCAST)
    if D_TILES > 3:
        acc3 = _dw_step(g_rows, stride_gd, row_ok, dcol0 + 3 * BLOCK_D, D, a, acc3, w_ptr, PRECISION, UPCAST)
    return acc0, acc1, acc2, acc3


@triton.jit
def _dw_store(base, dcol, D, E, e, e_ok, acc):
    """Store one D tile ``[BLOCK_D, 4·BLOCK_K]`` of a split's fp32 partial [D, E] at the columns ``e``."""
    tl.store(base + dcol[:, None] * E + e[None, :], acc, mask=(dcol < D)[:, None] & e_ok[None, :])


@triton.autotune(configs=_DW_CONFIGS + _DW_CONFIGS_FP32, key=["E", "D", "HAS_CTX"],
                 prune_configs_by={"early_config_prune": _prune_dw}, cache_results=True)
@triton.jit(do_not_specialize=["key0", "key1", "sigma", "R", "G", "rows_per_split", "RC", "ctx_rows_per_split"])
def _noise_weight_grad_kernel(g_ptr, stride_gg, stride_gr, stride_gd, w_ptr, dw_ptr,
                              R, E, E4, D, G, rows_per_split, key0, key1, sigma,
                              gc_ptr, stride_gcm, stride_gcd, x_ptr, stride_xm, stride_xk, RC, ctx_rows_per_split,
                              HAS_CTX: tl.constexpr, GROUPED: tl.constexpr, PRECISION: tl.constexpr,
                              UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                              D_TILES: tl.constexpr, BLOCK_K: tl.constexpr):
    """partial[s, d, e] = Σ_{r in split s} g[r, d]·n[r, e] (+ Σ_{c in split s} gc[c, d]·x[c, e] with HAS_CTX)
    for the columns e = q + j·E4, q in [q0, q0 + BLOCK_K), j = 0..3.

    One program: D_TILES [BLOCK_D, 4·BLOCK_K] tiles. With HAS_CTX the split first reduces its share of the RC
    rows of a second product read from memory (the predictor input's context rows: gradient ``gc``
    ``[RC, D]``, tokens ``x`` ``[RC, E]``) into the same accumulators, so dW of the whole predictor input is one
    fp32 sum of the splits. The noise of a row block is regenerated once and reduced into all D_TILES (≤ 4)
    D tiles. GROUPED: g's rows are addressed by group and row within it (:func:`_group_rows`).
    """
    tl.static_assert(D_TILES >= 1 and D_TILES <= 4)
    dcol0 = tl.program_id(0) * (BLOCK_D * D_TILES) + tl.arange(0, BLOCK_D)
    q0 = tl.program_id(1) * BLOCK_K
    split = tl.program_id(2)
    dt = w_ptr.dtype.element_ty
    e, e_ok = _quarter_cols(q0, E4, E, BLOCK_K)
    acc0 = tl.zeros([BLOCK_D, 4 * BLOCK_K], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_D, 4 * BLOCK_K], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_D, 4 * BLOCK_K], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_D, 4 * BLOCK_K], dtype=tl.float32)
    if HAS_CTX:
        # the context rows of this split: A = x[rows, e] from memory, gradient rows gc[rows]
        c_begin = split * ctx_rows_per_split
        c_end = tl.minimum(c_begin + ctx_rows_per_split, RC)
        for m0 in range(c_begin, c_end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < c_end
            a = _load_a(x_ptr, stride_xm, stride_xk, rows, row_ok, e, e_ok).to(dt)
            acc0, acc1, acc2, acc3 = _dw_steps(gc_ptr + rows.to(tl.int64) * stride_gcm, stride_gcd, row_ok, dcol0, D,
                                               a, acc0, acc1, acc2, acc3, w_ptr, PRECISION, UPCAST, BLOCK_D, D_TILES)
    r_begin = split * rows_per_split
    r_end = tl.minimum(r_begin + rows_per_split, R)
    # the masked rows of this split: regenerate the noise of a row block once as one [BLOCK_M, 4·BLOCK_K] tile
    # (columns q0 + k + j·E4), then load gᵀ [BLOCK_D, BLOCK_M] of every D tile and accumulate gᵀ·n. The
    # quarters are made as [K, M] tiles, stacked and transposed once: 2 barriers per step instead of 8-18
    # with [M, K] tiles joined side by side (sm_90a SASS, every config, triton 3.6 and 3.8)
    for m0 in range(r_begin, r_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < r_end
        n0, n1, n2, n3 = normal_quarters(rows[None, :], (q0 + tl.arange(0, BLOCK_K))[:, None], key0, key1, sigma)
        n = tl.trans(_cat4(n0.to(dt), n1.to(dt), n2.to(dt), n3.to(dt), 0))
        acc0, acc1, acc2, acc3 = _dw_steps(g_ptr + _group_rows(rows, G, stride_gg, stride_gr, GROUPED), stride_gd,
                                           row_ok, dcol0, D, n, acc0, acc1, acc2, acc3, w_ptr, PRECISION, UPCAST,
                                           BLOCK_D, D_TILES)
    # store this split's fp32 partial [D, E] at the step's columns (padded columns masked)
    base = dw_ptr + split.to(tl.int64) * D * E
    _dw_store(base, dcol0, D, E, e, e_ok, acc0)
    if D_TILES > 1:
        _dw_store(base, dcol0 + BLOCK_D, D, E, e, e_ok, acc1)
    if D_TILES > 2:
        _dw_store(base, dcol0 + 2 * BLOCK_D, D, E, e, e_ok, acc2)
    if D_TILES > 3:
        _dw_store(base, dcol0 + 3 * BLOCK_D, D, E, e, e_ok, acc3)


@triton.jit
def _store_pos_plus(out_ptrs, pos_ptrs, vec_ptr, col, D, row_ok, n, HAS_VEC: tl.constexpr):
    """Store ψ[idx, col] + v[col] + n at the columns ``col`` (< D) of the tile."""
    col_ok = col < D
    ok = row_ok[:, None] & col_ok[None, :]
    val = tl.load(pos_ptrs + col[None, :], mask=ok, other=0.0).to(tl.float32) + n
    if HAS_VEC:
        val += tl.load(vec_ptr + col, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptrs + col[None, :], val.to(out_ptrs.dtype.element_ty), mask=ok)


@triton.autotune(configs=_POS_CONFIGS, key=["D", "NOISE"], cache_results=True)
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


# The autotuner's pick per (kernel, its key's values, the tensor arguments' dtypes), read back after the autotuner ran
# a call with that key: later calls launch the JIT function with the config directly. Autotuner.run rebuilds its key
# from every argument on every call (dicts over the kernel's ~40 arguments, a list scan per name: 11 µs per launch
# on this project's CPU), host time that an eager step pays per launch. The key here is at least as fine as the
# autotuner's (the same values and dtypes), so a call gets the config the autotuner would give it.
_PICKED: dict = {}


@functools.lru_cache(maxsize=None)
def _key_slots(kernel) -> Tuple[int, ...]:
    """Positions in ``kernel.arg_names`` of the autotuner's key arguments."""
    return tuple(kernel.arg_names.index(k) for k in kernel.keys)


def _pick_key(kernel, args, kwargs) -> tuple:
    names = kernel.arg_names
    values = tuple(args[i] if i < len(args) else kwargs[names[i]] for i in _key_slots(kernel))
    return kernel, values, tuple(a.dtype for a in args if isinstance(a, torch.Tensor))


def _launch(kernel, grid, args, kwargs, interp_meta, name):
    """Launch an autotuned kernel, on the device of its first tensor argument.

    A config pinned with :func:`pin_configs` under ``name`` runs as is (interpreter or GPU); otherwise
    under TRITON_INTERPRET=1 the plain jit function runs with ``interp_meta()`` (a function: the GPU path, which
    the autotuner serves, never builds the interpreter's block sizes), and on the GPU the autotuner picks, once per
    key (``_PICKED``).
    """
    cfg = _PINNED.get(name)
    with on_device(next(a for a in args if isinstance(a, torch.Tensor))):
        if cfg is not None:
            meta = dict(cfg.kwargs)
            if interpreting():
                kernel.fn[grid(meta)](*args, **kwargs, **meta)
            else:
                kernel.fn[grid(meta)](*args, **kwargs, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        elif interpreting():
            meta = interp_meta()
            kernel.fn[grid(meta)](*args, **kwargs, **meta)
        else:
            key = _pick_key(kernel, args, kwargs)
            picked = _PICKED.get(key)
            if picked is None:
                kernel[grid](*args, **kwargs)  # the autotuner: times the configs on its first call for the key
                _PICKED[key] = kernel.best_config
            else:
                kernel.fn[grid](*args, **kwargs, **picked.all_kwargs())


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _rows3(t: torch.Tensor):
    """(G, stride_og, stride_or, stride_od) of a ``[groups, G, D]`` view: row r = group·G + i."""
    return t.shape[1], t.stride(0), t.stride(1), t.stride(2)


def _grouped(t: torch.Tensor) -> bool:
    """Whether the rows of a ``[groups, G, D]`` view need the group decomposition (:func:`_group_rows`): more than
    one group, not exactly G rows apart (row r is then not simply at ``r·stride(1)``)."""
    return t.shape[0] > 1 and t.stride(0) != t.shape[1] * t.stride(1)


def launch_project(out3: torch.Tensor, idx: torch.Tensor, pos_embed: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor], *, a: Optional[torch.Tensor] = None, seed: int = 0,
                   noise_std: float = 0.0, copies: int = 1, stride_copy: int = 0,
                   noise_rows: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> None:
    """Write ``A·Wᵀ + b + ψ[idx]`` into the rows of ``out3`` (``[groups, G, D]``, any strides).

    A is ``a`` (``[R, E]``) when given, else the Philox noise of ``seed`` scaled by ``noise_std``.
    ``idx`` is a flat ``[R]`` index tensor, ``R = groups·G``. With ``copies > 1`` every row is also
    stored at ``+c·stride_copy`` elements (c < copies). ``noise_rows = (out3_n, idx_n)`` (with ``a``): the same
    launch also writes the noise rows ``n·Wᵀ + b + ψ[idx_n]`` of ``seed`` and ``noise_std`` into ``out3_n``, as a
    launch of their own would (one Triton launch less per call: host time in an eager step).
    """
    R = idx.numel()
    D, E = weight.shape
    R2 = 0 if noise_rows is None else noise_rows[1].numel()
    if (R == 0 and R2 == 0) or D == 0:
        return
    idx = idx.reshape(-1).contiguous()
    # the kernels read b[d] at unit stride, in W's dtype: a bias of another dtype is rounded to it first, as the
    # reference twin takes it (the kernels add it in fp32, so an fp32 bias would otherwise skip that rounding)
    bias = bias.to(weight.dtype).contiguous() if bias is not None else None
    G, s_og, s_or, s_od = _rows3(out3)
    noise = a is None
    if noise_rows is not None and noise:
        raise ValueError("noise_rows: the second row segment needs memory rows (a) before it")
    out2, idx2 = noise_rows if noise_rows is not None else (out3, idx)
    idx2 = idx2.reshape(-1).contiguous()
    G2, s_og2, s_or2, s_od2 = _rows3(out2)
    a_arg = weight if noise else a
    s_am, s_ak = (0, 0) if noise else a.stride()
    key0, key1 = seed_key_args(seed)
    grid = lambda meta: (triton.cdiv(R, meta["BLOCK_M"]) + triton.cdiv(R2, meta["BLOCK_M"]),  # noqa: E731
                         triton.cdiv(D, meta["BLOCK_D"] * meta["D_TILES"]))
    args = (a_arg, s_am, s_ak, idx, pos_embed, pos_embed.stride(0), pos_embed.stride(1),
            weight, weight.stride(0), weight.stride(1), bias if bias is not None else weight,
            out3, s_og, s_or, s_od, stride_copy, R, E, quarter_width(E), D, G, copies, key0, key1, float(noise_std),
            idx2, out2, s_og2, s_or2, s_od2, R2, G2)
    interp = lambda: dict(BLOCK_M=_pow2(max(R, R2), 16, 1024), BLOCK_D=_pow2(D, 16, 128), D_TILES=1,  # noqa: E731
                          BLOCK_K=_pow2(quarter_width(E), 16, 64), SWAP_AB=False)
    _launch(_project_kernel, grid, args, dict(NOISE=noise, NOISE_ROWS=noise_rows is not None, HAS_BIAS=bias is not None,
                                              PRECISION=_precision(weight.dtype), UPCAST=interpreting()), interp, "fwd")


def _num_sms(device: torch.device) -> int:
    """SMs of ``device`` for the dW row splits; 2 off CUDA (the interpreter: few splits, fast tests)."""
    return sm_count(device, 2)


@functools.lru_cache(maxsize=256)  # a pure function of the shape, called every backward (≈ 40 µs of Python)
def _dw_splits(R: int, D: int, E4: int, sms: int, max_split: int = 16) -> int:
    """Row splits of the dW grid. Cost of s splits: waves × row blocks per program, at a nominal
    program of all of D (≤ 512) × 16 quarter columns × 64 rows and one program per SM (the dW configs'
    registers allow one), at least 256 rows per split. The fp32 partials cost s·D·E·4 bytes, so the
    fewest splits within 10 % of the cheapest win. ViT-H (R = 10752, E4 = 320, 132 SMs): 6 splits,
    one wave of 28 row blocks (13 splits: 2 waves of 13; the former fixed 8: 2 waves of 21), 11.8 MB
    of partials."""
    tiles = triton.cdiv(D, 512) * triton.cdiv(E4, 16)
    blocks = triton.cdiv(R, 64)
    costs = {s: triton.cdiv(tiles * s, sms) * triton.cdiv(blocks, s)
             for s in range(1, max(1, min(max_split, triton.cdiv(R, 256))) + 1)}
    best = min(costs.values())
    return min(s for s, c in costs.items() if c <= 1.1 * best)


def noise_weight_grad(g3: torch.Tensor, weight: torch.Tensor, seed: int, noise_std: float, *,
                      ctx_grad: Optional[torch.Tensor] = None, ctx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dW = Σ_r g[r]ᵀ n[r]`` (fp32 ``[D, E]``) with n regenerated; ``g3`` is ``[groups, G, D]`` (any strides).

    With ``ctx_grad`` (``[RC, D]``) and ``ctx`` (``[RC, E]``) the same launch adds ``ctx_gradᵀ·ctx``: the dW of a
    projection whose other rows read their input from memory (the predictor input's context rows), accumulated
    in the same fp32 sums, so no second GEMM, cast or add runs. Their tiles are multiplied in the weight's
    dtype, as the noise's.
    """
    D, E = weight.shape
    R = g3.shape[0] * g3.shape[1] if noise_std != 0.0 else 0  # σ = 0: the noise rows add nothing
    RC = 0 if ctx is None else ctx.shape[0]
    if (R == 0 and RC == 0) or D == 0 or E == 0:
        return torch.zeros((D, E), dtype=torch.float32, device=weight.device)
    if R and g3.dtype != weight.dtype:
        # The kernel multiplies in the weight's dtype (it casts each loaded g tile), so casting first gives the same
        # dW. It is a matter of speed: under autocast g is the fp32 gradient of the fp32 predictor input, and fp32 g
        # tiles tripled the kernel's main loop in SASS (544 -> 1586 instructions, 148 -> 238 registers for the
        # tuned config; benchmarks/NOTES.md). In the op it ran 0.29 ms against 0.08-0.09 for bf16 g in the config
        # sweep (h200-run5). One cast over R·D costs a few microseconds.
        g3 = g3.to(weight.dtype, memory_format=torch.contiguous_format)
    G, s_gg, s_gr, s_gd = _rows3(g3)
    E4 = quarter_width(E)
    split = _dw_splits(R + RC, D, E4, _num_sms(weight.device))
    rows_per_split, ctx_rows_per_split = triton.cdiv(R, split), triton.cdiv(RC, split)
    partial = torch.empty((split, D, E), dtype=torch.float32, device=weight.device)
    key0, key1 = seed_key_args(seed)
    grid = lambda meta: (triton.cdiv(D, meta["BLOCK_D"] * meta["D_TILES"]), triton.cdiv(E4, meta["BLOCK_K"]),  # noqa: E731
                         split)
    has_ctx = RC > 0
    gc, x = (ctx_grad, ctx) if has_ctx else (weight, weight)
    args = (g3, s_gg, s_gr, s_gd, weight, partial, R, E, E4, D, G, rows_per_split, key0, key1, float(noise_std),
            gc, gc.stride(0), gc.stride(1), x, x.stride(0), x.stride(1), RC, ctx_rows_per_split)
    interp = lambda: dict(BLOCK_M=_pow2(max(rows_per_split, ctx_rows_per_split), 16, 1024),  # noqa: E731
                          BLOCK_D=_pow2(D, 16, 128), D_TILES=1, BLOCK_K=_pow2(E4, 16, 64))
    _launch(_noise_weight_grad_kernel, grid, args,
            dict(HAS_CTX=has_ctx, GROUPED=_grouped(g3), PRECISION=_precision(weight.dtype), UPCAST=interpreting()),
            interp, "dw")
    return partial[0] if split == 1 else partial.sum(0)


def launch_pos_noise(out3: torch.Tensor, idx: torch.Tensor, pos_embed: torch.Tensor, vec: Optional[torch.Tensor],
                     *, seed: int = 0, noise_std: Optional[float] = None) -> None:
    """Write ``ψ[idx] + vec + σ·n_D`` into ``out3`` (``[groups, G, D]``, unit stride in D); no noise when σ is None."""
    R = idx.numel()
    D = pos_embed.shape[1]
    if R == 0 or D == 0:
        return
    # unit stride in d, or D = 1, where the one column is read at offset 0 whatever its stride (an [P, 1] ψ that
    # is a transposed row counts as contiguous, so ψ.contiguous() keeps its stride P)
    assert D == 1 or (out3.stride(2) == 1 and pos_embed.stride(1) == 1)
    idx = idx.reshape(-1).contiguous()
    vec = vec.contiguous() if vec is not None else None  # read at unit stride
    G, s_og, s_or, _ = _rows3(out3)
    key0, key1 = seed_key_args(seed)
    grid = lambda meta: (triton.cdiv(R, meta["BLOCK_M"]), triton.cdiv(quarter_width(D), meta["BLOCK_K"]))  # noqa: E731
    args = (idx, pos_embed, pos_embed.stride(0), vec if vec is not None else pos_embed,
            out3, s_og, s_or, R, D, G, key0, key1, float(noise_std or 0.0))
    interp = lambda: dict(BLOCK_M=_pow2(R, 16, 1024), BLOCK_K=_pow2(quarter_width(D), 16, 64))  # noqa: E731
    _launch(_pos_noise_kernel, grid, args, dict(NOISE=noise_std is not None, HAS_VEC=vec is not None), interp, "pos")


def scatter_rows(grad_rows: torch.Tensor, idx: torch.Tensor, P: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dψ: fp32 ``[P, D]`` scatter-add of the rows of ``grad_rows`` (``[..., D]``) by ``idx`` (``[...]``)."""
    D = grad_rows.shape[-1]
    if out is None:
        out = torch.zeros((P, D), dtype=torch.float32, device=grad_rows.device)
    return out.index_add_(0, idx.reshape(-1), grad_rows.reshape(idx.numel(), D).float())  # (not -1: D may be 0)


# ----------------------------------------------------------------------------------------------
# torch.library ops (work under torch.compile; the seed is a CPU int64 scalar tensor)
# ----------------------------------------------------------------------------------------------
def _out_dtype(weight: torch.Tensor, pos_embed: torch.Tensor) -> torch.dtype:
    return torch.promote_types(weight.dtype, pos_embed.dtype)


def _stop_embed_fwd(pos_embed: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    seed: torch.Tensor, noise_std: float) -> torch.Tensor:
    """The forward launch (the body of the custom op and of its eager twin ``_StopEmbedFn``)."""
    D = weight.shape[0]
    out = torch.empty(idx.shape + (D,), dtype=_out_dtype(weight, pos_embed), device=weight.device)
    launch_project(out.view(1, idx.numel(), D), idx.reshape(-1), pos_embed, weight, bias,
                   seed=int(seed), noise_std=noise_std)
    return out


_stop_embed_op = torch.library.custom_op("stop_kernels::stop_embed", _stop_embed_fwd, mutates_args=())


@_stop_embed_op.register_fake
def _(pos_embed, idx, weight, bias, seed, noise_std):
    return weight.new_empty(idx.shape + (weight.shape[0],), dtype=_out_dtype(weight, pos_embed))


@torch.library.custom_op("stop_kernels::noise_weight_grad", mutates_args=())
def _noise_weight_grad_op(grad: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, noise_std: float,
                          ctx_grad: Optional[torch.Tensor], ctx: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 ``[D, E]`` = Σ_r grad[r]ᵀ n[r] (+ ctx_gradᵀ·ctx); ``grad`` is ``[groups, G, D]`` (rows r = group·G + i)."""
    return noise_weight_grad(grad, weight, int(seed), noise_std, ctx_grad=ctx_grad, ctx=ctx)


@_noise_weight_grad_op.register_fake
def _(grad, weight, seed, noise_std, ctx_grad, ctx):
    return weight.new_empty(weight.shape, dtype=torch.float32)


def noise_weight_grad_in_backward(grad: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, noise_std: float, *,
                                  ctx_grad: Optional[torch.Tensor] = None,
                                  ctx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`noise_weight_grad` inside an op's backward: the custom op where the backward is traced
    (torch.compile), the launcher itself in eager, without the dispatcher round trip."""
    if custom_op_bypass_ok(grad):
        return noise_weight_grad(grad, weight, int(seed), noise_std, ctx_grad=ctx_grad, ctx=ctx)
    return _noise_weight_grad_op(grad, weight, seed, noise_std, ctx_grad, ctx)


def _stop_setup(ctx, inputs, output):
    pos_embed, idx, weight, bias, seed, noise_std = inputs
    ctx.save_for_backward(idx, weight, seed)
    ctx.noise_std = noise_std
    ctx.pos_meta = (pos_embed.shape[0], pos_embed.dtype)
    ctx.bias_dtype = bias.dtype if bias is not None else None


@first_order_backward
def _stop_backward(ctx, grad):
    idx, weight, seed = ctx.saved_tensors
    D = weight.shape[0]
    g = grad.reshape(idx.numel(), D)  # (not -1: D may be 0)
    dpos = dweight = dbias = None
    if ctx.needs_input_grad[2]:
        dweight = noise_weight_grad_in_backward(g.unsqueeze(0), weight, seed, ctx.noise_std).to(weight.dtype)
    if ctx.needs_input_grad[3]:
        dbias = g.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    if ctx.needs_input_grad[0]:
        P, pdtype = ctx.pos_meta
        dpos = scatter_rows(g, idx, P).to(pdtype)
    return dpos, None, dweight, dbias, None, None


torch.library.register_autograd("stop_kernels::stop_embed", _stop_backward, setup_context=_stop_setup)


# eager calls (custom_op_bypass_ok) run this twin of the custom op: no torch.library dispatch, the same launches
_StopEmbedFn = eager_twin("_StopEmbedFn", _stop_embed_fwd, _stop_setup, _stop_backward)


# ----------------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------------
def check_backend(backend: str, device: torch.device, dtypes: Dict[str, torch.dtype], name: str = "backend") -> str:
    """Resolve ``backend`` to "triton", "reference" or "cuda". ``dtypes``: the dtype each tensor argument reaches
    the kernels in, by argument name (a dtype the kernels do not take sends "auto" to the reference, and makes
    "triton" a ``TypeError`` naming that argument)."""
    chk.choice(name, backend, BACKENDS)
    unsupported = {arg: d for arg, d in dtypes.items() if d not in TRITON_DTYPES}
    if backend == "auto":  # (the custom op has no torch.func rules: reference under a transform, same noise)
        triton_ok = (device.type == "cuda" or (interpreting() and device.type == "cpu")) and not unsupported \
            and not functorch_transforming()
        return "triton" if triton_ok else "reference"
    if backend != "reference":
        refuse_under_func_grad(name, f"the {backend} backend's kernels",
                               f"use {name}='auto' (the reference ops under a transform, same noise) or 'reference'")
    if backend == "triton":
        for arg, d in unsupported.items():
            raise TypeError(f"{arg}: the triton backend takes float16, bfloat16 or float32 tensors, got "
                            f"{str(d).replace('torch.', '')} ({name}='triton'; 'reference' takes any float dtype)")
        if device.type != "cuda" and not (interpreting() and device.type == "cpu"):
            raise ValueError(f"{name}: 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got "
                             f"device {device}" + (f" ({INTERPRET_LATE})" if interpreter_set_after_import() else ""))
    return backend


_CUDA_EXT_OK: Optional[bool] = None


def _cuda_extension_preferred(pos_embed: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """``auto`` takes the compiled CUDA kernels for CUDA tensors when the extension is built and the call
    has one kernel dtype (:func:`_one_kernel_dtype`).

    Measured side by side on an H200 (benchmarks/results/h200-run2, ViT-H shapes, bf16): CUDA
    0.27 / 0.63 ms forward / forward+backward against Triton 0.22 / 1.13 ms, so the faster
    forward+backward (what training runs) is the default; both draw the same noise.
    """
    global _CUDA_EXT_OK
    # read before the arguments are checked: a non-tensor ψ or b goes on to the checks, which name it.
    # Under torch.use_deterministic_algorithms the Triton kernels (fixed-order sums): the CUDA dW adds its row
    # splits with fp32 atomics, which that mode refuses
    if not (isinstance(weight, torch.Tensor) and isinstance(pos_embed, torch.Tensor)
            and (bias is None or isinstance(bias, torch.Tensor))) or weight.device.type != "cuda" \
            or functorch_transforming() or torch.are_deterministic_algorithms_enabled():
        return False
    if not _one_kernel_dtype(pos_embed.dtype, weight.dtype, None if bias is None else bias.dtype,
                             autocast_dtype(weight.device)):
        return False
    if _CUDA_EXT_OK is None:
        try:
            from . import cuda_backend  # noqa: PLC0415
            _CUDA_EXT_OK = bool(cuda_backend.available())
        except Exception:
            _CUDA_EXT_OK = False
    return _CUDA_EXT_OK


def _one_kernel_dtype(pos_dtype: torch.dtype, weight_dtype: torch.dtype, bias_dtype: Optional[torch.dtype],
                      amp: Optional[torch.dtype]) -> bool:
    """Whether ψ, W and b (W and b in the autocast dtype ``amp`` when not None) share one dtype other than
    float64. The CUDA kernels run in one dtype, the promoted one: a mixed call (an fp32 ψ with bf16 W, as
    bf16 autocast calls it with the predictor's fp32 table) would run in fp32, where the Triton kernels take
    bf16 operands with an fp32 ψ in one kernel; float64 has no CUDA kernel."""
    dtypes = {pos_dtype} | {amp or d for d in (weight_dtype, bias_dtype) if d is not None}
    return len(dtypes) == 1 and torch.float64 not in dtypes


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
    """The autocast dtype when autocast is on for ``device``'s type (CUDA, or CPU: the interpreter and the
    reference path then agree, as on a GPU), else None."""
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def check_stop_args(pos_embed, idx, weight, bias, noise_std, generator) -> float:
    """Validate the arguments of :func:`stop_embed` (names the argument in every error)."""
    chk.position_table("pos_embed", pos_embed)
    chk.float_tensor("weight", weight, ndim=2)
    chk.tensor("idx", idx, min_ndim=1, dtypes=chk.INDEX_DTYPES)
    chk.kernel_sizes("idx", idx.numel(), "positions", weight)
    if bias is not None:
        chk.float_tensor("bias", bias, ndim=1)
    chk.projection_weight("weight", weight, pos_embed.shape[1], "pos_embed.shape[1]", bias=bias)
    if bias is not None:
        chk.dim_equals("bias", bias, 0, weight.shape[0], "predictor width D = weight.shape[0]")
    chk.dim_equals("pos_embed", pos_embed, 1, weight.shape[0], "predictor width D = weight.shape[0]")
    chk.same_device(pos_embed=pos_embed, idx=idx, weight=weight, bias=bias)
    sigma = chk.non_negative("noise_std", noise_std)
    check_generator(generator)
    if not torch.compiler.is_compiling():  # data-dependent: checked eagerly
        P = pos_embed.shape[0]
        chk.index_tensor("idx", idx, upper=P, what=f"pos_embed has {P} rows")
    return sigma


def _checked_seed_eager(pos_embed, idx, weight, bias, noise_std, generator):
    """Validate, then draw the call's seed as a CPU int64 scalar tensor (none when σ = 0: the noise is zero, and
    the generator is left as it was)."""
    sigma = check_stop_args(pos_embed, idx, weight, bias, noise_std, generator)
    return sigma, torch.tensor(draw_seed(generator) if sigma > 0 else 0, dtype=torch.int64, device="cpu")


_checked_seed = chk.eager_under_compile(_checked_seed_eager)


def stop_embed(pos_embed: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
               bias: Optional[torch.Tensor] = None, *, noise_std: float = 0.25,
               generator: Optional[torch.Generator] = None, backend: str = "auto") -> torch.Tensor:
    """Stochastic positional embedding ``ψ[idx] + n·Wᵀ + b`` with n ~ N(0, noise_std² I_E) from Philox.

    Args:
        pos_embed: ``[P, D]`` positional table ψ (gradient scatter-added only if it requires grad).
        idx: ``[..., M]`` int32/int64 positions in ``[0, P)``, any batch rank, any strides.
        weight: ``[D, E]`` projection W (as ``nn.Linear(E, D).weight`` holds it; any strides); bias: ``[D]`` or None.
        noise_std: σ ≥ 0. generator: CPU ``torch.Generator`` the per-call seed is drawn from
            (default generator when None), so ``torch.manual_seed`` reproduces the noise.
        backend: "auto" (the CUDA C++ kernels for CUDA tensors when ``stop_kernels._C`` is built and
            ψ, W and b have one dtype (W and b in the autocast dtype under autocast) — measured faster
            forward+backward on an H200 —, else Triton on CUDA or under TRITON_INTERPRET=1, else
            "reference"; "reference" also inside ``torch.func`` transforms such as ``grad``, which the
            custom ops do not support),
            "triton", "reference" (same seed and Philox noise, computed with
            :func:`stop_kernels.reference.stop_embed`), or "cuda" (the CUDA C++ backend).
    Returns:
        ``[..., M, D]`` in ``promote(weight.dtype, pos_embed.dtype)``. Under autocast (CUDA or CPU) W and
        b are taken in the autocast dtype (fp32 accumulation) on every backend.
    Noise row r is row r of ``idx.reshape(-1)``: ``n = philox_normal(seed, idx.numel(), E, σ)``.
    Under ``torch.compile`` the kernels are a custom op inside the graph, but each call draws its seed
    from the generator (and checks its arguments) eagerly: one graph break per call, so compiled and
    eager code draw the same noise; ``fullgraph=True`` refuses it (``Unsupported: Skip calling
    torch.compiler.disable()d function``). Under ``torch.func.vmap`` one seed serves all samples:
    ``randomness="same"`` works (every sample gets the same noise), ``"different"`` raises NotImplementedError.
    """
    chk.choice("backend", backend, BACKENDS)
    if backend == "cuda" or (backend == "auto" and _cuda_extension_preferred(pos_embed, weight, bias)):
        return load_cuda_backend().stop_embed_cuda(pos_embed, idx, weight, bias, noise_std=noise_std,
                                                  generator=generator)
    sigma, seed = _checked_seed(pos_embed, idx, weight, bias, noise_std, generator)
    amp = autocast_dtype(weight.device)
    if amp is not None:
        weight = weight.to(amp)
        bias = bias.to(amp) if bias is not None else None
    dtypes = {"pos_embed": pos_embed.dtype, "weight": weight.dtype}
    if bias is not None:
        dtypes["bias"] = bias.dtype
    resolved = check_backend(backend, weight.device, dtypes)
    if resolved == "reference":
        E = weight.shape[1]
        noise = philox_normal(int(seed), idx.numel(), E, sigma).to(device=weight.device, dtype=weight.dtype)
        b = bias.to(weight.dtype) if bias is not None else None
        return reference.stop_embed(pos_embed, idx, weight, b, noise.reshape(idx.shape + (E,)))
    args = (pos_embed, idx, weight, bias, seed, sigma)
    return _StopEmbedFn.apply(*args) if custom_op_bypass_ok(weight) else _stop_embed_op(*args)


__all__ = ["stop_embed", "launch_project", "launch_pos_noise", "noise_weight_grad", "scatter_rows",
           "check_stop_args", "check_backend", "load_cuda_backend", "autocast_dtype", "interpreting"]
