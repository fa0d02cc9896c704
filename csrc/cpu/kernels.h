// The interface between the baseline bindings (wspo_cpu.cpp) and the per-ISA kernel copies (kernels.cpp).
//
// kernels.cpp is compiled once per CPU instruction set (setup.py: AVX-512, AVX2, and the baseline,
// which is NEON on aarch64), each copy in its own namespace, and each fills one KernelTable.  Only the
// plain structs below cross this boundary -- no at::Tensor, no pybind11 -- so nothing compiled with
// ISA flags runs unless the bindings picked that table, and they pick only what the CPU supports
// (wspo_cpu.cpp: select_table).
#pragma once
#include <cstdint>

namespace wspo_cpu {

enum class DType { kFloat, kBFloat16, kHalf };

// Rows of an [N, V] or [B, T, V] tensor with unit stride along V: row i = (i / inner, i % inner).
struct Rows {
  void* data;
  int64_t outer_stride, inner_stride, inner, vocab;
  template <typename T>
  T* row(int64_t i) const {
    return static_cast<T*>(data) + (i / inner) * outer_stride + (i % inner) * inner_stride;
  }
};

// One kernel call: what it reads and writes (unused fields stay null).  All logits share `dtype`.
struct Job {
  DType dtype;
  Rows x;                      // logits (the policy's for wspo, the aligned model's for weak_log_ratio)
  Rows frozen[3];              // wspo_four: ref, aligned, base; weak_log_ratio: frozen[0] = base
  bool four = false;           // wspo: read `frozen` (else k is given)
  bool pipelined = true;       // wspo: write each row's gradient during the next row's sweep (kernels.cpp)
  const Rows* grad = nullptr;  // gradient buffer (logprobs_backward, wspo), may alias x
  const int64_t* labels = nullptr;
  int64_t n = 0, ignore_index = -100;
  float gamma = 0.f;
  const float* k = nullptr;          // wspo_rows: gamma * l^ref + l^aligned - l^base
  const float* weight = nullptr;     // wspo: per-token weight of the reduction
  const float* stats_in = nullptr;   // logprobs_backward: [3, n] saved statistics
  const float* scale = nullptr;      // logprobs_backward: dL/dlogp; scale_rows: the row factors
  float* logp = nullptr;             // [n] (wspo: [n] or [4, n]); weak_log_ratio: the result
  float* stats = nullptr;            // logprobs: [3, n] (m, s, r)
  float* loss = nullptr;             // wspo: [n]
};

// Rows [begin, end); `scratch` holds scratch_floats(job) floats for this call alone (one per thread).
using RowKernel = void (*)(const Job&, int64_t begin, int64_t end, float* scratch);

// Only wspo with a gradient keeps its exps in scratch (a row of fp32, see kernels.cpp: one exp per element).
inline int64_t scratch_floats(const Job& j) {  // wspo with a gradient: two rows of kept exps (kernels.cpp)
  return j.loss != nullptr && j.grad != nullptr ? 2 * j.x.vocab : 0;
}

struct KernelTable {
  const char* capability;
  const char* exp_variant;  // which vector exp the kernels use (kernels.cpp: vexp), for result tables
  RowKernel logprobs, logprobs_backward, weak_log_ratio, wspo, scale_rows;
  void (*exp_sweep)(float* buf, int64_t n, int64_t repeats);  // buf = exp(buf - 1), repeatedly: the exp rate
  void (*exp_values)(float* buf, int64_t n);                  // buf = exp(buf), buf <= 0: the exp's accuracy
  int64_t stream_min_bytes;  // gradients this large are written with streaming stores (0: this copy never streams)
};

// One per compiled copy of kernels.cpp (setup.py defines WSPO_HAVE_AVX2 / WSPO_HAVE_AVX512 for the
// bindings when it compiled those copies).
const KernelTable& table_default();
const KernelTable& table_avx2();
const KernelTable& table_avx512();

}  // namespace wspo_cpu
