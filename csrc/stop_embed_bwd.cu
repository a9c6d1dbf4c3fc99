// Backward of the StoP op: dW[d, c] = Σ_r g[r, d] · n[r, c] with n regenerated in registers from the
// Philox stream (philox.cuh) and never written to memory; db = Σ_r g and dψ = index_add(g) with ATen
// reductions (memory bound, cheap). See stop_embed.cu for the quarter-column K layout.
#include <ATen/Context.h>

#include "stop_common.cuh"

namespace stop_kernels {
namespace {
using namespace detail;
using namespace nvcuda;

// ------------------------------------------------------------------------------------------------
// Backward: dW[d, c] = Σ_r g[r, d] · n[r, c]
// ------------------------------------------------------------------------------------------------
// Block tile BD × 4·BQ (d × virtual c), BD = 4 warps × 16·FM, 4·BQ = 2 warps × 16·FN = 64 → BQ = 16.
// K = rows in steps of BR = 32; the rows are split over gridDim.z blocks whose fp32 partial sums are
// atomically added into dW (fp32, zeroed by the host).
constexpr int kBwdWarpsM = 4, kBwdWarpsN = 2, kBwdFN = 2, kBwdBR = 32;
constexpr int kBwdKV = kBwdWarpsN * 16 * kBwdFN;  // 64 virtual columns
constexpr int kBwdBQ = kBwdKV / 4;                // 16 quarter columns

template <class Op, int FM>
struct BwdSmem {
  using T = typename Op::T;
  static constexpr int BD = kBwdWarpsM * 16 * FM;
  static constexpr int LDG = BD + Op::kPad;                       // sG [BR][LDG]  (= gᵀ col-major)
  static constexpr int LDN = kBwdKV + Op::kPad;                   // sN [BR][LDN]
  static constexpr int G_BYTES = kBwdBR * LDG * sizeof(T);         // ×2 buffers
  static constexpr int N_BYTES = kBwdBR * LDN * sizeof(T);
  static constexpr int EPI_LD = 20;
  static constexpr int EPI_BYTES = kWarps * 16 * EPI_LD * sizeof(float);
  static constexpr int MAIN_BYTES = 2 * G_BYTES + N_BYTES;
  static constexpr int BYTES = MAIN_BYTES > EPI_BYTES ? MAIN_BYTES : EPI_BYTES;
};

// Stage rows [r0, r0 + BR) × columns [d0, d0 + BD) of g into sG (zero outside). vec: D % 8 == 0 and
// g 16-byte aligned → cp.async 16-byte chunks (zero-fill when out of range).
template <class Op, int FM>
__device__ __forceinline__ void bwd_load_grad(typename Op::T* sG, const typename Op::T* __restrict__ g, int64_t r0,
                                              int64_t r_end, int d0, int D, bool vec) {
  using T = typename Op::T;
  using S = BwdSmem<Op, FM>;
  constexpr int BD = S::BD, LDG = S::LDG;
  if (vec) {
    constexpr int CHUNKS = kBwdBR * BD / 8;
    constexpr int PER = 8 * sizeof(T) / 16;
    for (int c = threadIdx.x; c < CHUNKS; c += kThreads) {
      const int dc = (c % (BD / 8)) * 8;
      const int rr = c / (BD / 8);
      const int64_t r = r0 + rr;
      const bool ok = (r < r_end) && (d0 + dc < D);
      const T* src = ok ? g + r * D + d0 + dc : g;
      T* dst = sG + rr * LDG + dc;
#pragma unroll
      for (int p = 0; p < PER; ++p) cp_async16(dst + p * (16 / sizeof(T)), src + p * (16 / sizeof(T)), ok ? 16 : 0);
    }
  } else {
    constexpr int ELEMS = kBwdBR * BD;
    for (int e = threadIdx.x; e < ELEMS; e += kThreads) {
      const int dd = e % BD;
      const int rr = e / BD;
      const int64_t r = r0 + rr;
      T v = Op::from_float(0.f);
      if (r < r_end && d0 + dd < D) v = g[r * D + d0 + dd];
      sG[rr * LDG + dd] = v;
    }
  }
}

template <class Op, int FM>
__global__ void __launch_bounds__(kThreads, 1)
stop_embed_dw_kernel(const typename Op::T* __restrict__ g,  // [R, D]
                     float* __restrict__ dW,                // [D, E] fp32, accumulated atomically
                     int64_t R, int D, int E, int64_t rows_per_split, uint32_t k0, uint32_t k1, float sigma,
                     bool vec_g) {
#if SK_MMA_OK
  using T = typename Op::T;
  using S = BwdSmem<Op, FM>;
  constexpr int BD = S::BD, LDG = S::LDG, LDN = S::LDN;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sG0 = reinterpret_cast<T*>(smem);
  T* sG1 = reinterpret_cast<T*>(smem + S::G_BYTES);
  T* sN = reinterpret_cast<T*>(smem + 2 * S::G_BYTES);

  const int E4 = (E + 3) / 4;
  const int q0 = blockIdx.x * kBwdBQ;
  const int d0 = blockIdx.y * BD;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.z) * rows_per_split;
  const int64_t r_end = (r_begin + rows_per_split) < R ? (r_begin + rows_per_split) : R;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / kBwdWarpsN, wn = warp % kBwdWarpsN;
  const int m_valid = D - d0 - wm * 16 * FM;
  // virtual columns of this warp whose quarter column is < E4 (all four quarters share q)
  const int n_valid = kBwdKV;  // masking of q / c is done by zero noise; keep all fragments

