"""Memory-efficient (flash) attention in Triton, forward and backward, shaped for I-JEPA / StoP.

Math (non-causal, per sequence ``b`` and head ``h``; ``s = scale``, default ``Dh ** -0.5``)::

    S   = s · Q Kᵀ                     [N, N]   (never stored)
    lse = log Σ_j exp(S_ij)             [N]      (saved for the backward, float32)
    P   = exp(S − lse)                  [N, N]   (recomputed in the backward)
    O   = P V                           [N, Dh]
    δ_i = Σ_d dO_id · O_id              [N]
    dV  = Pᵀ dO
    dS  = P ∘ (dO Vᵀ − δ)
    dQ  = s · dS K,    dK = s · dSᵀ Q

Layouts:

* batched: q, k, v ``[B, N, H, Dh]`` with ANY strides (e.g. ``qkv.unbind(2)`` of the fused
  ``[B, N, 3, H, Dh]`` projection output; the strides go to the kernel, nothing is copied);
  the output is a fresh contiguous ``[B, N, H, Dh]`` so ``o.reshape(B, N, H * Dh)`` is free.
* varlen (packed): q, k, v ``[T, H, Dh]`` and ``cu_seqlens`` (int32/int64, ``[n + 1]``, starts at 0,
  non-decreasing, ends at T); sequence ``i`` is the rows ``cu_seqlens[i]:cu_seqlens[i+1]`` and
  attends only to itself (block-diagonal attention).
* packed QKV (:func:`attention_qkv`, what the models call): the projection output itself,
  ``[B, N, 3, H, Dh]`` (``[T, 3, H, Dh]`` varlen); same forward, and the backward writes d(qkv) as one
  contiguous tensor in that layout (the kernels' ``GRAD_GROUP = 3`` row stride), so autograd never
  stacks dq, dk, dv into it.

Supported: head dim ``Dh`` a multiple of 8 in [8, 128] (16, 24, 32, 40, 48, 64, 80, 96, 128 are the
model's), loaded as one or two power-of-two column chunks ``BD0 + BD1`` with masked loads (no padded
copies; 80 = 64 + 16, 96 = 64 + 32, 40/48 → 32 + 16, so the encoder's head dim 80 is not padded to
128 in the dots and register tiles; see ``_head_chunks``); any N ≥ 1;
float16 / bfloat16 (tensor-core dots, float32 accumulation and softmax); float32 inputs take the
*documented fp32 path*: the same kernels with ``input_precision="ieee"`` dots (true fp32 products,
no TF32), which is exact to ~1e-6 but several times slower than 16-bit — the dispatcher's "auto"
mode therefore sends float32 to torch SDPA and only 16-bit inputs to this kernel. Other head dims or
dtypes raise ``ValueError``/``TypeError`` from :func:`attention`; :func:`dispatch_attention` falls
back to SDPA for them.

Kernel design (see ``_fwd_configs`` / ``_bwd_configs``):

* forward ``_attn_fwd_kernel``: one program per (query block of ``BLOCK_M``, head, sequence), head
  index fastest in the launch order so the programs running together read neighbouring heads of the
  same token rows (full sectors of the packed QKV rows in L2). Online softmax over key blocks of
  ``BLOCK_N``; for the model's N ≤ 256 the candidates include ``BLOCK_N = next_pow2(N)`` so the
  whole key sequence is one tile and there is no key loop (no rescaling round trips). Persistent
  form (``PERSIST`` in a config, N ≤ 128): a fixed grid of programs per SM walks the work items,
  and with one key tile the item loop is the kernel's only loop, so Triton's pipeliner loads the
  next items' Q, K, V while the current one computes (an item alone is a few µs of dependent
  loads and math, which one program per item leaves exposed).
* backward, small head dim and N ≤ 256 (the predictor): ``_attn_bwd_fused_kernel``, one program per
  (sequence, head) that keeps all queries (Q, dO, δ, lse and the dQ accumulator) in registers and
  walks the keys in blocks of ``BLOCK_N``, producing dK, dV per key block and dQ at the end —
  one launch, no atomics, deterministic, δ computed in-kernel. Its key-stationary form (VARIANT
  ``keys``) keeps every key (K, V and the dK, dV accumulators) instead and walks the queries in blocks
  of ``BLOCK_M``: each block's dQ is complete in one step (every key is in the tile), so it is stored
  at once, still without atomics; the score tiles are ``[N, BLOCK_M]`` instead of ``[N, N]``, so fewer
  registers and more programs per SM than the one-pass kernel.
* backward, general (the encoder's Dh = 80, long sequences): ``_attn_bwd_dq_kernel`` (one program per
  query block; computes δ from O, dO, stores it, accumulates dQ over key blocks) then
  ``_attn_bwd_dkdv_kernel`` (one program per key block; accumulates dK, dV over query blocks). Two
  launches, no atomics, deterministic.
* the key mask in the dot (``DOT_MASK``): keys past a sequence's end must score −inf, which took a select
  per score and the per-column compares feeding it, a sixth of the one-tile forward's instructions. Where the
  head dim has a padding column (``Dh < BD0 + BD1``: 24 of 32, the predictor's) that column of Q reads 1.0 and
  that of K reads −3e38 for a missing key and 0 for a present one (``tl.load``'s ``other``, ``_pad_value``),
  so the QKᵀ dot itself scores a missing key −3e38 and a present one exactly as before (the added terms are
  exact zeros): outputs bit-identical to the select's, exp2 of −3e38 times the scale is 0, and −3e38 is below
  every finite bf16 / fp32 score (fp16, whose range ends at 65504, keeps the select).
  ``STOP_KERNELS_ATTN_DOT_MASK=0`` turns it off. With a 3-D grid (head, block, sequence) instead of a
  flat program id decoded by integer divisions, the one-tile forward at N = 116 went from 992 to 768 SASS
  instructions per warp (119 → 110 registers, four CTAs per SM) and the one-pass backward from 1160 to 1096
  (sm_90a, triton 3.6; GPU time not yet measured). The forward takes the 3-D grid only where the head dim is one
  chunk: at 80 = 64 + 16 it cost triton 3.6 six registers and the context encoder's forward a CTA per SM.
* lse once per thread (``COLUMN_LOADS``): the fused backward broadcasts lse over Pᵀ's query columns, and Triton's
  layout pass re-issues a load of fewer elements than the CTA has threads in its consumer's layout: one predicated
  load per column a thread holds (32 of them at N = 116). ``_load_column_vector`` loads it as identical columns,
  one element per thread, reduced by a max (the same bits) and moved to the tile's layout through shared memory
  once: the one-pass backward at N = 116 went from 1096 to 984 SASS instructions per warp (173 → 184 registers,
  still one CTA per SM; sm_90a, triton 3.6; GPU time not yet measured). ``STOP_KERNELS_ATTN_COLUMN_LOADS=0``
  turns it off. The split dK/dV kernel loads lse and δ per column in its query loop too, but keeps the plain loads
  there (benchmarks/NOTES.md: more barriers per iteration, and a paired load crashed triton 3.8's compiler).
* config choice: a short candidate list per (kernel, N bucket = next_pow2(max_seqlen), Dh, dtype,
  varlen), ordered by the forced-config timings of GPU run 2 (H200, benchmarks/results/h200-run2):
  the first candidate is the one measured fastest at the model's shapes (head dim 24 at N = 116 and
  150, head dim 80 at N = 74 and 256). By default the first candidate is used (the runtime tuner
  picked poorly in that run); ``STOP_KERNELS_ATTN_TUNE=1`` times the candidates once per key on
  CUDA (CUDA-graph replays, ``STOP_KERNELS_ATTN_TUNE_GRAPH=0`` for ``do_bench``; never during graph
  capture) and caches the pick in ``_TUNE_CACHE``, so a training run re-tunes only per bucket. A
  configs file (:func:`load_tuned_configs`, ``STOP_KERNELS_ATTN_CONFIGS``) fills that cache up front.
  The interpreter always uses the first candidate (or a loaded config).

Host cost per call (the kernels at the model's sizes take tens of µs, so Python matters):

* eager calls (not under ``torch.compile``/tracing, plain tensors) skip the ``torch.library``
  dispatcher: a ``torch.autograd.Function`` (:class:`_FlashAttnFn`) calls the launch wrappers
  directly, and a call that needs no gradient calls the forward wrapper alone;
* a launch *plan* per exact input signature (shapes, strides, dtype, packed, max_seqlen, scale)
  holds the bound ``kernel[grid]`` launchers, the non-pointer arguments and the constexprs
  (``_PLANS``), so a repeated call is: the input checks, one dict lookup, the output allocations,
  the launch(es); no host synchronisation (cu_seqlens is value-checked once per tensor version);
* kernel arguments are few: q/k/v pass (batch, token, head) strides only (the last-dim stride must
  be 1, else the wrapper copies), the outputs O, dQ, dK, dV and LSE are contiguous (dQ, dK, dV: or
  the slots of one packed d(qkv)) so their strides follow from H, Dh, N and ``GRAD_GROUP`` in-kernel,
  dO is made contiguous (a no-op in practice);
* under ``torch.compile`` the ``stop_kernels::flash_attn_fwd`` / ``flash_attn_bwd`` (and
  ``flash_attn_qkv_fwd`` / ``flash_attn_qkv_bwd``) ops run instead. On CUDA they are
  ``torch.library.triton_op``s: Inductor traces their bodies (fake tensors, symbolic N) and emits
  the kernel launches in its generated code, so a compiled graph pays none of the Python costs
  above per call; the config is fixed at compile time per N bucket (the cached pick, else the
  first candidate; the bucket comparisons are the graph's only guards on N). Under the Triton
  interpreter they are plain custom ops (opaque calls, the same plans). Same kernels and configs
  as the eager path, so the results are meant to be bit-identical (tested: on CPU through the
  custom ops, on CUDA by ``test_inductor_launches_the_kernels_itself``). In GPU run 3 (H200) the
  earlier custom-op version of these ops made the compiled ViT-H step host-bound (141.7 against 120.6
  ms/step with SDPA). The Inductor-launched version was measured in the step in GPU run 6: with it
  for the predictor's head dim 24 the step took 118.3 ms against 120.0 with SDPA everywhere, side by
  side (:data:`DEFAULT_AUTO_POLICY`).

Public API: :func:`attention`, :func:`attention_qkv`, :func:`dispatch_attention`,
:func:`dispatch_attention_qkv`, :func:`set_attention_backend`,
:func:`use_attention_backend`, :func:`get_attention_backend`, :func:`set_auto_policy` /
:func:`get_auto_policy` (what "auto" picks, set from measurements), :func:`clear_caches`,
:func:`save_tuned_configs` / :func:`load_tuned_configs` (kernel configs in a JSON file;
``STOP_KERNELS_ATTN_CONFIGS=path`` loads one at import: how tuned configs reach compiled graphs).
"""
from __future__ import annotations

import contextlib
import numbers
import os
from collections.abc import Mapping
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad as fwAD
import triton
import triton.language as tl

from .. import _checks as chk
from .. import reference
from ..backends import (custom_op_bypass_ok, first_order_backward, functorch_transforming, on_device,
                        refuse_under_func_grad, sm_count, triton_interpreting)

__all__ = ["attention", "attention_qkv", "dispatch_attention", "dispatch_attention_qkv", "set_attention_backend", "get_attention_backend",
           "use_attention_backend", "attention_backend_problem", "attention_supported", "set_auto_policy", "get_auto_policy", "use_auto_policy",
           "parse_auto_policy", "clear_caches", "save_tuned_configs", "load_tuned_configs",
           "DEFAULT_AUTO_POLICY",
           "BACKENDS"]

BACKENDS = ("auto", "triton", "sdpa", "xformers", "reference")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128
_FUSED_BWD_MAX_N = 256  # the fused backward keeps all of a sequence's queries in one tile


def _kernel_head_dim(D) -> bool:
    """A head dim the Triton kernels take: an int (a SymInt while torch.compile traces a shape), a multiple
    of 8 in [8, MAX_HEAD_DIM]."""
    return (isinstance(D, (int, torch.SymInt)) and not isinstance(D, bool) and D % 8 == 0
            and 8 <= D <= MAX_HEAD_DIM)


def _check_kernel_head_dim(name: str, D, dispatcher: str) -> None:
    if not _kernel_head_dim(D):
        raise ValueError(f"{name}: head dim {D} unsupported by the Triton attention kernel (needs a multiple of 8 "
                         f"in [8, {MAX_HEAD_DIM}]); use {dispatcher}() with backend 'auto' (the default), which "
                         f"falls back to SDPA")


_LOG2E = 1.4426950408889634
_INTERPRET = triton_interpreting()


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _f32(x):
    """A float scalar argument as float32. Triton's own launcher types a Python float fp32, but
    Inductor, launching these kernels from a compiled graph, passes it as fp64: the scores would then
    be promoted to fp64 (slow, and rounded differently from the eager launch) and a loop-carried
    running max m_i would change type in the key loop, which Triton refuses to compile (GPU run 4)."""
    return tl.cast(x, tl.float32)


