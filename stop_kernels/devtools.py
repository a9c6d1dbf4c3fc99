"""Kernel development without a GPU: compile (to PTX/SASS) or trace the Triton kernels for an sm_90 target.

Triton asks its *active driver* for the target architecture, the current device and stream. On a
machine without a GPU :func:`offline_driver` installs one that answers for an H100/H200 (sm_90) and
launches nothing, so that

* ``JITFunction.warmup(...)`` compiles a kernel with the same specialisation a real launch would get
  (unit strides folded, 16-divisible sizes and pointers marked) — :func:`ptxas_report` then reads
  its registers, spills and shared memory from ``ptxas`` (``benchmarks/ptxas_report.py``);
* torch's ``wrap_triton`` / Inductor tracing can generate the kernels' TTIR and analyse which
  tensors they write (``tests/_trace_attention_ops.py``).

The kernels must have been decorated without ``TRITON_INTERPRET=1`` (import stop_kernels with it unset).
Also here: :func:`rel_error`, the error measure that the tests and the GPU checks share,
:func:`cuda_autocast_flags`, CUDA autocast switched on without a device, :class:`AllocationTrace`, the
tensor memory a piece of code allocates, counted op by op on any device (:func:`trace_forward_backward`: of a
forward and a forward+backward), and :func:`predictor_input_case`, the
StoP op's inputs at given sizes (``VIT_H14_STOP_SIZES``: issue 3's).
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import weakref
from typing import Dict, Iterator, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OfflineDriver:
    """A Triton driver for an absent GPU of compute capability ``arch`` (launches nothing)."""

    def __init__(self, arch: int = 90, torch_device: str = "cuda"):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)
        self.torch_device = torch.device(torch_device)

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return self.torch_device

    def is_active(self):
        return True


@contextlib.contextmanager
def offline_driver(arch: int = 90, torch_device: str = "cuda") -> Iterator[OfflineDriver]:
    """Make :class:`OfflineDriver` Triton's active driver inside the block (restored afterwards)."""
    from triton.runtime import driver
    old = driver._active
    drv = OfflineDriver(arch, torch_device)
    driver.set_active(drv)
    try:
        yield drv
    finally:
        driver._active = old


def _jit_function(kernel):
    from triton.runtime.jit import JITFunction
    while not isinstance(kernel, JITFunction):  # Autotuner / Heuristics wrappers
        kernel = kernel.fn
    return kernel


def ptxas_report(kernel, args, kwargs, arch: int = 90) -> Dict:
    """Compile ``kernel(*args, **kwargs)`` for sm_``arch`` (a) without launching and return what
    ptxas says: registers per thread, spill stores/loads (bytes), shared memory (bytes), plus the
    number of wgmma / cp.async / 128-bit global loads in the PTX, and the size of the main loop in
    SASS (:func:`sass_loop_stats`). ``args`` are the launch
    arguments (tensors may be small CPU tensors of the right dtype: only their dtype and pointer
    alignment matter); ``kwargs`` the constexprs and ``num_warps`` / ``num_stages``."""
    import triton
    with offline_driver(arch, "cpu"):
        compiled = _jit_function(kernel).warmup(*args, grid=(1,), **kwargs)
    ptx = compiled.asm["ptx"]
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as fh:
            fh.write(ptx)
        log = subprocess.run([os.path.join(bin_dir, "ptxas"), f"-arch=sm_{arch}{'a' if arch >= 90 else ''}", "-v", src, "-o", cubin],
                             capture_output=True, text=True, check=True).stderr
        nvdisasm = os.path.join(bin_dir, "nvdisasm")
        sass = (subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
                if os.path.exists(nvdisasm) else "")
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"regs": int(regs.group(1)) if regs else None,
            "spill_stores": int(spill.group(1)) if spill else 0,
            "spill_loads": int(spill.group(2)) if spill else 0,
            "smem": int(compiled.metadata.shared),
            "num_warps": int(compiled.metadata.num_warps),
            "wgmma": ptx.count("wgmma.mma_async"), "mma_sync": ptx.count("mma.sync"),
            "cp_async": ptx.count("cp.async."), "ldg128": ptx.count("ld.global.v4"),
            **sass_loop_stats(sass)}


_SASS_OP = re.compile(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)")


