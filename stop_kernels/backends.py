"""What this installation can run: ``stop_kernels.backends()``.

>>> import stop_kernels; stop_kernels.backends()
{'reference': True, 'triton': False, 'cuda': False, 'xformers': False,
 'reasons': {'triton': '...', 'cuda': 'not built: ...', 'xformers': '...'}}

Nothing here compiles or launches anything: it only imports (the Triton / xformers packages and the
compiled extension ``stop_kernels._C``) and looks at the environment.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import re
import shutil
from typing import Dict, Tuple

import torch


def interpret_flag() -> bool:
    """``TRITON_INTERPRET`` read as Triton reads it (``1``/``true``/``on``/``yes``/``y``, any case; checked against
    triton 3.6 and 3.8). Plain ``os.environ`` (not ``triton.knobs``, which calls into C++): torch.compile traces it
    without a graph break."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")


# Triton makes a kernel interpreted when ``@triton.jit`` defines it, i.e. when stop_kernels is imported (this module
# is imported with the package, before the ops define their kernels): the flag at that moment decides for good.
_INTERPRETED_AT_IMPORT = interpret_flag()


def triton_interpreting() -> bool:
    """Whether the library's Triton kernels run in Triton's CPU interpreter: the flag was set when stop_kernels was
    imported (the kernels were defined interpreted) and still is, read per call (tests switch it off for the
    reference paths). Set only after the import, the kernels are compiled ones, which cannot take CPU tensors
    (:func:`interpreter_set_after_import`)."""
    return _INTERPRETED_AT_IMPORT and interpret_flag()


def interpreter_set_after_import() -> bool:
    """``TRITON_INTERPRET`` is on now but was off when stop_kernels was imported: the kernels are not interpreted."""
    return interpret_flag() and not _INTERPRETED_AT_IMPORT


INTERPRET_LATE = ("TRITON_INTERPRET was set after stop_kernels was imported, but Triton makes a kernel interpreted "
                  "when it is defined, at import: set it before importing stop_kernels")


