// Bindings of the native CPU kernels (wspo_kernels._C), compiled for the baseline ISA.
//
// The kernels themselves are in kernels.cpp, compiled once per instruction set into this same
// extension (kernels.h: one KernelTable per copy).  This file checks tensors, describes them as Rows,
// splits rows over threads (at::parallel_for, so threads follow torch.get_num_threads()) and calls the
// table chosen at run time: the best copy this CPU can execute (cpuid, through __builtin_cpu_supports),
// capped by the capability PyTorch itself uses (native.py passes torch.backends.cpu.get_cpu_capability(),
// which honours ATEN_CPU_CAPABILITY).  Nothing compiled with AVX2 or AVX-512 flags runs before that
// choice, and the choice never names an instruction set the CPU lacks.
#include <atomic>
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <chrono>
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "kernels.h"

namespace wspo_cpu {

using at::Tensor;

constexpr int64_t kRowsPerTask = 1;  // at::parallel_for grain, in rows

// ------------------------------------------------------------------------------------------ dispatch
bool cpu_supports(const std::string& name) {
#if defined(__x86_64__) || defined(_M_X64)
  if (name == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (name == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
  return name == "default";
}

// The compiled copies this CPU can execute, best first.
std::vector<const KernelTable*> runnable_tables() {
  std::vector<const KernelTable*> out;
#ifdef WSPO_HAVE_AVX512
  if (cpu_supports("avx512")) out.push_back(&table_avx512());
#endif
#ifdef WSPO_HAVE_AVX2
  if (cpu_supports("avx2")) out.push_back(&table_avx2());
#endif
  out.push_back(&table_default());
  return out;
}

const KernelTable* g_active = nullptr;

const KernelTable& active() {
  if (g_active == nullptr) g_active = runnable_tables().front();
  return *g_active;
}

std::vector<std::string> available_capabilities() {
  std::vector<std::string> names;
  for (const KernelTable* t : runnable_tables()) names.push_back(t->capability);
  return names;
}

void use_capability(const std::string& name) {
  for (const KernelTable* t : runnable_tables()) {
    if (name == t->capability) {
      g_active = t;
      return;
    }
  }
  TORCH_CHECK(false, "CPU capability '", name, "' is not available here (compiled and supported by this CPU: ",
              c10::Join(", ", available_capabilities()), ")");
}

std::string capability() { return active().capability; }

// ------------------------------------------------------------------------------------------ gradient buffers
// Fault a fresh block's pages in up front, one madvise per thread (Linux >= 5.14: MADV_POPULATE_WRITE):
// measured on a 500 MiB block, 0.10 s before the kernel instead of 0.22 s of faults taken inside it,
// where they interleave with its loads.  Elsewhere, or if the kernel refuses, the kernel's own first
// touch faults the pages in as before.
void prefault(void* p, size_t bytes) {
#if defined(__linux__)
  constexpr size_t kMinBytes = size_t{64} << 20;  // below this the faults do not matter
  constexpr int kPopulateWrite = 23;               // MADV_POPULATE_WRITE, absent from older headers
  if (bytes < kMinBytes) return;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(p) + page - 1) / page * page;
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(p) + bytes) / page * page;
  const int64_t pages = static_cast<int64_t>((hi - lo) / page);
  at::parallel_for(0, pages, pages / std::max<int64_t>(at::get_num_threads(), 1) + 1,
                   [&](int64_t begin, int64_t end) {
                     madvise(reinterpret_cast<void*>(lo + begin * page), (end - begin) * page, kPopulateWrite);
                   });
#endif
}

// The kernels write the policy gradient, a fresh [N, V] buffer per step.  The OS hands fresh memory
// out one zeroed 4 KiB page per fault on first touch: 128k faults for a 500 MiB gradient, which on
// the machines measured cost as much as the kernel that writes it (glibc maps blocks this large
// afresh on every malloc).  So, like PyTorch's CUDA caching allocator, a freed gradient buffer is kept
// (one block: the largest recently freed) and handed out again for any request it can hold; what the
// cache holds is reported (cached_bytes) and released on demand (empty_cache) or when disabled.
class BlockCache {
 public:
  // A block of at least `bytes`: the cached one if it fits (large enough, and at most kMaxSlack times
  // the request, so a small gradient does not pin a large block), else a new one.
  std::pair<void*, size_t> take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (block_ != nullptr && block_bytes_ >= bytes && block_bytes_ / kMaxSlack <= bytes) {
        std::pair<void*, size_t> out{block_, block_bytes_};
        block_ = nullptr;
        block_bytes_ = 0;
        return out;
      }
    }
    const size_t rounded = (bytes + kAlignment - 1) / kAlignment * kAlignment;  // aligned_alloc wants a multiple
    void* p = std::aligned_alloc(kAlignment, rounded);
    TORCH_CHECK(p != nullptr, "out of memory allocating a ", rounded, "-byte gradient buffer");
    prefault(p, rounded);
    return {p, rounded};
  }
  // A block whose tensor died: keep it if the cache is on and it is the largest, else free it.
  void give(void* p, size_t bytes) {
    void* drop = p;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (enabled_ && bytes >= block_bytes_) {
        drop = block_;
        block_ = p;
        block_bytes_ = bytes;
      }
    }
    if (drop != nullptr) std::free(drop);
  }
  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return block_bytes_;
  }
  void empty() {
    void* drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      drop = block_;
      block_ = nullptr;
      block_bytes_ = 0;
    }
    if (drop != nullptr) std::free(drop);
  }
  void set_enabled(bool on) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      enabled_ = on;
    }
    if (!on) empty();
  }

 private:
  static constexpr size_t kAlignment = 64;  // a cache line, as c10's CPU allocator
  static constexpr size_t kMaxSlack = 2;
  std::mutex mu_;
  void* block_ = nullptr;
  size_t block_bytes_ = 0;
  bool enabled_ = true;
};

