"""One-shot GPU check of the Triton flash attention (issue 4): correctness, timing, config variants.

    python benchmarks/gpu_attention.py --out DIR [--budget-s 150] [--pytest]
    python benchmarks/gpu_attention.py --host-overhead [--attention-file OLD.py]   # CPU is enough
    STOP_KERNELS_REHEARSE=1 python benchmarks/gpu_attention.py --out DIR   # every section on the CPU, toy sizes

Sections (each in try/except: a failure prints its traceback and the script goes on; each stops
at its share of ``--budget-s``):

1. environment: GPU name, torch / triton / CUDA versions.
2. correctness at real sizes: predictor (256, 16, 116, 24) and (256, 16, 150, 24), encoder
   (64, 16, 256, 80) and (64, 16, 74, 80) in bf16, EVERY forward and backward candidate config
   forced one by one (this also compiles them, so the tuner later only times); plus
   (2, 4, 1000, 64) fp16, varlen lengths [1, 7, 150, 256, 3] packed vs each sequence alone,
   float32 path, eager path == custom-op path bit for bit. Reference: float32 math on the same
   rounded inputs (float64 for the small ones).
3. host: per-call host cost with real launches at a tiny shape (1, 16, 116, 24) whose GPU work is a
   few µs, so the time per call is the CPU's: Triton (no_grad forward, grad-enabled forward,
   forward+backward) next to each SDPA backend.
4. timing, every impl (Triton tuned, each torch SDPA backend, xformers when it loads) at predictor
   (256, 16, N, 24) for N in {100, 116, 128, 150, 160} and encoder (64, 16, 256, 80),
   (64, 16, 74, 80), bf16, inputs as views of a [B, N, 3, H, D] QKV buffer, two ways:
   * eager: ``triton.testing.do_bench`` (median; includes the CPU launch cost: what an eager
     training loop sees when the host is the bottleneck);
   * graph: ``triton.testing.do_bench_cudagraph`` (median of graph replays: GPU time only).
   The forward is timed under no_grad, forward+backward as ``attention(q, k, v).backward(do)``
   (the graph version captures the backward too; tuning is warmed before any capture).
   TFLOP/s and GB/s from the graph time; ceilings 707 TFLOP/s and 4.23 TB/s on an H200 (an H100:
   2.95 TB/s, estimated; _gpu_common.card_limits).
   Bytes: forward q, k, v, o; forward+backward q, k, v, o, do, dq, dk, dv and lse.
   FLOPs: forward 4·B·H·N²·D; forward+backward 3.5× that (2 + 5 matmuls).
5. variants: every forward/backward candidate, graph-timed (kernel time), with and without the
   head-dim split where it applies (80 = 64 + 16; ``STOP_KERNELS_ATTN_SPLIT_D``), side by side at N = 116,
   150 and the encoder shapes, so the default order in ``_fwd_configs`` / ``_bwd_configs`` can be
   fixed from one run. First, at head dim 24, the default configs with the key mask in the dot and
   without it (``STOP_KERNELS_ATTN_DOT_MASK``; the off rows are never a best config). The fastest per
   shape is written to DIR/best_configs.json, for batched and packed inputs alike
   (``stop_kernels.ops.attention.load_tuned_configs``; ``STOP_KERNELS_ATTN_CONFIGS=path`` makes a later
   process, compiled graphs included, run them).
6. ``--pytest``: tests/test_attention.py on CUDA, only with the time left in the budget.

Writes DIR/gpu_attention.json and DIR/gpu_attention.md, and prints a short summary table last.

``--host-overhead`` needs no GPU: it replaces Triton's driver and compiled kernel with no-ops
(the whole Python path of ``JITFunction.run`` still runs: argument binding, specialisation, cache
key) and reports µs per call of ``attention`` (no_grad forward, forward, forward+backward) at a
tiny CPU shape. ``--attention-file`` loads another version of ``stop_kernels/ops/attention.py``
(e.g. ``git show HEAD~1:stop_kernels/ops/attention.py > /tmp/old.py``) for a before/after.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

# the script's start, before torch and the kernels are imported: --budget-s is sized against the section's
# limit in gpu_all.sh (SEC_* - BUDGET_*), which counts the imports too
T0 = time.time()

if __name__ == "__main__" and "--host-overhead" in sys.argv:  # its fake compile stands in for real JITFunctions,
    os.environ.pop("TRITON_INTERPRET", None)  # which Triton only makes while the flag is off as the kernels are defined

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _gpu_common import (DEV, REHEARSE, bench, bench_graph, make_section, record_env, sdpa_fn, sync,  # noqa: E402
                         write_json)
from stop_kernels.models.flops import attention_cost  # noqa: E402

PEAK_TFLOPS, PEAK_TBPS = 707.0, 4.23  # an H200's; env() sets the card's (_gpu_common.card_limits)
# (B, H, N, Dh) of each section: ViT-H/14 I-JEPA+StoP, or toy sizes in a rehearsal (_gpu_common)
if REHEARSE:
    PREDICTOR_NS = [20, 40]
    SHAPES = [(2, 2, n, 24) for n in PREDICTOR_NS] + [(1, 2, 40, 80)]
    CHECK_SHAPES = SWEEP_SHAPES = [(2, 2, 20, 24), (1, 2, 40, 80)]
    MATH_SHAPE, HOST_SHAPE, HOST_CALLS = (2, 2, 40, 24), (1, 2, 20, 24), 2
    LONG_SHAPE, FP32_SHAPE, BITWISE_SHAPE = (1, 2, 100, 64), (1, 2, 21, 40), (1, 2, 20, 24)
    VARLEN_LENS, VARLEN_HEADS = [1, 7, 40, 3], 2
else:
    PREDICTOR_NS = [100, 116, 128, 150, 160]
    # timed in this order, the section's budget cutting the last: the step's predictor N ~ 116 and the longer
    # masks' 150, the encoder's shapes (run 5's budget ended before them), then the other predictor lengths
    SHAPES = ([(256, 16, n, 24) for n in (116, 150)] + [(64, 16, 74, 80), (64, 16, 256, 80)]
              + [(256, 16, n, 24) for n in PREDICTOR_NS if n not in (116, 150)])
    CHECK_SHAPES = [(256, 16, 116, 24), (256, 16, 150, 24), (64, 16, 256, 80), (64, 16, 74, 80)]
    # the ViT-H step's order of importance: the predictor (N ~ 116), the context encoder (N ~ 74, forward
    # and backward), the target encoder (N = 256, forward only in training), then N = 150 (longer masks)
    SWEEP_SHAPES = [(256, 16, 116, 24), (64, 16, 74, 80), (64, 16, 256, 80), (256, 16, 150, 24)]
    MATH_SHAPE, HOST_SHAPE, HOST_CALLS = (256, 16, 150, 24), (1, 16, 116, 24), 300
    LONG_SHAPE, FP32_SHAPE, BITWISE_SHAPE = (2, 4, 1000, 64), (2, 4, 77, 40), (8, 16, 116, 24)
    VARLEN_LENS, VARLEN_HEADS = [1, 7, 150, 256, 3], 16
RESULTS: dict = {"env": {}, "correctness": [], "host": [], "timing": [], "variants": [], "errors": []}
GRAPHS = True


def elapsed() -> float:
    return time.time() - T0


section = make_section(RESULTS, elapsed)


_GEN = {}


def randn(*shape, dtype=torch.float32):
    """torch.randn on the GPU from this script's own generator: a failed CUDA-graph capture can leave
    the default CUDA generator in capture state ("Offset increment outside graph capture", run 2),
    which would then break every later draw from it."""
    if "g" not in _GEN:
        _GEN["g"] = torch.Generator(device=DEV).manual_seed(11)
    return torch.randn(*shape, device=DEV, dtype=dtype, generator=_GEN["g"])


def make_qkv(B, H, N, D, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    qkv = torch.randn(B, N, 3, H, D, device=DEV, dtype=dtype, generator=g).requires_grad_()
    return qkv


def cost(B, H, N, D, kind: str):
    """(FLOPs, least bytes) of one bf16 call: stop_kernels.models.flops.attention_cost (fwd: 4e; bwd alone:
    8e + lse; fwdbwd: 12e + 2·lse, e one [B, N, H, D] tensor)."""
    return attention_cost(B, N, H * D, kind, heads=H)


# ------------------------------------------------------------------------------------------
@section("environment")
def env():
    global PEAK_TFLOPS, PEAK_TBPS
    info = record_env(RESULTS, cudnn=True, xformers=True)
    PEAK_TFLOPS, PEAK_TBPS = info["limits_tflops"], info["limits_tbps"]  # this card's (_gpu_common.card_limits)


def _ref_f32(qkv, do, cu=None):
    """float32 reference output and grads for views q, k, v of qkv (computed without the kernel)."""
    from stop_kernels import reference
    x = qkv.detach().float().requires_grad_()
    q, k, v = x.unbind(-3)
    o = reference.attention(q, k, v, cu_seqlens=cu)
    o.backward(do.float())
    return o.detach(), x.grad


def _errs(o, g, o_ref, g_ref):
    def rel(a, b):
        return ((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
    fin = bool(torch.isfinite(o).all() and torch.isfinite(g).all())
    return {"o_rel": rel(o, o_ref), "dq_rel": rel(g[..., 0, :, :], g_ref[..., 0, :, :]),
            "dk_rel": rel(g[..., 1, :, :], g_ref[..., 1, :, :]), "dv_rel": rel(g[..., 2, :, :], g_ref[..., 2, :, :]),
            "finite": fin}


TOL_REL = {torch.bfloat16: (1.6e-2, 4e-2), torch.float16: (3e-3, 1e-2), torch.float32: (1e-4, 1e-4)}


def _record(name, dtype, errs):
    fo, fg = TOL_REL[dtype]
    ok = errs["finite"] and errs["o_rel"] <= fo and max(errs["dq_rel"], errs["dk_rel"], errs["dv_rel"]) <= fg
    row = dict(case=name, dtype=str(dtype)[6:], ok=ok, **{k: (round(v, 6) if isinstance(v, float) else v)
                                                         for k, v in errs.items()})
    RESULTS["correctness"].append(row)
    print(("PASS " if ok else "FAIL ") + json.dumps(row), flush=True)


@section("correctness")
def correctness(budget_s):
    from stop_kernels.ops import attention as A
    A._POISON_OUTPUTS = True  # NaN-prefilled outputs: unwritten elements show as non-finite
    try:
        for (B, H, N, D) in CHECK_SHAPES:
            qkv = make_qkv(B, H, N, D, seed=N + D)
            do = randn(B, N, H, D, dtype=torch.bfloat16)
            o_ref, g_ref = _ref_f32(qkv, do)
            fwd_c = A._fwd_candidates(N, D)
            bwd_c = A._bwd_candidates(N, D)
            for i in range(max(len(fwd_c), len(bwd_c))):
                if elapsed() > budget_s * 0.35:
                    print("correctness: time budget reached, remaining configs skipped")
                    break
                fc, bc = fwd_c[i % len(fwd_c)], bwd_c[i % len(bwd_c)]
                qkv.grad = None
                with A._force_config(fwd=fc, bwd=bc):
                    q, k, v = qkv.unbind(2)
                    o = A.attention(q, k, v)
                    o.backward(do)
                sync()
                _record(f"({B},{H},{N},{D}) fwd={fc} bwd={bc}", torch.bfloat16, _errs(o, qkv.grad, o_ref, g_ref))
            del o_ref, g_ref
        with heuristic_configs(A):
            _correctness_other_cases(A)
    finally:
        A._POISON_OUTPUTS = False


@contextlib.contextmanager
def heuristic_configs(A):
    """Cases not timed later: the heuristic config (first that launches), no tuning, so no compile
    of every candidate; the configs cached meanwhile are dropped on exit (the timed keys tune later)."""
    old_env = os.environ.get("STOP_KERNELS_ATTN_TUNE")
    before = set(A._TUNE_CACHE)
    os.environ["STOP_KERNELS_ATTN_TUNE"] = "0"
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop("STOP_KERNELS_ATTN_TUNE", None)
        else:
            os.environ["STOP_KERNELS_ATTN_TUNE"] = old_env
        for key in set(A._TUNE_CACHE) - before:
            del A._TUNE_CACHE[key]
        A._PLANS.clear()


def _correctness_other_cases(A):
    # long sequence, fp16
    B, H, N, D = LONG_SHAPE
    qkv = make_qkv(B, H, N, D, dtype=torch.float16, seed=5)
    do = randn(B, N, H, D, dtype=torch.float16)
    o = A.attention(*qkv.unbind(2))
    o.backward(do)
    _record(f"{LONG_SHAPE} fp16", torch.float16, _errs(o, qkv.grad, *_ref_f32(qkv, do)))
    # float32 path
    B, H, N, D = FP32_SHAPE
    qkv = make_qkv(B, H, N, D, dtype=torch.float32, seed=6)
    do = randn(B, N, H, D)
    o = A.attention(*qkv.unbind(2))
    o.backward(do)
    x = qkv.detach().double().requires_grad_()
    from stop_kernels import reference
    o64 = reference.attention(*x.unbind(2))
    o64.backward(do.double())
    _record(f"{FP32_SHAPE} fp32 path vs float64", torch.float32, _errs(o, qkv.grad, o64.detach().float(), x.grad.float()))
    # varlen: packed == each sequence alone, and vs reference
    lens = VARLEN_LENS
    T = sum(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=DEV)
    g = torch.Generator(device=DEV).manual_seed(7)
    qkv = torch.randn(T, 3, VARLEN_HEADS, 24, device=DEV, dtype=torch.bfloat16, generator=g).requires_grad_()
    do = randn(T, VARLEN_HEADS, 24, dtype=torch.bfloat16)
    o = A.attention(*qkv.unbind(1), cu_seqlens=cu)
    o.backward(do)
    _record(f"varlen {lens} H{VARLEN_HEADS} D24 bf16 vs reference", torch.bfloat16,
            _errs(o, qkv.grad, *_ref_f32(qkv, do, cu)))
    worst = 0.0
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        xi = qkv.detach()[a:b].unsqueeze(0).clone().requires_grad_()
        oi = A.attention(*xi.unbind(2))
        oi.backward(do[a:b].unsqueeze(0))
        worst = max(worst, (oi[0].float() - o[a:b].float()).abs().max().item(),
                    (xi.grad[0].float() - qkv.grad[a:b].float()).abs().max().item())
    ok = worst <= 2e-2
    RESULTS["correctness"].append({"case": "varlen packed == alone (max abs diff)", "ok": ok, "max_abs": worst})
    print(("PASS" if ok else "FAIL") + f" varlen packed == alone: max abs diff {worst:.2e}", flush=True)
    # the eager autograd.Function path and the torch.library custom-op path (used under
    # torch.compile) must agree bit for bit: same kernels, same plan
    B, H, N, D = BITWISE_SHAPE
    qkv = make_qkv(B, H, N, D, seed=8)
    do = randn(B, N, H, D, dtype=torch.bfloat16)
    o1 = A.attention(*qkv.unbind(2))
    o1.backward(do)
    g1, qkv.grad = qkv.grad, None
    q, k, v = qkv.unbind(2)
    o2, _ = torch.ops.stop_kernels.flash_attn_fwd(q, k, v, None, N, D ** -0.5)
    o2.backward(do)
    same = bool(torch.equal(o1, o2) and torch.equal(g1, qkv.grad))
    RESULTS["correctness"].append({"case": "eager path == custom-op path (bitwise)", "ok": same})
    print(("PASS" if same else "FAIL") + " eager path == custom-op path (bitwise)", flush=True)


def _impls():
    """name -> f(qkv): each implementation called on the packed ``[B, N, 3, H, Dh]`` QKV buffer, as the models
    call attention. ``triton`` and the SDPA backends take the views q, k, v (autograd stacks their three gradients
    into the buffer's layout: one more read and write of it); ``triton-qkv`` is the models' Triton path
    (``attention_qkv``: the backward writes the buffer's gradient itself)."""
    from stop_kernels.ops import attention as A

    def on_views(f):
        return lambda qkv: f(*qkv.unbind(2))
    impls = {"triton": on_views(A.attention), "triton-qkv": A.attention_qkv}
    for b in ("cudnn", "flash", "efficient", "math"):
        impls[f"sdpa-{b}"] = on_views(sdpa_fn(b))
    try:
        import xformers.ops as xops
        impls["xformers"] = on_views(xops.memory_efficient_attention)
    except Exception:
        pass
    return impls


def _time_impl(f, B, H, N, D, graphs=True):
    """{fwd,fwdbwd}_{eager,graph}_ms for impl ``f`` at (B, H, N, D); a failing graph capture is
    recorded as ``*_graph_error`` and does not lose the eager numbers."""
    qkv = make_qkv(B, H, N, D, seed=1)
    do = randn(B, N, H, D, dtype=torch.bfloat16)

    def fwd():
        with torch.no_grad():
            f(qkv)

    def fb():
        f(qkv).backward(do)

    def fb_fresh():
        # graph version: a new leaf per call. Views of qkv (q, k, v) keep its gradient accumulator alive, and
        # autograd recorded the default stream on it at the eager calls; under capture the backward then waits
        # across the capture boundary and the capture fails (runs 2 and 4: "operation failed due to a previous
        # error during capture"; pytorch/pytorch#180090). A leaf made inside the call gets its accumulator, and
        # its stream, from the capture.
        f(qkv.detach().requires_grad_()).backward(do)

    fwd()
    fb()  # compile / tune / probe support: all before any capture
    sync()
    out = {"fwd_eager_ms": bench(fwd), "fwdbwd_eager_ms": bench(fb, grad_to_none=[qkv])}
    if graphs:
        for name, fn in (("fwd_graph", fwd), ("fwdbwd_graph", fb_fresh)):
            try:
                out[name + "_ms"] = bench_graph(fn)
            except Exception as e:
                out[name + "_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                _graphs_off(e)
                try:
                    sync()
                except Exception:
                    pass
                break
    qkv.grad = None
    return out


@section("host")
def host(budget_s):
    """Per-call host cost with real launches: a shape whose GPU work is a few µs (1 sequence, 16
    heads) so the loop runs at the CPU's pace; µs per call = wall time of n calls / n."""
    B, H, N, D = HOST_SHAPE
    qkv = make_qkv(B, H, N, D, seed=3)
    do = randn(B, N, H, D, dtype=torch.bfloat16)
    impls = {k_: f for k_, f in _impls().items() if k_ != "sdpa-math"}

    def per_call_us(fn, n=HOST_CALLS):
        fn()
        sync()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - t) / n * 1e6

    for name, f in impls.items():
        if elapsed() > budget_s * 0.4:
            print("host: time budget reached, rest skipped")
            return
        row = {"shape": [B, H, N, D], "impl": name}
        try:
            def fwd_ng():
                with torch.no_grad():
                    f(qkv)

            def fwd_g():
                f(qkv)

            def fb():
                qkv.grad = None
                f(qkv).backward(do)
            row.update(fwd_nograd_us=round(per_call_us(fwd_ng), 1), fwd_us=round(per_call_us(fwd_g), 1),
                       fwdbwd_us=round(per_call_us(fb), 1))
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        RESULTS["host"].append(row)
        print(json.dumps(row), flush=True)


def _graphs_off(e: Exception) -> None:
    """After the first failed capture, time the rest eagerly (a capture may leave CUDA state behind)."""
    global GRAPHS
    if GRAPHS:
        print(f"CUDA-graph capture failed ({type(e).__name__}); eager timing from here on", flush=True)
        RESULTS["errors"].append({"section": "cudagraph", "traceback": f"{type(e).__name__}: {e}"[:500]})
    GRAPHS = False


@section("timing")
def timing(budget_s):
    impls = _impls()
    for (B, H, N, D) in SHAPES:
        for name, f in impls.items():
            if name == "sdpa-math" and (B, H, N, D) != MATH_SHAPE:
                continue
            if elapsed() > budget_s * 0.7:
                print("timing: time budget reached, rest skipped")
                return
            row = {"shape": [B, H, N, D], "impl": name}
            try:
                row.update({k_: (round(v_, 4) if isinstance(v_, float) else v_)
                            for k_, v_ in _time_impl(f, B, H, N, D, graphs=GRAPHS).items()})
                for mode in ("fwd", "fwdbwd"):  # rates from the GPU time, else (failed capture) the eager time
                    timer = "graph" if row.get(f"{mode}_graph_ms") else "eager"
                    fl, nb = cost(B, H, N, D, mode)
                    row[f"{mode}_tflops"] = round(fl / row[f"{mode}_{timer}_ms"] / 1e9, 1)
                    row[f"{mode}_gbps"] = round(nb / row[f"{mode}_{timer}_ms"] / 1e6, 0)
                    row[f"{mode}_rates_from"] = timer
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                try:
                    sync()
                except Exception:
                    pass
            RESULTS["timing"].append(row)
            print(json.dumps(row), flush=True)


@section("variants")
def variants(budget_s):
    """Every candidate config forced and graph-timed (kernel time: what the config choice is about). First, at every
    shape, the kernels' A/B switches (SWITCHES: each default config with a switch on and off), so that a budget cut
    short by the sweeps still brings back every side-by-side pair; then the sweeps, shape by shape."""
    from stop_kernels.ops import attention as A
    per_shape = [(shape, _shape_sweeps(A, shape)) for shape in SWEEP_SHAPES]  # (inputs made once, kept for both passes)
    for shape, sweeps in per_shape:
        _switches_ab(A, shape, sweeps, budget_s)
    for (B, H, N, D), sweeps in per_shape:
        bucket = A._pow2(N)
        # head dims that the kernels split in two chunks (80 = 64 + 16) are timed both ways
        splits = [True, False] if A._head_chunks(D, True)[1] else [A.HEAD_DIM_SPLIT]
        default_split = A.HEAD_DIM_SPLIT
        try:
            for split, (kind, configs_for, fn, moved) in ((sp, sw) for sp in splits for sw in sweeps):
                A.HEAD_DIM_SPLIT = split
                chosen = A._TUNE_CACHE.get((kind, bucket, D, torch.bfloat16, False, split))
                for cfg in configs_for(split):
                    if elapsed() > budget_s:
                        print("variants: time budget reached, rest skipped")
                        return
                    _time_forced(A, {"shape": [B, H, N, D], "kind": kind, "config": cfg, "split_d": split,
                                     "tuned_pick": cfg == chosen}, fn, moved)
        finally:
            A.HEAD_DIM_SPLIT = default_split


def _shape_sweeps(A, shape):
    """[(kind, configs_for(split), fn, bytes moved)] of the forward and the backward at ``shape`` (B, H, N, D) on
    fresh inputs: ``fn`` runs the forward op, or the backward's launch wrapper on one saved forward."""
    B, H, N, D = shape
    qkv = make_qkv(B, H, N, D, seed=2)
    q, k, v = (t.detach() for t in qkv.unbind(2))
    do = randn(B, N, H, D, dtype=torch.bfloat16)
    o, lse = A._fwd(q, k, v, None, N, D ** -0.5)
    # (the candidate lists per head-dim split: the one-pass backward configs depend on it)
    return [("fwd", lambda sp: A._fwd_candidates(N, D, sp), lambda: A.attention(q, k, v), cost(B, H, N, D, "fwd")[1]),
            ("bwd", lambda sp: A._bwd_candidates(N, D, sp),
             lambda: A._bwd(do, q, k, v, o, lse, None, N, D ** -0.5), cost(B, H, N, D, "bwd")[1])]


def _time_forced(A, row, fn, moved):
    """Time ``fn`` with ``row``'s config forced for its kind (CUDA-graph replays; eager after a failed capture),
    record the row in the variants and print it."""
    try:
        with A._force_config(**{row["kind"]: row["config"]}):
            if GRAPHS:
                try:
                    t = bench_graph(fn, rep=10)
                except Exception as e:
                    _graphs_off(e)
            if not GRAPHS:
                t = bench(fn)
        row.update(ms=round(t, 4), gbps=round(moved / t / 1e6, 0), timer="graph" if GRAPHS else "eager")
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    RESULTS["variants"].append(row)
    print(json.dumps(row, default=str), flush=True)


# The kernels' A/B switches (module flags of stop_kernels.ops.attention, each in the plan key): (flag, row field,
# kinds of launch it changes, whether it applies at (N, head dim) in bf16)
SWITCHES = [
    ("DOT_MASK", "dot_mask", ("fwd", "bwd"), lambda A, N, D: A._dot_mask(D, sum(A._head_chunks(D)), torch.bfloat16)),
    # the fused backward's lse loaded one element per thread (_load_column_vector): its one-pass and keys forms
    ("COLUMN_LOADS", "column_loads", ("bwd",),
     lambda A, N, D: A._bwd_candidates(N, D)[0]["VARIANT"] in ("fused", "keys")),
]


def _switches_ab(A, shape, sweeps, budget_s):
    """Each switch of SWITCHES that applies at this shape: the default configs of the kinds it changes timed with it
    on and off, side by side, before the sweep (rows with the switch's field, e.g. ``dot_mask``; the off rows never
    become a best config)."""
    N, D = shape[2], shape[3]
    for flag, field, kinds, applies in SWITCHES:
        if not applies(A, N, D):
            continue
        default = getattr(A, flag)
        try:
            for kind, configs_for, fn, moved in sweeps:
                if kind not in kinds:
                    continue
                cfg = configs_for(A.HEAD_DIM_SPLIT)[0]
                for on in (True, False):
                    if elapsed() > budget_s:
                        return
                    setattr(A, flag, on)
                    _time_forced(A, {"shape": list(shape), "kind": kind, "config": cfg, "split_d": A.HEAD_DIM_SPLIT,
                                     field: on, "tuned_pick": False}, fn, moved)
        finally:
            setattr(A, flag, default)


def _switch_cell(r) -> str:
    """The variants table's switch column: ``dot_mask on`` / ``column_loads off`` ... (empty for a sweep row)."""
    return ", ".join(f"{field} {'on' if r[field] else 'off'}" for _, field, _, _ in SWITCHES if field in r)


@section("pytest")
def run_pytest(budget_s):
    import subprocess
    left = budget_s - elapsed()
    if left < 30:
        print(f"pytest: only {left:.0f}s of the budget left, skipped")
        RESULTS["pytest"] = {"skipped": f"{left:.0f}s left"}
        return
    repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "tests/test_attention.py", "-x", "-q"], cwd=repo,
                           capture_output=True, text=True, timeout=left)
        tail = (r.stdout + r.stderr)[-3000:]
        RESULTS["pytest"] = {"rc": r.returncode, "tail": tail}
    except subprocess.TimeoutExpired as e:
        tail = ((e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""))[-3000:]
        RESULTS["pytest"] = {"rc": "timeout", "timeout_s": round(left), "tail": tail}
    print(json.dumps(RESULTS["pytest"])[-1500:], flush=True)


