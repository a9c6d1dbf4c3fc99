#!/usr/bin/env python
"""Host cost of the StoP predictor input per eager call, where no kernel runs: the fused op through its public
function beside the official unfused path, forward and forward+backward under bf16 autocast, on the CPU.

GPU run 6 (H200) timed the fused op's eager forward+backward at 1.5–1.7 ms (``do_bench``) for 0.35 ms of GPU
work: the host's share of an eager call, which issue 3's ratios against the eager and compiled unfused paths
(their own eager timings) are made of. This script measures that share without a GPU:

* **ops per call**: the aten ops each path issues below autograd (views aside) and the fused path's Triton
  launches: kernel launches on a GPU (allocations and the seed's host scalars aside, listed in the JSON), a
  count that does not depend on the machine.
* **µs per call**: the fused path with its Triton launches stubbed and its index values trusted (as a training
  step runs it: ``trusted_device_indices``), the official path with its CPU ops on toy sizes (their arithmetic
  costs next to nothing). Neither includes what a GPU adds per op (``cudaLaunchKernel``, the caching allocator)
  or the Triton launchers' own Python, so these are not GPU host times. Run 6's GPU host was ~8× slower per
  call than this machine on both paths alike (official path: 2.18 ms there, 0.26 ms here).

    python benchmarks/stop_host.py [--calls 3000] [--out DIR]

Writes ``DIR/stop_host.json`` and ``.md`` (machine and versions) and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from stop_kernels import trusted_device_indices  # noqa: E402
from stop_kernels import _checks as chk  # noqa: E402
from stop_kernels.ops import predictor_input as PI  # noqa: E402
from stop_kernels.ops import stop_embed as se  # noqa: E402

# toy sizes: the host cost does not depend on them; 4 target blocks as at ViT-H
B, NPRED, NC, NT, E, D, P = 2, 4, 5, 3, 16, 8, 16


def make_inputs():
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(B, NC, E, generator=g).bfloat16().requires_grad_()
    w = torch.randn(D, E, generator=g).requires_grad_()
    b = torch.randn(D, generator=g).requires_grad_()
    pos = torch.randn(P, D, generator=g)
    ctx_idx = torch.randint(0, P, (B, NC), generator=g)
    tgt = [torch.randint(0, P, (B, NT), generator=g) for _ in range(NPRED)]
    go = torch.randn(NPRED * B, NC + NT, D, generator=g)
    return (ctx, ctx_idx, tgt, w, b, pos), go


def paths(args, go):
    """{name: (forward, forward+backward)} closures over the same inputs, leaves' grads cleared per call."""
    from _official_stop import official_predictor_input
    ctx, ctx_idx, tgt, w, b, pos = args
    leaves = (ctx, w, b)

    def fused():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return PI.assemble_predictor_input(ctx, ctx_idx, tgt, w, b, pos, backend="triton")

    def official():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return official_predictor_input(ctx, ctx_idx, tgt, w, b, pos)

    def with_backward(fwd):
        def run():
            fwd().backward(go)
            for t in leaves:
                t.grad = None
        return run
    return {"fused": (fused, with_backward(fused)), "official": (official, with_backward(official))}


def ops_of(fn) -> list:
    """The aten ops one call of ``fn`` issues below autograd, views aside (ops whose result aliases an input: no
    kernel, little host time), in order: what reaches a backend, each a kernel launch on a GPU except allocations
    and host scalars (``empty``, ``randint`` of the seed, ``item``). Counted with a TorchDispatchMode; the fused
    op's eager path is kept under it (the mode would otherwise send the call through the torch.library op)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            returns = func._schema.returns
            if not (returns and returns[0].alias_info is not None):
                self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    bypass = (PI.custom_op_bypass_ok, se.custom_op_bypass_ok)
    PI.custom_op_bypass_ok = se.custom_op_bypass_ok = lambda t: True
    try:
        with Ops() as ops:
            fn()
    finally:
        PI.custom_op_bypass_ok, se.custom_op_bypass_ok = bypass
    return ops.names


def time_us(fn, calls: int) -> float:
    """Best of three rounds of ``calls`` calls, µs per call (after 100 warm-up calls)."""
    for _ in range(100):
        fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    launches = []
    real_launch, real_range, interpret = se._launch, chk.index_range, os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # the Triton backend resolves for CPU tensors; its launches are stubbed
    # no kernel runs: the host path alone. CPU index tensors are always range-checked (a host read, not a sync, on
    # the CPU); a training step's are device tensors it trusts (trusted_device_indices), so the stand-in skips it
    se._launch = lambda kernel, *rest: launches.append(kernel.fn.__name__)
    chk.index_range = lambda name, t, **kw: t
    rows = []
    try:
        args, go = make_inputs()
        with trusted_device_indices():
            for name, (fwd, fwd_bwd) in paths(args, go).items():
                for kind, fn in (("forward", fwd), ("forward+backward", fwd_bwd)):
                    fn()
                    launches.clear()
                    ops = ops_of(fn)
                    rows.append(dict(path=name, kind=kind, aten_ops=len(ops), triton_launches=len(launches),
                                     us_per_call=round(time_us(fn, a.calls), 1), ops=ops))
    finally:
        se._launch, chk.index_range = real_launch, real_range
        torch.set_num_threads(threads)
        if interpret is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = interpret
    env = dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), python=platform.python_version(),
               torch=torch.__version__, threads=1, calls=a.calls, sizes=dict(B=B, npred=NPRED, Nc=NC, Nt=NT, E=E, D=D, P=P))
    lines = ["| path | call | aten ops | Triton launches | µs per call (this CPU) |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['path']} | {r['kind']} | {r['aten_ops']} | {r['triton_launches']} | {r['us_per_call']} |" for r in rows]
    print("\n".join(lines))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "stop_host.json"), "w") as fh:
            json.dump(dict(env=env, rows=rows), fh, indent=1)
        with open(os.path.join(a.out, "stop_host.md"), "w") as fh:
            fh.write(f"# Host cost of the StoP predictor input per eager call (CPU, kernels stubbed)\n\n"
                     f"`python benchmarks/stop_host.py --out {a.out}`; {env}\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
