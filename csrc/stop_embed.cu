// StoP sampling op as CUDA kernels: out[r, :] = ψ[idx[r], :] + n[r, :] · Wᵀ + b, n ~ N(0, σ² I_E),
// with n generated in the kernel from the Philox stream of philox.cuh and never written to memory.
//
//   forward   stop_embed_fwd_kernel   GEMM  M = R rows, N = D, K = E (walked in quarter columns)
//   debug     stop_noise_kernel       writes the [R, E] noise itself (tests only)
//   backward  in stop_embed_bwd.cu;   shared device code in stop_common.cuh, the noise in philox.cuh
//
// Tensor cores through WMMA (sm_80+): bf16 / fp16 operands with fp32 accumulation; fp32 inputs use
// 3xTF32 (a = a_hi + a_lo, a·b ≈ a_hi·b_hi + a_hi·b_lo + a_lo·b_hi), which keeps ~fp32 accuracy.
//
// K walk in quarter columns: one Philox call (row r, quarter column q) yields the noise of columns
// q, q+E4, q+2E4 and q+3E4. A K step covers BKQ consecutive quarter columns q0 … q0+BKQ-1 and
// therefore 4·BKQ "virtual" K indices k = s·BKQ + j (s = quarter 0..3, j = 0..BKQ-1) whose real
// column is c = s·E4 + q0 + j. The noise tile and the weight tile are both laid out in that virtual
// order, so the MMA never needs to know about the permutation.
//
// No fast-math: precise logf, sqrtf and sincospif (see philox.cuh).
#include "stop_common.cuh"

