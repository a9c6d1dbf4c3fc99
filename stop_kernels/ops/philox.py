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
* Each word becomes a uniform in (0, 1) exactly representable in float32 (an odd multiple of
  2⁻²⁴ needs at most 24 significant bits): ``u = (2·(x >> 9) + 1) · 2⁻²⁴``, so every backend starts
  Box–Muller from the same float32 value and differs only by the rounding of log, sqrt, cos, sin.
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

from .. import _checks as chk
from ..backends import vmap_randomness_different

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF
SEED_BITS = 62  # seeds in [0, 2**62): non-negative in int64 on every backend


def check_generator(generator: Optional[torch.Generator]) -> None:
    """``generator`` is None or a CPU torch.Generator (the seed is drawn on the host)."""
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != "cpu":
            raise ValueError(f"generator: expected a CPU torch.Generator (the seed is drawn on the host), "
                             f"got one on {generator.device}")


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """Draw the per-call Philox seed from a CPU generator (the default one when None).

    On the host whatever ``torch.set_default_device`` says: a CUDA default device would otherwise draw
    from the CUDA generator and synchronise on every call."""
    check_generator(generator)
    if torch._C._are_functorch_transforms_active() and vmap_randomness_different():
        raise NotImplementedError(
            "torch.func.vmap(..., randomness='different') is not supported by the StoP noise: each call draws one "
            "Philox seed on the host, so the vmapped samples cannot get independent noise; use randomness='same' "
            "(every sample gets the same noise) or call the op once per sample")
    return int(torch.randint(0, 2 ** SEED_BITS, (), generator=generator, dtype=torch.int64, device="cpu"))


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
    """32 random bits → a float32-exact uniform in (0, 1): (2·(x >> 9) + 1)·2⁻²⁴."""
    return ((x >> np.uint64(9)) * np.uint64(2) + np.uint64(1)).astype(np.float64) * 2.0 ** -24


@chk.eager_under_compile  # NumPy on uint64: Dynamo cannot trace it (fake uint64 bitwise ops), so the CPU
# fallback of stop_embed / assemble_predictor_input crashed inside torch.compile'd code
def philox_normal(seed: int, rows: int, E: int, noise_std: float = 1.0, row_start: int = 0) -> torch.Tensor:
    """The noise matrix ``[rows, E]`` (float64) for rows ``row_start … row_start+rows-1`` of a call with ``seed``;
    under ``torch.compile`` computed eagerly (one graph break)."""
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
# ----------------------------------------------------------------------------------------------
import triton  # noqa: E402  (kept below the NumPy twin, which needs no Triton)
import triton.language as tl  # noqa: E402
from triton.language.extra import libdevice  # noqa: E402

from ..backends import triton_interpreting  # noqa: E402


