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

* **memory per call** (``stop_kernels.devtools.AllocationTrace``): the peak of the tensors each path allocates,
  forward and forward+backward (the output kept through the backward, as ``gpu_stop_embed.py`` measures it),
  at the ViT-H/14 shapes of issue 3, launches stubbed and dW's row splits as on an H200 (132 SMs): what a GPU's
  caching allocator counts for the same calls, less what libraries allocate outside the dispatcher (cuBLAS's
  workspace) and the allocator's 512 B rounding.

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

if __name__ == "__main__":  # the fused op's Triton backend resolves for CPU tensors only when stop_kernels defined its
    os.environ["TRITON_INTERPRET"] = "1"  # kernels interpreted, i.e. the flag is on at its import (launches stubbed)

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from stop_kernels import trusted_device_indices  # noqa: E402
from stop_kernels import _checks as chk  # noqa: E402
from stop_kernels.devtools import VIT_H14_STOP_SIZES, predictor_input_case, trace_forward_backward  # noqa: E402
from stop_kernels.ops import predictor_input as PI  # noqa: E402
from stop_kernels.ops import stop_embed as se  # noqa: E402

# toy sizes: the host cost does not depend on them; 4 target blocks as at ViT-H
TOY_SIZES = dict(B=2, npred=4, Nc=5, Nt=3, E=16, D=8, P=16)


def make_inputs(sizes=TOY_SIZES):
    """The op's inputs at ``sizes`` (``devtools.predictor_input_case``) and an upstream gradient of its output."""
    g = torch.Generator().manual_seed(1)
    go = torch.randn(sizes["npred"] * sizes["B"], sizes["Nc"] + sizes["Nt"], sizes["D"], generator=g)
    return predictor_input_case(**sizes), go


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

    def count():
        with Ops() as ops:
            fn()
        return ops.names
    return with_eager_twins(count)


def with_eager_twins(fn):
    """``fn()`` with the fused ops' eager twins forced: an active TorchDispatchMode turns
    ``backends.custom_op_bypass_ok`` off, and the custom op it would run instead is one opaque op to the mode."""
    bypass = (PI.custom_op_bypass_ok, se.custom_op_bypass_ok)
    PI.custom_op_bypass_ok = se.custom_op_bypass_ok = lambda t: True
    try:
        return fn()
    finally:
        PI.custom_op_bypass_ok, se.custom_op_bypass_ok = bypass


def allocation_rows() -> list:
    """Peak MiB beyond the inputs of each path at the ViT-H/14 shapes (``devtools.VIT_H14_STOP_SIZES``, bf16
    autocast), forward (output kept) and forward+backward (as ``gpu_stop_embed.py``'s ``peak_mib_beyond_inputs``),
    with the tensors live at the forward+backward peak. Call with the launches stubbed (``main``)."""
    sizes = VIT_H14_STOP_SIZES
    npred, B, Nc, Nt, D = (sizes[k] for k in ("npred", "B", "Nc", "Nt", "D"))
    args, go = make_inputs(sizes)
    ctx, w, b = args[0], args[3], args[4]
    rows = []
    for name, (fwd, _) in paths(args, go).items():
        f, fb = trace_forward_backward(fwd, go, leaves=(ctx, w, b))
        rows.append(dict(path=name, forward_MiB=round(f.peak_bytes / 2 ** 20, 2),
                         forward_backward_MiB=round(fb.peak_bytes / 2 ** 20, 2),
                         output_MiB=round(npred * B * (Nc + Nt) * D * 4 / 2 ** 20, 2), sizes=sizes,
                         live_at_peak=[[round(n / 2 ** 20, 2), op, list(shape), str(dt).replace("torch.", "")]
                                       for n, op, shape, dt in fb.live_at_peak if n >= 2 ** 19]))
    return rows


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
    real_sms, se._num_sms = se._num_sms, lambda device: 132  # dW's row splits as on an H200
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
            memory = with_eager_twins(allocation_rows)
    finally:
        se._launch, chk.index_range, se._num_sms = real_launch, real_range, real_sms
        torch.set_num_threads(threads)
        if interpret is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = interpret
    env = dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), python=platform.python_version(),
               torch=torch.__version__, threads=1, calls=a.calls, sizes=TOY_SIZES)
    lines = ["| path | call | aten ops | Triton launches | µs per call (this CPU) |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['path']} | {r['kind']} | {r['aten_ops']} | {r['triton_launches']} | {r['us_per_call']} |" for r in rows]
    mem = ["| path | peak forward MiB | peak forward+backward MiB | output MiB |", "| --- | --- | --- | --- |"]
    mem += [f"| {r['path']} | {r['forward_MiB']} | {r['forward_backward_MiB']} | {r['output_MiB']} |" for r in memory]
    for r in memory:
        mem += ["", f"Live at the forward+backward peak of {r['path']} (MiB, allocating op, shape, dtype):", ""]
        mem += [f"- {n} `{op}` {shape} {dt}" for n, op, shape, dt in r["live_at_peak"]]
    shapes = ", ".join(f"{k} {v}" for k, v in VIT_H14_STOP_SIZES.items() if k != "P")
    lines += ["", f"Tensor memory per call at the ViT-H/14 shapes ({shapes}, bf16 "
              "autocast; AllocationTrace, launches stubbed, dW split as on 132 SMs):", ""] + mem
    print("\n".join(lines))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "stop_host.json"), "w") as fh:
            json.dump(dict(env=env, rows=rows, memory=memory), fh, indent=1)
        with open(os.path.join(a.out, "stop_host.md"), "w") as fh:
            fh.write(f"# Host cost of the StoP predictor input per eager call (CPU, kernels stubbed)\n\n"
                     f"`python benchmarks/stop_host.py --out {a.out}`; {env}\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