namespace stop_kernels {
namespace {
using namespace detail;
using namespace nvcuda;

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------
// Block tile BM × BN of out, BM = 2 warps × 16·FM rows, BN = 4 warps × 16·FN columns.
// K step = BKQ quarter columns = 4·BKQ virtual K. FN ∈ {2, 4, 6} chosen on the host from D so
// that (for D ≤ 384) one block covers all of D and each noise value is generated exactly once.
constexpr int kFwdWarpsM = 2, kFwdWarpsN = 4, kFwdFM = 2, kFwdBKQ = 8;
constexpr int kFwdBM = kFwdWarpsM * 16 * kFwdFM;  // 64 rows
constexpr int kFwdKV = 4 * kFwdBKQ;               // 32 virtual K per step

template <class Op, int FN>
struct FwdSmem {
  using T = typename Op::T;
  static constexpr int BN = kFwdWarpsN * 16 * FN;
  static constexpr int LD = kFwdKV + Op::kPad;                   // row stride of sA and sB
  static constexpr int A_BYTES = kFwdBM * LD * sizeof(T);          // noise tile  [BM][LD]
  static constexpr int B_BYTES = BN * LD * sizeof(T);              // weight tile [BN][LD], ×2 buffers
  static constexpr int EPI_LD = 20;                                // epilogue scratch [16][20] fp32 / warp
  static constexpr int EPI_BYTES = kWarps * 16 * EPI_LD * sizeof(float);
  static constexpr int MAIN_BYTES = A_BYTES + 2 * B_BYTES;
  static constexpr int BYTES = MAIN_BYTES > EPI_BYTES ? MAIN_BYTES : EPI_BYTES;
};

// Stage the weight tile of K step (q0) into sB: sB[n][s·BKQ + j] = W[n0 + n, s·E4 + q0 + j]
// (zero outside [0, D) × [0, E) or q >= E4). vec: E % 32 == 0 and W 16-byte aligned, so every chunk
// of 8 columns is all in or all out of range and 16-byte aligned → cp.async (zero-fill when out).
template <class Op, int FN>
__device__ __forceinline__ void fwd_load_weight(typename Op::T* sB, const typename Op::T* __restrict__ W, int n0,
                                                int q0, int D, int E, int E4, bool vec) {
  using T = typename Op::T;
  using S = FwdSmem<Op, FN>;
  constexpr int BN = S::BN, LD = S::LD;
  if (vec) {
    // BN rows × 4 quarters × (BKQ / 8) chunks of 8 elements
    constexpr int CHUNKS = BN * 4 * (kFwdBKQ / 8);
    constexpr int PER = 8 * sizeof(T) / 16;  // 16-byte copies per chunk (1 for 16-bit, 2 for fp32)
    for (int c = threadIdx.x; c < CHUNKS; c += kThreads) {
      const int jc = (c % (kFwdBKQ / 8)) * 8;
      const int s = (c / (kFwdBKQ / 8)) % 4;
      const int n = c / (4 * (kFwdBKQ / 8));
      const int q = q0 + jc;
      const int col = s * E4 + q;
      const bool ok = (n0 + n < D) && (q < E4) && (col < E);
      const T* src = ok ? W + static_cast<int64_t>(n0 + n) * E + col : W;
      T* dst = sB + n * LD + s * kFwdBKQ + jc;
#pragma unroll
      for (int p = 0; p < PER; ++p) cp_async16(dst + p * (16 / sizeof(T)), src + p * (16 / sizeof(T)), ok ? 16 : 0);
    }
  } else {
    // generic shapes: element by element (synchronous), masked
    constexpr int ELEMS = BN * kFwdKV;
    for (int e = threadIdx.x; e < ELEMS; e += kThreads) {
      const int j = e % kFwdBKQ;
      const int s = (e / kFwdBKQ) % 4;
      const int n = e / kFwdKV;
      const int q = q0 + j;
      const int col = s * E4 + q;
      T v = Op::from_float(0.f);
      if (n0 + n < D && q < E4 && col < E) v = W[static_cast<int64_t>(n0 + n) * E + col];
      sB[n * LD + s * kFwdBKQ + j] = v;
    }
  }
}

template <class Op, int FN>
__global__ void __launch_bounds__(kThreads, 1)
stop_embed_fwd_kernel(const typename Op::T* __restrict__ pos,     // [P, D]
                      const void* __restrict__ idx,               // [R] int32 or int64 (idx64)
                      const typename Op::T* __restrict__ W,       // [D, E]
                      const typename Op::T* __restrict__ bias,    // [D] or nullptr
                      typename Op::T* __restrict__ out,           // [R, D]
                      int64_t R, int D, int E, uint32_t k0, uint32_t k1, float sigma, bool idx64, bool vec_w,
                      bool vec_out) {
#if SK_MMA_OK
  using T = typename Op::T;
  using S = FwdSmem<Op, FN>;
  constexpr int BN = S::BN, LD = S::LD;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sA = reinterpret_cast<T*>(smem);
  T* sB0 = reinterpret_cast<T*>(smem + S::A_BYTES);
  T* sB1 = reinterpret_cast<T*>(smem + S::A_BYTES + S::B_BYTES);

  const int E4 = (E + 3) / 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kFwdBM;
  const int n0 = blockIdx.y * BN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / kFwdWarpsN, wn = warp % kFwdWarpsN;
  const int rows_here = (R - row0) < kFwdBM ? static_cast<int>(R - row0) : kFwdBM;
  const int m_valid = rows_here - wm * 16 * kFwdFM;
  const int n_valid = D - n0 - wn * 16 * FN;

  typename Op::Acc acc[kFwdFM][FN];
#pragma unroll
  for (int i = 0; i < kFwdFM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  // Main loop over K steps (skipped entirely when σ = 0: the noise term vanishes).
  const int steps = sigma == 0.f ? 0 : (E4 + kFwdBKQ - 1) / kFwdBKQ;
  if (steps > 0) {
    fwd_load_weight<Op, FN>(sB0, W, n0, 0, D, E, E4, vec_w);  // prefetch step 0
    cp_async_commit();
  }
  for (int it = 0; it < steps; ++it) {
    T* sB = (it & 1) ? sB1 : sB0;
    // (1) prefetch the next weight tile into the other buffer (async when vec_w)
    if (it + 1 < steps) {
      fwd_load_weight<Op, FN>((it & 1) ? sB0 : sB1, W, n0, (it + 1) * kFwdBKQ, D, E, E4, vec_w);
      cp_async_commit();
    }
    // (2) generate this step's noise tile in registers and store it (as MMA operands) to sA:
    //     sA[m][s·BKQ + j] = n[row0 + m, s·E4 + q0 + j] (make_noise_tile, stop_common.cuh)
    make_noise_tile<Op, kFwdBM, kFwdBKQ>(sA, LD, row0, R, it * kFwdBKQ, E, E4, k0, k1, sigma);
    // (3) wait for this step's weight tile, make sA / sB visible to all warps
    if (it + 1 < steps) cp_async_wait<1>(); else cp_async_wait<0>();
    __syncthreads();
    // (4) tensor-core MMA: acc[64 × BN] += sA[64 × 32] · sB[32 × BN]
    if (m_valid > 0 && n_valid > 0)
      warp_tile_mma<Op, wmma::row_major, wmma::col_major, kFwdFM, FN>(
          acc, sA + wm * 16 * kFwdFM * LD, LD, sB + wn * 16 * FN * LD, LD, kFwdKV, m_valid, n_valid);
    // (5) everyone is done reading sA and this sB before they are overwritten
    __syncthreads();
  }

  // Epilogue: per 16×16 fragment, stage the fp32 accumulator in a per-warp scratch, then each lane
  // takes 8 consecutive columns of one row, adds bias and the gathered ψ[idx[r]] row, and stores.
  float* scratch = reinterpret_cast<float*>(smem) + warp * 16 * S::EPI_LD;
  const int er = lane >> 1, ec = (lane & 1) * 8;
#pragma unroll
  for (int i = 0; i < kFwdFM; ++i) {
#pragma unroll
    for (int j = 0; j < FN; ++j) {
      if (16 * i >= m_valid || 16 * j >= n_valid) continue;  // warp-uniform
      wmma::store_matrix_sync(scratch, acc[i][j], S::EPI_LD, wmma::mem_row_major);
      __syncwarp();
      const int64_t r = row0 + wm * 16 * kFwdFM + 16 * i + er;
      const int c = n0 + wn * 16 * FN + 16 * j + ec;
      if (r < R) {
        float v[8];
#pragma unroll
        for (int t = 0; t < 8; ++t) v[t] = scratch[er * S::EPI_LD + ec + t];
        const int64_t p = idx64 ? static_cast<const int64_t*>(idx)[r] : static_cast<int64_t>(static_cast<const int32_t*>(idx)[r]);
        const T* prow = pos + p * D;
        T* orow = out + r * D;
        if (vec_out && c + 8 <= D) {
          float pv[8], bv[8];
          load8(prow + c, pv);
          if (bias != nullptr) load8(bias + c, bv);
#pragma unroll
          for (int t = 0; t < 8; ++t) v[t] += pv[t] + (bias != nullptr ? bv[t] : 0.f);
          store8(orow + c, v);
        } else {
#pragma unroll
          for (int t = 0; t < 8; ++t) {
            if (c + t < D) {
              float x = v[t] + Op::to_float(prow[c + t]);
              if (bias != nullptr) x += Op::to_float(bias[c + t]);
              orow[c + t] = Op::from_float(x);
            }
          }
        }
      }
      __syncwarp();
    }
  }
#else
  __trap();  // compiled for a pre-sm_80 target (see SK_MMA_OK)
#endif
}

// ------------------------------------------------------------------------------------------------
// Debug: the noise matrix itself, [R, E] fp32 (one thread per Philox call).
// ------------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads)
stop_noise_kernel(float* __restrict__ out, int64_t R, int E, int64_t row_start, uint32_t k0, uint32_t k1,
                  float sigma) {
  const int E4 = (E + 3) / 4;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (t >= R * E4) return;
  const int64_t r = t / E4;
  const int q = static_cast<int>(t % E4);
  float n[4];
  stop_noise4(static_cast<uint32_t>(row_start + r), static_cast<uint32_t>(q), k0, k1, sigma, n);
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    const int col = s * E4 + q;
    if (col < E) out[r * E + col] = n[s];
  }
}


// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------
template <class AT, int FN>
void launch_fwd(const at::Tensor& pos, const at::Tensor& idx, const at::Tensor& w, const at::Tensor* bias,
                at::Tensor& out, int64_t R, int D, int E, uint32_t k0, uint32_t k1, float sigma, cudaStream_t stream) {
  using Op = typename OpFor<AT>::type;
  using T = typename Op::T;
  using S = FwdSmem<Op, FN>;
  auto kernel = stop_embed_fwd_kernel<Op, FN>;
  set_smem(kernel, S::BYTES);
  const T* pos_p = reinterpret_cast<const T*>(pos.data_ptr<AT>());
  const T* w_p = reinterpret_cast<const T*>(w.data_ptr<AT>());
  const T* b_p = bias ? reinterpret_cast<const T*>(bias->data_ptr<AT>()) : nullptr;
  T* out_p = reinterpret_cast<T*>(out.data_ptr<AT>());
  // 16-byte paths: weight chunks of 8 columns (E % 32 == 0 ⇒ E % 8 == 0 and E4 % 8 == 0), output /
  // ψ / bias rows of 8 columns (D % 8 == 0), all base pointers 16-byte aligned.
  const bool vec_w = (E % 32 == 0) && aligned16(w_p);
  const bool vec_out = (D % 8 == 0) && aligned16(pos_p) && aligned16(out_p) && (b_p == nullptr || aligned16(b_p));
  const dim3 grid(static_cast<unsigned>((R + kFwdBM - 1) / kFwdBM), static_cast<unsigned>((D + S::BN - 1) / S::BN));
  const bool idx64 = idx.scalar_type() == at::kLong;
  kernel<<<grid, kThreads, S::BYTES, stream>>>(pos_p, idx.data_ptr(), w_p, b_p, out_p, R, D, E, k0, k1, sigma, idx64,
                                               vec_w, vec_out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class AT>
void dispatch_fwd_fn(const at::Tensor& pos, const at::Tensor& idx, const at::Tensor& w, const at::Tensor* bias,
                     at::Tensor& out, int64_t R, int D, int E, uint32_t k0, uint32_t k1, float sigma,
                     cudaStream_t stream) {
  // BN = 64·FN: one column block up to D = 384 (each noise value generated once), tiles beyond. The fp32 FN = 6
  // tile (117 KB) exceeds sm_86 / sm_89's 99 KB per block: there, two column blocks of FN = 4.
  using S6 = FwdSmem<typename OpFor<AT>::type, 6>;
  if (D <= 128) launch_fwd<AT, 2>(pos, idx, w, bias, out, R, D, E, k0, k1, sigma, stream);
  else if (D <= 256 || !smem_fits(S6::BYTES, w.get_device()))
    launch_fwd<AT, 4>(pos, idx, w, bias, out, R, D, E, k0, k1, sigma, stream);
  else launch_fwd<AT, 6>(pos, idx, w, bias, out, R, D, E, k0, k1, sigma, stream);
}


}  // namespace


// out[R, D] = ψ[idx] + n·Wᵀ + b. All floating tensors share one dtype (fp32, bf16 or fp16);
// idx (int32/int64) is flattened. Indices are NOT range-checked here (the Python wrapper does it).
at::Tensor stop_embed_fwd_cuda(const at::Tensor& pos_embed, const at::Tensor& idx, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, int64_t seed, double noise_std) {
  check_device(weight, "weight");
  check_common(idx, noise_std);
  TORCH_CHECK(pos_embed.dim() == 2, "pos_embed: expected [P, D], got ", pos_embed.sizes());
  TORCH_CHECK(weight.dim() == 2, "weight: expected [D, E], got ", weight.sizes());
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "weight: expected float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(pos_embed.scalar_type() == dtype, "pos_embed: expected dtype ", dtype, " (that of weight), got ",
              pos_embed.scalar_type());
  const int64_t D64 = weight.size(0), E64 = weight.size(1);
  TORCH_CHECK(pos_embed.size(1) == D64, "pos_embed: expected ", D64, " columns (weight.shape[0]), got ",
              pos_embed.size(1));
  TORCH_CHECK(D64 < (1 << 30) && E64 < (1 << 30), "weight: dimensions too large");
  TORCH_CHECK(pos_embed.device() == weight.device() && idx.device() == weight.device(),
              "pos_embed, idx, weight: expected one CUDA device");
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.dim() == 1 && b.size(0) == D64, "bias: expected [", D64, "], got ", b.sizes());
    TORCH_CHECK(b.scalar_type() == dtype, "bias: expected dtype ", dtype, ", got ", b.scalar_type());
    TORCH_CHECK(b.device() == weight.device(), "bias: expected device ", weight.device());
  }
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor pos = pos_embed.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor ix = idx.reshape({-1}).contiguous();
  const int64_t R = ix.numel();
  const int D = static_cast<int>(D64), E = static_cast<int>(E64);
  at::Tensor out = at::empty({R, D64}, weight.options());
  if (R == 0 || D == 0) return out;
  uint32_t k0, k1;
  seed_to_key(static_cast<uint64_t>(seed), &k0, &k1);
  const float sigma = static_cast<float>(noise_std);
  const at::Tensor* bp = b.defined() ? &b : nullptr;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (dtype) {
    case at::kBFloat16: dispatch_fwd_fn<at::BFloat16>(pos, ix, w, bp, out, R, D, E, k0, k1, sigma, stream); break;
    case at::kHalf: dispatch_fwd_fn<at::Half>(pos, ix, w, bp, out, R, D, E, k0, k1, sigma, stream); break;
    default: dispatch_fwd_fn<float>(pos, ix, w, bp, out, R, D, E, k0, k1, sigma, stream); break;
  }
  return out;
}

