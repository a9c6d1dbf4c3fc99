"""The CUDA C++ backend of ``stop_embed``: the compiled extension ``stop_kernels._C`` (``csrc/``).

The extension registers ``torch.ops.stop_kernels_cuda.{stop_embed_fwd, stop_embed_bwd, stop_noise}``;
this module loads it lazily (importing :mod:`stop_kernels` never fails because of it), wraps the ops
in an ``autograd.Function`` and validates arguments like every other public function.

The noise is the stream of :mod:`stop_kernels.ops.philox` (same seed ⇒ same noise as the Triton
kernel and as :func:`~stop_kernels.ops.philox.philox_normal`); it never exists in GPU memory: the
forward kernel generates it tile by tile in registers and the backward kernel regenerates it.

dW is not bitwise reproducible here: the backward's row splits add their partial sums with fp32 atomics, in an
order that varies between runs, and the op says so to ``torch.use_deterministic_algorithms`` (which then refuses
it). ``stop_embed(backend="auto")`` takes the Triton kernels, whose sums run in a fixed order, in that mode.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from .. import _checks as chk
from ..backends import first_order_backward, functorch_transforming
from .philox import draw_seed

_OPS_NAMESPACE = "stop_kernels_cuda"
_state = {"tried": False, "module": None, "error": None}


def _load():
    """Import ``stop_kernels._C`` once; remember the failure reason."""
    if not _state["tried"]:
        _state["tried"] = True
        try:
            _state["module"] = importlib.import_module("stop_kernels._C")
            _register_fakes()
        except Exception as exc:  # ImportError, or an undefined symbol / CUDA mismatch in the .so
            _state["error"] = f"{type(exc).__name__}: {exc}"
    return _state["module"]


def use_module(module) -> None:
    """Adopt an extension module built elsewhere (e.g. JIT-built by ``torch.utils.cpp_extension.load``).

    Loading such a module registers the same ops; this only records that they are there.
    """
    _state.update(tried=True, module=module, error=None)
    _register_fakes()


def available() -> bool:
    """True when the compiled extension is importable (it may still need a CUDA device to run)."""
    return _load() is not None


def load_error() -> str:
    """Why the extension is not available ('' when it is)."""
    _load()
    return _state["error"] or ""


def _ops():
    if _load() is None:
        raise RuntimeError(f"stop_kernels._C (the CUDA backend) is not available: {load_error()}. "
                           "Build it with `pip install --no-build-isolation -e .` on a machine with nvcc "
                           "and a CUDA build of torch.")
    return getattr(torch.ops, _OPS_NAMESPACE)


_fakes_registered = False


def _register_fakes() -> None:
    """Shape-only (fake/meta) implementations so the ops trace under torch.compile."""
    global _fakes_registered
    if _fakes_registered or not hasattr(torch, "library") or not hasattr(torch.library, "register_fake"):
        return
    _fakes_registered = True
    try:
        @torch.library.register_fake(f"{_OPS_NAMESPACE}::stop_embed_fwd")
        def _fwd_fake(pos_embed, idx, weight, bias, seed, noise_std):
            return weight.new_empty((idx.numel(), weight.shape[0]))

        @torch.library.register_fake(f"{_OPS_NAMESPACE}::stop_embed_bwd")
        def _bwd_fake(grad_out, idx, P, E, seed, noise_std, need_dweight, need_dpos, need_dbias):
            D = grad_out.shape[1]
            dw = grad_out.new_empty((D, E)) if need_dweight else None
            db = grad_out.new_empty((D,)) if need_dbias else None
            dp = grad_out.new_empty((P, D)) if need_dpos else None
            return dw, db, dp
    except Exception:  # an older torch without fake registration for C++ ops: eager still works
        pass


class _StopEmbedCuda(torch.autograd.Function):
    """out[R, D] = pos_embed[idx] + n·weightᵀ + bias with n regenerated from ``seed`` in backward."""

    @staticmethod
    def forward(ctx, pos_embed, idx, weight, bias, seed: int, noise_std: float):
        out = _ops().stop_embed_fwd(pos_embed, idx, weight, bias, seed, noise_std)
        ctx.save_for_backward(idx)  # the noise is regenerated; weight is not needed for the gradients
        ctx.seed, ctx.noise_std = seed, noise_std
        ctx.P, ctx.E = pos_embed.shape[0], weight.shape[1]
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @first_order_backward  # the C++ gradients are not differentiable themselves
    def backward(ctx, grad_out):
        (idx,) = ctx.saved_tensors
        need_dpos, _, need_dw, need_db = ctx.needs_input_grad[:4]
        need_db = need_db and ctx.has_bias
        if not (need_dpos or need_dw or need_db):
            return None, None, None, None, None, None
        dw, db, dpos = _ops().stop_embed_bwd(grad_out.contiguous(), idx, ctx.P, ctx.E, ctx.seed, ctx.noise_std,
                                             bool(need_dw), bool(need_dpos), bool(need_db))
        return dpos, None, dw, db, None, None


def _autocast_dtype() -> Optional[torch.dtype]:
    """The CUDA autocast dtype when autocast is on, else None (works across torch versions)."""
    try:
        enabled = torch.is_autocast_enabled("cuda")
    except TypeError:  # older torch: no device argument
        enabled = torch.is_autocast_enabled()
    if not enabled:
        return None
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype("cuda")
    return torch.get_autocast_gpu_dtype()


def _compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """The dtype the kernels run in: the promoted dtype of the (None skipped) tensors (float64 is computed
    in float32: the kernels have no fp64 path)."""
    dt = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None:
            dt = torch.promote_types(dt, t.dtype)
    return torch.float32 if dt == torch.float64 else dt


def check_args(pos_embed, idx, weight, bias, noise_std):
    """Validate the arguments of :func:`stop_embed_cuda` (ValueError / TypeError naming the argument)."""
    chk.position_table("pos_embed", pos_embed)
    chk.float_tensor("weight", weight, ndim=2)
    if bias is not None:
        chk.float_tensor("bias", bias, ndim=1)
    chk.tensor("idx", idx, min_ndim=1, dtypes=chk.INDEX_DTYPES)
    noise_std = chk.non_negative("noise_std", noise_std)
    dev = chk.same_device(pos_embed=pos_embed, idx=idx, weight=weight, bias=bias)
    if dev.type != "cuda":
        raise ValueError(f"pos_embed: the CUDA backend needs CUDA tensors, got device {dev}")
    chk.projection_weight("weight", weight, pos_embed.shape[1], "pos_embed.shape[1]", bias=bias)
    chk.kernel_widths(weight)
    D, E = weight.shape
    chk.dim_equals("pos_embed", pos_embed, 1, D, "predictor width D = weight.shape[0]")
    if bias is not None:
        chk.dim_equals("bias", bias, 0, D, "predictor width D = weight.shape[0]")
    P = pos_embed.shape[0]
    chk.index_tensor("idx", idx, upper=P, what=f"pos_embed has {P} rows")
    if idx.numel() >= 2 ** 32:
        raise ValueError(f"idx: at most 2**32 tokens per call (32-bit Philox row counter), got {idx.numel()}")
    return noise_std


def stop_embed_cuda(pos_embed: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                    bias: Optional[torch.Tensor] = None, *, noise_std: float = 0.25,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``pos_embed[idx] + n·weightᵀ + bias`` with n ~ N(0, noise_std² I) generated in the CUDA kernel.

    Args:
        pos_embed: ``[P, D]`` positional table ψ.
        idx: ``[..., M]`` int32/int64 positions in ``[0, P)``.
        weight: ``[D, E]``.
        bias: ``[D]`` or None.
        noise_std: σ ≥ 0.
        generator: CPU ``torch.Generator`` the per-call Philox seed is drawn from (default generator
            when None), see :func:`stop_kernels.ops.philox.draw_seed`.
    Returns:
        ``[..., M, D]`` in ``promote(weight.dtype, pos_embed.dtype)``, weight and bias taken in the
        autocast dtype under CUDA autocast (as the Triton op). Kernel dtype: the promoted dtype of ψ, W
        and b (W and b in the autocast dtype under autocast); float64 inputs are computed in float32.
    Under ``torch.compile`` the call runs eagerly (one graph break): the seed drawn per call is an int
    argument of the op, which a traced graph would hold as a constant, recompiling on every call.
    """
    return _stop_embed_cuda_call(pos_embed, idx, weight, bias, noise_std, generator)


