// Registration of the CUDA StoP ops as torch ops in the namespace `stop_kernels_cuda`
// (torch.ops.stop_kernels_cuda.*), plus the Python module `stop_kernels._C` whose import loads them.
//
// This file includes no CUDA header (and not the heavy torch/extension.h), so it compiles quickly with
// the host compiler alone.
#include <ATen/core/Tensor.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace stop_kernels {
at::Tensor stop_embed_fwd_cuda(const at::Tensor& pos_embed, const at::Tensor& idx, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, int64_t seed, double noise_std);
std::tuple<at::Tensor, at::Tensor, at::Tensor> stop_embed_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& idx,
                                                                   int64_t P, int64_t E, int64_t seed,
                                                                   double noise_std, bool need_dweight,
                                                                   bool need_dpos, bool need_dbias);
at::Tensor stop_noise_cuda(int64_t seed, int64_t rows, int64_t E, double noise_std, int64_t row_start,
                           int64_t device_index);
}  // namespace stop_kernels

TORCH_LIBRARY(stop_kernels_cuda, m) {
  // out[R, D] = pos_embed[idx] + n·weightᵀ + bias, n = the Philox noise of `seed` (philox.py), idx flattened.
  m.def("stop_embed_fwd(Tensor pos_embed, Tensor idx, Tensor weight, Tensor? bias, int seed, float noise_std)"
        " -> Tensor");
  // (dweight [D, E], dbias [D], dpos [P, D]); an output that is not requested comes back as None.
  m.def("stop_embed_bwd(Tensor grad_out, Tensor idx, int P, int E, int seed, float noise_std, bool need_dweight,"
        " bool need_dpos, bool need_dbias) -> (Tensor, Tensor, Tensor)");
  // The noise itself, fp32 [rows, E], rows row_start … row_start+rows-1 (tests / debugging).
  // It has no tensor argument to dispatch on, so it is registered as a catch-all kernel right here.
  m.def("stop_noise(int seed, int rows, int E, float noise_std, int row_start, int device_index) -> Tensor",
        &stop_kernels::stop_noise_cuda);
}

TORCH_LIBRARY_IMPL(stop_kernels_cuda, CUDA, m) {
  m.impl("stop_embed_fwd", &stop_kernels::stop_embed_fwd_cuda);
  m.impl("stop_embed_bwd", &stop_kernels::stop_embed_bwd_cuda);
}

// `import stop_kernels._C` (or the JIT-built `stop_kernels_C`) runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "stop_kernels CUDA ops, registered as torch.ops.stop_kernels_cuda.{stop_embed_fwd, stop_embed_bwd, "
            "stop_noise}";
  m.attr("OPS") = pybind11::make_tuple("stop_embed_fwd", "stop_embed_bwd", "stop_noise");
}