// Gradients of stop_embed_fwd given grad_out [R, D] (dtype of the forward): (dweight [D, E],
// dbias [D], dpos [P, D]) in that dtype, each undefined (None in Python) when not requested.

at::Tensor stop_noise_cuda(int64_t seed, int64_t rows, int64_t E64, double noise_std, int64_t row_start,
                           int64_t device_index) {
  TORCH_CHECK(rows >= 0 && E64 >= 0 && row_start >= 0, "rows, E, row_start: expected non-negative values");
  TORCH_CHECK(rows <= (int64_t(1) << 32) - row_start, "rows: the Philox row counter is 32-bit");  // (no overflow)
  TORCH_CHECK(E64 < (int64_t(1) << 30), "E: expected fewer than 2^30 columns (the kernels index E in int)");
  TORCH_CHECK(noise_std >= 0.0, "noise_std: expected a value >= 0");
  const at::Device dev(at::kCUDA, static_cast<c10::DeviceIndex>(device_index));
  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor out = at::empty({rows, E64}, at::TensorOptions().dtype(at::kFloat).device(dev));
  const int E = static_cast<int>(E64);
  const int64_t calls = rows * ((E + 3) / 4);
  if (calls == 0) return out;
  uint32_t k0, k1;
  seed_to_key(static_cast<uint64_t>(seed), &k0, &k1);
  const int64_t blocks = (calls + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "rows × E too large");
  stop_noise_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<float>(), rows, E, row_start, k0, k1, static_cast<float>(noise_std));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}


}  // namespace stop_kernels