def _stop_embed_cuda_eager(pos_embed, idx, weight, bias, noise_std, generator):
    noise_std = check_args(pos_embed, idx, weight, bias, noise_std)
    if functorch_transforming():  # the extension's ops have no functorch rules (vmap's nor grad's): refused by
        # name here, where torch would raise about an autograd.Function's setup_context, which names nothing
        raise NotImplementedError(
            "backend: torch.func transforms (grad, vmap, jvp, …) cannot run the cuda backend's kernels; use "
            "stop_embed(..., backend='auto'), which takes the reference op under a transform (same noise)")
    _ops()  # fail early with the load reason
    seed = draw_seed(generator) if noise_std > 0 else 0  # (σ = 0: zero noise, the generator left as it was)
    # As the Triton op: under CUDA autocast weight and bias are taken in the autocast dtype and nothing
    # else changes, so autocast is the same call with W and b cast (an fp32 ψ is not rounded to bf16
    # with the sum). Output dtype promote(weight, pos_embed); the kernel runs in one dtype, the
    # promoted one (fp64 → fp32): the bf16 kernel under bf16 autocast when ψ is bf16 too.
    amp = _autocast_dtype()
    if amp is not None:
        weight = weight.to(amp)
        bias = bias.to(amp) if bias is not None else None
    if bias is not None:  # taken in W's dtype, as the reference twin and the Triton kernels take it
        bias = bias.to(weight.dtype)
    out_dtype = torch.promote_types(weight.dtype, pos_embed.dtype)
    dtype = _compute_dtype(pos_embed, weight, bias)
    pe, w = pos_embed.to(dtype), weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    with torch.autocast("cuda", enabled=False):  # dtypes are chosen above
        out = _StopEmbedCuda.apply(pe, idx.reshape(-1), w, b, seed, noise_std)
    out = out.view(*idx.shape, weight.shape[0])
    return out if out.dtype == out_dtype else out.to(out_dtype)