def sass_loop_stats(sass: str) -> Dict:
    """Static size of the kernel's main loop in SASS (``nvdisasm -c`` text): the longest span between a
    label and a backward branch to it. ``loop_instrs`` is the instruction count of one iteration (slow
    paths inside it included), ``loop_bar`` / ``loop_local`` its barriers and local-memory accesses
    (LDL/STL: spills or stack arrays), ``loop_wgmma_wait`` its waits for wgmma groups
    (``WARPGROUP.DEPBAR``: one per wgmma when ptxas serialises them); all None without SASS. A kernel
    without a loop (only the one-instruction ``BRA`` to itself that ends every kernel) gets the counts of
    the whole kernel and ``has_loop`` False."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"(\.L_x_\d+):", line.strip()))}
    best = None
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i and (best is None or i - labels[m.group(1)] > best[1] - best[0]):
            best = (labels[m.group(1)], i)
    if not any(_SASS_OP.match(line) for line in lines):
        return {"loop_instrs": None, "loop_bar": None, "loop_local": None, "loop_wgmma_wait": None, "has_loop": None}
    span = lines[best[0]:best[1] + 1] if best else []
    has_loop = sum(bool(_SASS_OP.match(line)) for line in span) > 1
    ops = [m.group(1) for line in (span if has_loop else lines) if (m := _SASS_OP.match(line))]
    return {"loop_instrs": len(ops), "loop_bar": sum(op.startswith("BAR") for op in ops),
            "loop_local": sum(op.startswith(("LDL", "STL")) for op in ops),
            "loop_wgmma_wait": sum(op.startswith("WARPGROUP.DEPBAR") for op in ops), "has_loop": has_loop}


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error ‖a − b‖ / ‖b‖ of ``a`` against the reference ``b``, in float64 on the
    CPU (0 when both are zero): the error measure of the kernels' tests and GPU checks."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# Issue 3's shapes: ViT-H/14 I-JEPA+StoP, batch 64, 4 target blocks, 74 context and 42 target tokens, encoder
# width 1280 projected to the predictor's 384, 256 positions. The StoP benchmarks and the op's memory test use them.
VIT_H14_STOP_SIZES = dict(B=64, npred=4, Nc=74, Nt=42, E=1280, D=384, P=256)


def predictor_input_case(B: int, npred: int, Nc: int, Nt: int, E: int, D: int, P: int, *, seed: int = 0,
                         device="cpu") -> Tuple:
    """Fresh random inputs of ``assemble_predictor_input`` as the predictor gets them under bf16 autocast:
    ``(ctx, ctx_idx, tgt_idx, weight, bias, pos_embed)`` with ctx ``[B, Nc, E]`` bf16 (the encoder's output),
    weight ``[D, E]`` (scaled by 1/√E), bias ``[D]`` and ψ ``[P, D]`` fp32, ctx, weight and bias requiring grad;
    ctx_idx ``[B, Nc]`` distinct positions per image (Nc ≤ P), tgt_idx a list of npred ``[B, Nt]``. Drawn on
    the CPU from ``seed`` (the same values on every device), then moved to ``device``. The one builder of these
    cases for the StoP benchmarks (``benchmarks/_official_stop.py``, ``stop_host.py``) and the op's memory test."""
    if not 1 <= Nc <= P:
        raise ValueError(f"Nc: {Nc} context positions per image need 1 <= Nc <= P = {P}")
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(B, Nc, E, generator=g).to(device).bfloat16().requires_grad_()
    w = (torch.randn(D, E, generator=g) / E ** 0.5).to(device).requires_grad_()
    b = (0.1 * torch.randn(D, generator=g)).to(device).requires_grad_()
    pos = torch.randn(P, D, generator=g).to(device)
    ctx_idx = torch.stack([torch.randperm(P, generator=g)[:Nc] for _ in range(B)]).to(device)
    tgt = [torch.randint(0, P, (B, Nt), generator=g).to(device) for _ in range(npred)]
    return ctx, ctx_idx, tgt, w, b, pos


@contextlib.contextmanager
def cuda_autocast_flags(dtype: torch.dtype) -> Iterator[None]:
    """CUDA autocast switched on as ``torch.autocast("cuda", dtype=dtype)`` does, without a device: code that
    only *reads* the autocast state (``torch.is_autocast_enabled("cuda")``, the autocast dtype) runs its
    CUDA branch on a CPU. The previous state is restored on exit."""
    old = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", old[0])
        torch.set_autocast_dtype("cuda", old[1])


class AllocationTrace(TorchDispatchMode):
    """The tensor memory that the code run under it allocates, op by op, on any device: what the CUDA caching
    allocator's ``max_memory_allocated`` would count for the same torch calls, without a GPU.

    Every result of an op that is new memory adds its storage's bytes: not a view, nor an in-place or ``out=``
    op's result (the schema's alias annotations), nor any result that shares an input's storage (``_unsafe_view``,
    which has no annotation). An in-place or ``out=`` op that grows a storage (``resize_``, an ``out=`` tensor too
    small) adds the growth. The bytes leave when the storage is freed (a finalizer on the storage, which torch keeps
    as one Python object while it lives). Memory allocated before the trace began (inputs, parameters) is not
    counted, even where the trace frees it. ``peak_bytes`` is the most bytes live at once; ``live_at_peak`` lists
    them, largest first, as ``(bytes, op, shape, dtype)``; ``allocations`` lists every counted allocation (or
    growth) in that form, in order.

    What it cannot see: memory allocated outside the dispatcher (a library's workspace, such as cuBLAS's on a
    GPU; Triton's scratch), tensors an op's kernel allocates inside itself (``sum(x, dtype=...)`` casts x
    first, a transient that the trace misses; a ``torch.library`` custom op is such an op, so trace the eager
    path of the fused ops, see ``backends.custom_op_bypass_ok``, which an active mode turns off), and the
    allocator's rounding of block sizes (512 B on CUDA). Kernels may be stubbed
    (launches replaced by no-ops): the allocations stay the same, so ViT-size shapes trace in milliseconds.
    """

    def __init__(self):
        super().__init__()
        self.current_bytes = 0
        self.peak_bytes = 0
        self.live_at_peak: List[Tuple[int, str, tuple, torch.dtype]] = []
        self.allocations: List[Tuple[int, str, tuple, torch.dtype]] = []
        self._live: Dict[int, Tuple[int, str, tuple, torch.dtype]] = {}

    def _freed(self, key: int) -> None:
        self.current_bytes -= self._live.pop(key)[0]

    def _add(self, storage, nbytes: int, op: str, t: torch.Tensor) -> None:
        key = id(storage)
        if key in self._live:  # (a storage grown in place)
            self._live[key] = (self._live[key][0] + nbytes, *self._live[key][1:])
        else:
            self._live[key] = (nbytes, op, tuple(t.shape), t.dtype)
            weakref.finalize(storage, self._freed, key)
        self.allocations.append((nbytes, op, tuple(t.shape), t.dtype))
        self.current_bytes += nbytes
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes
            self.live_at_peak = sorted(self._live.values(), key=lambda r: -r[0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_leaves
        inputs = {id(st): st.nbytes() for st in (t.untyped_storage() for t in tree_leaves((args, kwargs))
                                                if isinstance(t, torch.Tensor))}
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        writes = bool(returns) and returns[0].alias_info is not None  # a view of, or a write into, an input
        op = func.overloadpacket.__name__
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs:  # an input's memory: counted only where the op grew it
                if writes and storage.nbytes() > inputs[key]:
                    self._add(storage, storage.nbytes() - inputs[key], op, t)
            elif not writes and key not in self._live:
                self._add(storage, storage.nbytes(), op, t)
        return out


def trace_forward_backward(forward, grad: torch.Tensor, leaves=()) -> Tuple[AllocationTrace, AllocationTrace]:
    """:class:`AllocationTrace` of ``forward()`` (its output kept until the trace ends) and of
    ``forward().backward(grad)`` (the output alive through the backward, as a benchmark that measures the peak
    of a forward+backward call holds it), after one untraced forward+backward to warm caches (argument checks,
    autotuning). The ``leaves``' gradients are cleared after that, so the traced backward makes them as a first
    one does; they are left as it made them."""
    forward().backward(grad)
    for t in leaves:
        t.grad = None
    with AllocationTrace() as fwd:
        out = forward()
    del out
    with AllocationTrace() as both:
        forward().backward(grad)
    return fwd, both
