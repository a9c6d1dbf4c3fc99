"""A forward-only MLP input projection in one GEMM: ``GELU_tanh(x·Wᵀ + b)``, bias and activation in the epilogue.

Why. In the ViT-H/14 training step (batch 64, H200, GPU run 6) the separate GELU kernel took 5.9 ms of GPU time per
step, two thirds of it in the EMA target encoder: 32 blocks that each read and write a ``[16384, 5120]`` bf16
activation (336 MB) after a GEMM that had just written it. The target encoder keeps no graph for a backward, so
its ``fc1`` can run as one cuBLASLt GEMM whose epilogue adds the bias and applies the GELU in registers
(``CUBLASLT_EPILOGUE_GELU_BIAS``, which PyTorch reaches through ``aten._addmm_activation``): the activation is
written once and never read back by an elementwise kernel.

The epilogue has the tanh form of GELU only,
``GELU_tanh(h) = h/2 · (1 + tanh(√(2/π)·(h + 0.044715·h³)))``, against the models' exact ``h·Φ(h)``. The two differ
by at most 4.7e-4 (at h ≈ ±2.7); after ViT-H's ``fc2`` (K = 5120) the difference is ≈ 2e-4 of the output's norm,
8× below what autocast's bf16 rounding of the activation already changes there
(``tests/test_linear_gelu.py::test_tanh_form_is_below_bf16_rounding``).

Forward only: ``aten._addmm_activation`` has no derivative, and a backward would need the pre-activation that the
epilogue never writes. A call that autograd would record raises ``ValueError``; :class:`~stop_kernels.models.vit.MLP`
takes this path only where autograd records nothing.

Backends. CUDA: ``aten._addmm_activation(b, x, Wᵀ, use_gelu=True)``: cuBLASLt with the fused epilogue where it
applies (ATen's conditions: a 1-D bias, contiguous operands, more than one row and column), else a plain GEMM
followed by an in-place tanh GELU, the same values. Elsewhere: the reference twin
:func:`linear_gelu_reference` (``F.linear`` then ``F.gelu(approximate="tanh")``): ATen's CPU kernel of
``_addmm_activation`` applies the exact GELU, so it is not called there. Under autocast the inputs are cast to the
autocast dtype, as autocast casts a ``linear``'s (``_addmm_activation`` is not on its list).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _checks as chk

__all__ = ["linear_gelu", "linear_gelu_reference", "records_grad"]


def records_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd would record an op over ``tensors`` (grad mode on and one of them requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear_gelu_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The twin: ``F.gelu(F.linear(x, weight, bias), approximate="tanh")``, differentiable, any device and dtype."""
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def _check(x, weight, bias) -> None:
    chk.float_tensor("x", x, min_ndim=1)
    chk.float_tensor("weight", weight, ndim=2)
    if bias is not None:
        chk.float_tensor("bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected shape [{weight.shape[0]}] (weight's [D, E] = {list(weight.shape)}), "
                             f"got {tuple(bias.shape)}")
    chk.same_device(x=x, weight=weight, bias=bias)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: expected last dim {weight.shape[1]} (weight's [D, E] = {list(weight.shape)}), "
                         f"got shape {tuple(x.shape)}")
    if not chk.autocast_on(x.device.type):
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.dtype != x.dtype:
                raise TypeError(f"{name}: expected dtype {str(x.dtype).replace('torch.', '')} (that of x; outside "
                                f"autocast the three share one), got {str(t.dtype).replace('torch.', '')}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if records_grad(t):
            raise ValueError(f"{name}: requires grad, and linear_gelu is forward only (the fused epilogue keeps no "
                             f"pre-activation for a backward); call it under torch.no_grad() or use "
                             f"linear_gelu_reference")


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``GELU_tanh(x·weightᵀ + bias)``: ``x [..., E]``, ``weight [D, E]`` (as ``nn.Linear(E, D)`` holds it),
    ``bias [D]`` or None → ``[..., D]``. On CUDA one cuBLASLt GEMM with the bias and GELU in its epilogue; elsewhere
    :func:`linear_gelu_reference`. Forward only (see the module docstring): ``ValueError`` naming the argument
    when one requires grad under grad mode."""
    _check(x, weight, bias)
    if x.device.type != "cuda":
        return linear_gelu_reference(x, weight, bias)
    if chk.autocast_on("cuda"):
        dt = torch.get_autocast_dtype("cuda")
        x, weight = x.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    if bias is None:  # the op adds a [D] vector: zeros (D elements, beside a [T, D] output)
        bias = x.new_zeros(weight.shape[0])
    out = torch.ops.aten._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])