def seed_key_args(seed: int):
    """The Philox key of ``seed`` as two signed int32 kernel arguments ``(k0, k1)``.

    Passing both halves as int32 (bit patterns of the uint32 key words) keeps one kernel
    signature for every seed; the kernels bitcast them back to uint32.
    """
    def as_i32(v: int) -> int:
        v &= MASK32
        return v - (1 << 32) if v >= (1 << 31) else v
    return as_i32(seed), as_i32(seed >> 32)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 blocks: counter ``(c0, c1, c2, c3)``, key ``(k0, k1)`` → four words."""
    for _ in tl.static_range(10):
        _c0, _c2 = c0, c2
        c0 = tl.umulhi(_c2, 0xCD9E8D57) ^ c1 ^ k0   # hi(M1·c2) ^ c1 ^ k0
        c2 = tl.umulhi(_c0, 0xD2511F53) ^ c3 ^ k1   # hi(M0·c0) ^ c3 ^ k1
        c1 = _c2 * 0xCD9E8D57                        # lo(M1·c2)
        c3 = _c0 * 0xD2511F53                        # lo(M0·c0)
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def uniform01(x):
    """uint32 bits → float32 uniform in (0, 1): (2·(x >> 9) + 1)·2⁻²⁴, exact (the odd integer < 2²⁴)."""
    return ((x >> 9) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def normal_quarters(rows, cols, key0, key1, sigma):
    """The four quarter tiles of the noise at ``rows`` ``[BM, 1]`` × quarter columns ``cols`` ``[1, BK]``.

    ``key0``/``key1`` are the int32 kernel arguments of :func:`seed_key_args`. Returns float32
    ``(n[:, q], n[:, q+E4], n[:, q+2E4], n[:, q+3E4])``, each ``[BM, BK]``, scaled by ``sigma``.
    One Philox call per element; nothing is read from or written to memory.
    """
    c0 = (rows + cols * 0).to(tl.uint32, bitcast=True)
    c1 = (cols + rows * 0).to(tl.uint32, bitcast=True)
    zero = c0 * 0
    k0 = key0.to(tl.uint32, bitcast=True)
    k1 = key1.to(tl.uint32, bitcast=True)
    x0, x1, x2, x3 = philox4x32_10(c0, c1, zero, zero, k0, k1)
    rad01 = tl.sqrt(-2.0 * tl.log(uniform01(x0))) * sigma
    rad23 = tl.sqrt(-2.0 * tl.log(uniform01(x2))) * sigma
    c1, s1 = _cos_sin_2pi(uniform01(x1))
    c3, s3 = _cos_sin_2pi(uniform01(x3))
    return rad01 * c1, rad01 * s1, rad23 * c3, rad23 * s3


# On the GPU the angle's cos / sin use the SFU approximations (sin.approx / cos.approx, absolute
# error ≤ 2⁻²⁰·⁵ on [-π, π], i.e. ≤ 4e-6·σ on n: inside the stream's 1e-5·σ tolerance). libdevice's
# precise cosf / sinf cost ~25 instructions each plus a Payne–Hanek slow path with a local-memory
# stack frame (four per Philox call; ptxas, sm_90a). The interpreter has no libdevice and runs the
# precise functions on the same reduced angle.
_FAST_TRIG = tl.constexpr(not triton_interpreting())


@triton.jit
def _cos_sin_2pi(u):
    """(cos 2πu, sin 2πu) for u in (0, 1), evaluated at the equal angle 2π(u − [u > ½]) ∈ (−π, π].

    u − 1 is exact in float32 for u ≥ ½ (Sterbenz), so the reduction adds no rounding.
    """
    two_pi: tl.constexpr = 6.283185307179586
    th = two_pi * tl.where(u > 0.5, u - 1.0, u)
    if _FAST_TRIG:
        return libdevice.fast_cosf(th), libdevice.fast_sinf(th)
    else:
        return tl.cos(th), tl.sin(th)


# Integer arguments equal to 1 are specialised by Triton's JIT into compile-time constants, and a
# constexpr key has no ``.to(..., bitcast=True)``: seed 1 (key0 = 1) failed to compile on CUDA (the
# interpreter does not specialise). Every kernel that takes a Philox key therefore lists the key
# (and the other runtime scalars) in ``do_not_specialize``.
@triton.jit(do_not_specialize=["R", "E", "E4", "row_start", "key0", "key1", "sigma"])
def _philox_normal_kernel(out_ptr, R, E, E4, row_start, key0, key1, sigma,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Test kernel: write the ``[R, E]`` noise (the fused kernels never do this)."""
    # stage 1: this program's rows and quarter columns
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    # stage 2: generate the four quarter tiles in registers
    n0, n1, n2, n3 = normal_quarters(rows + row_start, cols, key0, key1, sigma)
    # stage 3: store each quarter at its columns q + j·E4 (masked to rows < R, q < E4, column < E)
    base = out_ptr + rows * E
    ok = (rows < R) & (cols < E4)
    tl.store(base + cols, n0, mask=ok & (cols < E))
    tl.store(base + cols + E4, n1, mask=ok & (cols + E4 < E))
    tl.store(base + cols + 2 * E4, n2, mask=ok & (cols + 2 * E4 < E))
    tl.store(base + cols + 3 * E4, n3, mask=ok & (cols + 3 * E4 < E))


def philox_normal_triton(seed: int, rows: int, E: int, noise_std: float = 1.0, row_start: int = 0,
                         device="cpu") -> torch.Tensor:
    """The Triton twin of :func:`philox_normal` (float32), materialised for tests only."""
    out = torch.empty((rows, E), dtype=torch.float32, device=device)
    E4 = quarter_width(E)
    BLOCK_M, BLOCK_K = 32, 32
    key0, key1 = seed_key_args(seed)
    grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(E4, BLOCK_K))
    # (the row counter is 32-bit, as philox_normal's: a start past 2**31 goes in as its int32 bit pattern)
    row_start = ((row_start & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000
    _philox_normal_kernel[grid](out, rows, E, E4, row_start, key0, key1, float(noise_std),
                                BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
    return out
