#!/usr/bin/env python
"""One-shot GPU check of the CUDA C++ backend (issue 6): tests, then timings at the ViT-H shapes.

Run on the GPU machine from the repository root, after building the extension in place
(``python setup.py build_ext --inplace`` or ``pip install --no-deps --no-build-isolation -e .``):

    python benchmarks/gpu_cuda.py --out /some/dir

If ``stop_kernels._C`` does not import, the script JIT-builds the same sources with
``torch.utils.cpp_extension.load(name="stop_kernels_C", ...)`` and reports the build time.

Sections (each in its own try/except, so one failure does not hide the rest):
  1. environment (GPU, torch, triton, CUDA)         4. timings: CUDA vs Triton vs unfused PyTorch,
  2. extension import / JIT build (+ build time)        forward and forward+backward, median of
  3. pytest tests/test_cuda_backend.py (in-process)     triton.testing.do_bench, peak memory
Writes ``gpu_cuda.json`` and ``gpu_cuda.md`` to --out and prints a short table last. ~1-2 minutes
(plus ~1 minute if the JIT build is needed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from _gpu_common import bench, md_cell  # noqa: E402
from _official_stop import SIGMA, official_stop_embed, triton_stop_embed  # noqa: E402
from stop_kernels.devtools import VIT_H14_STOP_SIZES  # noqa: E402

B, NPRED, _, NT, E, D, P = VIT_H14_STOP_SIZES.values()  # issue 3's ViT-H/14 sizes (CUDA only: never toy ones)
R = NPRED * B * NT
FWD_FLOPS = 2 * R * E * D  # the forward's n·Wᵀ (ANCHORS.md: the noise's 10.6 GFLOP at these sizes)
SOURCES = ["csrc/stop_embed.cu", "csrc/stop_embed_bwd.cu", "csrc/bindings.cpp"]
CUDA_FLAGS = ["-O3", "-lineinfo", "-std=c++17"]  # -std replaced below by the one torch uses


def section(report, name):
    class _S:
        def __enter__(self):
            self.t0 = time.time()
            print(f"== {name}", flush=True)
            return self

        def __exit__(self, et, ev, tb):
            report.setdefault("sections", {})[name] = {
                "ok": et is None, "seconds": round(time.time() - self.t0, 2),
                **({"error": "".join(traceback.format_exception(et, ev, tb))[-4000:]} if et else {})}
            if et:
                print(f"   FAILED: {et.__name__}: {ev}", flush=True)
            # keep going after an error; an interrupt (the section's time limit sends SIGINT) stops
            # the script, and main() still writes the report
            return et is None or not issubclass(et, KeyboardInterrupt)

    return _S()


def env_info(report):
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), sm=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    mem_gib=round(p.total_memory / 2 ** 30, 1))
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as exc:
        info["triton"] = f"unavailable ({type(exc).__name__})"
    report["env"] = info
    print("  ", info)


def ensure_extension(report):
    from stop_kernels.ops import cuda_backend as cb

    if cb.available():
        import stop_kernels._C as m
        report["extension"] = {"how": "import stop_kernels._C", "file": getattr(m, "__file__", "?")}
        print("   stop_kernels._C imported from", getattr(m, "__file__", "?"))
        return
    report["extension"] = {"import_error": cb.load_error()}
    print("   stop_kernels._C not importable:", cb.load_error(), "→ JIT build", flush=True)
    import inspect
    from torch.utils import cpp_extension as ce

    std = "-std=c++20" if "-std=c++20" in inspect.getsource(ce) else "-std=c++17"
    flags = [f for f in CUDA_FLAGS if not f.startswith("-std")] + [std]
    os.environ.setdefault("MAX_JOBS", str(min(8, os.cpu_count() or 1)))
    t0 = time.time()
    m = ce.load(name="stop_kernels_C", sources=[str(ROOT / s) for s in SOURCES], extra_cuda_cflags=flags,
                extra_cflags=["-O2"], extra_include_paths=[str(ROOT / "csrc")], verbose=False)
    dt = time.time() - t0
    cb.use_module(m)
    report["extension"].update(how="torch.utils.cpp_extension.load (JIT)", build_seconds=round(dt, 1),
                               cuda_flags=flags)
    print(f"   JIT build OK in {dt:.1f} s")


def run_tests(report, out_dir):
    import pytest

    junit = out_dir / "test_cuda_backend.xml"
    rc = pytest.main(["-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}", str(ROOT / "tests/test_cuda_backend.py")])
    summary = {"exit_code": int(rc)}
    try:
        import xml.etree.ElementTree as ET

        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        summary.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
        summary["failed_tests"] = [f"{c.get('name')}: {(c.find('failure') if c.find('failure') is not None else c.find('error')).get('message', '')[:300]}"
                                   for c in suite.iter("testcase")
                                   if c.find("failure") is not None or c.find("error") is not None]
    except Exception as exc:
        summary["junit_error"] = repr(exc)
    report["tests"] = summary
    print("  ", {k: v for k, v in summary.items() if k != "failed_tests"})


def _bench(fn):
    """do_bench median ms (benchmarks/_gpu_common.py), the warm-up and repetitions of run 2."""
    return bench(fn, warmup=25, rep=100)


def timings(report):
    from stop_kernels.ops import cuda_backend as cb

    dt = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    pos = torch.randn(P, D, device="cuda", generator=g).to(dt).requires_grad_(True)
    w = (torch.randn(D, E, device="cuda", generator=g) / E ** 0.5).to(dt).requires_grad_(True)
    b = torch.randn(D, device="cuda", generator=g).to(dt).requires_grad_(True)
    idx = torch.randint(0, P, (NPRED * B, NT), device="cuda", generator=g)
    grad = torch.randn(NPRED * B, NT, D, device="cuda", generator=g).to(dt)
    out_bytes = R * D * 2

    def unfused(p, i, w_, b_):  # the official path (benchmarks/_official_stop.py, shared with bench_cuda.py)
        return official_stop_embed(p, i, w_, b_, SIGMA)

    # the Triton kernels by name: an error is the row's error, never a silent fallback to "auto" (= CUDA)
    impls = {"cuda": lambda p, i, w_, b_: cb.stop_embed_cuda(p, i, w_, b_, noise_std=SIGMA), "unfused": unfused,
             "triton": lambda p, i, w_, b_: triton_stop_embed(p, i, w_, b_, SIGMA)}
    try:
        impls["unfused_compiled"] = torch.compile(unfused)
    except Exception as exc:
        report["compile_unavailable"] = repr(exc)

    rows = []
    try:  # time the ops, not the host-syncing idx range check (inputs are valid by construction)
        from stop_kernels._checks import trusted_device_indices
    except ImportError:
        import contextlib
        trusted_device_indices = contextlib.nullcontext
    try:
        with trusted_device_indices():
            _time_all(impls, rows, pos, idx, w, b, grad, FWD_FLOPS)
    finally:  # the section's time limit interrupts with SIGINT: the rows timed so far are kept
        _finish(report, rows, out_bytes)


def _time_all(impls, rows, pos, idx, w, b, grad, flop_fwd):
    for name, f in impls.items():
        row = {"impl": name}
        try:
            with torch.no_grad():
                f(pos, idx, w, b)  # warm-up / compile
                torch.cuda.synchronize()
                row["fwd_ms"] = _bench(lambda: f(pos, idx, w, b))
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                o = f(pos, idx, w, b)
                torch.cuda.synchronize()
                row["fwd_peak_extra_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2 ** 20, 1)
                del o

            def step():
                o = f(pos, idx, w, b)
                return torch.autograd.grad(o, (pos, w, b), grad)

            step(); torch.cuda.synchronize()
            row["fwdbwd_ms"] = _bench(step)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            r_ = step(); torch.cuda.synchronize()
            row["fwdbwd_peak_extra_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2 ** 20, 1)
            del r_
            row["fwd_tflops"] = round(flop_fwd / (row["fwd_ms"] * 1e-3) / 1e12, 1)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rows.append(row)
        print("  ", row, flush=True)


def _finish(report, rows, out_bytes):
    ref = next((r for r in rows if r["impl"] == "unfused"), {})
    for row in rows:  # speed-ups against the eager unfused path, for each pass both timed (a row whose
        # backward raised has fwd_ms and an error: a KeyError here, in timings' finally, lost every row)
        for kind in ("fwd", "fwdbwd"):
            if f"{kind}_ms" in ref and f"{kind}_ms" in row:
                row[f"{kind}_speedup_vs_unfused"] = round(ref[f"{kind}_ms"] / row[f"{kind}_ms"], 2)
    report["timings"] = {"shape": dict(R=R, E=E, D=D, P=P, dtype="bfloat16", noise_std=SIGMA),
                         "output_mib": round(out_bytes / 2 ** 20, 1), "rows": rows}


def write(report, out_dir):
    (out_dir / "gpu_cuda.json").write_text(json.dumps(report, indent=2, default=str))
    lines = ["# CUDA backend GPU check", "", f"GPU: {report.get('env', {}).get('gpu', '?')}, torch "
             f"{report.get('env', {}).get('torch')}, triton {report.get('env', {}).get('triton')}", ""]
    t = report.get("tests", {})
    lines += [f"Tests: {t.get('tests', '?')} run, {t.get('failures', '?')} failed, {t.get('errors', '?')} errors, "
              f"{t.get('skipped', '?')} skipped (exit {t.get('exit_code', '?')})", ""]
    for ft in t.get("failed_tests", []):
        lines.append(f"- FAILED {ft}")
    ext = report.get("extension", {})
    lines += ["", f"Extension: {ext.get('how', ext)}" + (f", JIT build {ext['build_seconds']} s" if "build_seconds" in ext else ""), ""]
    tm = report.get("timings", {})
    if tm:
        lines += [f"ViT-H shapes {tm['shape']}, output {tm['output_mib']} MiB, median ms (triton.testing.do_bench)", "",
                  "| impl | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd peak extra MiB | fwd+bwd peak extra MiB | fwd × vs unfused | fwd+bwd × vs unfused |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in tm["rows"]:
            if "error" in r:
                lines.append(f"| {r['impl']} | error: {md_cell(r['error'], 80)} | | | | | | |")
            else:
                lines.append(f"| {r['impl']} | {r['fwd_ms']:.4f} | {r['fwdbwd_ms']:.4f} | {r['fwd_tflops']} | "
                             f"{r['fwd_peak_extra_mib']} | {r['fwdbwd_peak_extra_mib']} | "
                             f"{r.get('fwd_speedup_vs_unfused', '')} | {r.get('fwdbwd_speedup_vs_unfused', '')} |")
    for name, s in report.get("sections", {}).items():
        if not s["ok"]:
            lines += ["", f"Section {name} failed:", "```", s["error"][-1500:], "```"]
    md = "\n".join(lines) + "\n"
    (out_dir / "gpu_cuda.md").write_text(md)
    return md


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_cuda_out"), help="output directory")
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t0 = time.time()
    try:
        with section(report, "env"):
            env_info(report)
        with section(report, "extension"):
            ensure_extension(report)
        if not args.skip_tests:
            with section(report, "tests"):
                run_tests(report, out_dir)
            write(report, out_dir)
        with section(report, "timings"):
            if not torch.cuda.is_available():
                raise RuntimeError("no CUDA device")
            timings(report)
    finally:  # also when the time limit interrupts: what was measured is kept
        report["total_seconds"] = round(time.time() - t0, 1)
        md = write(report, out_dir)
    print("\n" + md)
    ok = all(s["ok"] for s in report["sections"].values()) and report.get("tests", {}).get("exit_code", 0) == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