# ------------------------------------------------------------------------------------------
def _fmt(x):
    return "" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))


def _summary():
    """Per shape: best SDPA (eager, graph) vs Triton for forward and forward+backward."""
    out = []
    for shp in SHAPES:
        rows = [r for r in RESULTS["timing"] if tuple(r["shape"]) == shp and "error" not in r]
        tri = [r for r in rows if r["impl"] == "triton"]
        sd = [r for r in rows if r["impl"].startswith("sdpa") or r["impl"] == "xformers"]
        if not tri or not sd:
            continue
        t = tri[0]
        tq = next((r for r in rows if r["impl"] == "triton-qkv"), {})  # the models' path (attention_qkv)
        s = {"shape": shp}
        for col in ("fwd_eager_ms", "fwd_graph_ms", "fwdbwd_eager_ms", "fwdbwd_graph_ms"):
            cands = [r for r in sd if r.get(col) is not None]
            if not cands:
                continue
            best = min(cands, key=lambda r: r[col])
            for prefix, tr in (("", t), ("qkv_", tq)):
                if tr.get(col) is not None:
                    s[prefix + col] = (best[col], best["impl"], tr[col], best[col] / tr[col])
        B, H, N, D = shp
        for mode in ("fwd", "fwdbwd"):
            tt = t.get(f"{mode}_graph_ms")
            if tt:
                s[f"{mode}_vs_limit"] = tt / (cost(B, H, N, D, mode)[1] / (PEAK_TBPS * 1e9))
        out.append(s)
    return out


