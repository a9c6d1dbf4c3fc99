"""The unfused StoP path of the official code, the baseline of the fused ops' benchmarks.

Written as the official I-JEPA+StoP predictor does it, with plain torch ops and no argument
validation (no host synchronisation, no graph break under torch.compile):

* context: ``x = F.linear(ctx, W, b)`` then ``x += pos[ctx_idx]`` (apply_masks-style gather of the
  positional table by the context indices);
* per target block k: ``n = torch.randn(B, Nt, E) * std``, ``F.linear(n, W, b) + pos[tgt_idx[k]]``;
* ``x.repeat(npred, 1, 1)`` and ``torch.cat`` along the tokens → ``[npred·B, Nc+Nt, D]``.

The masked rows alone, ``stop_embed``'s unfused peer (:func:`official_stop_embed`: randn + Linear + gather),
and the Triton ``stop_embed`` forced by name (:func:`triton_stop_embed`), for the ``stop_embed`` benchmarks
(``benchmarks/gpu_cuda.py``, ``bench_cuda.py``).

Also the setup the fused-op benchmarks share: the ViT-H/14 sizes (``SIZES``, issue 3's), :func:`make_inputs`
and the contenders (:func:`official` at ``SIGMA``, :func:`fused`, :func:`fused_trusted`).

Imported by ``benchmarks/gpu_stop_embed.py``, ``bench_stop_embed.py``, ``gpu_cuda.py``, ``bench_cuda.py`` and
``stop_host.py``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from _gpu_common import DEV, REHEARSE
from stop_kernels.devtools import VIT_H14_STOP_SIZES, predictor_input_case


def official_predictor_input(ctx: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: Sequence[torch.Tensor],
                             weight: torch.Tensor, bias: torch.Tensor, pos: torch.Tensor,
                             noise_std: float = 0.25) -> torch.Tensor:
    """``[npred·B, Nc+Nt, D]`` predictor input: rows k·B + b = context of b, then its k-th target block."""
    x = F.linear(ctx, weight, bias)
    x = x + pos[ctx_idx]                                         # [B, Nc, D]
    B = ctx.shape[0]
    E = weight.shape[1]
    masked = []
    for idx in tgt_idx:                                          # one target block at a time
        noise = torch.randn(B, idx.shape[1], E, device=ctx.device, dtype=x.dtype) * noise_std
        masked.append(F.linear(noise, weight, bias) + pos[idx])  # [B, Nt, D]
    npred = len(masked)
    x = x.repeat(npred, 1, 1)                                    # [npred·B, Nc, D]
    return torch.cat([x, torch.cat(masked, dim=0).to(x.dtype)], dim=1)


def official_stop_embed(pos: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        noise_std: float = 0.25) -> torch.Tensor:
    """``[..., M, D]`` StoP rows as the official code computes them: ``n ~ N(0, σ²)`` of ``[..., M, E]``
    from torch.randn in ψ's dtype, then ``Linear(n) + ψ[idx]``."""
    n = torch.randn(*idx.shape, weight.shape[1], device=pos.device, dtype=pos.dtype) * noise_std
    return F.linear(n, weight, bias) + pos[idx]


def triton_stop_embed(pos, idx, weight, bias, noise_std: float = 0.25) -> torch.Tensor:
    """``stop_kernels.stop_embed`` on its Triton kernels, named: an error is the row's error, never a
    fallback to "auto" (the CUDA kernels where built), which would time them under Triton's name."""
    from stop_kernels.ops.stop_embed import stop_embed
    return stop_embed(pos, idx, weight, bias, noise_std=noise_std, backend="triton")


# ViT-H/14 sizes of the benchmarks (issue 3's: batch, target blocks, context / target tokens, encoder and
# predictor widths, positions); the noise std. A rehearsal (_gpu_common) runs toy sizes on the CPU.
SIZES = dict(B=2, npred=2, Nc=5, Nt=3, E=40, D=24, P=16) if REHEARSE else dict(VIT_H14_STOP_SIZES)
B, NPRED, NC, NT, E, D, P = SIZES.values()
SIGMA = 0.25


def make_inputs(seed=0):
    """``(ctx, ctx_idx, tgt, w, b, pos)`` at :data:`SIZES` on DEV (the GPU; the CPU in a rehearsal):
    ``stop_kernels.devtools.predictor_input_case``."""
    return predictor_input_case(**SIZES, seed=seed, device=DEV)


def official(ctx, ctx_idx, tgt, w, b, pos):
    """The official unfused path at SIGMA: randn noise, Linear, gather, repeat, cat; no validation, no host syncs."""
    return official_predictor_input(ctx, ctx_idx, tgt, w, b, pos, SIGMA)


def fused(ctx, ctx_idx, tgt, w, b, pos):
    """The fused Triton op through the public function (with its index range checks)."""
    from stop_kernels.ops.predictor_input import assemble_predictor_input
    return assemble_predictor_input(ctx, ctx_idx, tgt, w, b, pos, noise_mode="learned", noise_std=SIGMA,
                                    backend="triton")


def fused_trusted(ctx, ctx_idx, tgt, w, b, pos):
    """:func:`fused` inside trusted_device_indices(): the index range checks (host syncs) skipped."""
    from stop_kernels import trusted_device_indices
    with trusted_device_indices():
        return fused(ctx, ctx_idx, tgt, w, b, pos)
