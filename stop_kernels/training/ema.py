"""Exponential moving average of the context encoder into the target encoder.

``t ← m·t + (1 − m)·o`` for every parameter pair, written as ``t ← t + (1 − m)·(o − t)``: one foreach
lerp over all tensors (one pass reading t and o and writing t — 12 bytes per fp32 parameter, instead of
20 for a multiply then an add — and a few multi-tensor launches instead of two launches per parameter). Under FSDP2 the parameters are
DTensors sharded identically for both encoders, so the update runs on the local shards with no
communication.
"""
from __future__ import annotations

from typing import Iterable, List

import torch


def _local(p: torch.Tensor) -> torch.Tensor:
    """The local storage of a parameter: the shard of a DTensor, the tensor itself otherwise."""
    d = p.data if isinstance(p, torch.nn.Parameter) else p
    local = getattr(d, "_local_tensor", None)  # DTensor: its local shard, without an autograd op
    if local is not None:
        return local
    return d.to_local() if hasattr(d, "to_local") else d


@torch.no_grad()
def ema_update(target: Iterable[torch.Tensor], online: Iterable[torch.Tensor], momentum: float) -> None:
    """``t ← m·t + (1 − m)·o`` for every pair, as one foreach lerp (works on local FSDP shards)."""
    t: List[torch.Tensor] = [_local(p) for p in target]
    o: List[torch.Tensor] = [_local(p) for p in online]
    if len(t) != len(o):
        raise ValueError(f"target: expected as many tensors as online ({len(o)}), got {len(t)}")
    if not t:
        return
    torch._foreach_lerp_(t, o, 1.0 - momentum)
