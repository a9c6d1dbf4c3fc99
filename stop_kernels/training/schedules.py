"""Training schedules of I-JEPA, as pure functions of the step (so a resumed run needs no state).

Step ``i`` (0-based) of training corresponds to the official schedulers after ``i + 1`` calls of
``.step()``; ``total`` is the number of optimizer steps of the whole run.
"""
from __future__ import annotations

import math


def lr_at(step: int, *, warmup: int, total: int, start_lr: float, ref_lr: float, final_lr: float,
          hold: int = 0) -> float:
    """Linear warm-up from ``start_lr`` to ``ref_lr`` over ``warmup`` steps, then cosine to ``final_lr``.

    ``hold`` > 0: from step count ``hold`` on, the learning rate stays at the cosine's value there (the
    official StoP schedule's ``fix_lr_thres`` with ``fix_lr_strategy: const``, in steps)."""
    s = step + 1
    if s < warmup:
        return start_lr + s / max(1, warmup) * (ref_lr - start_lr)
    if 0 < hold <= s:
        s = hold
    progress = (s - warmup) / max(1, total - warmup)
    return max(final_lr, final_lr + (ref_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def wd_at(step: int, *, total: int, ref_wd: float, final_wd: float, hold: int = 0) -> float:
    """Cosine from ``ref_wd`` to ``final_wd`` (clamped at ``final_wd``); ``hold`` > 0: constant from step count
    ``hold`` on, at the cosine's value there (the official StoP ``fix_wd_thres`` with ``const``)."""
    s = step + 1
    if 0 < hold <= s:
        s = hold
    progress = s / max(1, total)
    wd = final_wd + (ref_wd - final_wd) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(final_wd, wd) if final_wd <= ref_wd else min(final_wd, wd)


def momentum_at(step: int, *, total: int, start: float, end: float) -> float:
    """EMA momentum, linear from ``start`` to ``end`` over the run."""
    return start + step * (end - start) / max(1, total)
