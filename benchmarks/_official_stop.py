"""The unfused StoP path of the official code, the baseline of the fused ops' benchmarks.

Written as the official I-JEPA+StoP predictor does it, with plain torch ops and no argument
validation (no host synchronisation, no graph break under torch.compile):

* context: ``x = F.linear(ctx, W, b)`` then ``x += pos[ctx_idx]`` (apply_masks-style gather of the
  positional table by the context indices);
* per target block k: ``n = torch.randn(B, Nt, E) * std``, ``F.linear(n, W, b) + pos[tgt_idx[k]]``;
* ``x.repeat(npred, 1, 1)`` and ``torch.cat`` along the tokens → ``[npred·B, Nc+Nt, D]``.

Imported by ``benchmarks/gpu_stop_embed.py`` and ``benchmarks/bench_stop_embed.py``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


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