// Never destroyed: tensors from it may outlive static destruction at interpreter exit.
BlockCache& grad_cache() {
  static BlockCache* cache = new BlockCache();
  return *cache;
}

// An uninitialised contiguous tensor from the cache (sizes / dtype of `like`, CPU).
Tensor cached_empty_like(const Tensor& like) {
  TORCH_CHECK(like.device().is_cpu(), "cached_empty_like takes a CPU tensor");
  const size_t bytes = std::max<size_t>(static_cast<size_t>(like.numel()) * like.element_size(), 1);
  const auto [ptr, held] = grad_cache().take(bytes);
  return at::from_blob(
      ptr, like.sizes(), [held = held](void* p) { grad_cache().give(p, held); },
      like.options().memory_format(c10::nullopt));
}

// ------------------------------------------------------------------------------------------ tensors -> jobs
DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kHalf;
    default: TORCH_CHECK(false, "native CPU kernels take float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

Rows rows_of(const Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK((t.dim() == 2 || t.dim() == 3) && (t.stride(-1) == 1 || t.size(-1) == 1) && t.device().is_cpu(), name,
              " must be a CPU [N, V] or [B, T, V] tensor with unit stride along V");
  const int64_t rows = t.numel() / std::max<int64_t>(t.size(-1), 1);
  TORCH_CHECK(rows == n, name, " has ", rows, " rows, labels have ", n);
  if (t.dim() == 3) return Rows{t.data_ptr(), t.stride(0), t.stride(1), std::max<int64_t>(t.size(1), 1), t.size(2)};
  return Rows{t.data_ptr(), 0, t.stride(0), std::max<int64_t>(n, 1), t.size(1)};
}

// An output gradient buffer: the logits' dtype and vocabulary, unit stride along V, any row strides.
Rows grad_rows(const Tensor& grad, const Tensor& like, int64_t n, const char* name) {
  TORCH_CHECK(grad.scalar_type() == like.scalar_type() && grad.size(-1) == like.size(-1), name,
              " must have the logits' dtype and vocabulary size");
  return rows_of(grad, n, name);
}

// Labels inside [0, V) of `rows` or ignore_index (the Python ops check first; this guards direct calls).
void check_label_range(const Job& j, const Rows& rows) {
  for (int64_t i = 0; i < j.n; ++i) {
    const int64_t y = j.labels[i];
    TORCH_CHECK(y == j.ignore_index || (y >= 0 && y < rows.vocab), "label ", y, " outside [0, ", rows.vocab, ")");
  }
}

// Whether wspo pipelines its gradient sweeps (kernels.cpp, "pipelined gradient"); off only to measure
// the lever (benchmarks/native_kernels.py --ab): the values are the same either way.
std::atomic<bool> g_pipelined{true};

// A job over `logits` rows with checked labels.
Job job_for(const Tensor& logits, const Tensor& labels, int64_t ignore_index, const char* name) {
  TORCH_CHECK(labels.dim() == 1 && labels.scalar_type() == at::kLong && labels.is_contiguous() &&
                  labels.device().is_cpu(), "labels must be contiguous CPU int64 [N]");
  Job j;
  j.n = labels.size(0);
  j.dtype = dtype_of(logits);
  j.x = rows_of(logits, j.n, name);
  j.labels = labels.data_ptr<int64_t>();
  j.ignore_index = ignore_index;
  j.pipelined = g_pipelined.load(std::memory_order_relaxed);
  check_label_range(j, j.x);
  return j;
}

void run(RowKernel kernel, const Job& j) {
  const int64_t floats = scratch_floats(j);
  at::parallel_for(0, j.n, kRowsPerTask, [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> scratch(floats > 0 ? new float[floats] : nullptr);  // baseline code: no ISA flags
    kernel(j, begin, end, scratch.get());
  });
}

Tensor per_row(const Tensor& like, int64_t n) { return at::empty({n}, like.options().dtype(at::kFloat)); }

// ------------------------------------------------------------------------------------------ ops
// (logp [N], stats [3, N]): stats rows are m, s, r (0, 1, 0 when ignored).
std::tuple<Tensor, Tensor> logprobs(const Tensor& logits, const Tensor& labels, int64_t ignore_index) {
  Job j = job_for(logits, labels, ignore_index, "logits");
  Tensor logp = per_row(logits, j.n), stats = at::empty({3, j.n}, logits.options().dtype(at::kFloat));
  j.logp = logp.data_ptr<float>();
  j.stats = stats.data_ptr<float>();
  run(active().logprobs, j);
  return {logp, stats};
}

Tensor logprobs_backward(const Tensor& logits, const Tensor& labels, const Tensor& stats, const Tensor& grad_logp,
                         int64_t ignore_index, Tensor out) {
  Job j = job_for(logits, labels, ignore_index, "logits");
  const Rows o = grad_rows(out, logits, j.n, "out");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 3 && stats.size(1) == j.n, "stats must be [3, N]");
  Tensor g = grad_logp.to(at::kFloat).contiguous(), st = stats.to(at::kFloat).contiguous();
  TORCH_CHECK(g.numel() == j.n, "grad_logp must be [N]");
  j.grad = &o;
  j.stats_in = st.data_ptr<float>();
  j.scale = g.data_ptr<float>();
  run(active().logprobs_backward, j);
  return out;
}

