"""One-shot GPU check of the Triton flash attention (issue 4): correctness, timing, config variants.

    python benchmarks/gpu_attention.py --out DIR [--budget-s 200]

Sections (each in try/except: a failure prints its traceback and the script goes on):

1. environment: GPU name, torch / triton / CUDA versions.
2. correctness at real sizes: predictor (256, 16, 116, 24) and (256, 16, 150, 24), encoder
   (64, 16, 256, 80) and (64, 16, 74, 80) in bf16, EVERY forward and backward candidate config
   forced one by one (this also compiles them, so the tuner in section 3 only times); plus
   (2, 4, 1000, 64) fp16, varlen lengths [1, 7, 150, 256, 3] packed vs each sequence alone,
   float32 path. Reference: float32 math on the same rounded inputs (float64 for the small ones).
3. timing (triton.testing.do_bench, median ms) of the tuned Triton kernel vs every torch SDPA
   backend (flash, efficient, cudnn; math at one shape) and xformers when it loads, at
   predictor (256, 16, N, 24) for N in {100, 116, 128, 150, 160} and encoder (64, 16, 256, 80),
   (64, 16, 74, 80), bf16, forward and forward+backward, inputs as views of a [B, N, 3, H, D]
   QKV buffer (SDPA gets the transposed views, as the dispatcher passes them). TFLOP/s and GB/s
   next to each time; ceilings 707 TFLOP/s and 4.23 TB/s (ANCHORS.md, one H200).
   Bytes: forward q, k, v, o; forward+backward q, k, v, o, do, dq, dk, dv and lse.
   FLOPs: forward 4·B·H·N²·D; forward+backward 3.5× that (2 + 5 matmuls).
4. variants: every forward/backward candidate timed side by side at N = 116, 150 and the encoder
   shapes, so the default order in ``_fwd_configs`` / ``_bwd_configs`` can be fixed from one run.

Writes DIR/gpu_attention.json and DIR/gpu_attention.md, and prints a short table last.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PEAK_TFLOPS = 707.0
PEAK_TBPS = 4.23
PREDICTOR_NS = [100, 116, 128, 150, 160]
SHAPES = [(256, 16, n, 24) for n in PREDICTOR_NS] + [(64, 16, 256, 80), (64, 16, 74, 80)]
T0 = time.time()
RESULTS: dict = {"env": {}, "correctness": [], "timing": [], "variants": [], "errors": []}


def elapsed() -> float:
    return time.time() - T0


def section(name):
    def deco(fn):
        def run(*a, **kw):
            print(f"\n=== {name} (t = {elapsed():.0f}s) ===", flush=True)
            try:
                return fn(*a, **kw)
            except Exception:
                tb = traceback.format_exc()
                print(tb, flush=True)
                RESULTS["errors"].append({"section": name, "traceback": tb})
        return run
    return deco


def bench(fn, grad_to_none=None) -> float:
    import triton
    try:
        return float(triton.testing.do_bench(fn, warmup=10, rep=40, grad_to_none=grad_to_none, return_mode="median"))
    except TypeError:
        return float(triton.testing.do_bench(fn, warmup=10, rep=40, grad_to_none=grad_to_none, quantiles=[0.5]))


def make_qkv(B, H, N, D, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=dtype, generator=g).requires_grad_()
    return qkv


def flops(B, H, N, D, bwd: bool) -> float:
    f = 4.0 * B * H * N * N * D
    return f * 3.5 if bwd else f


def nbytes(B, H, N, D, bwd: bool, elt=2) -> float:
    e = B * N * H * D * elt
    return 8 * e + B * H * N * 4 if bwd else 4 * e


# ------------------------------------------------------------------------------------------
@section("environment")
def env():
    import triton
    p = torch.cuda.get_device_properties(0)
    info = {"gpu": torch.cuda.get_device_name(0), "sm": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "python": platform.python_version()}
    try:
        import xformers
        info["xformers"] = xformers.__version__
    except Exception as e:
        info["xformers"] = f"not importable ({type(e).__name__})"
    RESULTS["env"] = info
    for k, v in info.items():
        print(f"{k}: {v}")


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
        for (B, H, N, D) in [(256, 16, 116, 24), (256, 16, 150, 24), (64, 16, 256, 80), (64, 16, 74, 80)]:
            qkv = make_qkv(B, H, N, D, seed=N + D)
            do = torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16)
            o_ref, g_ref = _ref_f32(qkv, do)
            bucket = A._pow2(N)
            bd = A._pow2(D)
            fwd_c = A._fwd_configs(bucket, bd)
            bwd_c = A._bwd_configs(bucket, bd)
            for i in range(max(len(fwd_c), len(bwd_c))):
                if elapsed() > budget_s * 0.45:
                    print("correctness: time budget reached, remaining configs skipped")
                    break
                fc, bc = fwd_c[i % len(fwd_c)], bwd_c[i % len(bwd_c)]
                qkv.grad = None
                with A._force_config(fwd=fc, bwd=bc):
                    q, k, v = qkv.unbind(2)
                    o = A.attention(q, k, v)
                    o.backward(do)
                torch.cuda.synchronize()
                _record(f"({B},{H},{N},{D}) fwd={fc} bwd={bc}", torch.bfloat16, _errs(o, qkv.grad, o_ref, g_ref))
            del o_ref, g_ref
        # long sequence, fp16, tuned path
        qkv = make_qkv(2, 4, 1000, 64, dtype=torch.float16, seed=5)
        do = torch.randn(2, 1000, 4, 64, device="cuda", dtype=torch.float16)
        o = A.attention(*qkv.unbind(2))
        o.backward(do)
        _record("(2,4,1000,64) fp16 tuned", torch.float16, _errs(o, qkv.grad, *_ref_f32(qkv, do)))
        # float32 path
        qkv = make_qkv(2, 4, 77, 40, dtype=torch.float32, seed=6)
        do = torch.randn(2, 77, 4, 40, device="cuda")
        o = A.attention(*qkv.unbind(2))
        o.backward(do)
        x = qkv.detach().double().requires_grad_()
        from stop_kernels import reference
        o64 = reference.attention(*x.unbind(2))
        o64.backward(do.double())
        _record("(2,4,77,40) fp32 path vs float64", torch.float32, _errs(o, qkv.grad, o64.detach().float(), x.grad.float()))
        # varlen: packed == each sequence alone, and vs reference
        lens = [1, 7, 150, 256, 3]
        T = sum(lens)
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device="cuda")
        g = torch.Generator(device="cuda").manual_seed(7)
        qkv = torch.randn(T, 3, 16, 24, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        do = torch.randn(T, 16, 24, device="cuda", dtype=torch.bfloat16)
        o = A.attention(*qkv.unbind(1), cu_seqlens=cu)
        o.backward(do)
        _record("varlen [1,7,150,256,3] H16 D24 bf16 vs reference", torch.bfloat16,
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
    finally:
        A._POISON_OUTPUTS = False


def _sdpa_fn(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    be = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
          "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend_name]

    def f(q, k, v):
        with sdpa_kernel([be]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return f


def _impls():
    from stop_kernels.ops import attention as A
    impls = {"triton": A.attention}
    for b in ("cudnn", "flash", "efficient", "math"):
        impls[f"sdpa-{b}"] = _sdpa_fn(b)
    try:
        import xformers.ops as xops
        impls["xformers"] = lambda q, k, v: xops.memory_efficient_attention(q, k, v)
    except Exception:
        pass
    return impls


def _time_impl(f, B, H, N, D):
    qkv = make_qkv(B, H, N, D, seed=1)
    q, k, v = qkv.unbind(2)
    do = torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        f(q, k, v)  # compile / tune / probe support
    t_f = bench(lambda: f(q, k, v))

    def fb():
        f(q, k, v).backward(do)
    fb()
    t_fb = bench(fb, grad_to_none=[qkv])
    return t_f, t_fb


@section("timing")
def timing(budget_s):
    impls = _impls()
    for (B, H, N, D) in SHAPES:
        for name, f in impls.items():
            if name == "sdpa-math" and (B, H, N, D) != (256, 16, 150, 24):
                continue
            if elapsed() > budget_s * 0.85:
                print("timing: time budget reached, rest skipped")
                return
            row = {"shape": [B, H, N, D], "impl": name}
            try:
                t_f, t_fb = _time_impl(f, B, H, N, D)
                row.update(fwd_ms=round(t_f, 4), fwdbwd_ms=round(t_fb, 4),
                           fwd_tflops=round(flops(B, H, N, D, False) / t_f / 1e9, 1),
                           fwdbwd_tflops=round(flops(B, H, N, D, True) / t_fb / 1e9, 1),
                           fwd_gbps=round(nbytes(B, H, N, D, False) / t_f / 1e6, 0),
                           fwdbwd_gbps=round(nbytes(B, H, N, D, True) / t_fb / 1e6, 0))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            RESULTS["timing"].append(row)
            print(json.dumps(row), flush=True)


@section("variants")
def variants(budget_s):
    from stop_kernels.ops import attention as A
    for (B, H, N, D) in [(256, 16, 116, 24), (256, 16, 150, 24), (64, 16, 256, 80), (64, 16, 74, 80)]:
        qkv = make_qkv(B, H, N, D, seed=2)
        q, k, v = qkv.unbind(2)
        do = torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16)
        bucket, bd = A._pow2(N), A._pow2(D)
        chosen_f = A._TUNE_CACHE.get(("fwd", bucket, D, torch.bfloat16, False))
        chosen_b = A._TUNE_CACHE.get(("bwd", bucket, D, torch.bfloat16, False))
        for fc in A._fwd_configs(bucket, bd):
            if elapsed() > budget_s:
                print("variants: time budget reached, rest skipped")
                return
            with A._force_config(fwd=fc):
                t = bench(lambda: A.attention(q, k, v))
            row = {"shape": [B, H, N, D], "kind": "fwd", "config": fc, "ms": round(t, 4), "tuned_pick": fc == chosen_f,
                   "gbps": round(nbytes(B, H, N, D, False) / t / 1e6, 0)}
            RESULTS["variants"].append(row)
            print(json.dumps(row), flush=True)
        # backward alone: the launch wrapper called directly on one saved forward
        o, lse = A._fwd(q.detach(), k.detach(), v.detach(), None, N, D ** -0.5)
        for bc in A._bwd_configs(bucket, bd):
            if elapsed() > budget_s:
                print("variants: time budget reached, rest skipped")
                return
            with A._force_config(bwd=bc):
                t = bench(lambda: A._bwd(do, q.detach(), k.detach(), v.detach(), o.detach(), lse, None, N, D ** -0.5))
            row = {"shape": [B, H, N, D], "kind": "bwd", "config": bc, "ms": round(t, 4), "tuned_pick": bc == chosen_b,
                   "gbps": round((nbytes(B, H, N, D, True) - nbytes(B, H, N, D, False)) / t / 1e6, 0)}
            RESULTS["variants"].append(row)
            print(json.dumps(row), flush=True)


def write(out):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_attention.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    lines = [f"# Triton attention on {RESULTS['env'].get('gpu', '?')}", "",
             " ".join(f"{k}={v}" for k, v in RESULTS["env"].items()), "",
             f"correctness: {sum(r['ok'] for r in RESULTS['correctness'])}/{len(RESULTS['correctness'])} pass", "",
             "| shape (B,H,N,D) | impl | fwd ms | fwd TFLOP/s | fwd GB/s | fwd+bwd ms | fwd+bwd TFLOP/s | fwd+bwd GB/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in RESULTS["timing"]:
        if "error" in r:
            lines.append(f"| {tuple(r['shape'])} | {r['impl']} | {r['error']} | | | | | |")
        else:
            lines.append(f"| {tuple(r['shape'])} | {r['impl']} | {r['fwd_ms']} | {r['fwd_tflops']} | {r['fwd_gbps']} | "
                         f"{r['fwdbwd_ms']} | {r['fwdbwd_tflops']} | {r['fwdbwd_gbps']} |")
    lines += ["", f"Ceilings: {PEAK_TFLOPS} TFLOP/s, {PEAK_TBPS} TB/s.", "", "## Speed-up of Triton vs the best SDPA backend", "",
              "| shape | fwd best SDPA ms | fwd Triton ms | fwd × | fwd+bwd best SDPA ms | fwd+bwd Triton ms | fwd+bwd × | fwd vs memory limit | fwd+bwd vs memory limit |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    summary = []
    for shp in SHAPES:
        rows = [r for r in RESULTS["timing"] if tuple(r["shape"]) == shp and "error" not in r]
        tri = [r for r in rows if r["impl"] == "triton"]
        sd = [r for r in rows if r["impl"].startswith("sdpa") or r["impl"] == "xformers"]
        if not tri or not sd:
            continue
        t = tri[0]
        bf = min(sd, key=lambda r: r["fwd_ms"])
        bb = min(sd, key=lambda r: r["fwdbwd_ms"])
        B, H, N, D = shp
        lim_f = nbytes(B, H, N, D, False) / (PEAK_TBPS * 1e9)
        lim_b = nbytes(B, H, N, D, True) / (PEAK_TBPS * 1e9)
        s = (shp, bf["fwd_ms"], bf["impl"], t["fwd_ms"], bf["fwd_ms"] / t["fwd_ms"], bb["fwdbwd_ms"], bb["impl"],
             t["fwdbwd_ms"], bb["fwdbwd_ms"] / t["fwdbwd_ms"], t["fwd_ms"] / lim_f, t["fwdbwd_ms"] / lim_b)
        summary.append(s)
        lines.append(f"| {shp} | {s[1]} ({s[2]}) | {s[3]} | {s[4]:.2f} | {s[5]} ({s[6]}) | {s[7]} | {s[8]:.2f} | "
                     f"{s[9]:.2f}× | {s[10]:.2f}× |")
    lines += ["", "## Config variants (forced, side by side)", "", "| shape | kind | config | ms | GB/s | tuner pick |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in RESULTS["variants"]:
        lines.append(f"| {tuple(r['shape'])} | {r['kind']} | {r['config']} | {r['ms']} | {r['gbps']} | {'*' if r['tuned_pick'] else ''} |")
    if RESULTS["errors"]:
        lines += ["", f"## {len(RESULTS['errors'])} section error(s): see gpu_attention.json"]
    with open(os.path.join(out, "gpu_attention.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return summary


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=180.0, help="soft wall-clock budget for all sections")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to do")
        return
    env()
    correctness(args.budget_s)
    write(args.out)
    timing(args.budget_s)
    write(args.out)
    variants(args.budget_s)
    summary = write(args.out)
    print(f"\n=== summary (t = {elapsed():.0f}s; {RESULTS['env'].get('gpu')}) ===")
    ok = sum(r["ok"] for r in RESULTS["correctness"])
    print(f"correctness {ok}/{len(RESULTS['correctness'])} pass; section errors: {len(RESULTS['errors'])}")
    print(f"{'shape':>22} {'fwd SDPA':>14} {'fwd tri':>8} {'x':>5} {'f+b SDPA':>14} {'f+b tri':>8} {'x':>5} {'f/lim':>6} {'fb/lim':>6}")
    for s in summary:
        print(f"{str(s[0]):>22} {s[1]:>7.4f}{s[2].replace('sdpa-', ''):>7} {s[3]:>8.4f} {s[4]:>5.2f} "
              f"{s[5]:>7.4f}{s[6].replace('sdpa-', ''):>7} "
              f"{s[7]:>8.4f} {s[8]:>5.2f} {s[9]:>6.2f} {s[10]:>6.2f}")


if __name__ == "__main__":
    main()
