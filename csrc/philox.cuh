// The StoP noise stream on the device (and on the host, for the CPU emulation test).
//
// This is the CUDA twin of stop_kernels/ops/philox.py; the contract is that module's docstring and
// its float64 NumPy function philox_normal(seed, rows, E, noise_std, row_start):
//
//   key      (k0, k1) = (seed & 0xffffffff, seed >> 32)
//   counter  (r, q, 0, 0)   r = flattened token row, q = quarter column in [0, E4), E4 = ceil(E / 4)
//   Philox4x32-10 → words x0..x3
//   uniform  u = (2·(x >> 9) + 1) · 2^-24                    (in (0, 1), exact in float32)
//   n[r, q]       = σ · sqrt(-2 ln u0) · cos(2π u1)
//   n[r, q +  E4] = σ · sqrt(-2 ln u0) · sin(2π u1)
//   n[r, q + 2E4] = σ · sqrt(-2 ln u2) · cos(2π u3)
//   n[r, q + 3E4] = σ · sqrt(-2 ln u2) · sin(2π u3)         (columns >= E dropped by the caller)
//
// Precision (no fast-math anywhere): u = v·2^-24 with v odd and v < 2^24, so u is exact in float32
// and every backend starts Box–Muller from the same value. Then
//   * ln u:    logf (precise, ≤ 1 ulp);  radius = sqrtf(-2 ln u) · σ  (IEEE sqrt: nvcc's default
//              -prec-sqrt=true), σ applied to the radius as the Triton kernel does;
//   * angle:   sincospif(2u) (precise, ≤ 1 ulp) rather than cosf/sinf(2π·u): no rounding of the product
//              by 2π. 2u = v·2^-23 with v = 2·(x >> 9) + 1 < 2^24 is exact, and it is shifted by the
//              period 2 into (-1, 0) when it exceeds 1 so that the argument stays small. The Triton
//              kernel rounds θ = 2π·u to float32 first (≤ 2.4e-7 rad) and, on a GPU, takes the SFU's
//              cos/sin (abs. error ≤ 2^-20.5, ops/philox.py), so the two agree to ≤ ~4e-6·σ.
//   n = radius · cos / sin.
//   On the host (emulation test) sincospif is replaced by double-precision sin/cos(π·x), rounded.
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define SK_HD __host__ __device__ __forceinline__
#else
#define SK_HD inline
#endif

namespace stop_kernels {

// Philox4x32-10 constants (Salmon et al., SC'11; identical to philox.py: PHILOX_M0 … PHILOX_ROUNDS).
constexpr uint32_t PHILOX_M0 = 0xD2511F53u;
constexpr uint32_t PHILOX_M1 = 0xCD9E8D57u;
constexpr uint32_t PHILOX_W0 = 0x9E3779B9u;
constexpr uint32_t PHILOX_W1 = 0xBB67AE85u;
constexpr int PHILOX_ROUNDS = 10;
// Uniform mapping u = (2·(x >> UNIFORM_SHIFT) + 1) · 2^-24.
constexpr int UNIFORM_SHIFT = 9;

struct Philox4 {
  uint32_t x0, x1, x2, x3;
};

// High 32 bits of the 64-bit product a·b.
SK_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32-10 on counter (c0, c1, c2, c3) with key (k0, k1): 10 rounds, key bumped after each round.
SK_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < PHILOX_ROUNDS; ++i) {
    const uint32_t hi0 = mulhi32(PHILOX_M0, c0), lo0 = PHILOX_M0 * c0;
    const uint32_t hi1 = mulhi32(PHILOX_M1, c2), lo1 = PHILOX_M1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += PHILOX_W0;
    k1 += PHILOX_W1;
  }
  return Philox4{c0, c1, c2, c3};
}

// The odd integer v = 2·(x >> 9) + 1 < 2^24 of u = v·2^-24 (exactly representable in float32).
SK_HD int32_t uniform_odd(uint32_t x) { return static_cast<int32_t>(((x >> UNIFORM_SHIFT) << 1) | 1u); }

// u = v · 2^-24 in (0, 1), exact.
SK_HD float uniform_from_bits(uint32_t x) { return static_cast<float>(uniform_odd(x)) * 5.9604644775390625e-08f; }

// ln(u), precise.
SK_HD float log_uniform(uint32_t x) { return logf(uniform_from_bits(x)); }

// sin(2πu), cos(2πu): 2u = v·2^-23 ∈ (0, 2), exact; shifted by the period 2 into (-1, 0) above 1.
SK_HD void sincos_2pi_uniform(uint32_t x, float* s, float* c) {
  int32_t v = uniform_odd(x);
  if (v >= (1 << 23)) v -= (1 << 24);                               // 2u - 2 ∈ (-1, 0): same sin / cos
  const float a = static_cast<float>(v) * 1.1920928955078125e-07f;  // · 2^-23 (exact, |v| < 2^23)
#if defined(__CUDA_ARCH__)
  sincospif(a, s, c);
#else
  const double t = 3.14159265358979323846 * static_cast<double>(a);
  *s = static_cast<float>(std::sin(t));
  *c = static_cast<float>(std::cos(t));
#endif
}

// The four noise values of one Philox call: columns q, q + E4, q + 2E4, q + 3E4 of row r
// (σ = sigma applied). The caller drops the columns >= E.
SK_HD void stop_noise4(uint32_t r, uint32_t q, uint32_t k0, uint32_t k1, float sigma, float n[4]) {
  const Philox4 w = philox4x32_10(r, q, 0u, 0u, k0, k1);
  const float rad01 = sqrtf(-2.0f * log_uniform(w.x0)) * sigma;
  const float rad23 = sqrtf(-2.0f * log_uniform(w.x2)) * sigma;
  float s1, c1, s3, c3;
  sincos_2pi_uniform(w.x1, &s1, &c1);
  sincos_2pi_uniform(w.x3, &s3, &c3);
  n[0] = rad01 * c1;
  n[1] = rad01 * s1;
  n[2] = rad23 * c3;
  n[3] = rad23 * s3;
}

// Split a 64-bit seed into the Philox key.
SK_HD void seed_to_key(uint64_t seed, uint32_t* k0, uint32_t* k1) {
  *k0 = static_cast<uint32_t>(seed & 0xffffffffull);
  *k1 = static_cast<uint32_t>(seed >> 32);
}

}  // namespace stop_kernels