Tensor weak_log_ratio(const Tensor& aligned, const Tensor& base, const Tensor& labels, int64_t ignore_index) {
  TORCH_CHECK(aligned.scalar_type() == base.scalar_type(), "aligned and base logits must share a dtype");
  Job j = job_for(aligned, labels, ignore_index, "aligned");
  j.frozen[0] = rows_of(base, j.n, "base");
  check_label_range(j, j.frozen[0]);
  Tensor out = per_row(aligned, j.n);
  j.logp = out.data_ptr<float>();
  run(active().weak_log_ratio, j);
  return out;
}

std::tuple<Tensor, Tensor> wspo(const Tensor& policy, const Tensor* frozen, const c10::optional<Tensor>& k,
                                const Tensor& labels, const Tensor& weight, double gamma, int64_t ignore_index,
                                const c10::optional<Tensor>& grad) {
  Job j = job_for(policy, labels, ignore_index, "policy");
  TORCH_CHECK(weight.numel() == j.n, "weight must be [N]");
  if (frozen != nullptr) {
    j.four = true;
    for (int m = 0; m < 3; ++m) {
      TORCH_CHECK(frozen[m].scalar_type() == policy.scalar_type(), "the one-pass kernel needs one dtype for all four");
      j.frozen[m] = rows_of(frozen[m], j.n, "frozen logits");
      check_label_range(j, j.frozen[m]);
    }
  }
  Rows gr{};
  if (grad.has_value()) {
    gr = grad_rows(*grad, policy, j.n, "grad");
    j.grad = &gr;
  }
  Tensor wc = weight.to(at::kFloat).contiguous(), kc = k.has_value() ? k->to(at::kFloat).contiguous() : Tensor();
  TORCH_CHECK(!k.has_value() || kc.numel() == j.n, "k must be [N]");
  Tensor loss = per_row(policy, j.n), logps = at::empty({j.four ? 4 : 1, j.n}, policy.options().dtype(at::kFloat));
  j.weight = wc.data_ptr<float>();
  j.k = k.has_value() ? kc.data_ptr<float>() : nullptr;
  j.gamma = static_cast<float>(gamma);
  j.loss = loss.data_ptr<float>();
  j.logp = logps.data_ptr<float>();
  run(active().wspo, j);
  return {loss, j.four ? logps : logps[0]};
}

