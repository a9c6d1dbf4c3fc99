#!/usr/bin/env python
"""The ViT-H step's GEMMs timed eagerly and replayed from CUDA graphs, with the kernel cuBLAS picks in each.

GPU run 7 (H200, torch 2.11): with every compiled block replayed from Inductor's CUDA-graph trees
(``compile_mode: reduce-overhead``) the step's matmul time rose from 59.8 to 65.2 ms. The profile showed other
cuBLAS kernels for the same shapes (``nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_bias_TNT`` 172 calls per step
against 118). Two suspects are a smaller cuBLAS(Lt) workspace under stream capture and the graph pool's pointer
alignment. Neither is checked yet (benchmarks/NOTES.md, GPU run 7).

This script takes the blocks' linear layers (qkv, proj, fc1, fc2) at the step's token counts: the target
encoder's forward at 64·256 tokens (it has no backward), then the context encoder's at 64·74 and the predictor's
at 256·116, each with its two backward products, dX = dY·W and dW = dYᵀ·X. The forward is ``F.linear`` with bias,
all bf16. Each GEMM runs three ways:

- eagerly;
- captured in a ``torch.cuda.graph`` and replayed;
- replayed from Inductor's CUDA-graph trees (``torch.compile(mode="reduce-overhead")`` of the same function, its
  inputs marked static as parameters and tree-owned activations are, so the replay copies nothing in).

For each it records the median time (``do_bench`` eager, ``do_bench_cudagraph`` for a graph) and, for all three,
the kernels the profiler sees with their GPU time per call. A kernel that differs between eager and graph, with
a slower time, confirms the suspicion; the same kernels and times clear it. Rows are written as they finish, so
a section cut by its limit keeps them.

    python benchmarks/gemm_in_graph.py --out DIR [--budget-s 100]

Rehearsal (``STOP_KERNELS_REHEARSE=1``): one layer at toy sizes on the CPU, to check the script: no CUDA graph,
the reduce-overhead compile running without one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

T0 = time.time()  # the budget counts from the start: the imports below take seconds on a cold machine

# the checkout's stop_kernels (write_json imports it) also where it is not installed, as the other GPU scripts find it
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _gpu_common import (DEV, REHEARSE, bench, bench_graph, kernel_times, md_cell, record_env, sync,  # noqa: E402
                         write_json)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# (name, tokens, in features, out features, GEMMs): the step's linear layers per block, the largest first
LAYERS = [(f"{who} {layer}", tokens, k, n, gemms)
          for who, tokens, width, gemms in (("target", 64 * 256, 1280, ("fwd",)),
                                            ("context", 64 * 74, 1280, ("fwd", "dx", "dw")),
                                            ("predictor", 256 * 116, 384, ("fwd", "dx", "dw")))
          for layer, k, n in (("qkv", width, 3 * width), ("proj", width, width), ("fc1", width, 4 * width),
                              ("fc2", 4 * width, width))]
if REHEARSE:
    LAYERS = [(name, 16, k // 64, n // 64, gemms) for name, _, k, n, gemms in LAYERS[4:5]]


def products(tokens: int, k: int, n: int):
    """The forward and the two backward GEMMs of one layer, each as a no-argument function on fixed inputs
    (marked static for the trees: a parameter's address, or an activation the tree itself allocated)."""
    dt = torch.float32 if REHEARSE else torch.bfloat16
    g = torch.Generator(DEV).manual_seed(0)
    x = torch.randn(tokens, k, device=DEV, dtype=dt, generator=g)
    w = torch.randn(n, k, device=DEV, dtype=dt, generator=g) / k ** 0.5
    b = torch.randn(n, device=DEV, dtype=dt, generator=g)
    dy = torch.randn(tokens, n, device=DEV, dtype=dt, generator=g)
    for t in (x, w, b, dy):
        torch._dynamo.mark_static_address(t)
    return {"fwd": lambda: F.linear(x, w, b), "dx": lambda: dy @ w, "dw": lambda: dy.t() @ x}


def kernels(fn, iters: int = 5) -> tuple:
    """The GPU kernels ``fn`` launches, memsets left out, and their GPU ms per call, from the profiler: the same
    timer for an eager call, a graph's replay and a tree's call."""
    from torch.profiler import ProfilerActivity, profile
    if REHEARSE:
        return [], None
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        sync()
    times = {k: v for k, v in kernel_times(prof, iters).items() if not k.startswith("Memset")}
    return sorted(times), round(sum(t for t, _ in times.values()), 5)


def graphed(fn):
    """``fn`` captured once in a CUDA graph: returns the replay (what the trees run)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm up on the side stream, as torch.cuda.graph's docs ask
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def tree(fn):
    """``fn`` under torch.compile's reduce-overhead mode: Inductor's CUDA-graph trees, as the step's blocks. Dynamo
    starts afresh for each: the three lambdas of :func:`products` are one code object per kind, whose recompiles
    for every layer's sizes would pass Dynamo's limit and run eagerly."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, mode="reduce-overhead")

    def call():
        torch.compiler.cudagraph_mark_step_begin()
        return compiled()
    for _ in range(3):  # warm-up, recording, replay
        call()
    return call


def measure(budget_s: float, rows: list, flush) -> None:
    """Append one row per GEMM to ``rows``, calling ``flush()`` after each."""
    for name, tokens, k, n, gemms in LAYERS:
        for kind, fn in products(tokens, k, n).items():
            if kind not in gemms:
                continue
            if time.time() - T0 > budget_s:
                rows.append({"layer": name, "gemm": kind, "note": "skipped: budget"})
                continue
            row = {"layer": name, "tokens": tokens, "k": k, "n": n, "gemm": kind,
                   "gflop": round(2 * tokens * k * n / 1e9, 3)}
            try:
                row["eager_ms"] = bench(fn)
                row["eager_kernels"], row["eager_kernel_ms"] = kernels(fn)
                if not REHEARSE:  # (no CUDA graph on the CPU)
                    row["graph_ms"] = bench_graph(fn)
                    row["graph_kernels"], row["graph_kernel_ms"] = kernels(graphed(fn))
                # the trees on the CPU: Inductor compiles and runs the call, without a graph (the rehearsal's check)
                row["trees_kernels"], row["trees_kernel_ms"] = kernels(tree(fn))
            except Exception:
                row["error"] = traceback.format_exc()[-1500:]
            rows.append(row)
            print(json.dumps({k_: v for k_, v in row.items() if not k_.endswith("kernels")}), flush=True)
            flush()


def write(out: str, env: dict, rows: list, quiet: bool = True) -> None:
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "gemm_in_graph.json"), {"env": env, "rows": rows})
    lines = [f"# The step's GEMMs eagerly and from CUDA graphs on {env.get('gpu', '?')} (torch {env.get('torch')})", "",
             "ms: medians (eager: do_bench; graph: do_bench_cudagraph). Kernel ms: the profiler's GPU time per call of "
             "the kernels of an eager call, a torch.cuda.graph replay and a reduce-overhead call (Inductor's trees). "
             "Kernels: the profiler's names; * where a graph's or the trees' differ from the eager call's.", "",
             "| layer | GEMM | GFLOP | eager ms | graph ms | kernel ms eager / graph / trees | eager kernel | "
             "graph kernel | trees kernel |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "eager_ms" not in r or "error" in r:
            text = md_cell(r.get("note", r.get("error", "")), 90, tail=True)
            lines.append(f"| {r['layer']} | {r['gemm']} | {r.get('gflop', '')} | | | | {text} | | |")
            continue
        ek = r.get("eager_kernels", [])
        fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
        names = [("*" if r.get(f"{m}_kernels") and r[f"{m}_kernels"] != ek else "")
                 + ", ".join(f"`{x[:70]}`" for x in r.get(f"{m}_kernels", []))
                 for m in ("eager", "graph", "trees")]
        kms = " / ".join(fmt(r.get(f"{m}_kernel_ms")) for m in ("eager", "graph", "trees"))
        lines.append(f"| {r['layer']} | {r['gemm']} | {r['gflop']} | {fmt(r.get('eager_ms'))} | {fmt(r.get('graph_ms'))} "
                     f"| {kms} | " + " | ".join(names) + " |")
    with open(os.path.join(out, "gemm_in_graph.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=100.0, help="no new GEMM starts after this many seconds")
    a = ap.parse_args(argv)
    if not (torch.cuda.is_available() or REHEARSE):
        print("needs a CUDA GPU (STOP_KERNELS_REHEARSE=1 rehearses the script on the CPU)")
        return 1
    results: dict = {}
    env = record_env(results)
    rows: list = []
    try:  # (the section's limit sends SIGINT: what finished is written all the same)
        measure(a.budget_s, rows, lambda: write(a.out, env, rows))
    finally:
        write(a.out, env, rows, quiet=False)
    return 0 if not any("error" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
