"""The StoP noise stream: one definition shared by the Triton kernels, the CUDA kernels and the CPU reference.

The fused ops never store the noise n; they regenerate it wherever it is needed (forward tile,
backward tile, CUDA or Triton). They agree because every implementation evaluates this same
function of (seed, row, column):

* Per call, one 64-bit ``seed`` is drawn from a CPU ``torch.Generator`` (the default one when none
  is given, so ``torch.manual_seed`` makes runs reproducible and consecutive calls draw independent
  noise; no device synchronisation is needed). Key ``(k0, k1) = (seed & 0xffffffff, seed >> 32)``.
* The noise is an ``[R, E]`` matrix (R = number of masked tokens, flattened row-major over ``idx``).
  Columns are split in four quarters of width ``E4 = ceil(E / 4)``. For row ``r`` and quarter
  column ``q`` in ``[0, E4)``, Philox4x32-10 with counter ``(r, q, 0, 0)`` and the key gives four
  words ``x0..x3``.
* Each word becomes a uniform in (0, 1) exactly representable in float32:
  ``u = (x >> 8) · 2⁻²⁴ + 2⁻²⁵``.
* Box–Muller on (x0, x1) and (x2, x3):
  ``n[r, q]        = σ·sqrt(-2 ln u0)·cos(2π u1)``
  ``n[r, q + E4]   = σ·sqrt(-2 ln u0)·sin(2π u1)``
  ``n[r, q + 2E4]  = σ·sqrt(-2 ln u2)·cos(2π u3)``
  ``n[r, q + 3E4]  = σ·sqrt(-2 ln u2)·sin(2π u3)``
  (columns ≥ E are dropped). The quarter layout lets a GEMM kernel consume all four words of a
  Philox call as four ordinary K-slices, with no interleaving, whatever its block sizes.

:func:`philox_normal` below is the float64 NumPy twin used by tests and by the CPU fallback.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF
SEED_BITS = 62  # seeds in [0, 2**62): non-negative in int64 on every backend


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """Draw the per-call Philox seed from a CPU generator (the default one when None)."""
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != "cpu":
            raise ValueError(f"generator: expected a CPU torch.Generator (the seed is drawn on the host), "
                             f"got one on {generator.device}")
    return int(torch.randint(0, 2 ** SEED_BITS, (), generator=generator, dtype=torch.int64))


def quarter_width(E: int) -> int:
    return (E + 3) // 4


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 on NumPy uint64 arrays holding 32-bit values."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & MASK32 for c in (c0, c1, c2, c3))
    k0 = np.uint64(k0 & MASK32)
    k1 = np.uint64(k1 & MASK32)
    m0, m1, w0, w1 = (np.uint64(v) for v in (PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1))
    mask = np.uint64(MASK32)
    s32 = np.uint64(32)
    for _ in range(rounds):
        p0 = m0 * c0  # < 2**64: exact in uint64
        p1 = m1 * c2
        hi0, lo0 = p0 >> s32, p0 & mask
        hi1, lo1 = p1 >> s32, p1 & mask
        c0, c1, c2, c3 = (hi1 ^ c1 ^ k0) & mask, lo1, (hi0 ^ c3 ^ k1) & mask, lo0
        k0 = (k0 + w0) & mask
        k1 = (k1 + w1) & mask
    return c0, c1, c2, c3


def uniform_from_bits(x: np.ndarray) -> np.ndarray:
    """32 random bits → a float32-exact uniform in (0, 1): (x >> 8)·2⁻²⁴ + 2⁻²⁵."""
    return (x >> np.uint64(8)).astype(np.float64) * 2.0 ** -24 + 2.0 ** -25


def philox_normal(seed: int, rows: int, E: int, noise_std: float = 1.0, row_start: int = 0) -> torch.Tensor:
    """The noise matrix ``[rows, E]`` (float64) for rows ``row_start … row_start+rows-1`` of a call with ``seed``."""
    E4 = quarter_width(E)
    r = np.arange(row_start, row_start + rows, dtype=np.uint64)[:, None]
    q = np.arange(E4, dtype=np.uint64)[None, :]
    r, q = np.broadcast_arrays(r, q)
    zero = np.zeros_like(r)
    x0, x1, x2, x3 = philox4x32(r, q, zero, zero, seed & MASK32, (seed >> 32) & MASK32)
    u0, u1, u2, u3 = (uniform_from_bits(x) for x in (x0, x1, x2, x3))
    rad01 = np.sqrt(-2.0 * np.log(u0))
    rad23 = np.sqrt(-2.0 * np.log(u2))
    two_pi = 2.0 * np.pi
    full = np.concatenate([rad01 * np.cos(two_pi * u1), rad01 * np.sin(two_pi * u1),
                           rad23 * np.cos(two_pi * u3), rad23 * np.sin(two_pi * u3)], axis=1)
    return torch.from_numpy(full[:, :E] * noise_std)


# ----------------------------------------------------------------------------------------------
# Triton device functions: the same stream, generated in registers inside the fused kernels.
