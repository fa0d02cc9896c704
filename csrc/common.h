// The CUDA kernels' dtypes, dispatched to a generic lambda (the CPU kernels dispatch on kernels.h's DType).
#pragma once
#include <torch/extension.h>

namespace wspo {

// f(T{}) for T in {float, at::BFloat16, at::Half}; any other dtype is a clear error naming `who`.
template <typename F>
void dispatch_dtype(at::ScalarType dtype, const char* who, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(at::BFloat16{});
    case at::kHalf: return f(at::Half{});
    default: TORCH_CHECK(false, who, " take float32, bfloat16 or float16, got ", dtype);
  }
}

}  // namespace wspo