  typename Op::Acc acc[FM][kBwdFN];
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < kBwdFN; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  const int64_t nrows = r_end - r_begin;
  const int steps = nrows > 0 ? static_cast<int>((nrows + kBwdBR - 1) / kBwdBR) : 0;
  if (steps > 0) {
    bwd_load_grad<Op, FM>(sG0, g, r_begin, r_end, d0, D, vec_g);  // prefetch step 0
    cp_async_commit();
  }
  for (int it = 0; it < steps; ++it) {
    const int64_t r0 = r_begin + static_cast<int64_t>(it) * kBwdBR;
    T* sG = (it & 1) ? sG1 : sG0;
    // (1) prefetch the next gradient tile into the other buffer
    if (it + 1 < steps) {
      bwd_load_grad<Op, FM>((it & 1) ? sG0 : sG1, g, r0 + kBwdBR, r_end, d0, D, vec_g);
      cp_async_commit();
    }
    // (2) regenerate the noise tile of these rows / quarter columns into sN:
    //     sN[rr][s·BQ + j] = n[r0 + rr, s·E4 + q0 + j] (make_noise_tile, stop_common.cuh)
    make_noise_tile<Op, kBwdBR, kBwdBQ>(sN, LDN, r0, r_end, q0, E, E4, k0, k1, sigma);
    // (3) wait for this step's gradient tile; make sG / sN visible
    if (it + 1 < steps) cp_async_wait<1>(); else cp_async_wait<0>();
    __syncthreads();
    // (4) acc[BD × 64] += gᵀ[BD × 32] · n[32 × 64]   (gᵀ read column-major from sG[r][d])
    if (m_valid > 0)
      warp_tile_mma<Op, wmma::col_major, wmma::row_major, FM, kBwdFN>(
          acc, sG + wm * 16 * FM, LDG, sN + wn * 16 * kBwdFN, LDN, kBwdBR, m_valid, n_valid);
    // (5) done reading sG / sN
    __syncthreads();
  }
  if (steps == 0) return;

