"""Experiment, the backward's half: StoP's noise weight gradient with the noise generation overlapped with
asynchronous wgmmas (Gluon), beside ``gluon_stop_forward.py`` (whose docstring says why).

``partial[s, d, e] = Σ_{r in split s} g[r, d]·n[r, e]`` for the noise rows, n the StoP Philox noise, as the library's
``_noise_weight_grad_kernel`` computes it without its context rows (``HAS_CTX``): one program per (16 quarter columns,
row split), all of D ≤ 384 in three 128-row tiles. Per step of BLOCK_M rows it generates the noise tile
``[4·16, BLOCK_M]`` (the forward's), waits until at most the previous step's 3 wgmmas are in flight, stores it into
the other of two buffers, refills the ring of g tiles (``cp.async``, ``[BLOCK_M, 128]`` per D tile), and issues
``accᵀ_t += gᵀ_t · nᵀ`` (A: the g tile read transposed from shared memory, B: the noise tile read transposed) for
the three D tiles, asynchronously. Its partials equal the library kernel's up to the fp32 summation order.

Built and checked by ``gluon_stop_forward.py`` (``--compile-only`` builds both; its GPU run checks and times both).
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared, warpgroup_mma,
                                                              warpgroup_mma_init, warpgroup_mma_wait)

from gluon_stop_forward import BLOCK_D, BLOCK_K, D_TILES, NUM_WARPS, _cp_async, _cta_barrier
from stop_kernels.ops.philox import normal_quarters, quarter_width, seed_key_args
from stop_kernels.ops.stop_embed import _cat4

CONFIGS = [dict(BLOCK_M=64, STAGES=3), dict(BLOCK_M=64, STAGES=4)]


@gluon.jit
def _load_g_step(g_ptr, stride_gr, g_smem, stage, r0, r_end, D,
                 BLOCK_M: gl.constexpr, BLOCK_D: gl.constexpr, D_TILES: gl.constexpr):
    """cp.async of one step's g: buffer ``stage·D_TILES + t`` ``[BLOCK_M, BLOCK_D]`` gets ``g[r0 + i, t·BLOCK_D + d]``
    (zero past the split's rows and past D). One copy operation per D tile (see ``_load_w_step``)."""
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [8, 1], [1, 0])  # [16, 128] per pass: 16-byte copies
    i = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld))
    d = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, ld))
    rows = r0 + i
    for t in gl.static_range(D_TILES):
        dd = t * BLOCK_D + d
        ok = (rows < r_end)[:, None] & (dd < D)[None, :]
        _cp_async(g_smem.index(stage * D_TILES + t), g_ptr + rows[:, None].to(gl.int64) * stride_gr + dd[None, :],
                  mask=ok)