def functorch_transforming() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, vjp, jacrev, jvp …) is running. The fused ops are
    ``torch.library`` custom ops, whose autograd registration functorch's grad transforms refuse (a
    RuntimeError about an autograd.Function's ``setup_context``), so "auto" then takes the PyTorch paths
    (reference StoP, SDPA attention), which compute the same values."""
    return torch._C._are_functorch_transforms_active()


def functorch_differentiating() -> bool:
    """Whether a ``torch.func`` transform that differentiates (grad, vjp, jacrev, jvp, jacfwd, hessian …) is
    running, at any level of nested transforms. Those refuse the fused ops' autograd registrations with a
    RuntimeError about an autograd.Function's ``setup_context`` that names no argument; vmap runs them (per sample).
    An explicitly requested kernel backend is refused under them by name instead (:func:`refuse_under_func_grad`)."""
    if torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active():  # (dynamo cannot trace
        return False  # the interpreter stack, and handles transforms itself; the second test is the cheap one)
    ft = torch._C._functorch
    return any(i.key() in (ft.TransformType.Grad, ft.TransformType.Jvp) for i in ft.get_interpreter_stack() or ())


def refuse_under_func_grad(arg: str, kernels: str, fallback: str) -> None:
    """``NotImplementedError`` naming ``arg`` when a differentiating ``torch.func`` transform runs (see
    :func:`functorch_differentiating`): ``kernels`` cannot run there, ``fallback`` says what can."""
    if functorch_differentiating():
        raise NotImplementedError(f"{arg}: torch.func's differentiating transforms (grad, vjp, jacrev, jvp, …) cannot "
                                  f"run {kernels}; {fallback}")


def custom_op_bypass_ok(t) -> bool:
    """True when a fused op may skip its ``torch.library`` registration and run its plain
    ``torch.autograd.Function`` (same kernels, same results): ``t`` is a plain tensor, nothing is tracing
    (torch.compile / export), no TorchDispatchMode is active (FakeTensorMode, make_fx, ...) and no functorch
    transform runs. Otherwise the custom op (fake and autograd registrations) runs. Each dispatcher round trip of
    a Python custom op costs tens of microseconds of host time (argument defaults, the autograd wrapper,
    redispatch), which a host-bound training step pays directly."""
    return (not torch.compiler.is_compiling() and type(t) is torch.Tensor
            and torch._C._len_torch_dispatch_stack() == 0 and not torch._C._are_functorch_transforms_active())


def first_order_backward(backward):
    """``backward(ctx, *grads)`` of a fused op whose gradients its kernels compute: first order only, and made to
    say so. ``torch.autograd.function.once_differentiable`` marks the returned gradients only when an incoming
    gradient requires grad. When none does (a loss linear in the op's output, ``out.sum()``), the gradients come
    back as constants although they depend on the op's inputs (dq on k and v; the predictor input's dctx on W), so a
    second derivative through them (``create_graph=True``: a gradient penalty) would be silently zero. Under
    ``create_graph=True`` (grad mode on inside the backward) this wrapper gives every returned gradient a node that
    raises when it is differentiated, whatever the incoming gradient; first-order calls run the backward as it is.
    For an ``autograd.Function``'s backward and for a ``torch.library`` registration's. Traced tensors (fake and
    functional ones: torch.compile, make_fx) are left to the tracer."""
    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        if not torch.is_grad_enabled() or torch.compiler.is_compiling() \
                or not all(type(g) is torch.Tensor for g in grads if g is not None):  # (every first-order call)
            return backward(ctx, *grads)
        with torch.no_grad():
            out = backward(ctx, *grads)
        outs = out if isinstance(out, tuple) else (out,)
        err = torch._C._functions.DelayedError(
            b"stop_kernels: the fused kernels' gradients are first order: differentiating them (a second "
            b"derivative through attention, stop_embed or assemble_predictor_input) is not supported; use "
            b"backend='reference' (or 'sdpa' for attention)", len(outs))
        marked = err(*[None if g is None else g.detach().requires_grad_() for g in outs])
        marked = marked if isinstance(marked, tuple) else (marked,)
        return marked if isinstance(out, tuple) else marked[0]
    return wrapped


def eager_twin(name: str, forward, setup_context, backward) -> type:
    """A plain ``torch.autograd.Function`` named ``name`` that runs a custom op's implementation ``forward(*inputs)``,
    its ``setup_context(ctx, inputs, output)`` and its registered ``backward(ctx, grad)`` without the torch.library
    dispatch: what an op's eager calls take when :func:`custom_op_bypass_ok` allows (same kernels, same results).
    ``backward`` is the registration's, already :func:`first_order_backward` (the kernels' gradients are not
    differentiable themselves)."""
    def fwd(ctx, *inputs):
        out = forward(*inputs)
        setup_context(ctx, inputs, out)
        return out
    return type(name, (torch.autograd.Function,), {
        "__doc__": f"Eager twin of a custom op: {forward.__name__} with its saved state and backward.",
        "forward": staticmethod(fwd),
        "backward": staticmethod(backward)})


def vmap_randomness_different() -> bool:
    """Whether a ``torch.func.vmap(..., randomness="different")`` is running, at any level of nested
    transforms (read from functorch's interpreter stack, as vmap itself does; checked with torch 2.11 and 2.14).
    The StoP ops draw one Philox seed per call on the host (:func:`stop_kernels.ops.philox.draw_seed`), so
    they cannot give every vmapped sample noise of its own; under this mode the draw is a per-sample tensor
    that ``int()`` refuses with vmap's opaque ".item()" error, which is why the draw asks first."""
    ft = torch._C._functorch
    for interp in ft.get_interpreter_stack() or ():
        if (interp.key() == ft.TransformType.Vmap
                and ft.CVmapInterpreterPtr(interp).randomness() == ft.RandomnessType.Different):
            return True
    return False


def _version(text: str) -> Tuple[int, int]:
    """(major, minor) of a version string such as '3.6.0', '2.4.0rc1' or '2.11.0+cu130'."""
    m = re.match(r"(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def triton_interpreter_problem() -> str:
    """Why Triton's CPU interpreter cannot run this library's kernels here, '' when it can.

    triton < 3.7's interpreter hands a kernel's integer arguments over as 1-element numpy arrays and
    calls ``int()`` on them where they bound a loop (``range(0, n, BLOCK)``); numpy ≥ 2.4 refuses that
    (``TypeError: only 0-dimensional arrays can be converted to Python scalars``). triton 3.7 squeezes
    the array first. Checked with triton 3.6 + numpy 2.3 / 2.4 and triton 3.8 + numpy 2.4."""
    import numpy
    import triton
    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (f"the CPU interpreter of triton {triton.__version__} cannot run with numpy {numpy.__version__}: "
                "install numpy<2.4 or triton>=3.7")
    return ""


def on_device(t: torch.Tensor):
    """A context manager that makes ``t``'s CUDA device the current one for a Triton launch (Triton
    launches on the current device, whatever device the tensors live on); a no-op when it already is
    current, and off CUDA. Autograd's backward already runs with the device of its tensors current."""
    if (t.device.type == "cuda" and t.device.index is not None and torch.cuda.is_available()
            and t.device.index != torch.cuda.current_device()):
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


_SM_COUNTS: Dict[int, int] = {}


def sm_count(device: torch.device, off_cuda: int) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (read once per device: a kernel's grid size is
    on the host path of every launch), or ``off_cuda`` for CPU tensors (the interpreter: the caller's
    stand-in, sized so its CPU tests still exercise a grid of several programs)."""
    if device.type != "cuda":
        return off_cuda
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNTS:
        _SM_COUNTS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNTS[idx]


def _triton() -> Tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    try:
        importlib.import_module("triton")
    except Exception as exc:  # a broken install
        return False, f"triton fails to import: {type(exc).__name__}: {exc}"
    if interpreter_set_after_import() and not torch.cuda.is_available():
        return False, INTERPRET_LATE
    if triton_interpreting():
        problem = triton_interpreter_problem()
        if problem:
            return False, "TRITON_INTERPRET=1, but " + problem
        return True, "TRITON_INTERPRET=1: kernels run in the Triton CPU interpreter"
    if torch.cuda.is_available():
        return True, ""
    return False, "triton is installed but no CUDA device is visible (set TRITON_INTERPRET=1 for the CPU interpreter)"


def _cuda_not_built_reason() -> str:
    """Why ``stop_kernels._C`` was most likely not built (setup.py builds it only when all hold)."""
    reasons = []
    if torch.version.cuda is None:
        reasons.append("torch has no CUDA")
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        reasons.append("nvcc missing")
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        reasons.append("no GPU at build time and TORCH_CUDA_ARCH_LIST unset")
    elif not os.environ.get("TORCH_CUDA_ARCH_LIST") and all(
            torch.cuda.get_device_capability(i) < (8, 0) for i in range(torch.cuda.device_count())):
        reasons.append("no GPU of compute capability 8.0 or newer (setup.py builds for sm_80+ only)")
    if not reasons:
        reasons.append("the package was installed without building it (run `pip install --no-build-isolation -e .`)")
    return "not built: " + " / ".join(reasons)


def _cuda() -> Tuple[bool, str]:
    from .ops import cuda_backend

    if cuda_backend.available():
        if not torch.cuda.is_available():  # usable means callable, as for triton
            return False, "built, but no CUDA device is visible"
        return True, ""
    err = cuda_backend.load_error()
    if "No module named 'stop_kernels._C'" in err:
        return False, _cuda_not_built_reason()
    return False, f"built but fails to load: {err}"


def _xformers() -> Tuple[bool, str]:
    if importlib.util.find_spec("xformers") is None:
        return False, "xformers is not installed"
    try:
        importlib.import_module("xformers")
    except Exception as exc:
        return False, f"xformers fails to import: {type(exc).__name__}: {exc}"
    return True, ""


def backends() -> Dict[str, object]:
    """Which implementations are usable here: ``{"reference", "triton", "cuda", "xformers"}`` → bool,
    plus ``"reasons"``: for each backend that is unavailable (or usable with a caveat), why."""
    result: Dict[str, object] = {"reference": True}
    reasons: Dict[str, str] = {}
    for name, probe in (("triton", _triton), ("cuda", _cuda), ("xformers", _xformers)):
        try:
            ok, why = probe()
        except Exception as exc:  # a probe must never break `import stop_kernels`
            ok, why = False, f"probe failed: {type(exc).__name__}: {exc}"
        result[name] = ok
        if why:
            reasons[name] = why
    result["reasons"] = reasons
    return result


__all__ = ["backends"]
