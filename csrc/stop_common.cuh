// Shared by the StoP CUDA kernels (stop_embed.cu: forward + noise, stop_embed_bwd.cu: backward):
// operand policies (bf16 / fp16 / 3xTF32 WMMA), 16-byte memory helpers, cp.async wrappers, the
// warp-level tile MMA, the Philox noise tile (make_noise_tile), and small host-side checks.
//
// Tensor cores through WMMA (sm_80+): bf16 / fp16 operands with fp32 accumulation; fp32 inputs use
// 3xTF32 (a = a_hi + a_lo, a·b ≈ a_hi·b_hi + a_hi·b_lo + a_lo·b_hi), which keeps ~fp32 accuracy.
#pragma once

// (ATen/cuda/CUDAContext.h is avoided on purpose: it pulls in cuBLAS / cuSPARSE headers that a bare
// nvcc install may lack; the stream and device queries below need only c10/cuda.)
// Light per-operator ATen headers (not ATen/ATen.h): they halve the host-side compile time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>

#include "philox.cuh"

namespace stop_kernels {
namespace detail {

using namespace nvcuda;

constexpr int kThreads = 256;  // 8 warps per block, every kernel below
constexpr int kWarps = kThreads / 32;

// The kernels need bf16 / tf32 WMMA (sm_80+). For older targets the bodies compile to a trap: the host
// launcher refuses pre-sm_80 GPUs (see check_device), and a kernel body compiled away must never run
// silently, leaving its outputs unwritten (today such a build already stops at the tf32 WMMA types).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define SK_MMA_OK 1
#else
#define SK_MMA_OK 0
#endif

// ------------------------------------------------------------------------------------------------
// Operand policies: element type in global/shared memory, WMMA shape and the conversions.
// ------------------------------------------------------------------------------------------------
struct OpBF16 {
  using T = __nv_bfloat16;
  static constexpr int K = 16;       // WMMA m16n16k16
  static constexpr bool kSplit = false;
  static constexpr int kPad = 8;     // smem row padding in elements (16 bytes)
  template <class L> using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, L>;
  template <class L> using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, L>;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  static __device__ __forceinline__ T from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ float to_float(T x) { return __bfloat162float(x); }
};

struct OpF16 {
  using T = __half;
  static constexpr int K = 16;
  static constexpr bool kSplit = false;
  static constexpr int kPad = 8;
  template <class L> using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, L>;
  template <class L> using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, L>;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  static __device__ __forceinline__ T from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ float to_float(T x) { return __half2float(x); }
};

struct OpF32 {  // 3xTF32
  using T = float;
  static constexpr int K = 8;        // WMMA m16n16k8 tf32
  static constexpr bool kSplit = true;
  static constexpr int kPad = 4;
  template <class L> using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, L>;
  template <class L> using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, L>;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
  static __device__ __forceinline__ T from_float(float x) { return x; }
  static __device__ __forceinline__ float to_float(T x) { return x; }
};

template <class T> struct OpFor;
template <> struct OpFor<at::BFloat16> { using type = OpBF16; };
template <> struct OpFor<at::Half> { using type = OpF16; };
template <> struct OpFor<float> { using type = OpF32; };

// ------------------------------------------------------------------------------------------------
// Small device helpers
// ------------------------------------------------------------------------------------------------
// 16-byte asynchronous global → shared copy; src_bytes = 0 zero-fills the destination.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
#if SK_MMA_OK && defined(__CUDA_ARCH__)
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if SK_MMA_OK && defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if SK_MMA_OK && defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// 8 consecutive elements ↔ 8 floats, with one (16-bit types) or two (fp32) 16-byte accesses.
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float f[8]) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}
__device__ __forceinline__ void load8(const __half* p, float f[8]) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __half22float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}
__device__ __forceinline__ void load8(const float* p, float f[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
  f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}
__device__ __forceinline__ void store8(__nv_bfloat16* p, const float f[8]) {
  uint4 v;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  *reinterpret_cast<uint4*>(p) = v;
}
__device__ __forceinline__ void store8(__half* p, const float f[8]) {
  uint4 v;
  __half2* h = reinterpret_cast<__half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
  *reinterpret_cast<uint4*>(p) = v;
}
__device__ __forceinline__ void store8(float* p, const float f[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
}

// Offsets of element (i, k) of A and (k, j) of B in a WMMA operand stored with the given layout.
template <class L> __device__ __forceinline__ int off_a(int i, int k, int ld) {
  return std::is_same<L, wmma::row_major>::value ? i * ld + k : k * ld + i;
}
template <class L> __device__ __forceinline__ int off_b(int k, int j, int ld) {
  return std::is_same<L, wmma::row_major>::value ? k * ld + j : j * ld + k;
}

// One warp's FM × FN fragment tile: acc += A[16FM × kv] · B[kv × 16FN] from shared memory.
// a / b point at the warp's tile origin; fragments of B whose first column is >= n_valid are
// skipped (warp-uniform), as are fragments of A whose first row is >= m_valid.
template <class Op, class LA, class LB, int FM, int FN>
__device__ __forceinline__ void warp_tile_mma(typename Op::Acc (&acc)[FM][FN], const typename Op::T* a, int lda,
                                              const typename Op::T* b, int ldb, int kv, int m_valid,
                                              int n_valid) {
#if SK_MMA_OK
  using FA = typename Op::template FragA<LA>;
  using FB = typename Op::template FragB<LB>;
  for (int kk = 0; kk < kv; kk += Op::K) {
    FA fa[FM];
    FA fa_lo[Op::kSplit ? FM : 1];
#pragma unroll
    for (int i = 0; i < FM; ++i) {
      if (16 * i >= m_valid) continue;
      wmma::load_matrix_sync(fa[i], a + off_a<LA>(16 * i, kk, lda), lda);
      if constexpr (Op::kSplit) {  // a = hi + lo, both tf32
#pragma unroll
        for (int t = 0; t < fa[i].num_elements; ++t) {
          const float x = fa[i].x[t];
          const float h = wmma::__float_to_tf32(x);
          fa[i].x[t] = h;
          fa_lo[i].x[t] = wmma::__float_to_tf32(x - h);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < FN; ++j) {
      if (16 * j >= n_valid) continue;
      FB fb;
      wmma::load_matrix_sync(fb, b + off_b<LB>(kk, 16 * j, ldb), ldb);
      if constexpr (Op::kSplit) {
        FB fb_lo;
#pragma unroll
        for (int t = 0; t < fb.num_elements; ++t) {
          const float x = fb.x[t];
          const float h = wmma::__float_to_tf32(x);
          fb.x[t] = h;
          fb_lo.x[t] = wmma::__float_to_tf32(x - h);
        }
#pragma unroll
        for (int i = 0; i < FM; ++i) {
          if (16 * i >= m_valid) continue;
          // small terms first, then the main product
          wmma::mma_sync(acc[i][j], fa_lo[i], fb, acc[i][j]);
          wmma::mma_sync(acc[i][j], fa[i], fb_lo, acc[i][j]);
          wmma::mma_sync(acc[i][j], fa[i], fb, acc[i][j]);
        }
      } else {
#pragma unroll
        for (int i = 0; i < FM; ++i) {
          if (16 * i >= m_valid) continue;
          wmma::mma_sync(acc[i][j], fa[i], fb, acc[i][j]);
        }
      }
    }
  }
#endif
}

// The noise tile shared by the forward (stop_embed.cu, A operand) and the dW backward
// (stop_embed_bwd.cu, B operand): ROWS rows from row0 and BQ quarter columns from q0 into s,
// s[m * ld + c * BQ + j] = n[row0 + m, c·E4 + q0 + j] for quarter c = 0..3, one Philox call per (m, j)
// giving the four quarters (zero for rows >= r_end, quarter columns >= E4 and columns >= E).
template <class Op, int ROWS, int BQ>
__device__ __forceinline__ void make_noise_tile(typename Op::T* s, int ld, int64_t row0, int64_t r_end, int q0,
                                                int E, int E4, uint32_t k0, uint32_t k1, float sigma) {
  constexpr int CALLS = ROWS * BQ;
#pragma unroll
  for (int t = threadIdx.x; t < CALLS; t += kThreads) {
    const int j = t % BQ;
    const int m = t / BQ;
    const int64_t r = row0 + m;
    const int q = q0 + j;
    float n[4] = {0.f, 0.f, 0.f, 0.f};
    if (r < r_end && q < E4) stop_noise4(static_cast<uint32_t>(r), static_cast<uint32_t>(q), k0, k1, sigma, n);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const float v = (c * E4 + q < E) ? n[c] : 0.f;
      s[m * ld + c * BQ + j] = Op::from_float(v);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host helpers
// ------------------------------------------------------------------------------------------------
inline int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

// Whether `bytes` of dynamic shared memory fit one block on `device` (its opt-in limit: 227 KB on Hopper and
// A100, 99 KB on sm_86 / sm_89, where the widest fp32 tiles do not fit and a narrower one is launched instead).
inline bool smem_fits(int bytes, int device) {
  return bytes <= device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
}

inline void check_device(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got ", t.device());
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor, t.get_device());
  TORCH_CHECK(major >= 8, "stop_kernels._C needs a GPU of compute capability 8.0 or newer (bf16/tf32 ",
              "tensor cores), got ", major, ".", device_attribute(cudaDevAttrComputeCapabilityMinor, t.get_device()));
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <class Kernel>
inline void set_smem(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
}

inline void check_common(const at::Tensor& idx, double noise_std) {
  TORCH_CHECK(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong,
              "idx: expected an int32 or int64 tensor, got ", idx.scalar_type());
  TORCH_CHECK(noise_std >= 0, "noise_std: expected a value >= 0, got ", noise_std);
  TORCH_CHECK(idx.numel() < (int64_t(1) << 32), "idx: at most 2^32 rows (the Philox row counter is 32-bit), got ",
              idx.numel());
}


}  // namespace detail
}  // namespace stop_kernels