@triton.jit
def _bwd_scales(scale):
    """The backward's score scale s and s·log2e (its exponent-2 form), both float32 (see _f32)."""
    scale = _f32(scale)
    return scale, scale * 1.4426950408889634


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with float32 accumulation (UPCAST: widen bf16 operands first, interpreter only)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _dot_d(a0, a1, b0, b1, BD1: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """A product contracted over the head dim, in its chunks: a0·b0 (+ a1·b1 when BD1 > 0), a
    ``[M, BD]`` and b ``[BD, N]`` chunk pairs from :func:`_load_tile` (zero beyond HEAD_DIM)."""
    acc = _dot(a0, b0, PREC, UPCAST)
    if BD1 > 0:
        acc += _dot(a1, b1, PREC, UPCAST)
    return acc


@triton.jit
def _cols(base, row_off, row_ok, cols, HEAD_DIM: tl.constexpr, TRANS: tl.constexpr):
    """Pointers [R, C] (TRANS: [C, R]) of columns ``cols`` of the rows at ``base + row_off`` and their
    mask (rows ``row_ok``, columns < HEAD_DIM)."""
    if TRANS:
        ptrs = base + row_off[None, :] + cols[:, None]
        mask = row_ok[None, :] & (cols < HEAD_DIM)[:, None]
    else:
        ptrs = base + row_off[:, None] + cols[None, :]
        mask = row_ok[:, None] & (cols < HEAD_DIM)[None, :]
    return ptrs, mask


@triton.jit
def _load_tile(base, row_off, row_ok, HEAD_DIM: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr,
               TRANS: tl.constexpr, PAD: tl.constexpr = 0):
    """Load the head-dim chunks of a tile of rows: columns [0, BD0) and [BD0, BD0 + BD1) of the rows
    at ``base + row_off`` (``row_off``: [R] element offsets), zero outside ``row_ok`` and beyond
    HEAD_DIM (but for the dot mask's padding column, PAD: _pad_value): (x0 [R, BD0], x1 [R, BD1]), or
    transposed ([BD, R]) with TRANS. BD1 = 0: the head dim is one chunk and x1 repeats x0 (never used)."""
    cols = tl.arange(0, BD0)
    ptrs, mask = _cols(base, row_off, row_ok, cols, HEAD_DIM, TRANS)
    x0 = tl.load(ptrs, mask=mask, other=_pad_value(cols, row_ok, HEAD_DIM, TRANS, PAD))
    x1 = x0
    if BD1 > 0:
        cols = BD0 + tl.arange(0, BD1)
        ptrs, mask = _cols(base, row_off, row_ok, cols, HEAD_DIM, TRANS)
        x1 = tl.load(ptrs, mask=mask, other=_pad_value(cols, row_ok, HEAD_DIM, TRANS, PAD))
    return x0, x1


# the tile loads' PAD: what the head dim's first padding column reads under the dot mask (_pad_value)
PAD_ZERO = tl.constexpr(0)   # zeros (no dot mask, or V, dO, O)
PAD_QUERY = tl.constexpr(1)  # Q: 1.0 in every row
PAD_KEY = tl.constexpr(2)    # K: −3e38 in the rows of missing keys, 0 in the others


@triton.jit
def _pad_value(cols, row_ok, HEAD_DIM: tl.constexpr, TRANS: tl.constexpr, PAD: tl.constexpr):
    """The value a masked element of a tile reads (``tl.load``'s ``other``): 0, except in column HEAD_DIM, the
    head dim's first padding column, under the dot mask (``DOT_MASK``, module docstring): PAD_QUERY 1.0 in every
    row, PAD_KEY −3e38 in the rows of missing keys. Given at the load, not by a select after it: a select on the
    Q tile cost the N = 116 one-tile forward 28 registers (142: three CTAs per SM instead of four; sm_90a,
    triton 3.6)."""
    if PAD == PAD_QUERY:
        v = (cols == HEAD_DIM).to(tl.float32)
        return v[:, None] if TRANS else v[None, :]
    elif PAD == PAD_KEY:
        if TRANS:
            return ((cols == HEAD_DIM)[:, None] & (row_ok == 0)[None, :]).to(tl.float32) * -3.0e38
        else:
            return ((row_ok == 0)[:, None] & (cols == HEAD_DIM)[None, :]).to(tl.float32) * -3.0e38
    else:
        return 0.0


@triton.jit
def _load_column_vector(ptrs, ok, THREADS: tl.constexpr):
    """``tl.load(ptrs, mask=ok, other=0)`` of a vector [L] that the kernel broadcasts over the *columns* of a
    transposed tile (lse against Pᵀ: queries as columns). With THREADS > L it is loaded as THREADS // L
    identical columns [L, THREADS // L] and reduced back to [L] (the max of equal values: the value itself,
    bit for bit).

    Why: Triton's layout pass (RemoveLayoutConversions, ``isExpensiveLoadOrStore``) counts a load of fewer
    elements than the CTA has threads as cheap and re-issues it in its consumer's layout. For a vector
    broadcast over the columns of a wgmma tile that is one predicated 4-byte load, with its own address and
    compare, per column a thread holds: 32 per thread in the one-pass backward at N = 116 (8 warps, 128
    queries). A load of THREADS elements keeps its blocked layout, one element per thread, and reaches the
    tile's layout through shared memory once. THREADS = 0: the plain load (COLUMN_LOADS off)."""
    L: tl.constexpr = ptrs.shape[0]
    if THREADS <= L:
        return tl.load(ptrs, mask=ok, other=0.0)
    else:
        copies = tl.zeros([1, THREADS // L], tl.int32)
        return tl.max(tl.load(ptrs[:, None] + copies, mask=ok[:, None], other=0.0), 1)


@triton.jit
def _store_tile(base, row_off, row_ok, x0, x1, HEAD_DIM: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr):
    """Store the head-dim chunks x0 [R, BD0] (and x1 [R, BD1]) of a tile of rows at ``base + row_off``
    (columns < HEAD_DIM, rows ``row_ok``), cast to the element type of ``base``."""
    ptrs, mask = _cols(base, row_off, row_ok, tl.arange(0, BD0), HEAD_DIM, False)
    tl.store(ptrs, x0.to(base.dtype.element_ty), mask=mask)
    if BD1 > 0:
        ptrs, mask = _cols(base, row_off, row_ok, BD0 + tl.arange(0, BD1), HEAD_DIM, False)
        tl.store(ptrs, x1.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_p(s, lse2, key_ok, scale_log2, TRANS: tl.constexpr, MASK: tl.constexpr):
    """Backward stage shared by the three backward kernels: the probabilities of a tile from its
    scores ``s`` (the dot of Q and Kᵀ, or of K and Qᵀ): P = exp2(scale·log2e · s − lse·log2e) with
    ``lse2`` = lse·log2e. TRANS=False: P, queries as rows (lse2 per row), keys as columns;
    TRANS=True: Pᵀ, keys as rows (lse2 per column).

    MASK: zero the keys outside ``key_ok``, needed only where the kernel sums dS·K over keys (dQ): a
    missing key's row of K, V is loaded as 0, so its score is 0 and P = exp2(−lse2), finite unless
    every score of the query is below −88, and its dS·K term is then 0; the mask keeps that term
    from being ∞·0 (tests/test_attention.py: very negative scores). The dK/dV kernel passes
    MASK=False: a missing key's rows are never stored. Missing *queries* need no mask anywhere:
    their Q, dO, lse and δ load as 0, so P = 1, dS = 1·(0 − 0) = 0 and P·dO = 0. (Masking only a
    peeled last key block cut the dQ loop by 10–25 % more in SASS but raised registers enough to
    lose a CTA per SM in several configs: not done.) With DOT_MASK the missing keys' scores are −3e38 from the
    dot (module docstring), so P is 0 there without the mask."""
    if TRANS:
        p = tl.math.exp2(s * scale_log2 - lse2[None, :])
        if MASK:
            p = tl.where(key_ok[:, None], p, 0.0)
    else:
        p = tl.math.exp2(s * scale_log2 - lse2[:, None])
        if MASK:
            p = tl.where(key_ok[None, :], p, 0.0)
    return p


@triton.jit
def _bwd_ds(p, dp, delta, like, TRANS: tl.constexpr):
    """The other shared backward stage: dS = P ∘ (dP − δ) with dP = dO Vᵀ (TRANS=False, δ per row)
    or dSᵀ = Pᵀ ∘ (dPᵀ − δ) with dPᵀ = V dOᵀ (TRANS=True, δ per column), in the dtype of ``like``
    (the Q operand) for the next dot."""
    if TRANS:
        ds = (p * (dp - delta[None, :])).to(like.dtype)
    else:
        ds = (p * (dp - delta[:, None])).to(like.dtype)
    return ds


@triton.jit
def _zeros_tile(ROWS: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr):
    """A float32 accumulator in head-dim chunks: (zeros [ROWS, BD0], zeros [ROWS, BD1]); BD1 = 0: the
    second repeats the first (never used)."""
    z0 = tl.zeros([ROWS, BD0], tl.float32)
    z1 = z0
    if BD1 > 0:
        z1 = tl.zeros([ROWS, BD1], tl.float32)
    return z0, z1


@triton.jit
def _load_do_delta(DO, O, row_off, row_ok, HEAD_DIM: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr):
    """The backward's preprocess for a tile of query rows of O/dO (contiguous, ``row_off`` element
    offsets): (dO chunks, δ = rowsum(dO ∘ O) in float32)."""
    do0, do1 = _load_tile(DO, row_off, row_ok, HEAD_DIM, BD0, BD1, False)
    o0, o1 = _load_tile(O, row_off, row_ok, HEAD_DIM, BD0, BD1, False)
    delta = tl.sum(do0.to(tl.float32) * o0.to(tl.float32), 1)
    if BD1 > 0:
        delta += tl.sum(do1.to(tl.float32) * o1.to(tl.float32), 1)
    return do0, do1, delta


@triton.jit
def _seq_bounds(cu_lo, cu_hi, b, NT, H, VARLEN: tl.constexpr):
    """Sequence ``b``: (start, seqlen, orow0, lbase).

    cu_lo, cu_hi: ``cu_seqlens[b]``, ``cu_seqlens[b + 1]`` when VARLEN (unused otherwise), loaded
    by the caller (``tl.load(CU + b) if VARLEN else b``) and passed as values, never the pointer:
    torch's kernel analysis (``wrap_triton``, Inductor) counts every pointer handed to a helper whose
    *results* address a store as written, and would then copy cu_seqlens (or the dummy q) around
    each launch of a compiled graph. (Loading CU inside a helper that returns nothing, as
    ``_fwd_item`` does, is fine: tests/test_attention_inductor_trace.py checks the packed persistent
    case.)
    start: first row of the sequence in q/k/v's token axis (0 when batched: the batch stride does it);
    seqlen: its length; orow0: its first row in the contiguous outputs O/dO/dQ/dK/dV (rows of
    H·HEAD_DIM elements: b·N batched, start packed); lbase: its offset in LSE ([B, H, N] batched:
    b·H·N; [H, T] packed: start). NT is N (batched) or the total token count T (packed).
    """
    if VARLEN:
        start = cu_lo.to(tl.int64)
        seqlen = (cu_hi.to(tl.int64) - start).to(tl.int32)
        orow0 = start
        lbase = start
    else:
        start = b * 0
        seqlen = NT
        orow0 = b * NT
        lbase = b * H * NT
    return start, seqlen, orow0, lbase


@triton.jit
def _unaligned_strides(sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, ALIGN: tl.constexpr):
    """The q/k/v (batch, token, head) strides, which arrive divided by ALIGN (see the forward)."""
    return (sqb * ALIGN, sqn * ALIGN, sqh * ALIGN, skb * ALIGN, skn * ALIGN, skh * ALIGN,
            svb * ALIGN, svn * ALIGN, svh * ALIGN)


def _grid_size(programs, sequences, longest):
    """``programs`` (one per head, block and sequence), refused by name past CUDA's 2**31 − 1 (Triton's launcher
    would raise an OverflowError): many short packed sequences beside a long one reach it while the token count
    stays small (131 072 one-token sequences beside one of 65 536 tokens, 16 heads, in the backward)."""
    if isinstance(programs, int) and programs > 2 ** 31 - 1:  # (a traced size is symbolic: nothing to check)
        raise ValueError(f"cu_seqlens (or q's batch): {sequences} sequences of up to {longest} tokens need {programs} "
                         f"programs in one launch, past CUDA's 2**31 - 1; split them over several calls")
    return programs


@triton.jit
def _bwd_program(H, NUM_BLOCKS, GRID3: tl.constexpr):
    """Stage 0 of the two general backward kernels: the (head, block, sequence) of this program,
    head index fastest: (h, blk, b); blk is the query block (dQ launch) or the key block (dK/dV launch).
    GRID3: the grid's three axes; else decoded from a flat program id."""
    if GRID3:
        return tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    pid = tl.program_id(0)
    h = pid % H
    rest = pid // H
    blk = rest % NUM_BLOCKS
    b = (rest // NUM_BLOCKS).to(tl.int64)
    return h, blk, b


@triton.jit
def _bwd_tile(blk, start, seqlen, BLOCK_OWN: tl.constexpr, BLOCK_OTHER: tl.constexpr):
    """The tile offsets of the two general backward kernels: this program's block ``blk`` of
    BLOCK_OWN rows (queries for dQ, keys for dK/dV) and the BLOCK_OTHER rows walked in the loop:
    (offs_own, offs_other, own_ok, rows_own)."""
    offs_own = blk * BLOCK_OWN + tl.arange(0, BLOCK_OWN)
    offs_other = tl.arange(0, BLOCK_OTHER)
    own_ok = offs_own < seqlen
    rows_own = (start + offs_own).to(tl.int64)
    return offs_own, offs_other, own_ok, rows_own


@triton.jit
def _grad_slot(G, slot, H, HEAD_DIM: tl.constexpr, GRAD_GROUP: tl.constexpr):
    """The gradient pointer of q/k/v ``slot`` (0/1/2). GRAD_GROUP = 1: ``G`` itself (three separate
    tensors). GRAD_GROUP = 3: ``G`` is the base of the packed d(qkv) ``[rows, 3, H, HEAD_DIM]``
    and the slot starts ``slot·H·HEAD_DIM`` elements in; a kernel then stores through its first
    gradient argument only, so the one d(qkv) tensor is passed once (the other gradient arguments
    are ignored) and a tracer sees a single mutated tensor. The kernels keep the ``if GRAD_GROUP ==
    3`` around their calls (the same three lines in the fused and dK/dV kernels): a helper that
    returned the dK/dV pointers of either case made torch's TTIR mutation analysis count the unused
    gradient arguments as written (tests/test_attention_inductor_trace.py catches it)."""
    if GRAD_GROUP == 3:
        return G + slot * H * HEAD_DIM
    else:
        return G


@triton.jit
def _row_offsets(row0, offs, row_stride, h, HEAD_DIM: tl.constexpr):
    """Element offsets [len(offs)] of head ``h`` in rows ``row0 + offs`` of a tensor whose rows are
    ``row_stride`` elements apart: H·HEAD_DIM for O, dO and separate dQ/dK/dV, 3·H·HEAD_DIM for
    the slots of a packed d(qkv) (GRAD_GROUP = 3)."""
    return (row0 + offs).to(tl.int64) * row_stride + h * HEAD_DIM


@triton.jit
def _fwd_key_block(q0, q1, k_base, v_base, start, cols, seqlen, skn, svn, m_i, l_i, acc0, acc1, scale_log2,
                   HEAD_DIM: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr, MASK: tl.constexpr,
                   FIRST: tl.constexpr, DOT_MASK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One key block of the forward's online softmax: load Kᵀ [BD, BLOCK_N] and V [BLOCK_N, BD] (per
    chunk) of the keys ``cols``, S = Q Kᵀ, update the running max ``m_i`` (log2 units) and sum ``l_i``,
    rescale and accumulate P V. The scale is applied inside the exponent, P = exp2(S·scale·log2e − m):
    one FFMA per score instead of a multiply before the max and a subtraction after it (the max of S·c
    is max(S)·c for the positive scale the wrapper guarantees). MASK: the block runs past the sequence
    end, so its missing keys must score −inf (the full blocks skip that): the dot does it with DOT_MASK (Q's
    padding column was loaded as 1, this Kᵀ's as −3e38 for the missing keys: see the module docstring), else a
    select. FIRST: the first block, whose running max, sum and accumulator are still empty (−inf, 0, 0): no
    rescaling."""
    n_ok = cols < seqlen
    rows_n = (start + cols).to(tl.int64)
    kt0, kt1 = _load_tile(k_base, rows_n * skn, n_ok, HEAD_DIM, BD0, BD1, True,
                          PAD_KEY if MASK and DOT_MASK else PAD_ZERO)
    s = _dot_d(q0, q1, kt0, kt1, BD1, PREC, UPCAST)
    if MASK and not DOT_MASK:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    v0, v1 = _load_tile(v_base, rows_n * svn, n_ok, HEAD_DIM, BD0, BD1, False)
    m_blk = tl.max(s, 1) * scale_log2
    m_new = m_blk if FIRST else tl.maximum(m_i, m_blk)
    p = tl.math.exp2(s * scale_log2 - m_new[:, None])
    pv = p.to(v0.dtype)
    if FIRST:
        l_i = tl.sum(p, 1)
        acc0 = _dot(pv, v0, PREC, UPCAST)
        if BD1 > 0:
            acc1 = _dot(pv, v1, PREC, UPCAST)
    else:
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc0 = acc0 * alpha[:, None] + _dot(pv, v0, PREC, UPCAST)
        if BD1 > 0:
            acc1 = acc1 * alpha[:, None] + _dot(pv, v1, PREC, UPCAST)
    return m_new, l_i, acc0, acc1


@triton.jit
def _fwd_rows(Q, K, V, O, LSE, b, hg, mb, start, seqlen, orow0, lbase,
              sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, NT, H, scale_log2,
              HEAD_DIM: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, HEADS: tl.constexpr, ONE_TILE: tl.constexpr, DOT_MASK: tl.constexpr,
              PREC: tl.constexpr, UPCAST: tl.constexpr):
    """O and LSE of query block ``mb`` of the HEADS heads of group ``hg`` of sequence ``b`` (rows
    beyond ``seqlen`` masked). ONE_TILE: BLOCK_N covers every sequence, so the keys are one masked
    block and there is no key loop."""
    so = H * HEAD_DIM
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < seqlen
    rows_m = (start + offs_m).to(tl.int64)
    orows_m = (orow0 + offs_m).to(tl.int64)

    for g in tl.static_range(HEADS):
        h = hg * HEADS + g
        # stage 1: load the Q tile [BLOCK_M, BD0 (+ BD1)] of head h (masked rows/cols read as 0; with
        # DOT_MASK the padding column reads 1).
        q0, q1 = _load_tile(Q + b * sqb + h.to(tl.int64) * sqh, rows_m * sqn, m_ok, HEAD_DIM, BD0, BD1, False,
                            PAD_QUERY if DOT_MASK else PAD_ZERO)
        k_base = K + b * skb + h.to(tl.int64) * skh
        v_base = V + b * svb + h.to(tl.int64) * svh

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc0, acc1 = _zeros_tile(BLOCK_M, BD0, BD1)
        # stage 2: the key blocks: every full one without a key mask, then the partial last one (if
        # any) with it (see _fwd_key_block); ONE_TILE: the single masked block.
        if ONE_TILE:
            m_i, l_i, acc0, acc1 = _fwd_key_block(q0, q1, k_base, v_base, start, offs_n, seqlen, skn, svn,
                                                  m_i, l_i, acc0, acc1, scale_log2, HEAD_DIM, BD0, BD1,
                                                  True, True, DOT_MASK, PREC, UPCAST)
        else:
            # a persistent program's query block past its sequence's end (packed) has no keys to
            # visit: its loop bound drops to 0 instead of a branch around the loop
            n_end = tl.where(mb * BLOCK_M < seqlen, seqlen, 0)
            n_full = (n_end // BLOCK_N) * BLOCK_N
            for n0 in range(0, n_full, BLOCK_N):
                m_i, l_i, acc0, acc1 = _fwd_key_block(q0, q1, k_base, v_base, start, n0 + offs_n, seqlen, skn,
                                                      svn, m_i, l_i, acc0, acc1, scale_log2, HEAD_DIM, BD0, BD1,
                                                      False, False, DOT_MASK, PREC, UPCAST)
            if n_full < n_end:
                m_i, l_i, acc0, acc1 = _fwd_key_block(q0, q1, k_base, v_base, start, n_full + offs_n, seqlen, skn,
                                                      svn, m_i, l_i, acc0, acc1, scale_log2, HEAD_DIM, BD0, BD1,
                                                      True, False, DOT_MASK, PREC, UPCAST)

        # stage 3: normalise and store O [BLOCK_M, HEAD_DIM] and the natural-log LSE [BLOCK_M].
        inv_l = 1.0 / l_i
        _store_tile(O + h * HEAD_DIM, orows_m * so, m_ok, acc0 * inv_l[:, None], acc1 * inv_l[:, None],
                    HEAD_DIM, BD0, BD1)
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
        tl.store(LSE + lbase + h.to(tl.int64) * NT + offs_m, lse, mask=m_ok)


@triton.jit
def _fwd_decode(item, n_groups, NUM_M):
    """Work item ``item`` of the forward: (head group, query block, sequence), head group fastest."""
    return item % n_groups, (item // n_groups) % NUM_M, (item // n_groups // NUM_M).to(tl.int64)


@triton.jit
def _fwd_item(item, Q, K, V, O, LSE, CU, sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, NT, H, NUM_M, scale_log2,
              HEAD_DIM: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, HEADS: tl.constexpr, ONE_TILE: tl.constexpr, VARLEN: tl.constexpr,
              DOT_MASK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One trip of the persistent loop: work item ``item``. A query block past its sequence's end
    (packed sequences shorter than the longest) runs with every row masked and, with a key loop, no
    key block: the loop body stays free of branches, which the pipeliner needs."""
    hg, mb, b = _fwd_decode(item, H // HEADS, NUM_M)
    start, seqlen, orow0, lbase = _seq_bounds(tl.load(CU + b) if VARLEN else b, tl.load(CU + b + 1) if VARLEN else b,
                                              b, NT, H, VARLEN)
    _fwd_rows(Q, K, V, O, LSE, b, hg, mb, start, seqlen, orow0, lbase,
              sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, NT, H, scale_log2,
              HEAD_DIM, BD0, BD1, BLOCK_M, BLOCK_N, HEADS, ONE_TILE, DOT_MASK, PREC, UPCAST)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh,
    NT, H, NUM_M, NB, scale_log2,
    HEAD_DIM: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEADS: tl.constexpr, ONE_TILE: tl.constexpr, PERSISTENT: tl.constexpr, ALIGN: tl.constexpr,
    VARLEN: tl.constexpr, DOT_MASK: tl.constexpr, GRID3: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """O and LSE for one query block of HEADS consecutive heads of one sequence (a work item):
    one item per program, or PERSISTENT: a fixed grid of programs each walking the items
    ``pid, pid + grid, ...`` of all NB sequences.

    q/k/v: (batch, token, head) strides arrive divided by ALIGN (8 when all are multiples of 8) so
    the compiler sees 16-byte aligned rows for head dims like 24 and 40 and vectorises the loads;
    their last-dim stride is 1 (the wrapper guarantees it). O is contiguous [rows, H, HEAD_DIM] and
    LSE [B, H, N] / [H, T]: their strides follow from H, HEAD_DIM and NT (no arguments). The head
    dim is handled in two power-of-two chunks BD0 + BD1 (e.g. 64 + 16 for 80; BD1 = 0: one chunk)
    so no dot or register tile is padded beyond the next multiple of 16.
    """
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh = _unaligned_strides(
        sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, ALIGN)
    scale_log2 = _f32(scale_log2)
    if PERSISTENT:
        # The short sequences make each item a few µs of dependent loads and math; one item per
        # program leaves that latency exposed. Here the item loop is the kernel's only loop (with
        # ONE_TILE), so Triton's pipeliner issues the next items' Q, K, V loads (num_stages) while
        # this one computes.
        for item in tl.range(tl.program_id(0), (H // HEADS) * NUM_M * NB, tl.num_programs(0)):
            _fwd_item(item, Q, K, V, O, LSE, CU, sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, NT, H, NUM_M,
                      scale_log2, HEAD_DIM, BD0, BD1, BLOCK_M, BLOCK_N, HEADS, ONE_TILE, VARLEN, DOT_MASK, PREC, UPCAST)
    else:
        # stage 0: this program's item; a query block past its sequence's end returns at once (an
        # early return: wrapping the rest in an `if` instead costs the N = 74, Dh 80 default 8
        # registers and its second CTA per SM, ptxas sm_90a)
        if GRID3:  # the grid is (head group, query block, sequence): no divisions
            hg, mb, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        else:
            hg, mb, b = _fwd_decode(tl.program_id(0), H // HEADS, NUM_M)
        start, seqlen, orow0, lbase = _seq_bounds(tl.load(CU + b) if VARLEN else b,
                                                  tl.load(CU + b + 1) if VARLEN else b, b, NT, H, VARLEN)
        if mb * BLOCK_M >= seqlen:
            return
        _fwd_rows(Q, K, V, O, LSE, b, hg, mb, start, seqlen, orow0, lbase,
                  sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, NT, H, scale_log2,
                  HEAD_DIM, BD0, BD1, BLOCK_M, BLOCK_N, HEADS, ONE_TILE, DOT_MASK, PREC, UPCAST)


@triton.jit
def _bwd_fused_key_block(q0, q1, do0, do1, delta, lse2, dq0, dq1, k_base, v_base, DK, DV, start, orow0, cols,
                         seqlen, skn, svn, h, so, scale, scale_log2,
                         HEAD_DIM: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr, DOT_MASK: tl.constexpr,
                         PREC: tl.constexpr, UPCAST: tl.constexpr, GRAD_GROUP: tl.constexpr):
    """One key block ``cols`` of the fused backward: load K, V [BLOCK_N, BD]; recompute
    Pᵀ = exp2(s·K Qᵀ·log2e − lse) [BLOCK_N, BLOCK_Q]; dV = Pᵀ dO, dSᵀ = Pᵀ ∘ (V dOᵀ − δ),
    dK = s·dSᵀ Q, stored for this block's rows; returns dQ (chunks) + dS K."""
    n_ok = cols < seqlen
    rows_n = (start + cols).to(tl.int64)
    k0, k1 = _load_tile(k_base, rows_n * skn, n_ok, HEAD_DIM, BD0, BD1, False, PAD_KEY if DOT_MASK else PAD_ZERO)
    v0, v1 = _load_tile(v_base, rows_n * svn, n_ok, HEAD_DIM, BD0, BD1, False)
    pt = _bwd_p(_dot_d(k0, k1, tl.trans(q0), tl.trans(q1), BD1, PREC, UPCAST), lse2, n_ok, scale_log2, True,
                not DOT_MASK)
    ptc = pt.to(do0.dtype)
    dst = _bwd_ds(pt, _dot_d(v0, v1, tl.trans(do0), tl.trans(do1), BD1, PREC, UPCAST), delta, q0, True)
    dv0 = _dot(ptc, do0, PREC, UPCAST)
    dk0 = _dot(dst, q0, PREC, UPCAST) * scale
    dq0 += _dot(tl.trans(dst), k0, PREC, UPCAST)
    dv1 = dv0
    dk1 = dk0
    if BD1 > 0:
        dv1 = _dot(ptc, do1, PREC, UPCAST)
        dk1 = _dot(dst, q1, PREC, UPCAST) * scale
        dq1 += _dot(tl.trans(dst), k1, PREC, UPCAST)
    g_rows = _row_offsets(orow0, cols, GRAD_GROUP * so, h, HEAD_DIM)
    _store_tile(DK, g_rows, n_ok, dk0, dk1, HEAD_DIM, BD0, BD1)
    _store_tile(DV, g_rows, n_ok, dv0, dv1, HEAD_DIM, BD0, BD1)
    return dq0, dq1


@triton.jit
def _bwd_fused_head(Q, K, V, O, DO, DQ, DK, DV, LSE, h, b, start, seqlen, orow0, lbase,
                    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, NT, H, scale,
                    HEAD_DIM: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr, BLOCK_Q: tl.constexpr,
                    BLOCK_N: tl.constexpr, DOT_MASK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                    GRAD_GROUP: tl.constexpr, THREADS: tl.constexpr):
    """dQ, dK, dV of head ``h`` of sequence ``b`` (its rows ``start`` … ``start + seqlen``), every
    query in one tile; DK, DV already point at their slots (see the kernel)."""
    so = H * HEAD_DIM
    scale, scale_log2 = _bwd_scales(scale)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_n = tl.arange(0, BLOCK_N)
    q_ok = offs_q < seqlen
    rows_q = (start + offs_q).to(tl.int64)
    g_q = _row_offsets(orow0, offs_q, so, h, HEAD_DIM)

    # stage 1: load every query row: Q, dO, O [BLOCK_Q, BD] and lse [BLOCK_Q];
    # δ = rowsum(dO ∘ O) in float32 (the preprocess, fused here).
    q0, q1 = _load_tile(Q + b * sqb + h.to(tl.int64) * sqh, rows_q * sqn, q_ok, HEAD_DIM, BD0, BD1, False,
                        PAD_QUERY if DOT_MASK else PAD_ZERO)
    do0, do1, delta = _load_do_delta(DO, O, g_q, q_ok, HEAD_DIM, BD0, BD1)
    lse2 = _load_column_vector(LSE + lbase + h.to(tl.int64) * NT + offs_q, q_ok, THREADS) * 1.4426950408889634
    dq0, dq1 = _zeros_tile(BLOCK_Q, BD0, BD1)
    k_base = K + b * skb + h.to(tl.int64) * skh
    v_base = V + b * svb + h.to(tl.int64) * svh

    # stage 2: per key block (_bwd_fused_key_block) dK, dV stored, dQ += dS K accumulated in registers.
    if BLOCK_N >= BLOCK_Q:  # one pass: every key in one block, no loop (see the one-pass candidates)
        dq0, dq1 = _bwd_fused_key_block(q0, q1, do0, do1, delta, lse2, dq0, dq1, k_base, v_base, DK, DV,
                                        start, orow0, offs_n, seqlen, skn, svn, h, so, scale, scale_log2,
                                        HEAD_DIM, BD0, BD1, DOT_MASK, PREC, UPCAST, GRAD_GROUP)
    else:
        for n0 in range(0, seqlen, BLOCK_N):
            dq0, dq1 = _bwd_fused_key_block(q0, q1, do0, do1, delta, lse2, dq0, dq1, k_base, v_base, DK, DV,
                                            start, orow0, n0 + offs_n, seqlen, skn, svn, h, so, scale,
                                            scale_log2, HEAD_DIM, BD0, BD1, DOT_MASK, PREC, UPCAST, GRAD_GROUP)

    # stage 3: store dQ = s · Σ dS K [BLOCK_Q, HEAD_DIM].
    g_dq = _row_offsets(orow0, offs_q, GRAD_GROUP * so, h, HEAD_DIM)
    _store_tile(DQ, g_dq, q_ok, dq0 * scale, dq1 * scale, HEAD_DIM, BD0, BD1)


@triton.jit
def _bwd_keys_query_block(k0, k1, v0, v1, dk0, dk1, dv0, dv1, q_base, DO, O, DQ, LSE, rows, start, seqlen, orow0,
                          l_base, sqn, n_ok, h, so, scale, scale_log2,
                          HEAD_DIM: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr, PREC: tl.constexpr,
                          UPCAST: tl.constexpr, GRAD_GROUP: tl.constexpr, THREADS: tl.constexpr):
    """One query block ``rows`` of the key-stationary backward (K, V of every key of the sequence given): load Q,
    dO, O [BLOCK_Q, BD] and lse, δ = rowsum(dO ∘ O); Pᵀ = exp2(s·K Qᵀ·log2e − lse) [BLOCK_N, BLOCK_Q];
    dV += Pᵀ dO, dSᵀ = Pᵀ ∘ (V dOᵀ − δ), dK += dSᵀ Q; dQ = s·dS K is this block's whole dQ (every key is in
    the tile): stored here, no accumulation across programs. Returns dK, dV (chunks)."""
    m_ok = rows < seqlen
    rows_m = (start + rows).to(tl.int64)
    q0, q1 = _load_tile(q_base, rows_m * sqn, m_ok, HEAD_DIM, BD0, BD1, False)
    do0, do1, delta = _load_do_delta(DO, O, _row_offsets(orow0, rows, so, h, HEAD_DIM), m_ok, HEAD_DIM, BD0, BD1)
    lse2 = _load_column_vector(LSE + l_base + rows, m_ok, THREADS) * 1.4426950408889634
    # (keys masked: dQ sums over them, see _bwd_p; a missing query adds 0 to dK, dV through its zero dO, dS)
    pt = _bwd_p(_dot_d(k0, k1, tl.trans(q0), tl.trans(q1), BD1, PREC, UPCAST), lse2, n_ok, scale_log2, True, True)
    ptc = pt.to(do0.dtype)
    dst = _bwd_ds(pt, _dot_d(v0, v1, tl.trans(do0), tl.trans(do1), BD1, PREC, UPCAST), delta, q0, True)
    dv0 += _dot(ptc, do0, PREC, UPCAST)
    dk0 += _dot(dst, q0, PREC, UPCAST)
    dq0 = _dot(tl.trans(dst), k0, PREC, UPCAST)
    dq1 = dq0
    if BD1 > 0:
        dv1 += _dot(ptc, do1, PREC, UPCAST)
        dk1 += _dot(dst, q1, PREC, UPCAST)
        dq1 = _dot(tl.trans(dst), k1, PREC, UPCAST)
    g_dq = _row_offsets(orow0, rows, GRAD_GROUP * so, h, HEAD_DIM)
    _store_tile(DQ, g_dq, m_ok, dq0 * scale, dq1 * scale, HEAD_DIM, BD0, BD1)
    return dk0, dk1, dv0, dv1


@triton.jit
def _bwd_keys_head(Q, K, V, O, DO, DQ, DK, DV, LSE, h, b, start, seqlen, orow0, lbase,
                   sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, NT, H, scale,
                   HEAD_DIM: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr, BLOCK_Q: tl.constexpr,
                   BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, GRAD_GROUP: tl.constexpr,
                   THREADS: tl.constexpr):
    """dQ, dK, dV of head ``h`` of sequence ``b`` with every key in one tile (seqlen <= BLOCK_N), the queries
    in blocks of BLOCK_Q: each block's tiles are half or a quarter of the one-pass kernel's [N, N] scores, so
    fewer registers and more programs per SM; K, V and every query row are still read once."""
    so = H * HEAD_DIM
    scale, scale_log2 = _bwd_scales(scale)
    offs_n = tl.arange(0, BLOCK_N)
    offs_q = tl.arange(0, BLOCK_Q)
    n_ok = offs_n < seqlen
    rows_n = (start + offs_n).to(tl.int64)

    # stage 1: load every key's K, V [BLOCK_N, BD] once; dK, dV accumulate in registers.
    k0, k1 = _load_tile(K + b * skb + h.to(tl.int64) * skh, rows_n * skn, n_ok, HEAD_DIM, BD0, BD1, False)
    v0, v1 = _load_tile(V + b * svb + h.to(tl.int64) * svh, rows_n * svn, n_ok, HEAD_DIM, BD0, BD1, False)
    dk0, dk1 = _zeros_tile(BLOCK_N, BD0, BD1)
    dv0, dv1 = _zeros_tile(BLOCK_N, BD0, BD1)
    q_base = Q + b * sqb + h.to(tl.int64) * sqh
    l_base = lbase + h.to(tl.int64) * NT

    # stage 2: per query block (_bwd_keys_query_block) its dQ stored, dK, dV accumulated.
    for m0 in range(0, seqlen, BLOCK_Q):
        dk0, dk1, dv0, dv1 = _bwd_keys_query_block(k0, k1, v0, v1, dk0, dk1, dv0, dv1, q_base, DO, O, DQ, LSE,
                                                   m0 + offs_q, start, seqlen, orow0, l_base, sqn, n_ok, h, so,
                                                   scale, scale_log2, HEAD_DIM, BD0, BD1, PREC, UPCAST, GRAD_GROUP,
                                                   THREADS)

    # stage 3: store dK = s·Σ dSᵀ Q and dV [BLOCK_N, HEAD_DIM].
    g_rows = _row_offsets(orow0, offs_n, GRAD_GROUP * so, h, HEAD_DIM)
    _store_tile(DK, g_rows, n_ok, dk0 * scale, dk1 * scale, HEAD_DIM, BD0, BD1)
    _store_tile(DV, g_rows, n_ok, dv0, dv1, HEAD_DIM, BD0, BD1)


@triton.jit
def _bwd_fused_item(item, b2, Q, K, V, O, DO, DQ, DK, DV, LSE, CU, sqb, sqn, sqh, skb, skn, skh, svb, svn, svh,
                    NT, H, scale, HEAD_DIM: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr,
                    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, VARLEN: tl.constexpr, DOT_MASK: tl.constexpr,
                    GRID2: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, GRAD_GROUP: tl.constexpr,
                    THREADS: tl.constexpr):
    """Work item ``item`` of the fused backward: (head, sequence), head index fastest. BLOCK_Q < BLOCK_N: the
    key-stationary form (every key in one tile, query blocks of BLOCK_Q); else every query in one tile (BLOCK_Q
    the bucket), key blocks of BLOCK_N."""
    if GRID2:  # a (head, sequence) grid: no division
        h = item
        b = b2.to(tl.int64)
    else:
        h = item % H
        b = (item // H).to(tl.int64)
    start, seqlen, orow0, lbase = _seq_bounds(tl.load(CU + b) if VARLEN else b, tl.load(CU + b + 1) if VARLEN else b,
                                              b, NT, H, VARLEN)
    if BLOCK_Q < BLOCK_N:
        _bwd_keys_head(Q, K, V, O, DO, DQ, DK, DV, LSE, h, b, start, seqlen, orow0, lbase,
                       sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, NT, H, scale,
                       HEAD_DIM, BD0, BD1, BLOCK_Q, BLOCK_N, PREC, UPCAST, GRAD_GROUP, THREADS)
    else:
        _bwd_fused_head(Q, K, V, O, DO, DQ, DK, DV, LSE, h, b, start, seqlen, orow0, lbase,
                        sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, NT, H, scale,
                        HEAD_DIM, BD0, BD1, BLOCK_Q, BLOCK_N, DOT_MASK, PREC, UPCAST, GRAD_GROUP, THREADS)


@triton.jit
def _attn_bwd_fused_kernel(
    Q, K, V, O, DO, DQ, DK, DV, LSE, CU,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh,
    NT, H, NB, scale,
    HEAD_DIM: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    PERSISTENT: tl.constexpr, ALIGN: tl.constexpr, VARLEN: tl.constexpr, DOT_MASK: tl.constexpr, GRID2: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, GRAD_GROUP: tl.constexpr, THREADS: tl.constexpr,
):
    """dQ, dK, dV of one (sequence, head) with every query in one tile (needs N <= BLOCK_Q), or with every key
    in one tile and BLOCK_Q-query blocks (VARIANT 'keys': BLOCK_Q < BLOCK_N, needs N <= BLOCK_N): one
    (sequence, head) per program, or PERSISTENT: a fixed grid of programs walking the H·NB of them
    (with one pass, BLOCK_N >= BLOCK_Q, the item loop is the only loop and Triton's pipeliner loads
    the next item's tiles during this one's math; see the forward).

    O and dO are contiguous [rows, H, HEAD_DIM] (the wrapper makes dO so); dQ, dK, dV are rows of
    GRAD_GROUP·H·HEAD_DIM elements (1: three contiguous tensors; 3: the q, k, v slots of one
    contiguous [rows, 3, H, HEAD_DIM] gradient of a packed QKV buffer); q/k/v strides arrive
    divided by ALIGN and the head dim is in chunks BD0 + BD1, as in the forward. THREADS: the CTA's thread count
    (32 · num_warps), with which lse is loaded one element per thread (_load_column_vector), or 0.
    """
    # stage 0: with GRAD_GROUP = 3 DQ is the base of d(qkv) and dK, dV are its other slots.
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh = _unaligned_strides(
        sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, ALIGN)
    if GRAD_GROUP == 3:
        DK = _grad_slot(DQ, 1, H, HEAD_DIM, GRAD_GROUP)
        DV = _grad_slot(DQ, 2, H, HEAD_DIM, GRAD_GROUP)
    if PERSISTENT:
        for item in tl.range(tl.program_id(0), H * NB, tl.num_programs(0)):
            _bwd_fused_item(item, 0, Q, K, V, O, DO, DQ, DK, DV, LSE, CU, sqb, sqn, sqh, skb, skn, skh, svb, svn,
                            svh, NT, H, scale, HEAD_DIM, BD0, BD1, BLOCK_Q, BLOCK_N, VARLEN, DOT_MASK, False, PREC,
                            UPCAST, GRAD_GROUP, THREADS)
    else:
        _bwd_fused_item(tl.program_id(0), tl.program_id(1), Q, K, V, O, DO, DQ, DK, DV, LSE, CU, sqb, sqn, sqh, skb,
                        skn, skh, svb, svn, svh, NT, H, scale, HEAD_DIM, BD0, BD1, BLOCK_Q, BLOCK_N, VARLEN, DOT_MASK,
                        GRID2, PREC, UPCAST, GRAD_GROUP, THREADS)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, CU,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh,
    NT, H, NUM_M, scale,
    HEAD_DIM: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ALIGN: tl.constexpr, VARLEN: tl.constexpr, DOT_MASK: tl.constexpr, GRID3: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, GRAD_GROUP: tl.constexpr,
):
    """δ and dQ for one query block of one head (general backward, first launch; dQ rows of
    GRAD_GROUP·H·HEAD_DIM elements, head-dim chunks BD0 + BD1, as in the fused kernel)."""
    # stage 0: (head, query block, sequence), head fastest; strides arrive divided by ALIGN.
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh = _unaligned_strides(
        sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, ALIGN)
    so = H * HEAD_DIM
    scale, scale_log2 = _bwd_scales(scale)
    h, mb, b = _bwd_program(H, NUM_M, GRID3)
    start, seqlen, orow0, lbase = _seq_bounds(tl.load(CU + b) if VARLEN else b, tl.load(CU + b + 1) if VARLEN else b,
                                              b, NT, H, VARLEN)
    if mb * BLOCK_M >= seqlen:
        return
    offs_m, offs_n, m_ok, rows_m = _bwd_tile(mb, start, seqlen, BLOCK_M, BLOCK_N)
    g_m = _row_offsets(orow0, offs_m, so, h, HEAD_DIM)
    l_m = lbase + h.to(tl.int64) * NT + offs_m

    # stage 1: load Q, dO, O [BLOCK_M, BD], lse; compute δ = rowsum(dO ∘ O), store it for the
    # dK/dV launch.
    q0, q1 = _load_tile(Q + b * sqb + h.to(tl.int64) * sqh, rows_m * sqn, m_ok, HEAD_DIM, BD0, BD1, False,
                        PAD_QUERY if DOT_MASK else PAD_ZERO)
    do0, do1, delta = _load_do_delta(DO, O, g_m, m_ok, HEAD_DIM, BD0, BD1)
    tl.store(DELTA + l_m, delta, mask=m_ok)
    lse2 = tl.load(LSE + l_m, mask=m_ok, other=0.0) * 1.4426950408889634
    k_base = K + b * skb + h.to(tl.int64) * skh
    v_base = V + b * svb + h.to(tl.int64) * svh
    dq0, dq1 = _zeros_tile(BLOCK_M, BD0, BD1)

    # stage 2: per key block load Kᵀ, Vᵀ [BD, BLOCK_N]; P = exp2(s·Q Kᵀ·log2e − lse),
    # dS = P ∘ (dO Vᵀ − δ), dQ += dS K.
    for n0 in range(0, seqlen, BLOCK_N):
        cols = n0 + offs_n
        n_ok = cols < seqlen
        rows_n = (start + cols).to(tl.int64)
        kt0, kt1 = _load_tile(k_base, rows_n * skn, n_ok, HEAD_DIM, BD0, BD1, True, PAD_KEY if DOT_MASK else PAD_ZERO)
        vt0, vt1 = _load_tile(v_base, rows_n * svn, n_ok, HEAD_DIM, BD0, BD1, True)
        p = _bwd_p(_dot_d(q0, q1, kt0, kt1, BD1, PREC, UPCAST), lse2, n_ok, scale_log2, False, not DOT_MASK)
        ds = _bwd_ds(p, _dot_d(do0, do1, vt0, vt1, BD1, PREC, UPCAST), delta, q0, False)
        dq0 += _dot(ds, tl.trans(kt0), PREC, UPCAST)
        if BD1 > 0:
            dq1 += _dot(ds, tl.trans(kt1), PREC, UPCAST)

    # stage 3: store dQ [BLOCK_M, HEAD_DIM].
    g_dq = _row_offsets(orow0, offs_m, GRAD_GROUP * so, h, HEAD_DIM)
    _store_tile(DQ, g_dq, m_ok, dq0 * scale, dq1 * scale, HEAD_DIM, BD0, BD1)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, CU,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh,
    NT, H, NUM_N, scale,
    HEAD_DIM: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ALIGN: tl.constexpr, VARLEN: tl.constexpr, DOT_MASK: tl.constexpr, GRID3: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, GRAD_GROUP: tl.constexpr,
):
    """dK, dV for one key block of one head (general backward, second launch; reads δ; dK, dV rows
    of GRAD_GROUP·H·HEAD_DIM elements, head-dim chunks BD0 + BD1, as in the fused kernel). DOT_MASK is
    the dQ launch's (both take one set of constexprs); this kernel masks no key (stage 2)."""
    # stage 0: (head, key block, sequence), head fastest; strides arrive divided by ALIGN; with
    # GRAD_GROUP = 3 DK is the base of d(qkv) and dK, dV are its slots 1 and 2.
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh = _unaligned_strides(
        sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, ALIGN)
    so = H * HEAD_DIM
    if GRAD_GROUP == 3:
        DV = _grad_slot(DK, 2, H, HEAD_DIM, GRAD_GROUP)
        DK = _grad_slot(DK, 1, H, HEAD_DIM, GRAD_GROUP)
    scale, scale_log2 = _bwd_scales(scale)
    h, nb, b = _bwd_program(H, NUM_N, GRID3)
    start, seqlen, orow0, lbase = _seq_bounds(tl.load(CU + b) if VARLEN else b, tl.load(CU + b + 1) if VARLEN else b,
                                              b, NT, H, VARLEN)
    if nb * BLOCK_N >= seqlen:
        return
    offs_n, offs_m, n_ok, rows_n = _bwd_tile(nb, start, seqlen, BLOCK_N, BLOCK_M)

    # stage 1: load this block's K, V [BLOCK_N, BD].
    k0, k1 = _load_tile(K + b * skb + h.to(tl.int64) * skh, rows_n * skn, n_ok, HEAD_DIM, BD0, BD1, False)
    v0, v1 = _load_tile(V + b * svb + h.to(tl.int64) * svh, rows_n * svn, n_ok, HEAD_DIM, BD0, BD1, False)
    q_base = Q + b * sqb + h.to(tl.int64) * sqh
    do_base = DO + orow0 * so + h * HEAD_DIM
    l_base = lbase + h.to(tl.int64) * NT
    dk0, dk1 = _zeros_tile(BLOCK_N, BD0, BD1)
    dv0, dv1 = _zeros_tile(BLOCK_N, BD0, BD1)

    # stage 2: per query block load Qᵀ, dOᵀ [BD, BLOCK_M], lse, δ [BLOCK_M];
    # Pᵀ = exp2(s·K Qᵀ·log2e − lse), dV += Pᵀ dO, dSᵀ = Pᵀ ∘ (V dOᵀ − δ), dK += dSᵀ Q. No mask: a
    # missing query adds 0 (see _bwd_p), a missing key's rows are never stored.
    for m0 in range(0, seqlen, BLOCK_M):
        rows = m0 + offs_m
        m_ok = rows < seqlen
        rows_m = (start + rows).to(tl.int64)
        qt0, qt1 = _load_tile(q_base, rows_m * sqn, m_ok, HEAD_DIM, BD0, BD1, True)
        dot0, dot1 = _load_tile(do_base, rows.to(tl.int64) * so, m_ok, HEAD_DIM, BD0, BD1, True)
        lse2 = tl.load(LSE + l_base + rows, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + l_base + rows, mask=m_ok, other=0.0)
        pt = _bwd_p(_dot_d(k0, k1, qt0, qt1, BD1, PREC, UPCAST), lse2, n_ok, scale_log2, True, False)
        ptc = pt.to(dot0.dtype)
        dst = _bwd_ds(pt, _dot_d(v0, v1, dot0, dot1, BD1, PREC, UPCAST), delta, qt0, True)
        dv0 += _dot(ptc, tl.trans(dot0), PREC, UPCAST)
        dk0 += _dot(dst, tl.trans(qt0), PREC, UPCAST)
        if BD1 > 0:
            dv1 += _dot(ptc, tl.trans(dot1), PREC, UPCAST)
            dk1 += _dot(dst, tl.trans(qt1), PREC, UPCAST)

    # stage 3: store dK = s·Σ dSᵀ Q and dV [BLOCK_N, HEAD_DIM].
    g_rows = _row_offsets(orow0, offs_n, GRAD_GROUP * so, h, HEAD_DIM)
    _store_tile(DK, g_rows, n_ok, dk0 * scale, dk1 * scale, HEAD_DIM, BD0, BD1)
    _store_tile(DV, g_rows, n_ok, dv0, dv1, HEAD_DIM, BD0, BD1)


# ----------------------------------------------------------------------------------------------
# configs and the per-bucket tuner
# ----------------------------------------------------------------------------------------------
def _pow2(x, lo: int = 16) -> int:
    """The smallest power of two >= max(x, lo). ``x`` may be a SymInt (a traced sequence length):
    each comparison then becomes a guard, so a compiled graph is reused within its N bucket and
    recompiled only when N crosses a bucket boundary (``int(x)`` would specialise on N itself)."""
    p = lo
    while x > p:
        p *= 2
    return p


# Head-dim chunks: the kernels take the head dim as BD0 + BD1 columns, two power-of-two tiles (Triton
# tiles are powers of two; a dot needs >= 16). 80 = 64 + 16, 96 = 64 + 32, 48 = 32 + 16, 40 -> 32 + 16:
# the dots and register tiles of the ViT-H encoder (head dim 80) are 80 wide instead of 128. Powers
# of two, and 24 (16 + 16 is no narrower than 32), stay one chunk (BD1 = 0).
# STOP_KERNELS_ATTN_SPLIT_D=0 turns the split off (one chunk of next_pow2(Dh)) for A/B timing.
HEAD_DIM_SPLIT = os.environ.get("STOP_KERNELS_ATTN_SPLIT_D", "1") != "0"

# The key mask folded into the QKᵀ dot (module docstring) where the head dim has a padding column (24 of 32):
# STOP_KERNELS_ATTN_DOT_MASK=0 turns it off (a select per score, as before) for A/B timing.
DOT_MASK = os.environ.get("STOP_KERNELS_ATTN_DOT_MASK", "1") != "0"
# CUDA's limit on a grid's y and z dimensions: within it the kernels take (head, block, sequence) from a 3-D
# grid; beyond it (more sequences or blocks) from a flat program id, decoded with integer divisions
_GRID_YZ_MAX = 65535


# The fused backward's lse against Pᵀ loaded one element per thread and moved to the tile's layout through shared
# memory (_load_column_vector); STOP_KERNELS_ATTN_COLUMN_LOADS=0 turns it off (Triton's own choice: one load per
# column a thread holds) for A/B timing.
COLUMN_LOADS = os.environ.get("STOP_KERNELS_ATTN_COLUMN_LOADS", "1") != "0"


def _column_load_threads(num_warps: int) -> int:
    """The fused backward's THREADS constexpr (_load_column_vector): the CTA's thread count, or 0 with COLUMN_LOADS
    off."""
    return 32 * num_warps if COLUMN_LOADS else 0


def _dot_mask(D: int, width: int, dtype: torch.dtype) -> bool:
    """Whether the kernels fold the key mask into the QKᵀ dot: the head dim has a padding column (D < width
    = BD0 + BD1) and the dtype keeps the −3e38 sentinel finite (bf16, fp32; fp16 ends at 65504, where a real
    score could lie below a representable sentinel)."""
    return DOT_MASK and D < width and dtype in (torch.bfloat16, torch.float32)


def _head_chunks(D: int, split: Optional[bool] = None) -> Tuple[int, int]:
    """(BD0, BD1) for head dim D: one chunk of next_pow2(D) (BD1 = 0), or two that are narrower in total."""
    full = _pow2(D)
    if not (HEAD_DIM_SPLIT if split is None else split):
        return full, 0
    bd0 = full if full == D else full // 2
    rest = D - bd0
    if rest <= 0:
        return full, 0
    bd1 = _pow2(rest)
    return (bd0, bd1) if bd0 + bd1 < full else (full, 0)


def _fwd_configs(bucket: int, block_d: int, width: Optional[int] = None,
                 dtype: torch.dtype = torch.bfloat16) -> List[Dict]:
    """Forward candidates (heuristic default first) for bucket = next_pow2(max_seqlen) >= 16.

    ``width``: the head dim's register width BD0 + BD1 (default ``block_d``); ``dtype``: the inputs'.
    Small head dim: the whole key sequence in one tile for N <= 128 (BLOCK_N = bucket, no key
    loop, no rescaling), 32/64-key blocks for N <= 256, and a two-heads-per-program variant. Last,
    for N <= 128 (both head dims): the persistent one-tile form, ``PERSIST`` programs per SM, as
    many as fit by registers and shared memory (ptxas, sm_90a: 128x128 with 8 warps 170 registers at
    Dh 24 and 226 at Dh 80, one CTA per SM; 64x128 with 4 warps 219 registers, two; 64x64 96, five).
    Register use checked offline with ptxas for sm_90a (no spills for these: tests/test_ptxas_report.py).
    The lists are keyed by the padded width ``block_d``, so head dims 88 / 96 (width 96 = 64 + 32) and
    104–128 (one 128 chunk) share head dim 80's (width 80 = 64 + 16, whose order came from GPU timings);
    at width 128 and N > 128 its default c(128, 32, 4, 3) spilled 24–32 B and c(128, 128, 8, 2) 64 B with
    triton 3.6 (bf16), so width 128 has its own list there, without them.
    float32 (the IEEE path: FMA dots, every thread holds whole head-dim rows of its Q and K operands in
    registers) gets 16 x 16 tiles with 8 warps, + 32 x 32 up to width 48: the 16-bit tiles spill there
    (the former default at head dim 80, c(128, 32, 4, 3), 10.8 KB of local memory per thread). Every
    candidate compiles without spills with triton 3.6 and 3.8 (benchmarks/compile_check.py); that is a
    compiler fact, the speed of the new lists is not measured (no GPU timing).
    """
    def c(bm, bn, w, st=1, heads=1, persist=0):
        d = dict(BLOCK_M=min(bm, bucket), BLOCK_N=min(bn, bucket), num_warps=w, num_stages=st, HEADS=heads)
        return dict(d, PERSIST=persist) if persist else d
    width = block_d if width is None else width
    if dtype == torch.float32:
        cands = [c(16, 16, 8, 2)] + ([c(32, 32, 8, 2)] if width <= 48 else [])
    elif block_d <= 32:
        if bucket <= 64:
            cands = [c(64, 64, 4), c(32, 64, 4), c(64, 64, 4, 1, 2), c(64, 64, 4, 2, persist=5)]
        elif bucket <= 128:
            # GPU run 4 (H200, N = 116, forced configs, eager timer): 64x128 0.069 ms, 128x128 0.073,
            # 64x64 0.075 (the former first), the persistent forms 0.090-0.105
            # (last, untimed: fewer SASS instructions per query than the first's 62 per warp, sm_90a, triton
            # 3.6: 64 x 128 with 2 warps (mma.sync, 5 CTAs per SM) 54.5, 128 x 128 with 4 warps (2 CTAs) 52)
            cands = [c(64, 128, 4), c(128, 128, 8), c(64, 64, 4, 2), c(64, 128, 4, 1, 2), c(32, 128, 4),
                     c(128, 128, 8, 2, persist=1), c(64, 128, 4, 2, persist=2), c(64, 128, 2), c(128, 128, 4)]
        elif bucket <= 256:
            # (the one-tile c(64, 256, 8) measured 4x slower than the first in run 2 and spills: dropped)
            cands = [c(64, 32, 4, 3), c(64, 64, 4, 2), c(64, 64, 4, 2, 2), c(128, 64, 8, 2)]
        else:
            cands = [c(64, 64, 4, 3), c(128, 64, 8, 3), c(128, 128, 8, 2), c(64, 128, 4, 2)]
    elif block_d <= 64:
        if bucket <= 128:
            cands = [c(64, 128, 4), c(128, 128, 8), c(64, 64, 4, 2), c(32, 128, 4)]
        else:
            cands = [c(64, 64, 4, 2), c(128, 64, 8, 2), c(64, 128, 8, 2), c(128, 128, 8, 2)]
    else:
        if bucket <= 128:
            # (the one-tile c(128, 128, 8), the fastest in GPU run 4, returned a wrong second head-dim
            # chunk at head dim 80 = 64 + 16 on an H200 with triton 3.6 (the interpreter passes it):
            # dropped; tests/test_attention.py::test_every_candidate_config checks the rest on the GPU)
            cands = [c(128, 64, 8, 2), c(64, 128, 8), c(64, 64, 8, 2), c(128, 128, 8, 2, persist=1),
                     c(64, 128, 8, 2, persist=1)]
        elif width <= 96:
            cands = [c(128, 32, 4, 3), c(128, 128, 8, 2), c(128, 64, 8, 2), c(64, 128, 8, 2), c(64, 64, 8, 2)]
        else:
            cands = [c(128, 64, 8, 2), c(64, 128, 8, 2), c(64, 64, 8, 2)]
    out: List[Dict] = []
    for d in cands:  # dedupe after clamping to the bucket
        if d not in out:
            out.append(d)
    return out


def _bwd_configs(bucket: int, block_d: int, width: Optional[int] = None,
                 dtype: torch.dtype = torch.bfloat16) -> List[Dict]:
    """Backward candidates: VARIANT 'fused' (one program per (sequence, head), all queries in one
    tile, N <= 256) or 'split' (δ+dQ launch, then dK/dV launch). Heuristic default first.

    ``width``: the head dim's register width BD0 + BD1 (default ``block_d``). At N <= 128 the first
    candidates are one-pass fused configs (BLOCK_N = the bucket: every score of a (sequence, head) at
    once, no loop, wgmma throughout, 11 barriers per program against 10 per 16-key step), kept only
    where ptxas shows no spill: head dim 24 (93 registers at N <= 64, 176 at N <= 128 with 8 warps)
    and 80 = 64 + 16 (254 registers). Last, at head dim 24, the persistent one-pass form
    (``PERSIST`` programs per SM walking the (sequence, head) items, the next item's tiles loaded by
    the pipeliner during this one's math): 255 registers and 97 KB of shared memory with 8 warps at
    N <= 128 (one CTA per SM, as the one-pass kernel without it), 193 registers with 4 warps at
    N <= 64 (two); at head dim 80 it spills, so it is not offered. GPU run 4 (H200) timed the one-pass
    form fastest at N <= 128 for head dims 24 and 80 (first now) and the persistent one slower (last).

    VARIANT 'keys' (``keys(bm, w)``, last at head dim 24, N <= 256): the key-stationary form of the fused
    kernel, every key in one tile (BLOCK_N = the bucket) and query blocks of BLOCK_M, each block's dQ
    stored when it is done. At N = 116 (sm_90a, triton 3.6) the one-pass fused(128, 8) holds 176 registers
    (one CTA of 8 warps per SM, 1160 SASS instructions per warp); keys(32, 8) 128 registers (two CTAs,
    4 × 340), keys(16, 4) 148 (three CTAs of 4 warps, 8 × 278), keys(32, 4) 197 (two, 4 × 452). keys(64, 4)
    spilled (100 B) and is not offered; at head dim 80 every keys tile tried spilled (48–1220 B). Not timed
    on a GPU yet."""
    def fused(bn, w, st=1, persist=0):
        d = dict(VARIANT="fused", BLOCK_N=min(bn, bucket), num_warps=w, num_stages=st)
        return dict(d, PERSIST=persist) if persist else d

    def split(bm, bn, w, st=2):
        return dict(VARIANT="split", BLOCK_M=min(bm, bucket), BLOCK_N=min(bn, bucket), num_warps=w, num_stages=st)

    def keys(bm, w, st=1, persist=0):
        if bm >= bucket:  # every query in the one block too: the one-pass kernel
            return fused(bucket, w, st, persist)
        d = dict(VARIANT="keys", BLOCK_M=bm, BLOCK_N=bucket, num_warps=w, num_stages=st)
        return dict(d, PERSIST=persist) if persist else d
    # no candidate spills registers at the ViT-H/14 shapes (ptxas, sm_90a, head dim split in chunks:
    # `benchmarks/ptxas_report.py`, kept so by tests/test_ptxas_report.py); fused(32, 4) at N <= 128,
    # fused(16, 4) at N <= 256 and split(32, 64, 4) / split(64, 32, 4) at head dim 80 did (20–380 B);
    # split(128, 64, 8) at head dim 80 does too, split(64, 128, 8) does not. Other head dims (every list:
    # benchmarks/compile_check.py, tests/test_compile_check.py, triton 3.6 and 3.8, bf16): fused(16, 8) at
    # head dim 64 and N <= 256 spilled 16 B with both (dropped); head dim 80's list (width 80) spills at
    # the widths that share its block_d: split(64, 64, 4) dK/dV 24 B at width 96 (head dim 88, the ViT-g
    # encoder's; triton 3.6) and 72–88 B at width 128, split(64, 128, 8) dK/dV 24–48 B at width 128 and 8–24 B
    # at width 96 when packed (both versions), so widths 96 and 128 have their own lists: split(64, 64, 8)
    # first (no spill with either version, batched or packed, at N > 32; at N <= 32 it clamps to 32 x 32,
    # which spills 32 B at width 96, as the former default's 32 x 32 with 4 warps did, 48 B with 3.8), and at width 128
    # split(64, 32, 4) (split(32, 64, 4) spilled 8–24 B packed with 3.6). float32
    # (IEEE FMA dots; the 16-bit defaults spilled 2.4–11 KB) gets one candidate, split(16, 16, 2): the only
    # tile of those tried (16 x 32, 32 x 16, 16 x 16 with 2 or 4 warps) that spilled at no head-dim chunk
    # class, bucket and layout (batched / packed) with triton 3.6, and only 16 B at head dim 40 / 48 and
    # N <= 16 with 3.8; the others spilled 4–550 B somewhere with both versions. Removing spills is a
    # compiler fact; the speed of these lists is not measured (no GPU timing)
    width = block_d if width is None else width
    if dtype == torch.float32:
        cands = [split(16, 16, 2)]
    elif block_d <= 32 and bucket <= 64:
        cands = [fused(16, 4), fused(32, 4), split(64, 64, 4), fused(64, 4), fused(64, 4, 2, persist=2), keys(32, 4)]
    elif block_d <= 32 and bucket <= 128:
        # GPU run 4 (H200, N = 116, forced, eager timer): the one-pass fused(128, 8) 0.151 ms, its
        # persistent form 0.178, split(64, 64, 4) 0.197, fused(16, 4) (the former first) 0.206
        cands = [fused(128, 8), fused(16, 4), fused(64, 8), split(64, 64, 4), split(32, 64, 4),
                 fused(128, 8, 2, persist=1), keys(64, 8), keys(32, 8), keys(32, 4), keys(16, 4)]
    elif block_d <= 32 and bucket <= 256:
        cands = [split(64, 64, 4), split(32, 64, 4), fused(16, 8), split(64, 64, 8), keys(32, 8), keys(16, 8),
                 keys(16, 4)]
    elif block_d <= 64 and bucket <= 256:
        cands = [split(64, 64, 4), split(64, 64, 8), split(32, 64, 4)]
    elif block_d <= 64:
        cands = [split(64, 64, 4), split(64, 64, 8), split(32, 64, 4), split(64, 32, 4)]
    elif width <= 80:
        # GPU run 4 (H200, N = 74, forced, eager timer): the one-pass fused(128, 8) 0.087 ms against
        # split(64, 64, 4) 0.139, split(64, 128, 8) 0.162, split(64, 64, 8) 0.169 (N <= 64: not timed)
        cands = ([fused(128, 8)] if bucket <= 128 else []) + [split(64, 64, 4), split(64, 64, 8), split(64, 128, 8)]
    elif width <= 96:
        cands = [split(64, 64, 8)]
    else:
        cands = [split(64, 64, 8), split(64, 32, 4)]
    if width == 16 and bucket > 64:  # 16-key steps over a width-16 head keep a stack frame (8-104 B, both Tritons)
        cands = [d for d in cands if not (d["VARIANT"] == "fused" and d["BLOCK_N"] == 16)]
    out: List[Dict] = []
    for d in cands:
        if d not in out:
            out.append(d)
    return out


def _fwd_candidates(N: int, D: int, split: Optional[bool] = None, dtype: torch.dtype = torch.bfloat16) -> List[Dict]:
    """The forward candidates for sequence length (or max_seqlen) ``N``, head dim ``D`` and input ``dtype``,
    with the head dim split as ``split`` says (default: HEAD_DIM_SPLIT), as the launch plan sees them."""
    return _fwd_configs(_pow2(N), _pow2(D), sum(_head_chunks(D, split)), dtype)


def _bwd_candidates(N: int, D: int, split: Optional[bool] = None, dtype: torch.dtype = torch.bfloat16) -> List[Dict]:
    """The backward candidates for sequence length (or max_seqlen) ``N``, head dim ``D`` and input ``dtype``,
    with the head dim split as ``split`` says (default: HEAD_DIM_SPLIT), as the launch plan sees them."""
    return _bwd_configs(_pow2(N), _pow2(D), sum(_head_chunks(D, split)), dtype)


_TUNE_CACHE: Dict[Tuple, Dict] = {}
_POISON_OUTPUTS = False  # tests: prefill every output with NaN so unwritten elements show up
_FORCED: Dict[str, Dict] = {}
_FORCED_KEY: Optional[Tuple] = None  # hashable image of _FORCED (part of the plan key), None = nothing forced


def _new(shape, dtype, device) -> torch.Tensor:
    if _POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _tuning_enabled() -> bool:
    return os.environ.get("STOP_KERNELS_ATTN_TUNE", "0") != "0"


def _capturing() -> bool:
    try:
        return torch.cuda.is_current_stream_capturing()
    except Exception:  # pragma: no cover - CPU-only builds
        return False


def _time_candidate(fn) -> float:
    """Kernel time (ms) of ``fn``: replayed from a CUDA graph (no CPU launch cost in the number, so
    short kernels are ranked by their GPU time, not by the host), or plain ``do_bench`` when graph
    timing fails or ``STOP_KERNELS_ATTN_TUNE_GRAPH=0``."""
    import triton.testing as tt
    if os.environ.get("STOP_KERNELS_ATTN_TUNE_GRAPH", "1") != "0":
        try:
            try:
                return float(tt.do_bench_cudagraph(fn, rep=5, return_mode="median"))
            except TypeError:
                return float(tt.do_bench_cudagraph(fn, rep=5))
        except Exception:
            pass
    return float(tt.do_bench(fn, warmup=3, rep=15))


def _pick_config(kind: str, key: Tuple, candidates: List[Dict], launch, on_cuda: bool,
                 traced: bool = False) -> Tuple[Dict, bool]:
    """The config for ``key``: (config, cacheable). Timed once per key on CUDA (``launch(cfg)``
    runs candidate ``cfg`` on scratch outputs) and kept in ``_TUNE_CACHE``.

    Never times during CUDA graph capture: there the heuristic first candidate is used for this
    call only (not cached, so a later eager call still tunes). Warm the cache before capturing.
    ``traced`` (Inductor tracing the ops with fake tensors): nothing can run, so the cached pick or
    the first candidate is used, uncached; an eager warm-up call fills the cache beforehand.
    """
    forced = _FORCED.get(kind)
    if forced is not None:
        return forced, True
    full_key = (kind,) + key
    cfg = _TUNE_CACHE.get(full_key)
    if cfg is not None:
        return cfg, True
    if traced:
        return candidates[0], False
    if not on_cuda or _INTERPRET:
        cfg = candidates[0]
    elif _capturing():
        return candidates[0], False
    elif len(candidates) == 1 or not _tuning_enabled():
        # heuristic: the first candidate that launches (a config can exceed shared memory,
        # e.g. float32 inputs with a large head dim)
        for i, cand in enumerate(candidates):
            try:
                launch(cand)
            except Exception:
                if i == len(candidates) - 1:
                    raise
                continue
            cfg = cand
            break
    else:
        best_t = float("inf")
        cfg = candidates[0]
        for cand in candidates:
            try:
                launch(cand)  # compile + warm (raises here when the config does not fit)
                t = _time_candidate(lambda: launch(cand))
            except Exception:  # e.g. out of shared memory / registers for this config
                t = float("inf")
            if t < best_t:
                best_t, cfg = t, cand
    _TUNE_CACHE[full_key] = cfg
    return cfg, True


@contextlib.contextmanager
def _force_config(fwd: Optional[Dict] = None, bwd: Optional[Dict] = None) -> Iterator[None]:
    """Testing/benchmark hook: force one forward and/or backward config (see ``_fwd_configs``)."""
    global _FORCED_KEY
    old, old_key = dict(_FORCED), _FORCED_KEY
    if fwd is not None:
        _FORCED["fwd"] = fwd
    if bwd is not None:
        _FORCED["bwd"] = bwd
    _FORCED_KEY = tuple(sorted((k, tuple(sorted(v.items()))) for k, v in _FORCED.items())) or None
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(old)
        _FORCED_KEY = old_key


# ----------------------------------------------------------------------------------------------
# launch plans: everything computable from (shapes, strides, dtype, mode) done once
# ----------------------------------------------------------------------------------------------
# A plan holds the bound kernel launcher(s) (``kernel[grid]``), the non-pointer arguments and the
# keyword constexprs for one exact input signature, so a repeated call does: one dict lookup, the
# output allocations and the launch(es). Key (``_plan_key``): q's shape and dtype, q/k/v strides,
# the number of packed sequences (None: batched), max_seqlen, scale and the forced config (tests). A plan snapshots the
# config chosen for its (N bucket, D, dtype, packed) tuning key: clear both caches together
# (:func:`clear_caches`). Plans are only cached when nothing in them is provisional (config
# picked during graph capture).
_PLANS: Dict[Tuple, "_Plan"] = {}
_MAX_PLANS = 4096  # packed mode sees a new T almost every batch: bounded, cleared when full


class _Plan:
    __slots__ = ("empty", "copy", "lse_shape", "fwd", "fwd_args", "fwd_kw", "bwd", "fkey")

    def __init__(self):
        self.bwd = None


class _BwdPlan:
    __slots__ = ("fused", "launch1", "args1", "launch2", "args2", "kw")


def clear_caches() -> None:
    """Forget tuned (and loaded) configs and launch plans (the next call per key re-tunes)."""
    _TUNE_CACHE.clear()
    _PLANS.clear()


# The configs of a kernel choice are plain ints/strings; these keys (and only these) may appear.
_CONFIG_KEYS = {"fwd": {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "HEADS", "PERSIST"},
                "bwd": {"VARIANT", "BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "PERSIST"}}
_CONFIG_REQUIRED = {"fwd": {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"},
                    "bwd": {"VARIANT", "BLOCK_N", "num_warps", "num_stages"}}
_DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _is_pow2(v, lo: int = 1) -> bool:
    return chk.is_int(v) and v >= lo and v & (v - 1) == 0


def _config_value_problem(name: str, v) -> str:
    """What a config value must be, '' when ``v`` is fine (the kernels' tiles are powers of two, a dot
    needs at least 16 rows and columns, a persistent grid SMs × PERSIST programs)."""
    if name == "VARIANT":
        return "" if v in ("fused", "keys", "split") else "'fused', 'keys' or 'split'"
    if name in ("BLOCK_M", "BLOCK_N"):
        return "" if _is_pow2(v, 16) else "a power of two >= 16"
    if name == "num_warps":
        return "" if _is_pow2(v) and v <= 32 else "a power of two in [1, 32]"
    if name in ("num_stages", "HEADS"):
        return "" if chk.is_int(v) and 1 <= v <= 16 else "an integer in [1, 16]"
    if name == "PERSIST":  # a larger grid than 32 programs per SM is never resident: a typo, not a config
        return "" if chk.is_int(v) and 0 <= v <= 32 else "an integer in [0, 32] (programs per SM; 0: one per item)"
    return "a known key"


def save_tuned_configs(path: str, configs: Optional[Dict[Tuple, Dict]] = None) -> int:
    """Write the kernel configs chosen so far (the tuner's picks, or loaded ones), or ``configs``
    (keyed as that cache: (kind, N bucket, head dim, dtype, packed, head-dim split)), to a JSON file
    that :func:`load_tuned_configs` reads back; returns the number of entries. Written to a
    temporary file and renamed, so a crash leaves the previous file whole."""
    configs = _TUNE_CACHE if configs is None else configs
    entries = [dict(kind=kind, bucket=bucket, head_dim=D, dtype=str(dtype).replace("torch.", ""), varlen=varlen,
                    split_d=split, config=dict(cfg))
               for (kind, bucket, D, dtype, varlen, split), cfg in sorted(configs.items(), key=str)]
    chk.write_json_atomic(path, entries)
    return len(entries)


# Configs that computed wrong numbers on a GPU (not merely slow ones), by (kind, bucket, head dim,
# head-dim split): dropped from the candidate lists, and refused by load_tuned_configs, since a file
# tuned before they were dropped may name them (run 4's own best_configs.json did).
_KNOWN_WRONG = {
    # GPU run 4, H200, triton 3.6: the one-tile forward at head dim 80 = 64 + 16 returned a wrong
    # second head-dim chunk (the interpreter computes it right)
    ("fwd", 128, 80, True): [dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=1, HEADS=1)],
}


def load_tuned_configs(path: str) -> int:
    """Use the kernel configs of a JSON file written by :func:`save_tuned_configs` (or by
    ``benchmarks/gpu_attention.py``: the fastest config it measured per shape) instead of the first
    candidate or the tuner, per (kind, N bucket, head dim, dtype, packed, head-dim split). This is
    how tuned configs reach code under ``torch.compile``, where nothing can be timed: tune once
    (``STOP_KERNELS_ATTN_TUNE=1`` in an eager run, then save), load in the training run
    (``STOP_KERNELS_ATTN_CONFIGS=path``, read at import). Returns the number of entries; a
    malformed entry (unknown keys, a bucket that is not a power of two, tiles that are not, ...)
    raises ``ValueError`` naming it, before anything is used. A well-formed config is then used as
    it is, with no fallback: one that does not fit this GPU (shared memory, registers) fails at its
    first launch, so load a file made on the same kind of GPU."""
    entries = chk.read_json(path, "tuned configs")
    if not isinstance(entries, list):
        raise ValueError(f"tuned configs {path}: expected a list of entries, got {type(entries).__name__}")
    loaded = {}
    for i, e in enumerate(entries):
        where = f"tuned configs {path}, entry {i}"
        if not isinstance(e, dict) or set(e) != {"kind", "bucket", "head_dim", "dtype", "varlen", "split_d", "config"}:
            raise ValueError(f"{where}: expected the keys kind, bucket, head_dim, dtype, varlen, split_d, config; "
                             f"got {sorted(e) if isinstance(e, dict) else e!r}")
        kind, cfg = e["kind"], e["config"]
        if not isinstance(kind, str) or kind not in _CONFIG_KEYS:
            raise ValueError(f"{where}: kind must be 'fwd' or 'bwd', got {kind!r}")
        if not isinstance(e["dtype"], str) or e["dtype"] not in _DTYPE_NAMES:
            raise ValueError(f"{where}: dtype must be one of {sorted(_DTYPE_NAMES)}, got {e['dtype']!r}")
        if not _is_pow2(e["bucket"], 16):
            raise ValueError(f"{where}: bucket must be next_pow2(N), a power of two >= 16, got {e['bucket']!r}")
        if not _kernel_head_dim(e["head_dim"]):
            raise ValueError(f"{where}: head_dim must be a multiple of 8 in [8, {MAX_HEAD_DIM}], got {e['head_dim']!r}")
        for name in ("varlen", "split_d"):
            if not isinstance(e[name], bool):
                raise ValueError(f"{where}: {name} must be true or false, got {e[name]!r}")
        if not isinstance(cfg, dict) or not _CONFIG_REQUIRED[kind] <= set(cfg) <= _CONFIG_KEYS[kind]:
            raise ValueError(f"{where}: a {kind} config needs {sorted(_CONFIG_REQUIRED[kind])} and may add "
                             f"{sorted(_CONFIG_KEYS[kind] - _CONFIG_REQUIRED[kind])}, got {cfg!r}")
        for name, v in cfg.items():
            why = _config_value_problem(name, v)
            if why:
                raise ValueError(f"{where}: config {name} must be {why}, got {v!r}")
        # keys a backward variant would silently ignore: the fused kernel tiles keys only, the split
        # kernels have no persistent form
        if cfg.get("VARIANT") in ("fused", "keys") and e["bucket"] > _FUSED_BWD_MAX_N:  # it would run as split
            what = "query" if cfg["VARIANT"] == "fused" else "key"
            raise ValueError(f"{where}: the {cfg['VARIANT']} backward holds every {what} in one tile, "
                             f"N <= {_FUSED_BWD_MAX_N}; bucket {e['bucket']} needs a split config")
        if cfg.get("VARIANT") == "keys" and not (cfg.get("BLOCK_N") == e["bucket"] and cfg.get("BLOCK_M", e["bucket"])
                                                  < e["bucket"]):
            raise ValueError(f"{where}: a keys backward config holds every key in one tile (BLOCK_N = the bucket, "
                             f"{e['bucket']}) and loops over smaller query blocks (BLOCK_M < BLOCK_N), got {cfg!r}")
        unused = {"fused": {"BLOCK_M"}, "split": {"PERSIST"}}.get(cfg.get("VARIANT"), set()) & set(cfg)
        if unused:
            raise ValueError(f"{where}: a {cfg['VARIANT']} backward config takes no {sorted(unused)}, got {cfg!r}")
        if {"HEADS": 1, **cfg} in _KNOWN_WRONG.get((kind, e["bucket"], e["head_dim"], e["split_d"]), []):
            raise ValueError(f"{where}: {kind} config {cfg!r} computed wrong numbers on a GPU at this shape "
                             "(see _KNOWN_WRONG in stop_kernels/ops/attention.py); tune again or drop the entry")
        key = (kind, e["bucket"], e["head_dim"], _DTYPE_NAMES[e["dtype"]], e["varlen"], e["split_d"])
        if key in loaded:
            raise ValueError(f"{where}: a second config for {kind}, bucket {e['bucket']}, head dim {e['head_dim']}, "
                             f"{e['dtype']}, varlen {e['varlen']}, split_d {e['split_d']}")
        loaded[key] = dict(cfg)
    _TUNE_CACHE.update(loaded)
    _PLANS.clear()  # plans snapshot their configs
    return len(loaded)


def _plan_key(q, k, v, cu, max_seqlen: int, scale: float) -> Tuple:
    # k, v have q's shape, dtype and device (checked by attention()); the device does not change
    # a plan (launches go to the current device, which attention() makes q's). Packed: the number of
    # sequences (cu_seqlens length) sets the grid, their lengths are read in-kernel.
    return (q.shape, q.stride(), k.stride(), v.stride(), q.dtype, None if cu is None else cu.shape[0],
            max_seqlen, scale, _FORCED_KEY, HEAD_DIM_SPLIT, DOT_MASK, COLUMN_LOADS)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels assume a unit last-dim stride (always true for views of a QKV projection)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _qkv_strides(ts, varlen: bool) -> Tuple[List[int], int]:
    """(batch, token, head) strides of q, k, v (packed: batch stride 0; size-1 dims: 0) divided by
    ALIGN, and ALIGN (8 when every such stride is a multiple of 8 and below 2^31, else 1: a divided
    stride that fits int32 would be multiplied back in int32 and wrap, see _unaligned_strides)."""
    out: List[int] = []
    for t in ts:
        st = t.stride()
        sh = t.shape
        if varlen:
            st3 = [0, st[0] if sh[0] > 1 else 0, st[1] if sh[1] > 1 else 0]
        else:
            st3 = [st[i] if sh[i] > 1 else 0 for i in range(3)]
        out += st3
    al = 8 if all(s % 8 == 0 and s < 2 ** 31 for s in out) else 1
    return [s // al for s in out], al


def _upcast(dtype: torch.dtype) -> bool:
    # Triton's CPU interpreter multiplies bfloat16 dot operands as raw bits (wrong results);
    # there the operands (already rounded to bf16) are widened to fp32 first. Never on GPU.
    return _INTERPRET and dtype == torch.bfloat16


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _dims(q: torch.Tensor, cu_n: int, varlen: bool, max_seqlen: int):
    """(B, N, H, D, NT). The head dim is always an int: it is the kernels' constexpr HEAD_DIM and part of
    the config keys, so a traced symbolic one (torch.compile(dynamic=True) of a function whose input's
    last dim is the head dim) is specialised here, i.e. guarded on (GPU run 4: hashing the SymInt failed)."""
    if varlen:
        T, H, D = q.shape
        return cu_n - 1, max_seqlen, H, int(D), T
    B, N, H, D = q.shape
    return B, N, H, int(D), N


def _num_sms(device: torch.device) -> int:
    """SMs of ``device``; 4 off CUDA, so the persistent forms' item loops run several trips per
    program in the CPU tests too."""
    return sm_count(device, 4)


def _launcher(kernel, grid, traced: bool):
    """``kernel[grid]``; when ``traced`` (the ops traced for Inductor), wrapped by
    ``torch.library.wrap_triton`` so the launch becomes a graph node Inductor emits itself."""
    if traced:
        return torch.library.wrap_triton(kernel)[grid]
    return kernel[grid]


def _make_plan(q, k, v, cu, varlen: bool, max_seqlen: int, scale: float,
               traced: bool = False) -> Tuple["_Plan", bool]:
    """Build the forward plan (tuning the forward config if its key is new). Returns (plan, cacheable).
    ``traced``: q, k, v are fake/functional tensors of a graph being traced (sizes may be SymInts)."""
    B, N, H, D, NT = _dims(q, cu.numel() if varlen else 0, varlen, max_seqlen)
    p = _Plan()
    p.fkey = _FORCED_KEY
    p.lse_shape = (H, NT) if varlen else (B, H, N)
    p.empty = q.numel() == 0 or B == 0 or N == 0
    p.copy = False
    if p.empty:
        return p, not traced
    block_d = _pow2(D)  # candidate lists are keyed by the padded width
    bd0, bd1 = _head_chunks(D)
    bucket = _pow2(N)
    strides, al = _qkv_strides((q, k, v), varlen)
    prec, upcast = _prec(q.dtype), _upcast(q.dtype)
    scale_log2 = scale * _LOG2E
    cu_arg = cu if varlen else q  # dummy pointer when not varlen (never read)

    def parts(cfg):
        num_m = triton.cdiv(N, cfg["BLOCK_M"])
        heads = cfg.get("HEADS", 1)
        heads = heads if H % heads == 0 else 1
        persist = cfg.get("PERSIST", 0)  # programs per SM of the persistent form; 0: one program per item
        # a fixed grid for the persistent form (no min() with the item count: that would put a guard
        # on a symbolic N into a compiled graph; surplus programs run no iteration)
        # the 3-D grid where the head dim is one chunk: with two (80 = 64 + 16) it cost triton 3.6 registers, and the
        # context encoder's default forward (N = 74) its second CTA per SM (128 -> 134 registers, ptxas sm_90a)
        grid3 = not persist and bd1 == 0 and num_m <= _GRID_YZ_MAX and B <= _GRID_YZ_MAX
        if persist:
            grid = (_num_sms(q.device) * persist,)
        elif grid3:
            grid = (H // heads, num_m, B)
        else:
            grid = (_grid_size(H // heads * num_m * B, B, N),)
        args = (*strides, NT, H, num_m, B, scale_log2)
        kw = dict(HEAD_DIM=D, BD0=bd0, BD1=bd1, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], HEADS=heads,
                  ONE_TILE=cfg["BLOCK_N"] >= bucket, PERSISTENT=bool(persist), ALIGN=al, VARLEN=varlen,
                  DOT_MASK=_dot_mask(D, bd0 + bd1, q.dtype), GRID3=grid3,
                  PREC=prec, UPCAST=upcast, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        return grid, args, kw

    scratch: List[torch.Tensor] = []

    def launch(cfg):  # tuning: scratch outputs, allocated once
        grid, args, kw = parts(cfg)
        if not scratch:
            scratch.extend([torch.empty(q.shape, dtype=q.dtype, device=q.device),
                            torch.empty(p.lse_shape, dtype=torch.float32, device=q.device)])
        _attn_fwd_kernel[grid](q, k, v, scratch[0], scratch[1], cu_arg, *args, **kw)

    cfg, ok = _pick_config("fwd", (bucket, D, q.dtype, varlen, HEAD_DIM_SPLIT),
                           _fwd_configs(bucket, block_d, bd0 + bd1, q.dtype), launch, q.is_cuda, traced)
    grid, p.fwd_args, p.fwd_kw = parts(cfg)
    p.fwd = _launcher(_attn_fwd_kernel, grid, traced)
    return p, ok


def _make_bwd_plan(q, k, v, cu, varlen: bool, max_seqlen: int, scale: float, o, lse, do,
                   traced: bool = False) -> Tuple[_BwdPlan, bool]:
    B, N, H, D, NT = _dims(q, cu.numel() if varlen else 0, varlen, max_seqlen)
    bd0, bd1 = _head_chunks(D)
    bucket = _pow2(N)
    strides, al = _qkv_strides((q, k, v), varlen)
    prec, upcast = _prec(q.dtype), _upcast(q.dtype)
    cu_arg = cu if varlen else q

    def parts(cfg, traced_=False) -> _BwdPlan:
        bp = _BwdPlan()
        if cfg["VARIANT"] in ("fused", "keys") and bucket <= _FUSED_BWD_MAX_N:
            # one launch, one program per (sequence, head): every query in one tile and key blocks of BLOCK_N
            # ('fused'), or every key in one tile and query blocks of BLOCK_M ('keys'); both: one pass
            if cfg["VARIANT"] == "keys":
                block_q, block_n = min(cfg["BLOCK_M"], bucket), bucket
            else:
                block_q, block_n = bucket, cfg["BLOCK_N"]
            bp.fused = True
            persist = cfg.get("PERSIST", 0)  # programs per SM of the persistent form (see the forward's)
            grid2 = not persist and B <= _GRID_YZ_MAX
            grid = (_num_sms(q.device) * persist,) if persist else ((H, B) if grid2 else (H * B,))
            bp.launch1 = _launcher(_attn_bwd_fused_kernel, grid, traced_)
            bp.args1 = (*strides, NT, H, B, scale)
            bp.launch2, bp.args2 = None, None
            bp.kw = dict(HEAD_DIM=D, BD0=bd0, BD1=bd1, BLOCK_Q=block_q, BLOCK_N=block_n, PERSISTENT=bool(persist),
                         ALIGN=al, VARLEN=varlen, GRID2=grid2,
                         # (not the persistent form: there the −3e38 K tile cost ptxas 8 B of spills, triton 3.6;
                         # the key-stationary form has no dot mask)
                         DOT_MASK=_dot_mask(D, bd0 + bd1, q.dtype) and not persist and cfg["VARIANT"] == "fused",
                         PREC=prec, UPCAST=upcast, THREADS=_column_load_threads(cfg["num_warps"]),
                         num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            return bp
        bm = cfg.get("BLOCK_M", 64)
        bn = cfg.get("BLOCK_N", 64)
        num_m = triton.cdiv(N, bm)
        num_n = triton.cdiv(N, bn)
        bp.fused = False
        # launch 1: δ and dQ per query block; launch 2: dK, dV per key block (reads δ)
        grid3 = max(num_m, num_n) <= _GRID_YZ_MAX and B <= _GRID_YZ_MAX
        bp.launch1 = _launcher(_attn_bwd_dq_kernel, (H, num_m, B) if grid3 else (_grid_size(H * num_m * B, B, N),),
                               traced_)
        bp.args1 = (*strides, NT, H, num_m, scale)
        bp.launch2 = _launcher(_attn_bwd_dkdv_kernel, (H, num_n, B) if grid3 else (_grid_size(H * num_n * B, B, N),),
                               traced_)
        bp.args2 = (*strides, NT, H, num_n, scale)
        bp.kw = dict(HEAD_DIM=D, BD0=bd0, BD1=bd1, BLOCK_M=bm, BLOCK_N=bn, ALIGN=al, VARLEN=varlen,
                     DOT_MASK=_dot_mask(D, bd0 + bd1, q.dtype), GRID3=grid3, PREC=prec, UPCAST=upcast,
                     num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 1))
        return bp

    scratch: List[torch.Tensor] = []

    def launch(cfg):  # tuning: scratch outputs, allocated once
        if not scratch:
            scratch.extend([torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3)])
            scratch.append(torch.empty(lse.shape, dtype=torch.float32, device=q.device))
        _run_bwd(parts(cfg), cu_arg, q, k, v, o, lse, do, scratch[:3], delta=scratch[3])

    cfg, ok = _pick_config("bwd", (bucket, D, q.dtype, varlen, HEAD_DIM_SPLIT),
                           _bwd_candidates(N, D, dtype=q.dtype), launch, q.is_cuda, traced)
    return parts(cfg, traced), ok


def _run_bwd(bp: _BwdPlan, cu_arg, q, k, v, o, lse, do, grads, delta=None) -> None:
    """Launch a backward plan. ``grads``: ``(dq, dk, dv)``, contiguous ``[rows, H, Dh]`` each
    (GRAD_GROUP 1), or ``(dqkv,)``, one contiguous ``[rows, 3, H, Dh]`` gradient of a packed QKV
    buffer (GRAD_GROUP 3: the kernels store through their first gradient argument, the slot offsets
    are theirs; the other gradient arguments get ``q``, never read or written, so the one mutated
    tensor appears once among the arguments)."""
    if len(grads) == 3:
        dq, dk, dv = grads
        group = 1
    else:
        dq = dk = dv = grads[0]
        group = 3
    if bp.fused:
        bp.launch1(q, k, v, o, do, dq, dk if group == 1 else q, dv if group == 1 else q, lse, cu_arg, *bp.args1,
                   GRAD_GROUP=group, **bp.kw)
    else:
        if delta is None:
            delta = torch.empty(lse.shape, dtype=torch.float32, device=lse.device)
        bp.launch1(q, k, v, o, do, dq, lse, delta, cu_arg, *bp.args1, GRAD_GROUP=group, **bp.kw)
        bp.launch2(q, k, v, do, dk, dv if group == 1 else q, lse, delta, cu_arg, *bp.args2, GRAD_GROUP=group,
                   **bp.kw)


def _is_real(t: torch.Tensor) -> bool:
    """False while the ops are being traced (fake / functional tensors, or a dispatch mode such as
    FakeTensorMode active): then nothing launches, the launches are recorded via ``wrap_triton``."""
    return type(t) is torch.Tensor and torch._C._len_torch_dispatch_stack() == 0


def _get_plan(q, k, v, cu, max_seqlen: int, scale: float, key=None) -> "_Plan":
    """The forward plan for these inputs: cached per signature for real tensors, built afresh (with
    ``wrap_triton`` launchers, uncached) while tracing."""
    varlen = cu is not None
    traced = not _is_real(q)
    if traced:
        qq, kk, vv = _unit_last(q), _unit_last(k), _unit_last(v)
        p, _ = _make_plan(qq, kk, vv, cu, varlen, max_seqlen, scale, traced=True)
        p.copy = qq is not q or kk is not k or vv is not v
        return p
    if key is None:
        key = _plan_key(q, k, v, cu, max_seqlen, scale)
    p = _PLANS.get(key)
    if p is None:
        qq, kk, vv = _unit_last(q), _unit_last(k), _unit_last(v)
        p, ok = _make_plan(qq, kk, vv, cu, varlen, max_seqlen, scale)
        p.copy = qq is not q or kk is not k or vv is not v
        if ok:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            _PLANS[key] = p
    return p


def _fwd(q, k, v, cu, max_seqlen: int, scale: float, plan: Optional["_Plan"] = None
         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward launch wrapper: (o, lse). ``plan``: from :func:`_get_plan` (looked up when None)."""
    p = plan if plan is not None else _get_plan(q, k, v, cu, max_seqlen, scale)
    if p.copy:
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    dev = q.device
    o = _new(q.shape, q.dtype, dev)
    lse = _new(p.lse_shape, torch.float32, dev)
    if not p.empty:
        p.fwd(q, k, v, o, lse, q if cu is None else cu, *p.fwd_args, **p.fwd_kw)
    return o, lse


def _bwd(do, q, k, v, o, lse, cu, max_seqlen: int, scale: float, plan: Optional["_Plan"] = None,
         qkv_grad: bool = False):
    """Backward launch wrapper: (dq, dk, dv), fresh contiguous tensors; with ``qkv_grad`` one fresh
    contiguous ``[..., 3, H, Dh]`` gradient of a packed QKV buffer instead (q, k, v its slots)."""
    p = plan if plan is not None and plan.fkey == _FORCED_KEY else _get_plan(q, k, v, cu, max_seqlen, scale)
    if p.copy:
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    if not do.is_contiguous():  # the kernels read dO with o's (contiguous) layout
        do = do.contiguous()
    if not (o.is_contiguous() and lse.is_contiguous()):  # ours are; a compiler could pass others
        o, lse = o.contiguous(), lse.contiguous()
    dev = q.device
    if qkv_grad:
        grads = (_new((*q.shape[:-2], 3, *q.shape[-2:]), q.dtype, dev),)
    else:
        grads = tuple(_new(q.shape, q.dtype, dev) for _ in range(3))
    if not p.empty:
        bp = p.bwd
        cu_arg = q if cu is None else cu
        if bp is None:
            bp, ok = _make_bwd_plan(q, k, v, cu, cu is not None, max_seqlen, scale, o, lse, do, traced=not _is_real(q))
            if ok:
                p.bwd = bp
        _run_bwd(bp, cu_arg, q, k, v, o, lse, do, grads)
    return grads[0] if qkv_grad else grads


# ----------------------------------------------------------------------------------------------
# eager autograd path (no torch.library dispatch: the per-call host cost of the op)
# ----------------------------------------------------------------------------------------------
class _FlashAttnFn(torch.autograd.Function):
    """Eager-mode autograd wrapper calling the launch wrappers directly. Same math and kernels as
    the ``stop_kernels::flash_attn_*`` custom ops (which :func:`attention` uses under
    ``torch.compile`` / tracing); it only skips the dispatcher round trips."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_seqlen, scale, plan):
        o, lse = _fwd(q, k, v, cu, max_seqlen, scale, plan)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.cu, ctx.max_seqlen, ctx.scale, ctx.plan = cu, max_seqlen, scale, plan
        return o

    @staticmethod
    @first_order_backward
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _bwd(do, q, k, v, o, lse, ctx.cu, ctx.max_seqlen, ctx.scale, ctx.plan)
        return dq, dk, dv, None, None, None, None


class _FlashAttnQKVFn(torch.autograd.Function):
    """:class:`_FlashAttnFn` for a packed ``[..., 3, H, Dh]`` QKV buffer: the backward writes one
    ``[..., 3, H, Dh]`` gradient directly (no stack of dq, dk, dv into the QKV projection's layout)."""

    @staticmethod
    def forward(ctx, qkv, cu, max_seqlen, scale, plan):
        q, k, v = qkv.unbind(-3)
        o, lse = _fwd(q, k, v, cu, max_seqlen, scale, plan)
        ctx.save_for_backward(qkv, o, lse)
        ctx.cu, ctx.max_seqlen, ctx.scale, ctx.plan = cu, max_seqlen, scale, plan
        return o

    @staticmethod
    @first_order_backward
    def backward(ctx, do):
        qkv, o, lse = ctx.saved_tensors
        dqkv = _bwd(do, *qkv.unbind(-3), o, lse, ctx.cu, ctx.max_seqlen, ctx.scale, ctx.plan, qkv_grad=True)
        return dqkv, None, None, None, None


# ----------------------------------------------------------------------------------------------
# torch.library ops (the torch.compile / tracing path)
# ----------------------------------------------------------------------------------------------
# On CUDA they are ``torch.library.triton_op``s: when Inductor compiles a graph that calls them, it
# traces their bodies (with fake tensors, so each launch goes through ``wrap_triton``) and emits the
# Triton launches in its own generated code. A compiled graph then pays no Python op dispatch, no
# plan lookup and no Triton Python launcher per call (the host cost that made the custom-op version
# lose to SDPA in compiled ViT-H blocks, benchmarks/results/h200-run3). The configs are those of
# the eager path (the cached pick, else the first candidate), fixed at compile time per N bucket
# (the bucket comparisons on the traced sequence length are guards).
# Under the Triton interpreter the kernels are not traceable Python objects, so there the ops are
# plain ``custom_op``s with fake registrations (opaque calls in the graph, same numbers).
INDUCTOR_LAUNCHES = not _INTERPRET and hasattr(torch.library, "triton_op")


def _library_op(name: str):
    if INDUCTOR_LAUNCHES:
        return torch.library.triton_op(name, mutates_args=())
    return torch.library.custom_op(name, mutates_args=())


def _fake(op):
    """``op.register_fake`` for the custom-op variant; a triton_op's fake is its own body."""
    if INDUCTOR_LAUNCHES:
        return lambda fn: fn
    return op.register_fake


def _lse_fake(q: torch.Tensor, varlen: bool) -> torch.Tensor:
    if varlen:
        return q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


@_library_op("stop_kernels::flash_attn_fwd")
def _flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
                    max_seqlen: int, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return _fwd(q, k, v, cu_seqlens, max_seqlen, scale)


@_fake(_flash_attn_fwd)
def _(q, k, v, cu_seqlens, max_seqlen, scale):
    return q.new_empty(q.shape), _lse_fake(q, cu_seqlens is not None)


@_library_op("stop_kernels::flash_attn_bwd")
def _flash_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                    lse: torch.Tensor, cu_seqlens: Optional[torch.Tensor], max_seqlen: int,
                    scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd(do, q, k, v, o, lse, cu_seqlens, max_seqlen, scale)


@_fake(_flash_attn_bwd)
def _(do, q, k, v, o, lse, cu_seqlens, max_seqlen, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
    ctx.max_seqlen = max_seqlen
    ctx.scale = scale


@first_order_backward
def _backward(ctx, do, dlse):
    q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _flash_attn_bwd(do, q, k, v, o, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None


_flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


@_library_op("stop_kernels::flash_attn_qkv_fwd")
def _flash_attn_qkv_fwd(qkv: torch.Tensor, cu_seqlens: Optional[torch.Tensor], max_seqlen: int,
                        scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return _fwd(*qkv.unbind(-3), cu_seqlens, max_seqlen, scale)


@_fake(_flash_attn_qkv_fwd)
def _(qkv, cu_seqlens, max_seqlen, scale):
    q = qkv.select(-3, 0)
    return q.new_empty(q.shape), _lse_fake(q, cu_seqlens is not None)


@_library_op("stop_kernels::flash_attn_qkv_bwd")
def _flash_attn_qkv_bwd(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                        cu_seqlens: Optional[torch.Tensor], max_seqlen: int, scale: float) -> torch.Tensor:
    return _bwd(do, *qkv.unbind(-3), o, lse, cu_seqlens, max_seqlen, scale, qkv_grad=True)


@_fake(_flash_attn_qkv_bwd)
def _(do, qkv, o, lse, cu_seqlens, max_seqlen, scale):
    return qkv.new_empty(qkv.shape)


def _setup_context_qkv(ctx, inputs, output):
    qkv, cu_seqlens, max_seqlen, scale = inputs
    o, lse = output
    ctx.save_for_backward(qkv, o, lse, cu_seqlens)
    ctx.max_seqlen = max_seqlen
    ctx.scale = scale


@first_order_backward
def _backward_qkv(ctx, do, dlse):
    qkv, o, lse, cu_seqlens = ctx.saved_tensors
    return _flash_attn_qkv_bwd(do, qkv, o, lse, cu_seqlens, ctx.max_seqlen, ctx.scale), None, None, None


_flash_attn_qkv_fwd.register_autograd(_backward_qkv, setup_context=_setup_context_qkv)


# ----------------------------------------------------------------------------------------------
# public op
# ----------------------------------------------------------------------------------------------
def attention_supported(q: torch.Tensor) -> bool:
    """True when the Triton kernel handles q's head dim and dtype (the dispatcher's test)."""
    return q.dtype in KERNEL_DTYPES and _kernel_head_dim(q.shape[-1])


def _check_qkv_layout(q, k, v, varlen: bool, dtypes=chk.FLOAT_DTYPES) -> None:
    """q, k, v: tensors of one shape ``[B, N, H, Dh]`` (``[T, H, Dh]`` when ``varlen``), one dtype out of
    ``dtypes`` and one device; ``ValueError`` / ``TypeError`` naming the argument otherwise."""
    nd = 3 if varlen else 4
    # fast accept (every call): the same conditions as below, without the messages
    if (type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor
            and q.dim() == nd and q.shape[-1] >= 1 and k.shape == q.shape and v.shape == q.shape
            and q.dtype in dtypes and k.dtype == q.dtype and v.dtype == q.dtype
            and k.device == q.device and v.device == q.device):
        return
    layout = "[T, H, Dh] (packed, with cu_seqlens)" if varlen else "[B, N, H, Dh] (or [T, H, Dh] with cu_seqlens)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        chk.tensor(name, t, dtypes=dtypes)
        if t.dim() != nd:
            raise ValueError(f"{name}: expected layout {layout}, got shape {tuple(t.shape)}")
    if q.shape[-1] < 1:  # (every backend refuses it, as the reference does: an empty head is a bug upstream)
        raise ValueError(f"q: expected {layout} with a head dim Dh >= 1, got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name}: expected the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected the dtype of q ({q.dtype}), got {t.dtype}")
    chk.same_device(q=q, k=k, v=v)


def _check_qkv(q, k, v, varlen: bool) -> None:
    """:func:`_check_qkv_layout` plus what the Triton kernels need: fp16/bf16/fp32, a head dim they
    support, CUDA tensors (or the interpreter)."""
    # fast accept (every call in eager mode): the same conditions as below, without the messages
    if (type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor
            and q.dim() == (3 if varlen else 4) and k.shape == q.shape and v.shape == q.shape
            and q.dtype in KERNEL_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
            and _kernel_head_dim(q.shape[-1])
            and (q.is_cuda or (_INTERPRET and q.device.type == "cpu")) and k.device == q.device and v.device == q.device):
        return
    _check_qkv_layout(q, k, v, varlen, KERNEL_DTYPES)
    _check_kernel_head_dim("q", q.shape[-1], "dispatch_attention")
    if q.device.type != "cuda" and not (_INTERPRET and q.device.type == "cpu"):
        raise ValueError(f"q: the Triton attention kernel needs CUDA tensors (got {q.device}); set "
                         "TRITON_INTERPRET=1 before importing stop_kernels to run it on CPU tensors, or use "
                         "dispatch_attention() with backend 'auto' (the default)")


def _check_cu_seqlens(cu_seqlens, total: int, device: torch.device, max_seqlen: Optional[int]) -> Tuple[torch.Tensor, int]:
    """Validate cu_seqlens (int32/int64 [n+1], starts at 0, non-decreasing, ends at T); return it on
    ``device``, contiguous (the kernels read it at unit stride), and the max sequence length. The
    value check syncs once per cu_seqlens tensor version (cached on the tensor), so a layer stack
    reusing one cu_seqlens pays it once; an inference-mode tensor has no version and is checked on
    every call. Limits: a change that bypasses the version counter (``.data``, ``.numpy()``) keeps
    the cached verdict (make a new tensor instead), and under torch.compile the values are not
    checked at all (that would be a host sync inside the graph): the models pass cu_seqlens built
    from host-checked masks."""
    chk.tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=chk.INDEX_DTYPES)
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens: expected at least one element ([n + 1] offsets), got 0")
    if cu_seqlens.device != device and cu_seqlens.device.type != "cpu":
        raise ValueError(f"cu_seqlens: expected device {device} (that of q) or cpu, got {cu_seqlens.device}")
    if torch.compiler.is_compiling():
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
        return cu_seqlens.to(device).contiguous(), int(max_seqlen)
    tag = None if cu_seqlens.is_inference() else (cu_seqlens._version, total)
    cached = getattr(cu_seqlens, "_stop_kernels_checked", None) if tag is not None else None
    if cached is not None and cached[0] == tag:
        true_max = cached[1]
    else:
        true_max = chk.packed_offsets("cu_seqlens", cu_seqlens.tolist(), total)
        if tag is not None:
            try:
                cu_seqlens._stop_kernels_checked = (tag, true_max)
            except Exception:
                pass
    _check_max_seqlen_type(max_seqlen)
    if max_seqlen is None:
        max_seqlen = true_max
    elif max_seqlen < true_max:
        raise ValueError(f"max_seqlen: {max_seqlen} is smaller than the longest sequence in cu_seqlens ({true_max})")
    return cu_seqlens.to(device, non_blocking=True).contiguous(), int(max_seqlen)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
              cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None) -> torch.Tensor:
    """Non-causal softmax attention ``softmax(scale · q kᵀ) v`` with the Triton flash kernels.

    Args:
        q, k, v: ``[B, N, H, Dh]`` (any strides, e.g. views into a ``[B, N, 3, H, Dh]`` QKV buffer;
            a last-dim stride other than 1 costs a copy), or ``[T, H, Dh]`` packed when
            ``cu_seqlens`` is given. Same shape, dtype and device.
            dtype float16/bfloat16 (fp32 accumulation) or float32 (the fp32 path: IEEE fp32 dots).
            ``Dh`` a multiple of 8 in [8, 128] (otherwise ``ValueError``; the dispatcher falls back).
        scale: softmax scale, default ``Dh ** -0.5``; any finite value > 0. The output stays accurate at any
            scale, but dq and dk lose accuracy as the scores ``scale · q·k`` grow to tens and beyond: softmax's
            gradient is ill-conditioned there, and the backward's ``δ = rowsum(dO ∘ O)`` reads O rounded to q's
            dtype (as every flash backward does). At 100× the default, bf16 dq errs by about half its norm.
        cu_seqlens: int32/int64 ``[n + 1]`` offsets (0 = first, last = T, non-decreasing) of the
            packed sequences; on q's device or the CPU, any stride. Bad values raise ``ValueError``
            in eager calls; under torch.compile they are not checked (a host sync).
        max_seqlen: a Python int (packed: at least the longest sequence, computed when omitted; batched: N).

    Returns:
        ``[B, N, H, Dh]`` (or ``[T, H, Dh]``), contiguous, dtype of q. Differentiable in q, k, v
        (first order).

    Eager calls go through a plain ``torch.autograd.Function`` (or straight to the launch wrapper
    when no gradient is needed) with a launch plan cached per input signature; under
    ``torch.compile`` and other tracing the ``stop_kernels::flash_attn_fwd/bwd`` custom ops run.
    Both call the same kernels with the same configs (identical results).
    """
    cu_seqlens, max_seqlen, scale = _prepare(q, k, v, scale, cu_seqlens, max_seqlen)
    if custom_op_bypass_ok(q):
        with on_device(q):
            plan = _get_plan(q, k, v, cu_seqlens, max_seqlen, scale)
            if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
                return _FlashAttnFn.apply(q, k, v, cu_seqlens, max_seqlen, scale, plan)
            return _fwd(q, k, v, cu_seqlens, max_seqlen, scale, plan)[0]
    o, _ = _flash_attn_fwd(q, k, v, cu_seqlens, max_seqlen, scale)
    return o


def _prepare(q, k, v, scale, cu_seqlens, max_seqlen) -> Tuple[Optional[torch.Tensor], int, float]:
    """The checks shared by :func:`attention` and :func:`attention_qkv`: (cu_seqlens on q's device,
    max_seqlen, scale as a float)."""
    varlen = cu_seqlens is not None
    _check_qkv(q, k, v, varlen)
    refuse_under_func_grad("q, k, v (qkv)", "the Triton attention kernels",
                           "use dispatch_attention(..., backend='auto') (SDPA under a transform), 'sdpa' or 'reference'")
    if fwAD._current_level >= 0 and any(fwAD.unpack_dual(t).tangent is not None for t in (q, k, v)):
        # the kernels have no forward-mode formula: refuse instead of returning a primal without tangent
        raise NotImplementedError("q, k, v: forward-mode AD (dual tensors) is not supported by the Triton attention "
                                  "kernels; use dispatch_attention(..., backend='reference')")
    if varlen:
        cu_seqlens, max_seqlen = _check_cu_seqlens(cu_seqlens, q.shape[0], q.device, max_seqlen)
    else:
        _check_batched_max_seqlen(max_seqlen, q.shape[1])
        max_seqlen = q.shape[1]
    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif not _kernel_scale_ok(scale):
        if not isinstance(scale, numbers.Real) or isinstance(scale, bool):  # the wrong kind, as the other backends say
            raise TypeError(f"scale: the Triton attention kernels take None or a number, got {type(scale).__name__}; "
                            f"dispatch_attention(backend='sdpa') also takes a 0-d floating tensor")
        raise ValueError(f"scale: the Triton attention kernels need a positive finite scale, got {scale!r}; "
                         f"dispatch_attention(backend='sdpa') takes any")
    return cu_seqlens, max_seqlen, float(scale)


def _kernel_scale_ok(scale) -> bool:
    """A scale the Triton kernels take: a positive finite number (the forward takes the running max
    of the unscaled scores, see _fwd_key_block)."""
    return isinstance(scale, numbers.Real) and not isinstance(scale, bool) and 0 < scale < float("inf")


def _check_max_seqlen_type(max_seqlen) -> None:
    """``max_seqlen`` is a Python int or None, packed or batched alike (a float, a bool or a tensor is refused)."""
    if max_seqlen is not None and not chk.is_int(max_seqlen):
        raise TypeError(f"max_seqlen: expected an int or None, got {type(max_seqlen).__name__}")


def _check_batched_max_seqlen(max_seqlen, N: int) -> None:
    _check_max_seqlen_type(max_seqlen)
    if max_seqlen is not None and max_seqlen != N:
        raise ValueError(f"max_seqlen: only meaningful with cu_seqlens; got {max_seqlen} with N = {N}")


def _split_qkv(qkv, varlen: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v views of a packed ``[B, N, 3, H, Dh]`` (``[T, 3, H, Dh]`` varlen) buffer, after checking its layout."""
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv: expected a torch.Tensor, got {type(qkv).__name__}")
    nd = 4 if varlen else 5
    if qkv.dim() != nd or qkv.shape[-3] != 3:
        layout = "[T, 3, H, Dh] (packed, with cu_seqlens)" if varlen else "[B, N, 3, H, Dh]"
        raise ValueError(f"qkv: expected layout {layout}, got shape {tuple(qkv.shape)}")
    return qkv.unbind(-3)


def attention_qkv(qkv: torch.Tensor, *, scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None,
                  max_seqlen: Optional[int] = None) -> torch.Tensor:
    """:func:`attention` over a packed QKV buffer: ``qkv`` is ``[B, N, 3, H, Dh]`` (``[T, 3, H, Dh]``
    with ``cu_seqlens``), e.g. ``qkv_linear(x).unflatten(-1, (3, H, Dh))``; returns ``[B, N, H, Dh]``.

    Same kernels and results as ``attention(*qkv.unbind(-3))``; the difference is the backward, which
    writes the gradient of ``qkv`` as one contiguous ``[..., 3, H, Dh]`` tensor, so autograd does not
    stack separate dq, dk, dv into the projection's layout (a full extra read and write of the
    gradient: ~7 ms of a ViT-H/14 training step on an H200).
    """
    varlen = cu_seqlens is not None
    q, k, v = _split_qkv(qkv, varlen)
    if qkv.dtype not in KERNEL_DTYPES:
        chk.tensor("qkv", qkv, dtypes=KERNEL_DTYPES)
    _check_kernel_head_dim("qkv", qkv.shape[-1], "dispatch_attention_qkv")
    cu_seqlens, max_seqlen, scale = _prepare(q, k, v, scale, cu_seqlens, max_seqlen)
    if custom_op_bypass_ok(qkv):
        with on_device(qkv):
            plan = _get_plan(q, k, v, cu_seqlens, max_seqlen, scale)
            if torch.is_grad_enabled() and qkv.requires_grad:
                return _FlashAttnQKVFn.apply(qkv, cu_seqlens, max_seqlen, scale, plan)
            return _fwd(q, k, v, cu_seqlens, max_seqlen, scale, plan)[0]
    o, _ = _flash_attn_qkv_fwd(qkv, cu_seqlens, max_seqlen, scale)
    return o


# ----------------------------------------------------------------------------------------------
# dispatcher used by the models
# ----------------------------------------------------------------------------------------------
_DEFAULT_BACKEND = os.environ.get("STOP_KERNELS_ATTENTION_BACKEND", "").strip() or "auto"
chk.choice("STOP_KERNELS_ATTENTION_BACKEND", _DEFAULT_BACKEND, BACKENDS)  # a typo is not "auto"


def set_attention_backend(name: str) -> None:
    """Set the module default used by :func:`dispatch_attention` when ``backend=None``."""
    global _DEFAULT_BACKEND
    chk.choice("name", name, BACKENDS)
    _DEFAULT_BACKEND = name


def get_attention_backend() -> str:
    """The module default backend of :func:`dispatch_attention` (one of :data:`BACKENDS`; "auto" unless set by
    :func:`set_attention_backend`, :func:`use_attention_backend` or ``STOP_KERNELS_ATTENTION_BACKEND``)."""
    return _DEFAULT_BACKEND


@contextlib.contextmanager
def use_attention_backend(name: str) -> Iterator[None]:
    """Context manager forcing the default backend (tests): ``with use_attention_backend("sdpa"): ...``."""
    global _DEFAULT_BACKEND
    chk.choice("name", name, BACKENDS)
    old = _DEFAULT_BACKEND
    _DEFAULT_BACKEND = name
    try:
        yield
    finally:
        _DEFAULT_BACKEND = old


def attention_backend_problem(name: str, device: torch.device) -> str:
    """Why the backend ``name`` cannot run attention on ``device``, '' when it can ("sdpa" and
    "reference" always can; "auto" can unless the current "auto" policy sends CUDA calls to xformers,
    see :func:`set_auto_policy`, and xformers does not import). A training run checks its backend with
    this at start-up, under its policy, before it sets an earlier run's files aside, instead of
    failing at its first step."""
    chk.choice("name", name, BACKENDS)
    device = torch.device(device)
    if name == "triton" and device.type != "cuda" and not _INTERPRET:
        return (f"the Triton kernels need a CUDA device, got {device.type} (TRITON_INTERPRET=1 runs them in "
                "the CPU interpreter); 'auto' picks what runs here")
    # "auto" consults its policy on CUDA only (elsewhere it runs SDPA)
    policy_xformers = name == "auto" and device.type == "cuda" and "xformers" in _AUTO_POLICY.values()
    if name == "xformers" or policy_xformers:
        try:
            import xformers.ops  # noqa: F401
        except Exception as e:  # depends on the install
            if policy_xformers:
                return (f"the 'auto' policy {_AUTO_POLICY} sends calls to xformers, which does not import "
                        f"({type(e).__name__}: {e})")
            return f"xformers does not import ({type(e).__name__}: {e}); 'auto' picks what runs here"
    return ""


# "auto" policy: which backend "auto" uses on CUDA for shapes the Triton kernel supports (16-bit,
# head dim a multiple of 8 up to 128), set from measurements. Keys: a mode, or (mode, head dim) to
# override one head dim. A call is "train" (q, k or v requires grad under grad mode) or "fwd_only" (no
# gradient needed: no_grad / inference / the EMA target encoder); traced by torch.compile it is also
# "compiled", and "compiled_train" or "compiled_fwd_only" tell those two apart there (the encoders'
# head dim 80 runs both: the context encoder trains, the target encoder only runs forward, and the
# kernels' forward and backward compare differently with cuDNN's, GPU run 7). Values: "triton", "sdpa"
# or "xformers". Lookup order: under torch.compile ("compiled_<m>", Dh), ("compiled", Dh),
# "compiled_<m>", "compiled"; then (m, Dh), then m, then "triton" (m: "train" or "fwd_only"). A head-dim
# key wins over a mode-wide one, so "compiled_train=sdpa" leaves the default's ("compiled", 24) in place.
# Set it with set_auto_policy({...}), the environment, e.g.
#   STOP_KERNELS_ATTN_AUTO="fwd_only=sdpa,train:80=sdpa"   (set but empty: Triton everywhere, compiled code too)
# or, for a training run, the config key attention_policy (overrides on top of this policy, applied
# around each step by use_auto_policy): --attention-policy "compiled:24=sdpa" gives the predictor's
# head dim 24 back to SDPA in compiled blocks (the default before GPU run 6), "compiled:80=triton"
# the encoders' head dim 80 to the Triton kernels, "compiled_train:80=triton" only the context
# encoder's (e2e paths fast_levers and fast_cg_levers).
#
# The default, DEFAULT_AUTO_POLICY, comes from the ViT-H/14 training step on an H200. Eager blocks run
# the Triton kernels (run 3: their GPU time per step is 17 ms against cuDNN's 25 ms, and the eager step
# is as fast or faster). Inside torch.compile'd blocks (benchmarks/results/h200-run6, e2e paths fast and
# fast_mixed in one call): the predictor's head dim 24 goes to the Triton kernels, which Inductor
# launches itself: 118.3 ms/step against 120.0 with SDPA there (attention 9.0 against 10.4 ms of GPU
# time per step, the same loss at step 20); the encoders' head dim 80 stays on SDPA, where the kernels
# were never measured faster in the step (run 2: slower at the encoder's shapes, before the head-dim
# split; run 6 times the Triton side of N = 74 at 0.106 ms forward+backward, its cuDNN peer untimed).
_AUTO_MODES = ("compiled", "compiled_train", "compiled_fwd_only", "fwd_only", "train")
_AUTO_CHOICES = ("triton", "sdpa", "xformers")
DEFAULT_AUTO_POLICY: Dict = {"compiled": "sdpa", ("compiled", 24): "triton"}
_AUTO_POLICY: Dict = dict(DEFAULT_AUTO_POLICY)


def set_auto_policy(policy: Optional[Dict] = None) -> Dict:
    """Replace the "auto" policy; returns the previous one. ``None``: the measured default
    (:data:`DEFAULT_AUTO_POLICY`); ``{}``: Triton for every supported CUDA shape, compiled or not.
    Example: ``set_auto_policy({"fwd_only": "sdpa", ("train", 80): "sdpa", "compiled": "triton"})``."""
    global _AUTO_POLICY
    _check_policy_mapping("policy", policy)
    new: Dict = {}
    for key, val in (DEFAULT_AUTO_POLICY if policy is None else policy).items():
        if isinstance(key, str):
            key = (key, None)
        if not isinstance(key, tuple) or len(key) != 2:
            raise ValueError(f"policy: a key is a mode or a (mode, head_dim) pair, got {key!r}")
        chk.choice("policy backend", val, _AUTO_CHOICES)
        new[_policy_key(*key)] = val
    old, _AUTO_POLICY = _AUTO_POLICY, new
    return old


def _check_policy_mapping(name: str, policy) -> None:
    """``policy``: None or a mapping (the text form goes through :func:`parse_auto_policy` first)."""
    if policy is not None and not isinstance(policy, Mapping):
        raise TypeError(f"{name}: expected a dict such as {{'compiled': 'sdpa', ('train', 80): 'triton'}} or None, "
                        f"got {type(policy).__name__} (parse_auto_policy reads the text form)")


def _policy_key(mode, head_dim):
    """A checked policy key: ``mode``, or ``(mode, head_dim)`` for a head dim the policy is consulted for
    (the Triton kernel's: a multiple of 8 in [8, MAX_HEAD_DIM]); any other head dim would never match."""
    chk.choice("policy mode", mode, _AUTO_MODES)
    if head_dim is None:
        return mode
    if not _kernel_head_dim(head_dim):
        raise ValueError(f"policy: head dim {head_dim!r} of mode {mode!r} is never looked up (the policy covers "
                         f"head dims that are multiples of 8 in [8, {MAX_HEAD_DIM}])")
    return mode, head_dim


def get_auto_policy() -> Dict:
    """A copy of the current "auto" policy, keys ``mode`` or ``(mode, head_dim)`` → backend, as
    :func:`set_auto_policy` takes it (:data:`DEFAULT_AUTO_POLICY` unless changed)."""
    return dict(_AUTO_POLICY)


def parse_auto_policy(text: str) -> Dict:
    """A policy from its text form: items ``mode=backend`` or ``mode:head_dim=backend`` separated
    by ``,`` or ``;`` (``;`` fits inside a comma-separated list), e.g. ``"compiled:24=triton"``.
    Checked as :func:`set_auto_policy` checks it; ``ValueError`` naming ``policy`` otherwise."""
    if not isinstance(text, str):
        raise TypeError(f"policy: expected a string like 'compiled:24=triton', got {type(text).__name__}")
    out: Dict = {}
    for item in filter(None, (s.strip() for s in text.replace(";", ",").split(","))):
        lhs, eq, val = item.partition("=")
        mode, colon, dh = lhs.strip().partition(":")
        if not eq or (colon and not dh.strip().isdecimal()):  # (isdigit() takes '²', which int() refuses)
            raise ValueError(f"policy: cannot read {item!r}; expected mode=backend or mode:head_dim=backend "
                             f"(modes {list(_AUTO_MODES)}, backends {list(_AUTO_CHOICES)})")
        key = _policy_key(mode.strip(), int(dh) if colon else None)
        chk.choice("policy backend", val.strip(), _AUTO_CHOICES)
        if key in out:
            raise ValueError(f"policy: {item!r} repeats {lhs.strip()!r} (set each mode or mode:head_dim once)")
        out[key] = val.strip()
    return out


@contextlib.contextmanager
def use_auto_policy(overrides: Optional[Union[Dict, str]] = None) -> Iterator[None]:
    """Context manager: the current "auto" policy updated by ``overrides`` (a dict as for
    :func:`set_auto_policy`, or its text form, see :func:`parse_auto_policy`); restored on exit.
    ``None`` or empty: the policy is left as it is. The trainer wraps each step in it (config key
    ``attention_policy``)."""
    if isinstance(overrides, str):
        overrides = parse_auto_policy(overrides)
    _check_policy_mapping("overrides", overrides)
    if not overrides:
        yield
        return
    old = set_auto_policy({**_AUTO_POLICY, **overrides})
    try:
        yield
    finally:
        set_auto_policy(old)


if "STOP_KERNELS_ATTN_AUTO" in os.environ:
    set_auto_policy(parse_auto_policy(os.environ["STOP_KERNELS_ATTN_AUTO"]))
if os.environ.get("STOP_KERNELS_ATTN_CONFIGS"):
    load_tuned_configs(os.environ["STOP_KERNELS_ATTN_CONFIGS"])


def _auto_policy_choice(q: torch.Tensor, k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None) -> str:
    """The policy's backend for a supported CUDA call (see ``_AUTO_POLICY``)."""
    if not _AUTO_POLICY:
        return "triton"
    dh = q.shape[-1]
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v))
    mode = "train" if grad else "fwd_only"
    if torch.compiler.is_compiling():
        for key in (("compiled_" + mode, dh), ("compiled", dh), "compiled_" + mode, "compiled"):
            pick = _AUTO_POLICY.get(key)
            if pick is not None:
                return pick
    return _AUTO_POLICY.get((mode, dh), _AUTO_POLICY.get(mode, "triton"))


def _resolve_auto(q: torch.Tensor, k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None,
                  scale: Optional[float] = None) -> str:
    if (scale is not None and not _kernel_scale_ok(scale)) or functorch_transforming():
        return "sdpa"  # (the kernels' custom ops have no torch.func rules: torch.func.grad refuses them)
    if q.device.type == "cuda":
        if not (q.dtype in (torch.float16, torch.bfloat16) and attention_supported(q)):
            return "sdpa"
        return _auto_policy_choice(q, k, v)
    if _INTERPRET and q.device.type == "cpu" and os.environ.get("STOP_KERNELS_CPU_AUTO") == "triton" \
            and attention_supported(q) and q.dtype != torch.float64:
        return "triton"
    return "sdpa"


def _sdpa(q, k, v, scale, cu_seqlens):
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        outs = [F.scaled_dot_product_attention(q[None, a:b].transpose(1, 2), k[None, a:b].transpose(1, 2),
                                               v[None, a:b].transpose(1, 2), scale=scale)[0].transpose(0, 1)
                for a, b in zip(bounds[:-1], bounds[1:])]
        return torch.cat(outs, 0) if outs else (q + k + v).to(q.dtype)  # no sequence (T = 0): empty, with a grad_fn
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          scale=scale).transpose(1, 2)


def _xformers(q, k, v, scale, cu_seqlens):
    try:
        import xformers.ops as xops  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        raise RuntimeError(f"attention backend 'xformers': xformers does not import ({e!r})") from e
    try:
        if cu_seqlens is not None:
            from xformers.ops.fmha.attn_bias import BlockDiagonalMask
            lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
            bias = BlockDiagonalMask.from_seqlens(lens)
            return xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias, scale=scale)[0]
        return xops.memory_efficient_attention(q, k, v, scale=scale)
    except (NotImplementedError, RuntimeError, ValueError) as e:  # pragma: no cover
        raise RuntimeError(f"attention backend 'xformers': its kernels did not run here ({e})") from e


def dispatch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
                       cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
                       backend: Optional[str] = None) -> torch.Tensor:
    """Attention for the models: non-causal ``softmax(scale · q kᵀ) v`` per (sequence, head), ``scale``
    default ``Dh ** -0.5``; q, k, v ``[B, N, H, Dh]`` → ``[B, N, H, Dh]`` (or packed ``[T, H, Dh]`` →
    ``[T, H, Dh]`` with cu_seqlens, each sequence attending to itself only), by the backend below.

    backend (None → the module default, see :func:`set_attention_backend`):

    * ``"auto"``: CUDA + fp16/bf16 + supported head dim → Triton, unless the measured policy
      (:data:`DEFAULT_AUTO_POLICY`: inside torch.compile'd code SDPA, except Triton at head dim 24;
      :func:`set_auto_policy`, env ``STOP_KERNELS_ATTN_AUTO``) names another backend for this mode
      ("compiled", "compiled_train", "compiled_fwd_only", "fwd_only", "train") and head dim; CUDA otherwise, and inside ``torch.func``
      transforms (grad, vmap, …, which the kernels' custom ops do not support) → torch SDPA; CPU → SDPA
      (fast for tests), except the Triton interpreter when ``TRITON_INTERPRET=1`` and
      ``STOP_KERNELS_CPU_AUTO=triton`` are both set (a test hook; not ``STOP_KERNELS_ATTENTION_BACKEND``, the
      default backend).
    * ``"triton"``: :func:`attention` (raises for unsupported head dims/dtypes).
    * ``"sdpa"``: ``F.scaled_dot_product_attention`` on transposed views (packed: per sequence).
    * ``"xformers"``: ``xformers.ops.memory_efficient_attention`` (``RuntimeError`` if unavailable).
    * ``"reference"``: :func:`stop_kernels.reference.attention` (float32/64 compute).
    """
    name = _DEFAULT_BACKEND if backend is None else backend
    chk.choice("backend", name, BACKENDS)
    if name == "auto":
        if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
            for arg, t in (("q", q), ("k", k), ("v", v)):
                chk.tensor(arg, t)  # named, before _resolve_auto reads their devices and dtypes
        name = _resolve_auto(q, k, v, scale)
    if name == "triton":
        return attention(q, k, v, scale=scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    # the other backends get the same argument checks as the kernel (SDPA would otherwise read a packed
    # [T, H, Dh] tensor as [B, N, H] and broadcast mismatched k / v: a result of the wrong meaning)
    _check_qkv_layout(q, k, v, cu_seqlens is not None)
    if scale is not None and not (isinstance(scale, numbers.Real) and not isinstance(scale, bool)) and not (
            isinstance(scale, torch.Tensor) and scale.dim() == 0 and scale.is_floating_point()):
        got = (f"a {scale.dtype} tensor of shape {tuple(scale.shape)}" if isinstance(scale, torch.Tensor)
               else type(scale).__name__)
        raise TypeError(f"scale: expected None, a number or a 0-d floating tensor, got {got}")
    if cu_seqlens is not None:
        cu_seqlens, _ = _check_cu_seqlens(cu_seqlens, q.shape[0], q.device, max_seqlen)
    else:
        _check_batched_max_seqlen(max_seqlen, q.shape[1])
    if name == "reference":
        return reference.attention(q, k, v, scale=scale, cu_seqlens=cu_seqlens)
    if name == "xformers":
        return _xformers(q, k, v, scale, cu_seqlens)
    return _sdpa(q, k, v, scale, cu_seqlens)


def dispatch_attention_qkv(qkv: torch.Tensor, *, scale: Optional[float] = None,
                           cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
                           backend: Optional[str] = None) -> torch.Tensor:
    """:func:`dispatch_attention` for a packed ``[B, N, 3, H, Dh]`` (``[T, 3, H, Dh]``) QKV buffer, as
    the models' attention layers produce it: ``softmax(scale · q kᵀ) v`` of its q, k, v slices, returned
    as ``[B, N, H, Dh]`` (``[T, H, Dh]``). The Triton backend runs :func:`attention_qkv` (the
    gradient of ``qkv`` written in place of a stack); the others run on the q, k, v views."""
    q, k, v = _split_qkv(qkv, cu_seqlens is not None)
    chk.float_tensor("qkv", qkv)  # named here: the backends below check the q, k, v views and would say "q"
    name = _DEFAULT_BACKEND if backend is None else backend
    chk.choice("backend", name, BACKENDS)
    if name == "auto":
        name = _resolve_auto(q, k, v, scale)
    if name == "triton":
        return attention_qkv(qkv, scale=scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    return dispatch_attention(q, k, v, scale=scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, backend=name)


