"""Exponential moving average of the context encoder into the target encoder."""
from __future__ import annotations

from typing import Iterable

import torch


@torch.no_grad()
def ema_update(target: Iterable[torch.Tensor], online: Iterable[torch.Tensor], momentum: float) -> None:
    """``t ← m·t + (1 − m)·o`` for every pair, in two foreach kernels (works on local FSDP shards)."""
    t = [p.data if not hasattr(p.data, "to_local") else p.data.to_local() for p in target]
    o = [p.data if not hasattr(p.data, "to_local") else p.data.to_local() for p in online]
    if len(t) != len(o):
        raise ValueError(f"target: expected as many tensors as online ({len(o)}), got {len(t)}")
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, o, alpha=1.0 - momentum)