@gluon.jit
def _store_partial(acc, t, base, q0, E, E4, D, BLOCK_D: gl.constexpr, BLOCK_K: gl.constexpr):
    """D tile t of a split's partial: ``acc`` ``[BLOCK_D, 4·BLOCK_K]`` (column ``j·BLOCK_K + k``: e = q0 + k + j·E4)."""
    st: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [8, 1], [1, 0])  # 16-byte stores along a quarter's columns
    val = gl.convert_layout(acc, st)
    d = t * BLOCK_D + gl.arange(0, BLOCK_D, layout=gl.SliceLayout(1, st))
    c = gl.arange(0, 4 * BLOCK_K, layout=gl.SliceLayout(0, st))
    q = q0 + c % BLOCK_K
    e = q + (c // BLOCK_K) * E4
    ok = (d < D)[:, None] & ((q < E4) & (e < E))[None, :]
    gl.store(base + d[:, None].to(gl.int64) * E + e[None, :], val, mask=ok)


@gluon.jit(do_not_specialize=["key0", "key1", "sigma", "R"])
def noise_weight_grad_kernel(g_ptr, stride_gr, dw_ptr, R, D, key0, key1, sigma,
                             E: gl.constexpr, ROWS_PER_SPLIT: gl.constexpr,
                             BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                             BLOCK_D: gl.constexpr, D_TILES: gl.constexpr, BLOCK_K: gl.constexpr):
    """The split ``pid(1)``'s partial of dW at the quarter columns ``q0 = pid(0)·BLOCK_K …`` (all four quarters) and
    all of D: ``accᵀ_t[d, j·BLOCK_K + k] += Σ_r g[r, t·BLOCK_D + d]·n[r, q0 + k + j·E4]``. E and the rows per split
    are constexprs so that the trip count is a constant (a runtime one made triton 3.6 serialise the wgmmas of the
    forward's loop: ``gluon_stop_forward.py``)."""
    gl.static_assert(STAGES >= 3)
    gl.static_assert(D_TILES == 3)
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1],
                                                    instr_shape=[16, 4 * BLOCK_K, 16])
    noise_l: gl.constexpr = gl.BlockedLayout([1, BLOCK_M // 16], [2, 16], [8, 1], [1, 0])  # [16, BLOCK_M]
    g_sl: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    n_sl: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=2 * BLOCK_M, element_bitwidth=16, rank=2)
    g_smem = gl.allocate_shared_memory(g_ptr.dtype.element_ty, [STAGES * D_TILES, BLOCK_M, BLOCK_D], g_sl)
    n_smem = gl.allocate_shared_memory(g_ptr.dtype.element_ty, [2, 4 * BLOCK_K, BLOCK_M], n_sl)
    E4: gl.constexpr = (E + 3) // 4
    n_steps: gl.constexpr = (ROWS_PER_SPLIT + BLOCK_M - 1) // BLOCK_M

    q0 = gl.program_id(0) * BLOCK_K
    split = gl.program_id(1)
    r_begin = split * ROWS_PER_SPLIT
    r_end = gl.minimum(r_begin + ROWS_PER_SPLIT, R)
    qq = q0 + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, noise_l))
    ii = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, noise_l))

    # prologue: the g tiles of the first STAGES - 2 steps in flight (one cp.async group per step)
    for s in gl.static_range(STAGES - 2):
        _load_g_step(g_ptr, stride_gr, g_smem, s, r_begin + s * BLOCK_M, r_end, D, BLOCK_M, BLOCK_D, D_TILES)
        async_copy.commit_group()
    acc0 = warpgroup_mma_init(gl.zeros([BLOCK_D, 4 * BLOCK_K], gl.float32, acc_l))
    acc1 = warpgroup_mma_init(gl.zeros([BLOCK_D, 4 * BLOCK_K], gl.float32, acc_l))
    acc2 = warpgroup_mma_init(gl.zeros([BLOCK_D, 4 * BLOCK_K], gl.float32, acc_l))
    for s in range(n_steps):
        # stage 1: the step's noise, [16, BLOCK_M] per quarter (rows past the split's end meet zero g rows)
        n0, n1, n2, n3 = normal_quarters((r_begin + s * BLOCK_M + ii)[None, :], qq[:, None], key0, key1, sigma)
        # stage 2: step s - 2's wgmmas are done in both warp groups: its noise and g buffers can be written again
        acc0, acc1, acc2 = warpgroup_mma_wait(D_TILES, deps=[acc0, acc1, acc2])
        _cta_barrier()
        dt: gl.constexpr = g_ptr.dtype.element_ty
        n_buf = n_smem.index(s % 2)
        n_buf.store(_cat4(n0.to(dt), n1.to(dt), n2.to(dt), n3.to(dt), 0))  # [4·BLOCK_K, BLOCK_M]: nᵀ
        # stage 3: g of step s + STAGES - 2 into the buffers step s - 2 read; then wait for step s's g
        nxt = s + STAGES - 2
        if nxt < n_steps:
            _load_g_step(g_ptr, stride_gr, g_smem, nxt % STAGES, r_begin + nxt * BLOCK_M, r_end, D,
                         BLOCK_M, BLOCK_D, D_TILES)
        async_copy.commit_group()
        async_copy.wait_group(STAGES - 2)
        fence_async_shared()
        _cta_barrier()
        # stage 4: accᵀ_t += gᵀ_t · nᵀ (K = the step's BLOCK_M rows), asynchronous
        gb = (s % STAGES) * D_TILES
        n_t = n_buf.permute((1, 0))  # [BLOCK_M, 4·BLOCK_K]
        acc0 = warpgroup_mma(g_smem.index(gb).permute((1, 0)), n_t, acc0, is_async=True)
        acc1 = warpgroup_mma(g_smem.index(gb + 1).permute((1, 0)), n_t, acc1, is_async=True)
        acc2 = warpgroup_mma(g_smem.index(gb + 2).permute((1, 0)), n_t, acc2, is_async=True)
    acc0, acc1, acc2 = warpgroup_mma_wait(0, deps=[acc0, acc1, acc2])
    async_copy.wait_group(0)

    # epilogue: this split's fp32 partial [D, E] at the program's columns
    base = dw_ptr + split.to(gl.int64) * D * E
    _store_partial(acc0, 0, base, q0, E, E4, D, BLOCK_D, BLOCK_K)
    _store_partial(acc1, 1, base, q0, E, E4, D, BLOCK_D, BLOCK_K)
    _store_partial(acc2, 2, base, q0, E, E4, D, BLOCK_D, BLOCK_K)


def launch(g: torch.Tensor, weight: torch.Tensor, *, seed: int, noise_std: float, splits: int,
           BLOCK_M: int = 64, STAGES: int = 3, partial=None, warmup: bool = False):
    """fp32 partials ``[splits, D, E]`` (into ``partial`` when given) of ``dW = Σ_r g[r]ᵀ n[r]`` for ``g`` ``[R, D]``
    (bf16, unit stride along D, rows 16-byte aligned) and the noise of ``seed`` (E from ``weight``, whose dtype g
    must have). ``warmup``: launch nothing, return the kernel's arguments and meta-parameters (an offline build)."""
    D, E = weight.shape
    R = g.shape[0]
    if g.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        raise TypeError(f"g, weight: the experiment takes bf16, got {g.dtype} and {weight.dtype}")
    if g.dim() != 2 or g.shape[1] != D or g.stride(1) != 1 or g.stride(0) % 8:
        raise ValueError(f"g: [R, D = {D}] with unit stride along D and 16-byte aligned rows, got shape "
                         f"{tuple(g.shape)} strides {g.stride()}")
    if D > BLOCK_D * D_TILES or E % 32:
        raise ValueError(f"weight: D ≤ {BLOCK_D * D_TILES} and E a multiple of 32, got {tuple(weight.shape)}")
    rows_per_split = triton.cdiv(R, splits)
    if partial is None:
        partial = torch.empty((splits, D, E), dtype=torch.float32, device=g.device)
    key0, key1 = seed_key_args(seed)
    args = (g, g.stride(0), partial, R, D, key0, key1, float(noise_std))
    meta = dict(E=E, ROWS_PER_SPLIT=rows_per_split, BLOCK_M=BLOCK_M, STAGES=STAGES, BLOCK_D=BLOCK_D,
                D_TILES=D_TILES, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS)
    if warmup:
        return args, meta
    noise_weight_grad_kernel[(triton.cdiv(quarter_width(E), BLOCK_K), splits)](*args, **meta)
    return partial