std::tuple<Tensor, Tensor> wspo_rows(const Tensor& policy, const Tensor& labels, const Tensor& k, const Tensor& weight,
                                     double gamma, int64_t ignore_index, c10::optional<Tensor> grad) {
  return wspo(policy, nullptr, k, labels, weight, gamma, ignore_index, grad);
}

std::tuple<Tensor, Tensor> wspo_four(const Tensor& policy, const Tensor& ref, const Tensor& aligned,
                                     const Tensor& base, const Tensor& labels, const Tensor& weight, double gamma,
                                     int64_t ignore_index, c10::optional<Tensor> grad) {
  const Tensor frozen[3] = {ref, aligned, base};
  return wspo(policy, frozen, c10::nullopt, labels, weight, gamma, ignore_index, grad);
}

// grad[i, :] *= scale[i] in place; grad may be any non-overlapping rows layout (the policy logits
// themselves with inplace_grad).
void scale_rows_(Tensor grad, const Tensor& scale) {
  TORCH_CHECK(scale.dim() == 1, "scale must be [N]");
  Job j;
  j.n = scale.size(0);
  j.dtype = dtype_of(grad);
  j.x = rows_of(grad, j.n, "grad");
  Tensor sc = scale.to(at::kFloat).contiguous();
  j.scale = sc.data_ptr<float>();
  run(active().scale_rows, j);
}

// Exps per second (G/s) of the active kernel copy on every thread: the benchmarks' exp floor.
double exp_rate(int64_t repeats) {
  constexpr int64_t kFloats = 4096;  // 16 KB per thread: L1-resident
  const int64_t threads = at::get_num_threads();
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      std::vector<float> buf(kFloats, 0.5f);
      active().exp_sweep(buf.data(), kFloats, repeats);
    }
  });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return static_cast<double>(threads) * kFloats * repeats / seconds / 1e9;
}

// x = exp(x) in place with the active copy's vector exp, for x <= 0 (contiguous float32): its accuracy.
void vec_exp_(Tensor x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "vec_exp_ takes a contiguous CPU float32 tensor");
  active().exp_values(x.data_ptr<float>(), x.numel());
}

}  // namespace wspo_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "wspo-kernels native CPU row kernels (one copy per instruction set, chosen at run time)";
  m.def("available_capabilities", &wspo_cpu::available_capabilities,
        "kernel copies compiled in and supported by this CPU, best first");
  m.def("use_capability", &wspo_cpu::use_capability, "run the kernel copy for this capability");
  m.def("capability", &wspo_cpu::capability, "the capability whose kernels run");
  m.def("exp_variant", []() { return std::string(wspo_cpu::active().exp_variant); },
        "the vector exp of the kernels that run");
  m.def("stream_min_bytes", []() { return wspo_cpu::active().stream_min_bytes; },
        "gradients of at least this many bytes are written with streaming stores by the active copy (0: never)");
  m.def("set_pipelined", [](bool on) { wspo_cpu::g_pipelined.store(on); },
        "wspo: write each row's gradient during the next row's statistics sweep (default on; same values)");
  m.def("exp_rate", &wspo_cpu::exp_rate, "G exp/s of the active copy's vector exp on every thread", py::arg("repeats"));
  m.def("cached_empty_like", &wspo_cpu::cached_empty_like,
        "an uninitialised contiguous tensor like this one, from the gradient-buffer cache");
  m.def("cached_bytes", []() { return wspo_cpu::grad_cache().cached_bytes(); }, "bytes the cache holds");
  m.def("empty_cache", []() { wspo_cpu::grad_cache().empty(); }, "free the block the cache holds");
  m.def("set_cache_enabled", [](bool on) { wspo_cpu::grad_cache().set_enabled(on); },
        "keep freed gradient buffers (on by default); off frees what is held");
  m.def("vec_exp_", &wspo_cpu::vec_exp_, "x = exp(x) in place with the kernels' vector exp (x <= 0)");
  m.def("logprobs", &wspo_cpu::logprobs,
        "per-row logp [N] and statistics [3, N] (max, sum of exp, that sum without the label)");
  m.def("logprobs_backward", &wspo_cpu::logprobs_backward, "grad_logp * (onehot - softmax) into out");
  m.def("weak_log_ratio", &wspo_cpu::weak_log_ratio, "l^aligned - l^base per row");
  m.def("wspo_rows", &wspo_cpu::wspo_rows, "WSPO loss terms and policy gradient from k = gamma*l^r + l^a - l^w");
  m.def("wspo_four", &wspo_cpu::wspo_four, "one-pass WSPO from four logits");
  m.def("scale_rows_", &wspo_cpu::scale_rows_, "grad[i, :] *= scale[i] in place");
}
