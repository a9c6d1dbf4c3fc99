#!/usr/bin/env python
"""Every Triton kernel of ``stop_kernels.ops`` in every config its launch wrappers can choose, compiled
for sm_90a without a GPU (CI: tests/test_compile_check.py).

    python benchmarks/compile_check.py [--jobs N] [--scope ci|wide|full] [--match REGEX] [--out FILE.json] [--list]

For each (kernel, config) the launch wrapper itself builds the launch (arguments, constexprs, warps,
stages: ``launch_project`` / ``noise_weight_grad`` / ``launch_pos_noise`` captured at their ``_launch``,
the attention plans ``_make_plan`` / ``_make_bwd_plan`` with the config forced), and Triton's JIT
compiles it through the offline sm_90 driver of :mod:`stop_kernels.devtools` (nothing launched). A
config passes when it compiles, its cubin has no local memory (no register spills, no stack frame:
``cuobjdump --dump-resource-usage`` of the cubin Triton built, with Triton's own ptxas flags) and its
shared memory fits the 227 KB an H100/H200 block may use. Exit status 1 when any config fails.

What "every config the wrappers can choose" means per kernel (the CI scope, ``--scope ci``, ~120
compiles, ~70 s of two cores; CI_STOP_CASES / CI_ATTN_CASES say why each case is there):

* ``_project_kernel`` / ``_noise_weight_grad_kernel``: every autotune config that survives the
  kernel's own prune (``_prune_fwd`` / ``_prune_dw``: configs too big for the call's dtype, or whose
  last D tile lies beyond D), at E = 1280 and D = 384 (the predictor's; D = 512 for the D_TILES = 4
  configs), for the noise (StoP) and the memory operand (the predictor input's context projection).
  Sizes change nothing else: E and D only enter through Triton's 16-divisibility specialisation. dW also
  with the context rows of the predictor input's backward in the same launch (``HAS_CTX``).
* ``_pos_noise_kernel``: both autotune configs, isotropic noise (no vector) and mask token (no noise).
* ``_philox_normal_kernel``: its one launch (the tests' materialised noise).
* attention: the forward and backward candidates (``_fwd_candidates`` / ``_bwd_candidates``: what the
  tuner times with STOP_KERNELS_ATTN_TUNE=1; without it the first one that launches runs). A list is
  picked by the dtype (float32 has its own), the N bucket (next_pow2(N)), the head dim's power-of-two
  width and its chunk width, and its tiles are clamped to the bucket, so each list is compiled at the top
  bucket of its range (512 stands for every bucket beyond 256). Registers and shared memory depend on the
  head dim only through its chunks (BD0, BD1) of ``_head_chunks`` (HEAD_DIM itself only masks columns;
  ``STOP_KERNELS_ATTN_SPLIT_D=0`` adds no chunk pair). float16 differs from bfloat16 only in conversion
  instructions (same element size and tensor-core shapes); packed (varlen), separate dq/dk/dv
  (GRAD_GROUP = 1) and unaligned strides (ALIGN = 1) in address arithmetic; these compile the default
  (first) candidates. float32 (the documented ieee path, never picked by "auto") compiles every candidate
  of its lists at the widest head dim, at head dims 80 and 48 (width 48 has one more forward candidate)
  and at the smallest bucket (a one-tile forward). tests/test_ptxas_report.py compiles every bf16
  candidate at the ViT-H/14 shapes (head dim 24 at N = 116 / 150, 80 at N = 74 / 256) with stricter
  loop checks, so the CI scope leaves those out.

``--scope wide`` compiles every candidate of head dims 16, 24, 48, 64, 80, 88, 128 (one per chunk pair)
at every bucket 16 … 512, batched and packed, bf16, and the other variants' defaults at head dims 24
and 80 (~900 compiles); ``--scope full`` every head dim 8 … 128 and the product of all variants (hours).

Known register spills that are reported but not fixed are listed in ``KNOWN_SPILLS`` (per Triton version;
a listed config must still spill, any other problem fails the run).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, NamedTuple, Optional

os.environ.pop("TRITON_INTERPRET", None)  # the real JITFunctions

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SMEM_LIMIT = 227 * 1024  # shared memory one block may use on an H100 / H200 (sm_90)
# ViT-H/14 I-JEPA+StoP: E = 1280 (encoder), D = 384 (predictor), P = 256 positions
E, D, P, R = 1280, 384, 256, 4 * 42
# a sequence length in each attention bucket (next_pow2(N)), none a multiple of 16 (the models' are not:
# 116, 150, 74, 196 ...); 512 stands for every bucket beyond 256 (same candidates)
BUCKET_N = {16: 12, 32: 20, 64: 42, 128: 116, 256: 196, 512: 400}
ATTN_HEAD_DIMS = (16, 24, 48, 64, 80, 88, 128)  # one per head-dim chunk class (see the module docstring)
MODEL_HEAD_DIMS = (24, 80)  # the ViT-H/14 predictor's and encoder's: the reduced variants run these
ATTN_HEADS = 16
# the Philox key (1, 0): an integer argument equal to 1 becomes a constexpr unless the kernel lists it in
# do_not_specialize, and a constexpr key does not compile (philox.py); every kernel with a key must list it
SEED = 1


_BF, _FP16, _FP32 = torch.bfloat16, torch.float16, torch.float32


class Spec(NamedTuple):
    kernel: str          # kernel function name
    label: str           # what is being compiled (dtype, variant, shape)
    config: Dict         # the config (constexprs picked by the config list, warps, stages)
    make: Callable       # () -> (kernel, args, kwargs) as the launch wrapper builds them


_MIXED, _ALL_BF16, _ALL_FP16, _ALL_FP32 = ("W bf16, ψ fp32", _BF, _FP32), ("bf16", _BF, _BF), ("fp16", _FP16, _FP16), \
    ("fp32", _FP32, _FP32)
# (call, dtype case): the calls are the StoP noise projection ("noise", stop_embed), the context projection of
# the predictor input ("context"), the noise weight gradient ("dw") and the isotropic / mask-token rows ("pos");
# a dtype case is (label, W and b dtype, ψ dtype), the output in their promotion. CI: bf16 throughout
# (stop_embed under bf16 autocast) for noise and dW, the predictor input's bf16 W with its fp32 ψ table
# (fp32 output) for context and pos, and fp32 (no autocast: the configs of the prune's fp32 lists) for all four.
# float16 has bfloat16's element size, so the same configs, tiles and shared memory ("wide" runs it).
# D = 512 adds the D_TILES = 4 configs, which the prune drops at D = 384 (the others compile as at 384).
CI_STOP_CASES = [("noise", _ALL_BF16, D), ("dw", _ALL_BF16, D), ("noise", _ALL_BF16, 512), ("dw", _ALL_BF16, 512),
                 ("context", _MIXED, D), ("pos", _MIXED, D),
                 ("noise", _ALL_FP32, D), ("dw", _ALL_FP32, D), ("context", _ALL_FP32, D), ("pos", _ALL_FP32, D)]


def _stop_cases(scope: str):
    if scope == "ci":
        return list(CI_STOP_CASES)
    dtypes = [_MIXED, _ALL_BF16, _ALL_FP16, _ALL_FP32]
    if scope == "full":
        dtypes += [("W fp16, ψ fp32", _FP16, _FP32), ("W fp32, ψ bf16", _FP32, _BF)]
    return [(call, dt, d) for dt in dtypes for call in ("noise", "dw", "context", "pos") for d in (D, 512)]


def stop_specs(scope: str = "ci") -> List[Spec]:
    from stop_kernels.ops import stop_embed as S
    from stop_kernels.ops import philox as X
    specs: List[Spec] = []

    def captured(call):
        """The (kernel, args, kwargs) that ``call`` hands to stop_embed._launch, nothing launched."""
        box = {}

        def capture(kernel, grid, args, kwargs, interp_meta, name):
            box["launch"] = (kernel, args, kwargs)
        real, S._launch = S._launch, capture
        try:
            call()
        finally:
            S._launch = real
        return box["launch"]

    def autotuned(kernel_name, label, call):
        kernel, args, kwargs = captured(call)
        named = dict(zip(kernel.arg_names, args), **kwargs)
        prune = kernel.early_config_prune or (lambda configs, named_args: configs)
        for c in prune(list(kernel.configs), named):  # the configs the autotuner times
            kw = dict(kwargs, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            specs.append(Spec(kernel_name, label, dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages),
                              lambda kernel=kernel, args=args, kw=kw: (kernel, args, kw)))

    idx = torch.zeros(R, dtype=torch.int64)
    for call, (label, wdt, pdt), width in _stop_cases(scope):
        odt = torch.promote_types(wdt, pdt)
        label = label if width == D else f"{label}, D={width}"
        w, pos = torch.empty(width, E, dtype=wdt), torch.empty(P, width, dtype=pdt)
        out = torch.empty(1, R, width, dtype=odt)
        for bias in (torch.empty(width, dtype=wdt), None) if scope == "full" else (torch.empty(width, dtype=wdt),):
            tag = label + ("" if bias is not None else ", no bias")
            if call == "noise":
                autotuned("_project_kernel", f"noise, {tag}", lambda: S.launch_project(
                    out, idx, pos, w, bias, seed=SEED, noise_std=0.2))
            elif call == "context":  # the context rows of the predictor input, stored into 4 row groups
                ctx, out4 = torch.empty(R, E, dtype=wdt), torch.empty(4, R, width, dtype=odt)
                autotuned("_project_kernel", f"context, {tag}", lambda: S.launch_project(
                    out4[:1], idx, pos, w, bias, a=ctx, copies=4, stride_copy=out4.stride(0)))
                # and the StoP rows in the same launch (the op's learned mode)
                autotuned("_project_kernel", f"context + noise rows, {tag}", lambda: S.launch_project(
                    out4[:1], idx, pos, w, bias, a=ctx, copies=4, stride_copy=out4.stride(0), seed=SEED,
                    noise_std=0.2, noise_rows=(out, idx)))
        if call == "dw":
            autotuned("_noise_weight_grad_kernel", label, lambda: S.noise_weight_grad(out, w, SEED, 0.2))
            # the predictor input's backward: the context rows (read from memory) in the same launch
            ctx, gctx = torch.empty(R, E, dtype=wdt), torch.empty(R, width, dtype=wdt)
            autotuned("_noise_weight_grad_kernel", f"{label}, context rows", lambda: S.noise_weight_grad(
                out, w, SEED, 0.2, ctx_grad=gctx, ctx=ctx))
        elif call == "pos":
            autotuned("_pos_noise_kernel", f"isotropic, {label}", lambda: S.launch_pos_noise(
                out, idx, pos, None, seed=SEED, noise_std=0.2))
            autotuned("_pos_noise_kernel", f"mask token, {label}", lambda: S.launch_pos_noise(
                out, idx, pos, torch.empty(width, dtype=wdt)))

    def philox():
        out = torch.empty(R, E, dtype=torch.float32)
        key0, key1 = X.seed_key_args(SEED)
        return X._philox_normal_kernel, (out, R, E, X.quarter_width(E), 0, key0, key1, 0.2), dict(BLOCK_M=32, BLOCK_K=32)
    specs.append(Spec("_philox_normal_kernel", "fp32", dict(BLOCK_M=32, BLOCK_K=32), philox))
    return specs


class _AttnCase(NamedTuple):
    dtype: torch.dtype
    head_dim: int
    bucket: int
    varlen: bool = False
    grad_group: int = 3   # 3: attention_qkv (one packed d(qkv)), 1: attention (dq, dk, dv)
    aligned: bool = True  # q/k/v strides multiples of 8 (ALIGN = 8), else ALIGN = 1
    candidates: str = "all"  # "all", "fwd" (every forward candidate only) or "first" (the default of each)

    def label(self):
        return (f"{str(self.dtype).replace('torch.', '')} Dh={self.head_dim} N={BUCKET_N[self.bucket]}"
                f"{' packed' if self.varlen else ''}{'' if self.grad_group == 3 else ' dq/dk/dv'}"
                f"{'' if self.aligned else ' unaligned'}")


# CI (tests/test_compile_check.py; tests/test_ptxas_report.py already compiles every candidate at the ViT-H
# shapes: head dim 24 at N = 116 / 150, 80 at N = 74 / 256, bf16): every candidate of every candidate list
# (_fwd_configs / _bwd_configs pick a list by the N bucket and the head dim's power-of-two width) at the
# heaviest point of its range where a heavier list does not dominate it: tiles are clamped to the bucket,
# so the top bucket of a list's range has the largest tiles, and registers grow with the head dim's width.
#   width 32: N <= 64 (its own lists, incl. the persistent backward), N > 256 (forward list; its backward
#     list is width 64's at N > 256);  width 64 (head dim 64: ViT-B/L encoders): N <= 128 (forward list;
#     its backward list is N <= 256's), N <= 256 and N > 256;
#   width 128: head dim 128 (one 128 chunk, the widest) at N <= 128 (one-tile and persistent forms) and
#     N <= 256; head dim 88 = 64 + 32 (ViT-g encoder) at N <= 256.
# float32 (its own lists, tiles <= 32: the bucket only clamps them at N <= 16), every candidate: head dims
# 128 (the widest), 80 (the encoder's) and 48 (width 48: the forward's 32 x 32 candidate) at N <= 256, and
# head dim 16 at N <= 16 (one-tile forward).
# Variants, first (default) candidates only: packed (varlen) at the ViT-H predictor's and encoder's
# shapes; float16, separate dq/dk/dv and unaligned strides at the encoder's.
CI_ATTN_CASES = [
    _AttnCase(_BF, 24, 64), _AttnCase(_BF, 24, 512, candidates="fwd"),
    _AttnCase(_BF, 64, 128, candidates="fwd"), _AttnCase(_BF, 64, 256), _AttnCase(_BF, 64, 512),
    _AttnCase(_BF, 128, 128), _AttnCase(_BF, 128, 256), _AttnCase(_BF, 88, 256),
    _AttnCase(_BF, 24, 128, varlen=True, candidates="first"), _AttnCase(_BF, 80, 256, varlen=True, candidates="first"),
    _AttnCase(_FP32, 128, 256), _AttnCase(_FP32, 80, 256), _AttnCase(_FP32, 48, 256), _AttnCase(_FP32, 16, 16),
    _AttnCase(_FP16, 80, 256, candidates="first"),
    _AttnCase(_BF, 80, 256, grad_group=1, candidates="first"),
    _AttnCase(_BF, 80, 256, aligned=False, candidates="first"),
]


def _attn_cases(scope: str) -> List[_AttnCase]:
    if scope == "ci":
        return list(CI_ATTN_CASES)
    if scope == "full":
        return [_AttnCase(dt, hd, b, vl, gg, al) for dt, hd, b, vl, gg, al in itertools.product(
            (_BF, _FP16, _FP32), range(8, 129, 8), BUCKET_N, (False, True), (3, 1), (True, False))]
    # wide: every candidate of every head-dim chunk class at every bucket, batched and packed, bf16; the other
    # variants' defaults at the models' head dims
    cases = [_AttnCase(_BF, hd, b, vl) for hd, b, vl in itertools.product(ATTN_HEAD_DIMS, BUCKET_N, (False, True))]
    cases += [_AttnCase(dt, hd, b, False, gg, al, "first")
              for (dt, gg, al), hd, b in itertools.product(((_FP16, 3, True), (_FP32, 3, True), (_BF, 1, True),
                                                            (_BF, 3, False)), MODEL_HEAD_DIMS, BUCKET_N)]
    return cases


def _attn_inputs(c: _AttnCase):
    """q, k, v (views of one packed QKV buffer, or of a buffer whose rows are 4 elements longer when
    unaligned), o, lse, do, cu_seqlens and max_seqlen for case ``c``."""
    N, H, Dh = BUCKET_N[c.bucket], ATTN_HEADS, c.head_dim
    lead = (3 * N,) if c.varlen else (2, N)   # packed: 3 sequences of N tokens
    pad = 0 if c.aligned else 4
    buf = torch.empty(*lead, 3 * H * Dh + pad, dtype=c.dtype)
    qkv = buf[..., :3 * H * Dh].unflatten(-1, (3, H, Dh))
    q, k, v = qkv.unbind(-3)
    o, do = torch.empty(q.shape, dtype=c.dtype), torch.empty(q.shape, dtype=c.dtype)
    cu = torch.arange(0, 3 * N + 1, N, dtype=torch.int32) if c.varlen else None
    lse = torch.empty((H, 3 * N) if c.varlen else (2, H, N), dtype=torch.float32)
    return q, k, v, o, lse, do, cu, N


def attention_specs(scope: str = "ci") -> List[Spec]:
    from stop_kernels.ops import attention as A
    specs: List[Spec] = []
    for c in _attn_cases(scope):
        N, Dh = BUCKET_N[c.bucket], c.head_dim
        fwd = A._fwd_candidates(N, Dh, dtype=c.dtype)
        bwd = A._bwd_candidates(N, Dh, dtype=c.dtype)
        for cfg in fwd[:1] if c.candidates == "first" else fwd:
            def make(c=c, cfg=cfg):
                q, k, v, o, lse, do, cu, N = _attn_inputs(c)
                with A._force_config(fwd=cfg):
                    p, _ = A._make_plan(q, k, v, cu, c.varlen, N, Dh ** -0.5)
                return A._attn_fwd_kernel, (q, k, v, o, lse, q if cu is None else cu, *p.fwd_args), p.fwd_kw
            specs.append(Spec("_attn_fwd_kernel", c.label(), cfg, make))
        for cfg in {"all": bwd, "first": bwd[:1], "fwd": []}[c.candidates]:
            with A._force_config(bwd=cfg):
                q, k, v, o, lse, do, cu, N = _attn_inputs(c)
                fused = A._make_bwd_plan(q, k, v, cu, c.varlen, N, Dh ** -0.5, o, lse, do)[0].fused
            parts = ["fused"] if fused else ["dq", "dkdv"]
            for part in parts:
                def make(c=c, cfg=cfg, part=part):
                    q, k, v, o, lse, do, cu, N = _attn_inputs(c)
                    with A._force_config(bwd=cfg):
                        bp, _ = A._make_bwd_plan(q, k, v, cu, c.varlen, N, Dh ** -0.5, o, lse, do)
                    cu_arg = q if cu is None else cu
                    grads = (torch.empty(q.shape[:-2] + (3,) + q.shape[-2:], dtype=q.dtype),) if c.grad_group == 3 \
                        else tuple(torch.empty(q.shape, dtype=q.dtype) for _ in range(3))
                    dq = grads[0]
                    dk, dv = (q, q) if c.grad_group == 3 else grads[1:]
                    kw = dict(bp.kw, GRAD_GROUP=c.grad_group)
                    if part == "fused":  # as _run_bwd passes them
                        return A._attn_bwd_fused_kernel, (q, k, v, o, do, dq, dk, dv, lse, cu_arg, *bp.args1), kw
                    delta = torch.empty_like(lse)
                    if part == "dq":
                        return A._attn_bwd_dq_kernel, (q, k, v, o, do, dq, lse, delta, cu_arg, *bp.args1), kw
                    return (A._attn_bwd_dkdv_kernel, (q, k, v, do, dq if c.grad_group == 3 else dk, dv, lse, delta,
                                                       cu_arg, *bp.args2), kw)
                kname = {"fused": "_attn_bwd_fused_kernel", "dq": "_attn_bwd_dq_kernel",
                         "dkdv": "_attn_bwd_dkdv_kernel"}[part]
                specs.append(Spec(kname, c.label(), cfg, make))
    return specs


def entry_kernels() -> List[str]:
    """The names of the Triton kernels that stop_kernels/ops launches: the module-level ``@triton.jit``
    functions of its sources that no other jit function calls (the others are inlined device functions)."""
    import ast
    ops = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "stop_kernels", "ops")
    jit = {}
    for name in sorted(os.listdir(ops)):
        if name.endswith(".py"):
            with open(os.path.join(ops, name)) as fh:
                tree = ast.parse(fh.read())
            for node in tree.body:
                if isinstance(node, ast.FunctionDef) and any(
                        "jit" in ast.unparse(d.func if isinstance(d, ast.Call) else d) for d in node.decorator_list):
                    jit[node.name] = node
    called = {n.func.id for f in jit.values() for n in ast.walk(f)
              if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    return sorted(set(jit) - called)


SCOPES = ("ci", "wide", "full")


def all_specs(scope: str = "ci") -> List[Spec]:
    if scope not in SCOPES:
        raise ValueError(f"scope: expected one of {SCOPES}, got {scope!r}")
    return stop_specs(scope) + attention_specs(scope)


def _signature(kernel_name, args, kwargs):
    """What Triton specialises a compile on (approximately): the constexprs, pointer dtypes, and integers
    by their specialisation class (1, a multiple of 16, other); two specs with one signature are one compile."""
    def cls(a):
        if isinstance(a, torch.Tensor):
            return str(a.dtype)
        if isinstance(a, bool) or not isinstance(a, int):
            return type(a).__name__
        return "1" if a == 1 else "16" if a % 16 == 0 else "int"
    return (kernel_name, tuple(cls(a) for a in args), tuple(sorted((k, str(v)) for k, v in kwargs.items())))


def unique_specs(scope: str = "ci") -> List[Spec]:
    """all_specs without the ones that compile to the same kernel as an earlier one."""
    seen, out = set(), []
    for s in all_specs(scope):
        kernel, args, kwargs = s.make()
        key = _signature(s.kernel, args, kwargs)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


_RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def cubin_resources(cubin: bytes) -> Dict:
    """Registers per thread, stack frame and local memory per thread (bytes: register spills, local arrays)
    of the one kernel in ``cubin``, from ``cuobjdump --dump-resource-usage`` (Triton's bundled binary)."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    m = _RESOURCE.search(text)
    if m is None:
        raise RuntimeError(f"cuobjdump: no resource usage line in {text!r}")
    return dict(regs=int(m.group(1)), stack=int(m.group(2)), local=int(m.group(4)))


def check(spec: Spec) -> Dict:
    """Compile ``spec`` for sm_90a (nothing launched) and return its verdict (``problem``: None when it passes)."""
    from stop_kernels.devtools import _jit_function, offline_driver
    row = dict(kernel=spec.kernel, label=spec.label, config=spec.config)
    t0 = time.time()
    try:
        kernel, args, kwargs = spec.make()
        with offline_driver(90, "cpu"):
            compiled = _jit_function(kernel).warmup(*args, grid=(1,), **kwargs)
        row.update(cubin_resources(compiled.asm["cubin"]), smem=int(compiled.metadata.shared))
    except Exception as exc:  # a compile error is this config's verdict, not the end of the run
        row.update(problem=f"does not compile: {type(exc).__name__}: {str(exc).strip()[:2000]}")
        return dict(row, seconds=round(time.time() - t0, 2))
    problems = []
    if row["stack"] or row["local"]:
        problems.append(f"local memory (register spills or a stack frame): stack {row['stack']} B, "
                        f"local {row['local']} B")
    if row["smem"] > SMEM_LIMIT:
        problems.append(f"shared memory {row['smem']} B > {SMEM_LIMIT} B")
    return dict(row, problem="; ".join(problems) or None, seconds=round(time.time() - t0, 2))


def _key(kernel: str, label: str, config: Dict):
    return kernel, label, tuple(sorted(config.items()))


# Register spills found by this check and not fixed, per Triton version (major.minor) of the CI scope; a
# version not listed must have none. A config listed here must still spill (a fix then deletes its line) and
# must compile and fit shared memory; any other failure fails the run. Empty: the float32 StoP and attention
# configs, the 64 x 64 _POS_CONFIGS entry and the spilling bf16 attention candidates at head dims 64, 88 and
# 128 that were listed here (16 B – 11 KB of local memory per thread, triton 3.6 and 3.8) were replaced by
# configs that do not spill (benchmarks/results/offline-sm90a/compile_check.md)
KNOWN_SPILLS: Dict[str, set] = {}


def verdict(rows: List[Dict], known) -> List[str]:
    """What makes a run fail: a config that does not compile or exceeds shared memory; local memory in a
    config not in ``known`` (keys of :func:`_key`); a ``known`` config that no longer spills or was not
    compiled (fixed or renamed: delete its line)."""
    seen = {_key(r["kernel"], r["label"], r["config"]): r for r in rows}
    out = []
    for key, r in seen.items():
        if r["problem"] and not (key in known and r["problem"].startswith("local memory")):
            out.append(f"{r['kernel']} [{r['label']}] {r['config']}: {r['problem']}")
    for key in sorted(known, key=str):
        if key not in seen:
            out.append(f"known spill {key} was not compiled (renamed or dropped? update KNOWN_SPILLS)")
        elif not seen[key]["problem"]:
            out.append(f"known spill {key} no longer spills: delete it from KNOWN_SPILLS")
    return out


def known_spills(scope: str = "ci"):
    """The known spills of this Triton version for ``scope`` (only the CI scope has a list)."""
    import triton
    return KNOWN_SPILLS.get(".".join(triton.__version__.split(".")[:2]), set()) if scope == "ci" else set()


def _matches(match: Optional[str], kernel: str, label: str) -> bool:
    """Whether ``kernel [label]`` contains the regular expression ``match`` (None: everything)."""
    return match is None or re.search(match, f"{kernel} [{label}]") is not None


def _run_shard(index: int, count: int, scope: str, match: Optional[str] = None) -> List[Dict]:
    specs = [s for s in unique_specs(scope) if _matches(match, s.kernel, s.label)]
    return [check(s) for i, s in enumerate(specs) if i % count == index]


def run(jobs: int, scope: str = "ci", match: Optional[str] = None) -> List[Dict]:
    """Every unique spec (whose ``kernel [label]`` contains ``match``) checked, in ``jobs`` worker processes
    (each enumerates the specs and compiles every jobs-th one), in the order of :func:`unique_specs`."""
    if jobs <= 1:
        return _run_shard(0, 1, scope, match)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    extra = [] if match is None else ["--match", match]
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--shard", f"{i}/{jobs}", "--scope", scope,
                               *extra], env=env, stdout=subprocess.PIPE, text=True)
             for i in range(jobs)]
    shards = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"compile_check worker exited with {p.returncode}")
        shards.append(json.loads(out))
    rows = []
    for i in range(max(len(s) for s in shards)):  # undo the round-robin split
        rows += [s[i] for s in shards if i < len(s)]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: the CPUs)")
    ap.add_argument("--scope", choices=SCOPES, default="ci",
                    help="ci: the CI set (default); wide: every candidate of every head-dim class at every bucket "
                         "(~900 compiles); full: every head dim and the product of all variants (hours)")
    ap.add_argument("--match", default=None, metavar="REGEX",
                    help="only the specs whose 'kernel [label]' contains REGEX, e.g. '_project_kernel \\[.*fp32' "
                         "or 'float32 Dh=128' (known spills outside it are not checked)")
    ap.add_argument("--out", default=None, help="write every row as JSON here")
    ap.add_argument("--list", action="store_true", help="print the (kernel, config) list without compiling")
    ap.add_argument("--shard", default=None, help=argparse.SUPPRESS)  # worker: "i/n", JSON rows on stdout
    args = ap.parse_args(argv)
    if args.shard:
        i, n = (int(x) for x in args.shard.split("/"))
        json.dump(_run_shard(i, n, args.scope, args.match), sys.stdout)
        return 0
    if args.list:
        for s in unique_specs(args.scope):
            if not _matches(args.match, s.kernel, s.label):
                continue
            print(f"{s.kernel} | {s.label} | {s.config}")
        return 0
    t0 = time.time()
    rows = run(args.jobs, args.scope, args.match)
    for r in rows:
        if r["problem"]:
            print(f"{r['kernel']} [{r['label']}] {r['config']}: {r['problem']}")
    known = {k for k in known_spills(args.scope) if _matches(args.match, k[0], k[1])}
    problems = verdict(rows, known)
    for p in problems:
        print(f"FAIL {p}")
    import triton
    print(f"compile_check: {len(rows)} kernel configs compiled for sm_90a with triton {triton.__version__}, "
          f"{sum(bool(r['problem']) for r in rows)} with a problem, {len(problems)} failing the check, "
          f"{time.time() - t0:.0f} s with {args.jobs} jobs")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
