"""Attention dispatch used by the models (the Triton kernel lands here; see issue 4).

Layout ``[B, N, H, Dh]`` for q, k, v and the output.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import reference


def dispatch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
                       backend: Optional[str] = None) -> torch.Tensor:
    if backend == "reference":
        return reference.attention(q, k, v, scale=scale)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return o.transpose(1, 2)
