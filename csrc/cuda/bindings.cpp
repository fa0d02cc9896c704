// pybind11 bindings of the CUDA row kernels (wspo_kernels._C_cuda); same functions as the CPU modules.
#include <torch/extension.h>

namespace wspo_cuda {
using at::Tensor;
std::tuple<Tensor, Tensor> logprobs(const Tensor&, const Tensor&, int64_t);
Tensor logprobs_backward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, Tensor);
Tensor weak_log_ratio(const Tensor&, const Tensor&, const Tensor&, int64_t);
std::tuple<Tensor, Tensor> wspo_rows(const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, int64_t,
                                     c10::optional<Tensor>);
std::tuple<Tensor, Tensor> wspo_four(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                     const Tensor&, double, int64_t, c10::optional<Tensor>);
void scale_rows_(Tensor, const Tensor&);
}  // namespace wspo_cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "wspo-kernels native CUDA row kernels";
  m.attr("capability") = "cuda";
  m.def("logprobs", &wspo_cuda::logprobs, "per-row logp [N] and statistics [3, N] (max, sum of exp, that sum without the label)");
  m.def("logprobs_backward", &wspo_cuda::logprobs_backward, "grad_logp * (onehot - softmax) into out");
  m.def("weak_log_ratio", &wspo_cuda::weak_log_ratio, "l^aligned - l^base per row");
  m.def("wspo_rows", &wspo_cuda::wspo_rows, "WSPO loss terms and policy gradient from k");
  m.def("wspo_four", &wspo_cuda::wspo_four, "one-pass WSPO from four logits");
  m.def("scale_rows_", &wspo_cuda::scale_rows_, "grad[i, :] *= scale[i] in place");
}