  // Epilogue: stage each fragment in per-warp scratch, then atomically add the valid entries
  // (d < D, q < E4, c < E) into dW; 8 consecutive columns per lane.
  float* scratch = reinterpret_cast<float*>(smem) + warp * 16 * S::EPI_LD;
  const int er = lane >> 1, ec = (lane & 1) * 8;
#pragma unroll
  for (int i = 0; i < FM; ++i) {
#pragma unroll
    for (int j = 0; j < kBwdFN; ++j) {
      if (16 * i >= m_valid) continue;
      wmma::store_matrix_sync(scratch, acc[i][j], S::EPI_LD, wmma::mem_row_major);
      __syncwarp();
      const int d = d0 + wm * 16 * FM + 16 * i + er;
      const int vk = wn * 16 * kBwdFN + 16 * j + ec;  // virtual column: s = vk / BQ, j = vk % BQ
      const int s = vk / kBwdBQ;
      const int qb = q0 + vk % kBwdBQ;
      if (d < D) {
#pragma unroll
        for (int t = 0; t < 8; ++t) {
          const int q = qb + t;
          const int col = s * E4 + q;
          if (q < E4 && col < E) atomicAdd(dW + static_cast<int64_t>(d) * E + col, scratch[er * S::EPI_LD + ec + t]);
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
// Host side
// ------------------------------------------------------------------------------------------------
template <class AT, int FM>
void launch_dw(const at::Tensor& g, at::Tensor& dw32, int64_t R, int D, int E, uint32_t k0, uint32_t k1, float sigma,
               cudaStream_t stream) {
  using Op = typename OpFor<AT>::type;
  using T = typename Op::T;
  using S = BwdSmem<Op, FM>;
  auto kernel = stop_embed_dw_kernel<Op, FM>;
  set_smem(kernel, S::BYTES);
  const T* g_p = reinterpret_cast<const T*>(g.data_ptr<AT>());
  const bool vec_g = (D % 8 == 0) && aligned16(g_p);
  const int E4 = (E + 3) / 4;
  const int gx = (E4 + kBwdBQ - 1) / kBwdBQ;
  const int gy = (D + S::BD - 1) / S::BD;
  // Split K (the rows) so that there are ~2 blocks per SM, each with at least 4 row steps.
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount, g.get_device());
  const int64_t row_steps = (R + kBwdBR - 1) / kBwdBR;
  int64_t splits = (2 * static_cast<int64_t>(sms) + gx * gy - 1) / (gx * gy);
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, (row_steps + 3) / 4, 65535}));
  const int64_t rows_per_split = ((row_steps + splits - 1) / splits) * kBwdBR;
  splits = (R + rows_per_split - 1) / rows_per_split;
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(splits));
  kernel<<<grid, kThreads, S::BYTES, stream>>>(g_p, dw32.data_ptr<float>(), R, D, E, rows_per_split, k0, k1, sigma,
                                               vec_g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class AT>
void dispatch_dw_fm(const at::Tensor& g, at::Tensor& dw32, int64_t R, int D, int E, uint32_t k0, uint32_t k1,
                    float sigma, cudaStream_t stream) {
  using S6 = BwdSmem<typename OpFor<AT>::type, 6>;  // (fp32: 106 KB, over sm_86 / sm_89's 99 KB per block)
  if (D <= 128) launch_dw<AT, 2>(g, dw32, R, D, E, k0, k1, sigma, stream);
  else if (D <= 256 || !smem_fits(S6::BYTES, g.get_device())) launch_dw<AT, 4>(g, dw32, R, D, E, k0, k1, sigma, stream);
  else launch_dw<AT, 6>(g, dw32, R, D, E, k0, k1, sigma, stream);
}


}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> stop_embed_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& idx,
                                                                   int64_t P, int64_t E64, int64_t seed,
                                                                   double noise_std, bool need_dweight,
                                                                   bool need_dpos, bool need_dbias) {
  check_device(grad_out, "grad_out");
  check_common(idx, noise_std);
  const auto dtype = grad_out.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "grad_out: expected float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == idx.numel(), "grad_out: expected [", idx.numel(),
              ", D], got ", grad_out.sizes());
  TORCH_CHECK(P >= 0 && E64 >= 0 && E64 < (1 << 30), "P, E: expected non-negative sizes");
  TORCH_CHECK(idx.device() == grad_out.device(), "idx: expected device ", grad_out.device());
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor ix = idx.reshape({-1}).contiguous();
  const int64_t R = g.size(0), D64 = g.size(1);
  TORCH_CHECK(D64 < (1 << 30), "grad_out: D too large");
  const int D = static_cast<int>(D64), E = static_cast<int>(E64);
  at::Tensor dweight, dbias, dpos;
  if (need_dweight) {
    at::Tensor dw32 = at::zeros({D64, E64}, g.options().dtype(at::kFloat));
    if (R > 0 && D > 0 && E > 0 && noise_std != 0) {
      // the row splits add their partial sums into dW with fp32 atomics, in an order that varies between runs
      // (the Triton backend sums its partials in a fixed order instead): say so under deterministic algorithms
      at::globalContext().alertNotDeterministic("stop_kernels_cuda::stop_embed_bwd (dweight, fp32 atomic adds)");
      uint32_t k0, k1;
      seed_to_key(static_cast<uint64_t>(seed), &k0, &k1);
      const float sigma = static_cast<float>(noise_std);
      cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
      switch (dtype) {
        case at::kBFloat16: dispatch_dw_fm<at::BFloat16>(g, dw32, R, D, E, k0, k1, sigma, stream); break;
        case at::kHalf: dispatch_dw_fm<at::Half>(g, dw32, R, D, E, k0, k1, sigma, stream); break;
        default: dispatch_dw_fm<float>(g, dw32, R, D, E, k0, k1, sigma, stream); break;
      }
    }
    dweight = dtype == at::kFloat ? dw32 : dw32.to(dtype);
  }
  if (need_dbias) {
    dbias = at::sum(g, {0}, /*keepdim=*/false, at::kFloat).to(dtype);  // fp32 accumulation
  }
  if (need_dpos) {
    at::Tensor dp32 = at::zeros({P, D64}, g.options().dtype(at::kFloat));
    if (R > 0) dp32.index_add_(0, ix, g.to(at::kFloat));
    dpos = dtype == at::kFloat ? dp32 : dp32.to(dtype);
  }
  return std::make_tuple(dweight, dbias, dpos);
}

// The noise matrix n[row_start : row_start + rows, :E] as fp32 on `device_index` (tests / debugging).

}  // namespace stop_kernels