def best_configs():
    """The fastest config the variants sweep measured per (kind, N bucket, head dim, head-dim split),
    keyed as the attention module's tuning cache (bf16). Graph-timed rows (kernel time) are compared
    among themselves; eager rows (after a failed capture: host time included) only where a key has
    no graph-timed row.

    The sweep times batched inputs only; its pick also serves packed (varlen) runs at the same N
    bucket, which launch the same kernels with the same tiles (``packed: true`` training would
    otherwise run the first candidate inside compiled graphs). A sweep cut short by its budget still
    timed each key's first candidate (the sweep goes in candidate order), so its pick is never slower
    than the default it replaces."""
    from stop_kernels.ops import attention as A
    best = {}
    for r in RESULTS["variants"]:
        if "ms" not in r or any(r.get(field) is False for _, field, _, _ in SWITCHES):  # (a switch's off rows)
            continue
        N, D = r["shape"][2], r["shape"][3]
        key = (r["kind"], A._pow2(N), D, torch.bfloat16, False, r["split_d"])
        rank = (r.get("timer") != "graph", r["ms"])  # graph-timed first, then the time
        if key not in best or rank < best[key][0]:
            best[key] = (rank, r["config"])
    picks = {key: cfg for key, (_, cfg) in best.items()}
    return {**picks, **{key[:4] + (True,) + key[5:]: cfg for key, cfg in picks.items()}}