_stop_embed_cuda_call = chk.eager_under_compile(_stop_embed_cuda_eager)


def stop_noise_cuda(seed: int, rows: int, E: int, noise_std: float = 1.0, row_start: int = 0,
                    device=None) -> torch.Tensor:
    """The noise matrix the CUDA kernels use, ``[rows, E]`` float32, computed on the GPU (tests): rows
    ``row_start … row_start+rows-1`` of :func:`~stop_kernels.ops.philox.philox_normal` ``(seed, rows, E, noise_std,
    row_start)`` on the CUDA ``device`` (the current one when None or "cuda")."""
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda":  # the op runs on a CUDA device index: "cpu" would silently mean the current GPU
        raise ValueError(f"device: expected a CUDA device, got {dev}")
    if not chk.is_int(seed):
        raise TypeError(f"seed: expected an integer, got {seed!r}")
    rows, E, row_start = (chk.int_at_least(n, v, 0) for n, v in (("rows", rows), ("E", E), ("row_start", row_start)))
    noise_std = chk.non_negative("noise_std", noise_std)
    if row_start + rows > 2 ** 32:
        raise ValueError(f"rows: row_start + rows must be <= 2**32 (32-bit Philox row counter), got {row_start + rows}")
    seed &= 2 ** 64 - 1  # the key is the seed's 64 bits, as philox_normal takes them: the op's int64 bit pattern
    seed = seed - 2 ** 64 if seed >= 2 ** 63 else seed
    index = dev.index if dev.index is not None else torch.cuda.current_device()  # "cuda" = the current one
    return _ops().stop_noise(seed, rows, E, noise_std, row_start, index)
