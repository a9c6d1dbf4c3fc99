#!/usr/bin/env python
"""Experiment: the StoP forward's noise rows with the noise generation overlapped with asynchronous wgmmas (Gluon).

Why (benchmarks/NOTES.md, "Why the StoP forward's noise costs 3× its arithmetic"): the library's Triton kernel
(``_project_kernel``, SWAP_AB) generates a step's noise, stores it to shared memory, and then issues each D tile's
wgmma and *waits for it*: Triton makes a wgmma asynchronous only when its operands come from loads its pipeliner
multi-buffers, never from a tile made in registers. So generation and tensor cores never overlap: 0.1075 ms on an
H200 (run 7) for the ViT-H masked rows, against 0.032 ms with A read from memory.

This kernel writes out what Triton will not: two shared-memory noise buffers, 12 asynchronous wgmmas per K step
(3 D tiles × 4 quarter slices), and ``warpgroup_mma_wait(12)``, so step k's noise is generated while step k-1's
wgmmas run, and the weight tiles arrive by ``cp.async`` into a ring of STAGES buffers. Same noise stream
(``philox.normal_quarters``, called from Gluon), same sums, same epilogue (+ b + ψ[idx], rows r at
``(r // G)·stride_og + (r % G)·stride_or``): its output equals the Triton kernel's up to the fp32 summation order.

The backward's dW kernel has the same serialised structure (run 7: 0.088 ms); ``gluon_stop_dw.py`` is its
overlapped twin, and this script builds, checks and times both.

It is an experiment, not a library op: bf16 W (and b), D ≤ 384 (three 128-row D tiles), E a multiple of 32
(16-byte ``cp.async`` of the quarter chunks). Gluon has no CPU interpreter, so it is checked on the GPU
against the library's Triton kernels and float64, and offline by compiling it for sm_90a (registers, shared memory,
and the main loop's SASS: its ``WARPGROUP.DEPBAR`` waits must not be one per wgmma).

    python benchmarks/gluon_stop_forward.py --compile-only          # no GPU: sm_90a build of each config, SASS stats
    python benchmarks/gluon_stop_forward.py --out DIR [--budget-s 60]   # GPU: correctness, then timings

Writes ``DIR/gluon_stop_forward.json`` and ``.md`` (GPU) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

T0 = time.time()
if __name__ == "__main__" and "--compile-only" in sys.argv:
    os.environ.pop("TRITON_INTERPRET", None)  # real JITFunctions, compiled for an offline sm_90 driver

import torch  # noqa: E402
import triton  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared,  # noqa: E402
                                                              warpgroup_mma, warpgroup_mma_init, warpgroup_mma_wait)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from stop_kernels.ops.philox import normal_quarters, seed_key_args  # noqa: E402
from stop_kernels.ops.stop_embed import _cat4  # noqa: E402  (the quarters stacked as the library stacks them)

# Gluon is experimental and renamed these between triton 3.6 (the GPU image) and 3.8 (CI)
_cp_async = getattr(async_copy, "async_copy_global_to_shared", None) or async_copy.async_load
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

BLOCK_D = 128  # rows of W per D tile: the wgmma's M, two warp groups of 64
D_TILES = 3    # all of D ≤ 384 in one program, so each noise value is generated once
BLOCK_K = 16   # quarter columns per K step: 4 × 16 = 64 columns of E, one wgmma K of 16 per quarter
NUM_WARPS = 8
# in the order a GPU call should reach them: 64 rows per program as the library's tuned config, then 32 (less work
# per step between the waits), each with a 3- and a 4-buffer W ring (one or two steps of cp.async lookahead)
CONFIGS = [dict(BLOCK_M=64, STAGES=3), dict(BLOCK_M=32, STAGES=3), dict(BLOCK_M=64, STAGES=4),
           dict(BLOCK_M=32, STAGES=4)]


@gluon.jit
def _load_w_step(w_ptr, stride_wd, w_smem, stage, q0, E, E4, D,
                 BLOCK_D: gl.constexpr, D_TILES: gl.constexpr, BLOCK_K: gl.constexpr):
    """cp.async of one K step's W: buffer ``stage·D_TILES + t`` ``[4·BLOCK_D, BLOCK_K]`` gets D tile t, its row block j
    ``W[t·BLOCK_D + d, q0 + k + j·E4]`` (quarter j, k < BLOCK_K; zero outside D, E4 and E). One copy operation per
    D tile: as one per (tile, quarter), Gluon put a CTA barrier between every two (their buffers' indices are not
    constants), 11 barriers per step; a buffer of all three tiles is not a power of two."""
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [16, 2], [8, 1], [1, 0])  # 16-byte copies, 4 per thread
    rho = gl.arange(0, 4 * BLOCK_D, layout=gl.SliceLayout(1, ld))
    k = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, ld))
    q = q0 + k
    e = q[None, :] + ((rho // BLOCK_D) * E4)[:, None]
    for t in gl.static_range(D_TILES):
        d = t * BLOCK_D + rho % BLOCK_D
        ok = (d < D)[:, None] & (q < E4)[None, :] & (e < E)
        _cp_async(w_smem.index(stage * D_TILES + t), w_ptr + d[:, None].to(gl.int64) * stride_wd + e, mask=ok)


@gluon.jit
def _epilogue_tile(acc, t, rows, row_ok, out_rows, b_ptr, idx_ptr, pos_ptr, stride_pp, D,
                   HAS_BIAS: gl.constexpr, BLOCK_D: gl.constexpr, BLOCK_M: gl.constexpr):
    """D tile t of the transposed output ``accᵀ`` [BLOCK_D, BLOCK_M]: + b + ψ[idx[r]], stored at ``out_rows``
    (d fastest across a warp, so each row's columns are written contiguously)."""
    epi: gl.constexpr = gl.BlockedLayout([4, 1], [32, 1], [1, 8], [0, 1])
    val = gl.convert_layout(acc, epi)
    d = t * BLOCK_D + gl.arange(0, BLOCK_D, layout=gl.SliceLayout(1, epi))
    d_ok = d < D
    ok = d_ok[:, None] & row_ok[None, :]
    if HAS_BIAS:
        val += gl.load(b_ptr + d, mask=d_ok, other=0.0).to(gl.float32)[:, None]
    p = gl.load(idx_ptr + rows, mask=row_ok, other=0).to(gl.int64)
    val += gl.load(pos_ptr + p[None, :] * stride_pp + d[:, None], mask=ok, other=0.0).to(gl.float32)
    gl.store(out_rows[None, :] + d[:, None], val.to(out_rows.dtype.element_ty), mask=ok)


@gluon.jit(do_not_specialize=["key0", "key1", "sigma", "R", "G"])
def stop_noise_rows_kernel(w_ptr, stride_wd, b_ptr, idx_ptr, pos_ptr, stride_pp, out_ptr, stride_og, stride_or,
                           R, D, G, key0, key1, sigma, E: gl.constexpr,
                           HAS_BIAS: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                           BLOCK_D: gl.constexpr, D_TILES: gl.constexpr, BLOCK_K: gl.constexpr):
    """``out[r, d] = Σ_e n[r, e]·W[d, e] + b[d] + ψ[idx[r], d]`` for BLOCK_M noise rows r and all of D, n the StoP
    Philox noise (σ = ``sigma``), computed transposed: ``accᵀ[d, r] += W[d, e]·nᵀ[e, r]`` (W the wgmma's A, the
    noise its B, both in shared memory)."""
    gl.static_assert(STAGES >= 3)  # the ring refills a buffer two steps after it was read (see the loop)
    NQ: gl.constexpr = 4 * D_TILES  # wgmmas per K step
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1],
                                                    instr_shape=[16, BLOCK_M, 16])
    noise_l: gl.constexpr = gl.BlockedLayout([1, BLOCK_M // 16], [2, 16], [8, 1], [1, 0])  # [16, BLOCK_M]
    w_sl: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=32, element_bitwidth=16, rank=2)
    n_sl: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=2 * BLOCK_M, element_bitwidth=16, rank=2)
    w_smem = gl.allocate_shared_memory(w_ptr.dtype.element_ty, [STAGES * D_TILES, 4 * BLOCK_D, BLOCK_K], w_sl)
    n_smem = gl.allocate_shared_memory(w_ptr.dtype.element_ty, [2, 4 * BLOCK_K, BLOCK_M], n_sl)

    pid = gl.program_id(0)
    rows_n = pid * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, noise_l))
    kk = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, noise_l))
    # E is a constexpr so that the trip count is a constant: with a runtime count triton 3.6 zeroes the accumulators
    # again on the path that skips the loop, where it meets the final wgmma wait, and ptxas then serialises every
    # wgmma of the loop (C7515: 12 waits per step; gl.assume(n_steps > 0) did not remove that path)
    E4: gl.constexpr = (E + 3) // 4
    n_steps: gl.constexpr = (E4 + BLOCK_K - 1) // BLOCK_K

    # prologue: the W tiles of the first STAGES - 2 steps in flight (one cp.async group per step)
    for s in gl.static_range(STAGES - 2):
        _load_w_step(w_ptr, stride_wd, w_smem, s, s * BLOCK_K, E, E4, D, BLOCK_D, D_TILES, BLOCK_K)
        async_copy.commit_group()
    acc0 = warpgroup_mma_init(gl.zeros([BLOCK_D, BLOCK_M], gl.float32, acc_l))
    acc1 = warpgroup_mma_init(gl.zeros([BLOCK_D, BLOCK_M], gl.float32, acc_l))
    acc2 = warpgroup_mma_init(gl.zeros([BLOCK_D, BLOCK_M], gl.float32, acc_l))
    for s in range(n_steps):
        # stage 1: this step's noise in registers, four [BLOCK_K, BLOCK_M] quarters (columns q, q + E4, ...);
        # step s - 1's wgmmas are still running: this is the overlap the kernel exists for
        n0, n1, n2, n3 = normal_quarters(rows_n[None, :], (s * BLOCK_K + kk)[:, None], key0, key1, sigma)
        # stage 2: step s - 2's wgmmas are done (at most step s - 1's NQ outstanding) in both warp groups, so its
        # noise buffer (s % 2) and its W buffer ((s - 2) % STAGES) can be written again
        acc0, acc1, acc2 = warpgroup_mma_wait(NQ, deps=[acc0, acc1, acc2])
        _cta_barrier()
        dt: gl.constexpr = w_ptr.dtype.element_ty
        n_buf = n_smem.index(s % 2)
        n_buf.store(_cat4(n0.to(dt), n1.to(dt), n2.to(dt), n3.to(dt), 0))  # one store: [4·BLOCK_K, BLOCK_M]
        # stage 3: W of step s + STAGES - 2 into the buffer step s - 2 read; then wait for step s's W
        nxt = s + STAGES - 2
        if nxt < n_steps:
            _load_w_step(w_ptr, stride_wd, w_smem, nxt % STAGES, nxt * BLOCK_K, E, E4, D, BLOCK_D, D_TILES, BLOCK_K)
        async_copy.commit_group()  # (empty past the end: the group count stays one per step)
        async_copy.wait_group(STAGES - 2)
        fence_async_shared()  # the noise stores and the copies, visible to the wgmmas (async proxy)
        _cta_barrier()
        # stage 4: the step's 12 wgmmas, asynchronous: accᵀ_t += W_t,j · n_j for D tile t, quarter j
        wb = (s % STAGES) * D_TILES
        for j in gl.static_range(4):
            n_j = n_buf.slice(j * BLOCK_K, BLOCK_K)
            acc0 = warpgroup_mma(w_smem.index(wb).slice(j * BLOCK_D, BLOCK_D), n_j, acc0, is_async=True)
            acc1 = warpgroup_mma(w_smem.index(wb + 1).slice(j * BLOCK_D, BLOCK_D), n_j, acc1, is_async=True)
            acc2 = warpgroup_mma(w_smem.index(wb + 2).slice(j * BLOCK_D, BLOCK_D), n_j, acc2, is_async=True)
    acc0, acc1, acc2 = warpgroup_mma_wait(0, deps=[acc0, acc1, acc2])
    async_copy.wait_group(0)

    # epilogue: + b + ψ[idx[r]] in fp32, rounded once into out's dtype, at row r's place in the [groups, G, D] view
    epi: gl.constexpr = gl.BlockedLayout([4, 1], [32, 1], [1, 8], [0, 1])
    rows = pid * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, epi))
    row_ok = rows < R
    r64 = rows.to(gl.int64)
    out_rows = out_ptr + (r64 // G) * stride_og + (r64 % G) * stride_or
    _epilogue_tile(acc0, 0, rows, row_ok, out_rows, b_ptr, idx_ptr, pos_ptr, stride_pp, D, HAS_BIAS, BLOCK_D, BLOCK_M)
    _epilogue_tile(acc1, 1, rows, row_ok, out_rows, b_ptr, idx_ptr, pos_ptr, stride_pp, D, HAS_BIAS, BLOCK_D, BLOCK_M)
    _epilogue_tile(acc2, 2, rows, row_ok, out_rows, b_ptr, idx_ptr, pos_ptr, stride_pp, D, HAS_BIAS, BLOCK_D, BLOCK_M)


def check_args(out3: torch.Tensor, idx: torch.Tensor, pos_embed: torch.Tensor, weight: torch.Tensor, bias) -> None:
    """What this experiment supports (ValueError / TypeError naming the argument otherwise)."""
    D, E = weight.shape
    if weight.dtype != torch.bfloat16 or (bias is not None and bias.dtype != torch.bfloat16):
        raise TypeError(f"weight, bias: the experiment takes bf16, got {weight.dtype}"
                        f"{'' if bias is None else f' and {bias.dtype}'}")
    if D > BLOCK_D * D_TILES:
        raise ValueError(f"weight: D ≤ {BLOCK_D * D_TILES} (three 128-row tiles), got {D}")
    if E % 32 or weight.stride(1) != 1 or weight.stride(0) % 8:
        raise ValueError(f"weight: E a multiple of 32 and rows 16-byte aligned (cp.async of the quarter chunks), "
                         f"got shape {tuple(weight.shape)} strides {weight.stride()}")
    if out3.stride(2) != 1 or pos_embed.stride(1) != 1:
        raise ValueError("out3, pos_embed: unit stride along D")
    if out3.shape[0] * out3.shape[1] != idx.numel():
        raise ValueError(f"idx: {out3.shape[0] * out3.shape[1]} rows of out3, got {idx.numel()} indices")


def launch(out3: torch.Tensor, idx: torch.Tensor, pos_embed: torch.Tensor, weight: torch.Tensor, bias, *,
           seed: int, noise_std: float, BLOCK_M: int = 64, STAGES: int = 3, warmup: bool = False):
    """``out3`` (``[groups, G, D]``, any group/row strides) ← n·Wᵀ + b + ψ[idx], n the Philox noise of ``seed``.
    ``warmup``: launch nothing, return the kernel's arguments and meta-parameters (for an offline build)."""
    check_args(out3, idx, pos_embed, weight, bias)
    D, E = weight.shape
    R = idx.numel()
    key0, key1 = seed_key_args(seed)
    args = (weight, weight.stride(0), bias if bias is not None else weight, idx.reshape(-1), pos_embed,
            pos_embed.stride(0), out3, out3.stride(0), out3.stride(1), R, D, out3.shape[1], key0, key1,
            float(noise_std))
    meta = dict(E=E, HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, STAGES=STAGES, BLOCK_D=BLOCK_D, D_TILES=D_TILES,
                BLOCK_K=BLOCK_K, num_warps=NUM_WARPS)
    if warmup:
        return args, meta
    return stop_noise_rows_kernel[(triton.cdiv(R, BLOCK_M),)](*args, **meta)


# ViT-H/14 masked rows (issue 3): 64 images × 4 blocks × 42 tokens, E 1280 → D 384, P 256
VITH = dict(R=64 * 4 * 42, E=1280, D=384, P=256)
SIGMA = 0.2


def compile_only() -> list:
    """Each config built for sm_90a without a GPU (devtools.ptxas_report): registers, spills, shared memory, and
    the main loop's SASS (its wgmma waits, barriers and size)."""
    from stop_kernels.devtools import ptxas_report
    R, E, D, P = (VITH[k] for k in "REDP")
    w, b = torch.empty(D, E, dtype=torch.bfloat16), torch.empty(D, dtype=torch.bfloat16)
    pos, idx, out = torch.empty(P, D), torch.zeros(R, dtype=torch.int64), torch.empty(1, R, D)
    import gluon_stop_dw as DW
    g = torch.empty(R, D, dtype=torch.bfloat16)
    builds = [(f"gluon {c}", stop_noise_rows_kernel, launch(out, idx, pos, w, b, seed=1234, noise_std=SIGMA,
                                                             warmup=True, **c)) for c in CONFIGS]
    builds += [(f"gluon dW {c}", DW.noise_weight_grad_kernel, DW.launch(g, w, seed=1234, noise_std=SIGMA,
                                                                         splits=dw_splits(), warmup=True, **c))
               for c in DW.CONFIGS]
    rows = []
    for name, kernel, (args, meta) in builds:
        try:
            rows.append(dict(impl=name, **ptxas_report(kernel, args, meta)))
        except Exception as exc:  # a config that does not build is a result, reported by name
            rows.append(dict(impl=name, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"))
    return rows


def dw_splits(sms: int = 132) -> int:
    """The library's row splits of dW at the ViT-H rows on an H200's 132 SMs (6: one wave of 20 × 6 programs)."""
    from stop_kernels.ops import stop_embed as S
    return S._dw_splits(VITH["R"], VITH["D"], (VITH["E"] + 3) // 4, sms)


def case(sizes, device, seed=1234):
    """Random bf16 W and b, an fp32 ψ and positions, at ``sizes`` (R, E, D, P)."""
    g = torch.Generator().manual_seed(seed)
    R, E, D, P = (sizes[k] for k in "REDP")
    w = (torch.randn(D, E, generator=g) * 0.02).to(device, torch.bfloat16)
    b = (torch.randn(D, generator=g) * 0.02).to(device, torch.bfloat16)
    pos = torch.randn(P, D, generator=g).to(device)
    idx = torch.randint(0, P, (R,), generator=g).to(device)
    return w, b, pos, idx


def library_configs():
    """The library kernels' configs that the tuner picked in GPU run 7 for these rows (pinned: tuning times all):
    ``(forward, dW)``."""
    from stop_kernels.ops import stop_embed as S
    tile = dict(BLOCK_M=64, BLOCK_D=128, D_TILES=3, BLOCK_K=16)
    fwd = next(c for c in S._FWD_CONFIGS if (c.num_warps, c.num_stages) == (16, 2) and c.kwargs == dict(
        SWAP_AB=True, **tile))
    dw = next(c for c in S._DW_CONFIGS if (c.num_warps, c.num_stages) == (8, 2) and c.kwargs == tile)
    return fwd, dw


def _contenders(sizes, device, run):
    """``[(kind, name, cfg, produce)]`` in the order to run them, and per kind ``(exact, scale, epilogue)``:
    ``produce(cfg)`` returns a fresh output (NaN before the kernel writes it; ``poison=False``: uninitialised, for
    the timer), ``exact`` the float64 result. The forward: the library's kernel, then each Gluon config; dW (noise
    rows, the library's row splits): the same."""
    import gluon_stop_dw as DW
    from stop_kernels.ops import stop_embed as S
    from stop_kernels.ops.philox import philox_normal
    R, E, D = sizes["R"], sizes["E"], sizes["D"]
    w, b, pos, idx = case(sizes, device)
    g = (torch.randn(R, D, generator=torch.Generator().manual_seed(7)) * 1e-3).to(device, torch.bfloat16)
    seed = 987654321
    n = philox_normal(seed, R, E, SIGMA).to(device).to(torch.bfloat16).double()  # as the kernels round it
    epilogue = b.double() + pos.double()[idx]
    exact = {"forward": n @ w.double().t() + epilogue, "dW": g.double().t() @ n}
    splits = S._dw_splits(R, D, (E + 3) // 4, S._num_sms(w.device))
    fwd_cfg, dw_cfg = library_configs()

    def fresh(shape, poison):  # NaN where the kernel must write, for the check; uninitialised for the timer
        return torch.full(shape, float("nan"), device=device) if poison else torch.empty(shape, device=device)

    def fwd_library(cfg, poison=True):
        out = fresh((1, R, D), poison)
        with S.pin_configs(fwd=fwd_cfg):
            S.launch_project(out, idx, pos, w, b, seed=seed, noise_std=SIGMA)
        return out[0]

    def fwd_gluon(cfg, poison=True):
        out = fresh((1, R, D), poison)
        if run and "forward" in run:
            run["forward"](out, idx, pos, w, b, seed, cfg)
        else:
            launch(out, idx, pos, w, b, seed=seed, noise_std=SIGMA, **cfg)
        return out[0]

    def dw_library(cfg, poison=True):  # (its partials are the library's own)
        with S.pin_configs(dw=dw_cfg):
            return S.noise_weight_grad(g[None], w, seed, SIGMA)

    def dw_gluon(cfg, poison=True):
        partial = fresh((splits, D, E), poison)
        if run and "dW" in run:
            run["dW"](partial, g, w, seed, cfg)
        else:
            DW.launch(g, w, seed=seed, noise_std=SIGMA, splits=splits, partial=partial, **cfg)
        return partial.sum(0)

    order = [("forward", f"triton (library, run 7's config: {fwd_cfg})", None, fwd_library)]
    order += [("forward", f"gluon {c}", c, fwd_gluon) for c in CONFIGS]
    order += [("dW", f"triton dW (library, run 7's config: {dw_cfg}; {splits} splits)", None, dw_library)]
    order += [("dW", f"gluon dW {c}", c, dw_gluon) for c in DW.CONFIGS]
    scales = {k: v.abs().max().item() for k, v in exact.items()}
    return order, {k: (exact[k], scales[k], epilogue if k == "forward" else None) for k in exact}


def gpu_run(out_dir, budget_s: float, *, sizes=VITH, device="cuda", run=None, timer=None) -> list:
    """Forward, then dW: the library's Triton kernel, then each Gluon config, each output against float64 and against
    the library's (the same noise), and its GPU time (CUDA graph) when it is right; a wrong one gets a diagnosis.
    Rows are written as they finish, each only while the budget lasts (counted from the script's start). ``run``
    (``{"forward": fn(out, idx, pos, w, b, seed, cfg), "dW": fn(partial, g, w, seed, cfg)}``) and ``timer(fn)``
    stand in for the Gluon launches and the timer in tests of this logic without a GPU."""
    from _gpu_common import write_json
    if timer is None:
        from triton.testing import do_bench_cudagraph
        timer = lambda fn: do_bench_cudagraph(fn, rep=100)  # noqa: E731
    order, truth = _contenders(sizes, device, run)
    fwd_cfg, dw_cfg = library_configs()
    env = dict(gpu=torch.cuda.get_device_name() if device == "cuda" else device, torch=torch.__version__,
               triton=triton.__version__, sizes=sizes, sigma=SIGMA,
               dtype="bf16 W, b and g; fp32 ψ, out and dW", library_configs=[str(fwd_cfg), str(dw_cfg)])
    rows, ref = [], {}
    for kind, name, cfg, produce in order:
        row = dict(kind=kind, impl=name, **({"config": cfg} if cfg else {}))
        rows.append(row)
        exact, scale, epilogue = truth[kind]
        if time.time() - T0 > budget_s:
            row["error"] = "skipped (budget)"
            continue
        try:
            out = produce(cfg)
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:  # a config that fails to build or launch is a result, reported by name
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        else:
            row["unwritten"] = int(out.isnan().sum().item())
            row["rel_err_vs_f64"] = (out.double() - exact).nan_to_num(1e30).abs().max().item() / scale
            if kind in ref:
                row["rel_err_vs_triton"] = (out.double() - ref[kind].double()).nan_to_num(1e30).abs().max().item() / scale
            else:
                ref[kind] = out
            if not row["unwritten"] and row["rel_err_vs_f64"] < 2e-2:  # (a wrong kernel's time means nothing)
                row["ms"] = timer(lambda: produce(cfg, poison=False))
            else:  # where it is wrong, so that one GPU call says what to fix
                row["diagnosis"] = diagnose(out, exact, epilogue, scale)
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            write_json(os.path.join(out_dir, "gluon_stop_forward.json"), dict(env=env, rows=rows))
            with open(os.path.join(out_dir, "gluon_stop_forward.md"), "w") as fh:
                fh.write(f"# StoP noise rows and dW: Gluon (asynchronous wgmma) against the Triton kernels\n\n"
                         f"`python benchmarks/gluon_stop_forward.py --out DIR`; {env}\n\n{_table(rows)}\n")
    return rows


def diagnose(out: torch.Tensor, exact: torch.Tensor, epilogue, scale: float) -> dict:
    """Where a wrong ``out`` departs from ``exact``: the largest error per block of 128 columns (the forward's D
    tiles; dW's are its rows) and per block of 64 rows (the first 8), the share of wrong elements, and for the
    forward whether out is ``epilogue`` (b + ψ[idx]) alone, the GEMM part missing, or the GEMM part alone."""
    err = (out.double() - exact).nan_to_num(1e30).abs() / scale
    D = out.shape[1]
    close = lambda a, b: (a - b).nan_to_num(1e30).abs().max().item() / scale < 1e-2  # noqa: E731
    found = dict(max_by_dtile=[round(err[:, t:t + BLOCK_D].max().item(), 4) for t in range(0, D, BLOCK_D)],
                 max_by_rowblock=[round(err[r:r + 64].max().item(), 4) for r in range(0, min(len(out), 512), 64)],
                 frac_wrong=round((err > 1e-2).double().mean().item(), 4), nan=int(out.isnan().sum().item()))
    if epilogue is not None:
        found.update(gemm_missing=close(out.double(), epilogue), epilogue_missing=close(out.double(), exact - epilogue))
    return found


def _table(rows) -> str:
    rows = [dict(r, impl=r.get("impl", f"gluon {r.get('config')}")) for r in rows]
    keys = [k for k in ("impl", "ms", "rel_err_vs_f64", "rel_err_vs_triton", "unwritten", "regs", "spill_stores",
                        "smem", "loop_instrs", "loop_bar", "loop_wgmma_wait", "error", "diagnosis")
            if any(k in r for r in rows)]
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compile-only", action="store_true", help="no GPU: build each config for sm_90a, print ptxas")
    p.add_argument("--out", default=None)
    p.add_argument("--budget-s", type=float, default=60.0)
    a = p.parse_args(argv)
    if a.compile_only:
        rows = compile_only()
    elif not torch.cuda.is_available():
        print("gluon_stop_forward: needs a CUDA GPU (sm_90); --compile-only builds it offline")
        return 2
    else:
        rows = gpu_run(a.out, a.budget_s)
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