def write(out):
    os.makedirs(out, exist_ok=True)
    best = best_configs()
    if best:  # STOP_KERNELS_ATTN_CONFIGS=<out>/best_configs.json runs them (gpu_all.sh: the e2e section)
        from stop_kernels.ops import attention as A
        A.save_tuned_configs(os.path.join(out, "best_configs.json"), best)
    summary = _summary()
    RESULTS["summary"] = summary
    write_json(os.path.join(out, "gpu_attention.json"), RESULTS)
    lines = [f"# Triton attention on {RESULTS['env'].get('gpu', '?')}", "",
             " ".join(f"{k}={v}" for k, v in RESULTS["env"].items()), "",
             f"correctness: {sum(bool(r['ok']) for r in RESULTS['correctness'])}/{len(RESULTS['correctness'])} pass", ""]
    if RESULTS["host"]:
        lines += ["## Host cost per call (real launches, GPU work ~µs: the CPU's time)", "",
                  "| shape | impl | fwd no_grad µs | fwd (grad) µs | fwd+bwd µs |", "| --- | --- | --- | --- | --- |"]
        for r in RESULTS["host"]:
            lines.append(f"| {tuple(r['shape'])} | {r['impl']} | {r.get('fwd_nograd_us', r.get('error', ''))} | "
                         f"{r.get('fwd_us', '')} | {r.get('fwdbwd_us', '')} |")
        lines.append("")
    lines += ["## Timing (ms, median). eager = do_bench (CPU launch cost included); graph = do_bench_cudagraph "
              "(GPU time only). Forward under no_grad. TFLOP/s, GB/s from the graph time (from the eager time, "
              "marked *, where the capture failed). Bytes: fwd 4e, f+b 12e + 2·lse (e one [B, N, H, D] tensor).", "",
              "| shape (B,H,N,D) | impl | fwd eager | fwd graph | fwd TFLOP/s | fwd GB/s | f+b eager | f+b graph | "
              "f+b TFLOP/s | f+b GB/s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in RESULTS["timing"]:
        if "error" in r:
            lines.append(f"| {tuple(r['shape'])} | {r['impl']} | {r['error']} | | | | | | | |")
            continue
        fg = r.get("fwd_graph_ms", r.get("fwd_graph_error", ""))
        bg = r.get("fwdbwd_graph_ms", r.get("fwdbwd_graph_error", ""))
        mark = {m: "*" if r.get(f"{m}_rates_from") == "eager" else "" for m in ("fwd", "fwdbwd")}
        lines.append(f"| {tuple(r['shape'])} | {r['impl']} | {_fmt(r['fwd_eager_ms'])} | {_fmt(fg)} | "
                     f"{r['fwd_tflops']}{mark['fwd']} | {r['fwd_gbps']}{mark['fwd']} | {_fmt(r['fwdbwd_eager_ms'])} | "
                     f"{_fmt(bg)} | {r['fwdbwd_tflops']}{mark['fwdbwd']} | {r['fwdbwd_gbps']}{mark['fwdbwd']} |")
    lines += ["", f"Ceilings: {PEAK_TFLOPS} TFLOP/s, {PEAK_TBPS} TB/s.", "",
              "## Speed-up of Triton vs the best SDPA backend (× > 1: Triton faster)", "",
              "| shape | fwd eager: SDPA / Triton / × | fwd graph: SDPA / Triton / × | f+b eager: SDPA / Triton / × | "
              "f+b graph: SDPA / Triton / × | f+b graph, Triton on the QKV buffer (the models' path) | "
              "fwd graph vs memory limit | f+b graph vs memory limit |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def cell(s, col):
        if col not in s:
            return ""
        b, name, t, x = s[col]
        return f"{b:.4f} ({name.replace('sdpa-', '')}) / {t:.4f} / {x:.2f}"
    for s in summary:
        lim = [f"{s[c]:.2f}×" if c in s else "" for c in ("fwd_vs_limit", "fwdbwd_vs_limit")]
        lines.append(f"| {s['shape']} | {cell(s, 'fwd_eager_ms')} | {cell(s, 'fwd_graph_ms')} | "
                     f"{cell(s, 'fwdbwd_eager_ms')} | {cell(s, 'fwdbwd_graph_ms')} | {cell(s, 'qkv_fwdbwd_graph_ms')} | "
                     f"{lim[0]} | {lim[1]} |")
    lines += ["", "## Config variants (forced; timer graph = kernel time, eager = after a failed capture)", "",
              "| shape | kind | config | head dim split | switch (A/B) | ms | timer | GB/s | tuner pick |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in RESULTS["variants"]:
        lines.append(f"| {tuple(r['shape'])} | {r['kind']} | {r['config']} | {r.get('split_d', '')} | "
                     f"{_switch_cell(r)} | "
                     f"{r.get('ms', r.get('error'))} | {r.get('timer', '')} | {r.get('gbps', '')} | "
                     f"{'*' if r['tuned_pick'] else ''} |")
    if RESULTS.get("pytest"):
        p = RESULTS["pytest"]
        lines += ["", f"## pytest tests/test_attention.py: rc={p.get('rc', p.get('skipped'))}", "", "```",
                  str(p.get("tail", ""))[-1500:], "```"]
    if RESULTS["errors"]:
        lines += ["", f"## {len(RESULTS['errors'])} section error(s): see gpu_attention.json"]
    with open(os.path.join(out, "gpu_attention.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return summary


def print_summary(summary):
    print(f"\n=== summary (t = {elapsed():.0f}s; {RESULTS['env'].get('gpu')}) ===")
    ok = sum(bool(r["ok"]) for r in RESULTS["correctness"])
    print(f"correctness {ok}/{len(RESULTS['correctness'])} pass; section errors: {len(RESULTS['errors'])}")
    for r in RESULTS["host"]:
        if "error" not in r:
            print(f"host µs/call {r['impl']:>15}: fwd no_grad {r['fwd_nograd_us']:7.1f}  fwd {r['fwd_us']:7.1f}  "
                  f"fwd+bwd {r['fwdbwd_us']:7.1f}")
    print("ms: best SDPA (backend) / Triton / x (>1 = Triton faster)")
    print(f"{'shape':>20} | {'fwd eager':^26} | {'fwd graph':^26} | {'f+b eager':^26} | {'f+b graph':^26}")
    for s in summary:
        cells = []
        for col in ("fwd_eager_ms", "fwd_graph_ms", "fwdbwd_eager_ms", "fwdbwd_graph_ms"):
            if col in s:
                b, name, t, x = s[col]
                cells.append(f"{b:.4f} {name.replace('sdpa-', '')[:5]:>5} {t:.4f} {x:4.2f}")
            else:
                cells.append(" " * 26)
        print(f"{str(s['shape']):>20} | " + " | ".join(cells))


# ------------------------------------------------------------------------------------------
# --host-overhead: the Python cost per call without a GPU (Triton's launch replaced by no-ops)
# ------------------------------------------------------------------------------------------
def _load_attention(path):
    """stop_kernels.ops.attention, or another version of that file (before/after comparisons):
    the package is stubbed so only that file's custom ops get registered."""
    if path is None:
        from stop_kernels.ops import attention as A
        return A
    import importlib.util
    import types
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    for name, sub in (("stop_kernels", "stop_kernels"), ("stop_kernels.ops", os.path.join("stop_kernels", "ops"))):
        m = types.ModuleType(name)
        m.__path__ = [os.path.join(root, sub)]
        sys.modules[name] = m
    spec = importlib.util.spec_from_file_location("stop_kernels.ops.attention", path)
    A = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = A
    spec.loader.exec_module(A)
    return A


def host_overhead(attention_file=None, n=1000, reps=7):
    os.environ.pop("TRITON_INTERPRET", None)  # real JITFunction objects (their Python launch path)
    import triton
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from stop_kernels.devtools import OfflineDriver

    class FakeKernel:
        function = None
        packed_metadata = None

        def __getattr__(self, name):
            return lambda *a, **k: None

    def fake_compile(self, key, *a, **kw):
        self.device_caches[0][0][key] = kern = FakeKernel()
        return kern

    driver.set_active(OfflineDriver(90, "cpu"))
    JITFunction._do_compile = fake_compile
    A = _load_attention(attention_file)
    A._INTERPRET = True  # CPU tensors pass the device check; the tuner takes the heuristic candidate

    def best_us(fn, n_=n):
        for _ in range(100):
            fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            for _ in range(n_):
                fn()
            ts.append((time.perf_counter() - t) / n_ * 1e6)
        return min(ts)

    print(f"host overhead (fake launch, CPU): torch {torch.__version__}, triton {triton.__version__}, "
          f"file {attention_file or A.__file__}; µs per call, best of {reps} × {n}")
    res = {}
    for (B, N, H, D) in [(1, 16, 2, 24), (1, 300, 2, 24)]:
        qkv = torch.randn(B, N, 3, H, D, dtype=torch.float16, requires_grad=True)
        q, k, v = qkv.unbind(2)
        do = torch.randn(B, N, H, D, dtype=torch.float16)

        def fwd_ng():
            with torch.no_grad():
                A.attention(q, k, v)

        def fwd():
            A.attention(q, k, v)

        def fb():
            qkv.grad = None
            A.attention(q, k, v).backward(do)

        def floor_fb():  # the same autograd plumbing around a trivial op: torch's own floor
            qkv.grad = None
            a, b, c = qkv.unbind(2)
            (a * 1).backward(do)
        bwd = A._bwd_candidates(N, D)[0]["VARIANT"]
        for name, fn, nn in (("fwd no_grad", fwd_ng, n), ("fwd (grad enabled)", fwd, n),
                             (f"fwd+bwd ({bwd} bwd)", fb, n // 2), ("torch floor: unbind, x*1, backward", floor_fb, n // 2)):
            us = best_us(fn, nn)
            res[f"N={N} {name}"] = us
            print(f"  N={N:<4} {name:36s} {us:8.1f}")
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--budget-s", type=float, default=150.0, help="soft wall-clock budget for all sections")
    ap.add_argument("--pytest", action="store_true", help="also run tests/test_attention.py with the time left")
    ap.add_argument("--no-graphs", action="store_true", help="eager timing only")
    ap.add_argument("--host-overhead", action="store_true", help="CPU-only: Python cost per call, launches faked")
    ap.add_argument("--attention-file", help="with --host-overhead: another attention.py to measure")
    args = ap.parse_args()
    if args.host_overhead:
        host_overhead(args.attention_file)
        return
    if args.attention_file:
        ap.error("--attention-file: only measured with --host-overhead (the GPU sections time the installed kernels)")
    if not args.out:
        ap.error("--out is required")
    if not (torch.cuda.is_available() or REHEARSE):
        print("no CUDA device: nothing to do (STOP_KERNELS_REHEARSE=1 rehearses the script on the CPU)")
        return
    global GRAPHS
    GRAPHS = not args.no_graphs
    try:  # the section's time limit sends SIGINT (KeyboardInterrupt passes the sections' except
        # Exception): whatever ends the run, the rows so far and best_configs.json are written
        env()
        correctness(args.budget_s)
        write(args.out)
        host(args.budget_s)
        timing(args.budget_s)
        write(args.out)
        variants(args.budget_s)
        write(args.out)
        if args.pytest:
            run_pytest(args.budget_s)
    finally:
        summary = write(args.out)
    print_summary(summary)


if __name__ == "__main__":
    main()
