#!/usr/bin/env python
"""Host time of a block stack's forward+backward per compile set-up: what the step levers ``compile_scope``,
``cpp_wrapper`` and ``compile_mode: reduce-overhead`` act on, measured where the kernels cost nothing.

A stack of ``--depth`` tiny transformer blocks (``--width``, 2 heads, 2 sequences of 5 or 7 tokens, dynamic
shapes) runs forward+backward on fresh inputs; at these sizes the time is the host's: Dynamo's guard checks,
AOTAutograd's wrappers, Inductor's host code, the autograd engine. Set-ups: eager, one compiled graph per
block (``compile_scope: block``, the default), the same with Inductor's C++ host code (``cpp_wrapper``), one
graph per stack (``compile_scope: stack``), the stack with the C++ host code (which torch refuses), and the
stack unrolled into one graph (``compile_scope: unrolled``), with and without the C++ host code, and the block and
the stack replayed from Inductor's CUDA-graph trees (``compile_mode: reduce-overhead``; on a CPU they run as
compiled, so only a GPU run tells them apart).

    python benchmarks/host_overhead.py [--device cpu] [--depth 32] [--passes 30] [--out DIR]

On the CPU the compiled code is C++ already, so what this shows of ``cpp_wrapper`` is only its own call
overhead; on a GPU (``--device cuda``) its host code also takes over one Python launcher call per Triton
kernel. Writes ``DIR/host_overhead.json`` and ``.md`` (with the machine and versions) and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stop_kernels.models.vit import Block, run_blocks  # noqa: E402
from stop_kernels.training.parallelize import apply_compile  # noqa: E402

SETUPS = {  # name -> apply_compile arguments (None: eager)
    "eager": None,
    "block": dict(scope="block"),
    "block + C++ host code": dict(scope="block", cpp_wrapper=True),
    "stack": dict(scope="stack"),
    "stack + C++ host code": dict(scope="stack", cpp_wrapper=True),
    "unrolled stack": dict(scope="unrolled"),
    "unrolled stack + C++ host code": dict(scope="unrolled", cpp_wrapper=True),
    # compile_mode reduce-overhead: replays from Inductor's CUDA-graph trees (on a CPU the graphs run as compiled)
    "block + CUDA graphs": dict(scope="block", mode="reduce-overhead"),
    "stack + CUDA graphs": dict(scope="stack", mode="reduce-overhead"),
}


def time_setup(kw, depth: int, width: int, passes: int, device: str) -> float:
    """ms per forward+backward pass of the stack (after 4 warm-up passes: compile, both lengths)."""
    torch.manual_seed(0)
    holder = nn.Module()
    holder.blocks = nn.ModuleList([Block(width, 2) for _ in range(depth)]).to(device)
    if kw is not None:
        apply_compile(holder, dynamic=True, **kw)
    xs = [torch.randn(2, n, width, device=device) for n in (5, 7)]

    graphs = kw is not None and kw.get("mode") == "reduce-overhead"

    def one(i):
        if graphs:  # each pass a new generation of the tree (as the Trainer marks each micro-batch)
            torch.compiler.cudagraph_mark_step_begin()
        run_blocks(holder.blocks, xs[i % 2].clone().requires_grad_()).sum().backward()
    for i in range(4):  # each length twice: under CUDA-graph trees its warm-up and its recording
        one(i)
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(passes):
        one(i)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / passes * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--passes", type=int, default=30)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the host's own cost, not parallelism)")
    p.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, of {list(SETUPS)}")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.depth < 1 or a.passes < 1 or a.width % 2:
        p.error("--depth and --passes must be >= 1 and --width even (2 heads)")
    names = a.setups.split(",")
    unknown = [n for n in names if n not in SETUPS]
    if unknown:
        p.error(f"--setups: unknown {unknown}; choose from {list(SETUPS)}")
    torch.set_num_threads(a.threads)
    rows = []
    for name in names:
        try:
            ms = time_setup(SETUPS[name], a.depth, a.width, a.passes, a.device)
            rows.append({"setup": name, "ms_per_pass": round(ms, 3), "us_per_block": round(ms / a.depth * 1e3, 1)})
        except Exception as e:  # a set-up this torch cannot compile is a result too
            msg = str(e).strip().splitlines()
            rows.append({"setup": name, "error": f"{type(e).__name__}: {msg[0][:160] if msg else ''}"})
        print(json.dumps(rows[-1]), flush=True)
    machine = (torch.cuda.get_device_name() if a.device == "cuda" else
               f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {a.threads} thread(s)")
    head = (f"{a.device}: {machine}; torch {torch.__version__}, Python {platform.python_version()}; depth {a.depth}, "
            f"width {a.width}, 2 heads, 2 × 5|7 tokens, {a.passes} passes; "
            f"`python benchmarks/host_overhead.py {' '.join(argv if argv is not None else sys.argv[1:])}`")
    lines = [head, "", "| compiled as | ms per pass | µs per block |", "| --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['setup']} | {r['ms_per_pass']} | {r['us_per_block']} |" if "error" not in r
                     else f"| {r['setup']} | fails: {r['error']} | |")
    print("\n".join(lines))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "host_overhead.json"), "w") as fh:
            json.dump({"header": head, "rows": rows}, fh, indent=1)
        with open(os.path.join(a.out, "host_overhead.md"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
