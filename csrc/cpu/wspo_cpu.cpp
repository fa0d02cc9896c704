// Native CPU row kernels of wspo-kernels: vectorised (ATen Vectorized<float>), parallel over rows.
//
// Every kernel works on rows: logits [N, V] (unit stride along V, any row stride), labels [N] int64,
// rows whose label is ignore_index contribute 0.  Accumulation is float32 for fp32 / bf16 / fp16 inputs.
//
// Online log-sum-exp, one sweep of the row from memory: the row is cut into blocks of kBlock
// elements (small enough to stay in L1); for each block
//     M = max_j z_j;  m' = max(m, M);  s = s * exp(m - m') + sum_j exp(z_j - m')
// so the block is read twice from L1 and once from memory; lse = m + log(s).  The label logit z_y is
// read directly.  logp = z_y - lse.
//
// WSPO in one pass (wspo_four): per row, the log-sum-exps of ref, aligned and base (each row read once),
// then the policy's; d = gamma * (l^p - l^r) - (l^a - l^w), loss = w * d^2 with the per-token weight
// w (m_t / n_b / B'), and the policy gradient of sum_t loss_t written in a second sweep of the policy
// row (from cache):  g_v = c * (1[v = y] - exp(z_v - lse)),  c = 2 * gamma * w * d.
// wspo_rows is the same with the frozen models folded into k = gamma * l^r + l^a - l^w.
// Nothing is saved: the caller keeps the gradient; the gradient buffer may be the policy logits
// (in-place), as each element is read before it is written.
//
// This file is compiled once per CPU capability (AVX-512, AVX2, default) into separate modules;
// wspo_kernels/backends/native.py loads the one matching the running CPU.
#include <torch/extension.h>

#include "../common.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstring>
#include <limits>

namespace wspo_cpu {

using Vec = at::vec::Vectorized<float>;
using at::Tensor;

constexpr int64_t kBlock = 4096;                  // elements per online-lse block (16 KB of fp32)
constexpr int64_t kRowsPerTask = 1;               // at::parallel_for grain, in rows
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ------------------------------------------------------------------------------------------ row I/O
// A "step" is two float vectors: one Vectorized<T> of bf16/fp16 widens to exactly two of float.
template <typename T>
struct RowIO {
  using RVec = at::vec::Vectorized<T>;
  static constexpr int64_t kStep = RVec::size();
  static_assert(kStep == 2 * Vec::size(), "reduced-precision vector must widen to two float vectors");
  static inline void load(const T* p, Vec& a, Vec& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(RVec::loadu(p));
  }
  static inline void load_tail(const T* p, int64_t n, float fill, Vec& a, Vec& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(RVec::loadu(p, n));
    fill_tail(n, fill, a, b);
  }
  static inline void store(T* p, const Vec& a, const Vec& b) { at::vec::convert_from_float<T>(a, b).store(p); }
  static inline void store_tail(T* p, int64_t n, const Vec& a, const Vec& b) {
    at::vec::convert_from_float<T>(a, b).store(p, n);
  }
  static inline void fill_tail(int64_t n, float fill, Vec& a, Vec& b) {
    const int64_t vs = Vec::size();
    a = Vec::set(Vec(fill), a, std::min(n, vs));
    b = n > vs ? Vec::set(Vec(fill), b, n - vs) : Vec(fill);
  }
};

template <>
struct RowIO<float> {
  static constexpr int64_t kStep = 2 * Vec::size();
  static inline void load(const float* p, Vec& a, Vec& b) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + Vec::size());
  }
  static inline void load_tail(const float* p, int64_t n, float fill, Vec& a, Vec& b) {
    const int64_t vs = Vec::size();
    a = Vec::set(Vec(fill), Vec::loadu(p, std::min(n, vs)), std::min(n, vs));
    b = n > vs ? Vec::set(Vec(fill), Vec::loadu(p + vs, n - vs), n - vs) : Vec(fill);
  }
  static inline void store(float* p, const Vec& a, const Vec& b) {
    a.store(p);
    b.store(p + Vec::size());
  }
  static inline void store_tail(float* p, int64_t n, const Vec& a, const Vec& b) {
    const int64_t vs = Vec::size();
    a.store(p, std::min(n, vs));
    if (n > vs) b.store(p + vs, n - vs);
  }
};

inline float hmax(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, v);
}
inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, v);
}

// Apply f(a, b) to the row in steps; the tail is padded with `fill`.
template <typename T, typename F>
inline void for_steps(const T* x, int64_t n, float fill, F&& f) {
  using IO = RowIO<T>;
  Vec a, b;
  int64_t j = 0;
  for (; j + IO::kStep <= n; j += IO::kStep) {
    IO::load(x + j, a, b);
    f(a, b);
  }
  if (j < n) {
    IO::load_tail(x + j, n - j, fill, a, b);
    f(a, b);
  }
}

// ------------------------------------------------------------------------------------------ row math
template <typename T>
float row_lse(const T* x, int64_t V) {
  float m = kNegInf, s = 0.f;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const T* xb = x + b0;
    const int64_t n = std::min(kBlock, V - b0);
    Vec vmax(kNegInf);
    for_steps(xb, n, kNegInf, [&](const Vec& a, const Vec& b) { vmax = at::vec::maximum(vmax, at::vec::maximum(a, b)); });
    const float block_max = hmax(vmax);
    if (block_max == kNegInf) continue;  // nothing to add (and no -inf - -inf)
    const float m_new = std::max(m, block_max);
    s *= std::exp(m - m_new);
    m = m_new;
    const Vec vm(m);
    Vec vsum(0.f);
    for_steps(xb, n, kNegInf, [&](const Vec& a, const Vec& b) { vsum += (a - vm).exp() + (b - vm).exp(); });
    s += hsum(vsum);
  }
  return m == kNegInf ? kNegInf : m + std::log(s);
}

// out = coef * (onehot(y) - exp(x - lse)); out may alias x.  z_y is the label logit, read beforehand.
template <typename T>
void row_grad(const T* x, T* out, int64_t V, float lse, float coef, int64_t y, float z_y) {
  using IO = RowIO<T>;
  const Vec vl(lse), vc(-coef);
  Vec a, b;
  int64_t j = 0;
  for (; j + IO::kStep <= V; j += IO::kStep) {
    IO::load(x + j, a, b);
    IO::store(out + j, (a - vl).exp() * vc, (b - vl).exp() * vc);
  }
  if (j < V) {
    IO::load_tail(x + j, V - j, kNegInf, a, b);
    IO::store_tail(out + j, V - j, (a - vl).exp() * vc, (b - vl).exp() * vc);
  }
  out[y] = static_cast<T>(coef * (1.f - std::exp(z_y - lse)));  // one rounding for the label entry
}

template <typename T>
inline void zero_row(T* out, int64_t V) {
  std::memset(static_cast<void*>(out), 0, sizeof(T) * V);
}

struct Rows {  // a [N, V] logits view
  const void* data;
  int64_t stride, vocab;
  template <typename T>
  const T* row(int64_t i) const { return static_cast<const T*>(data) + i * stride; }
};

inline Rows rows_of(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be [N, V] with unit stride along V");
  return Rows{t.data_ptr(), t.stride(0), t.size(1)};
}

// (lse, label logit) of row i; the label was validated by the caller (and is checked here once more).
template <typename T>
inline std::pair<float, float> row_stats(const Rows& r, int64_t i, int64_t y) {
  TORCH_CHECK(y >= 0 && y < r.vocab, "label ", y, " outside [0, ", r.vocab, ")");
  const T* x = r.row<T>(i);
  return {row_lse(x, r.vocab), static_cast<float>(x[y])};
}

template <typename F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  wspo::dispatch_dtype(dtype, "native CPU kernels", std::forward<F>(f));
}

void check_rows(const Tensor& labels, std::initializer_list<Tensor> tensors) {
  TORCH_CHECK(labels.dim() == 1 && labels.scalar_type() == at::kLong && labels.is_contiguous(),
              "labels must be contiguous int64 [N]");
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu(), "native CPU kernels need CPU tensors");
    TORCH_CHECK(t.size(0) == labels.size(0), "row count mismatch");
  }
}

Tensor per_row(const Tensor& like, int64_t n) { return at::empty({n}, like.options().dtype(at::kFloat)); }

// ------------------------------------------------------------------------------------------ kernels
std::tuple<Tensor, Tensor> logprobs(const Tensor& logits, const Tensor& labels, int64_t ignore_index) {
  check_rows(labels, {logits});
  const Rows r = rows_of(logits, "logits");
  const int64_t n = labels.size(0);
  Tensor logp = per_row(logits, n), lse = per_row(logits, n);
  const int64_t* y = labels.data_ptr<int64_t>();
  float *lp = logp.data_ptr<float>(), *ls = lse.data_ptr<float>();
  dispatch_dtype(logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, n, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (y[i] == ignore_index) { lp[i] = 0.f; ls[i] = 0.f; continue; }
        auto [l, z] = row_stats<T>(r, i, y[i]);
        ls[i] = l;
        lp[i] = z - l;
      }
    });
  });
  return {logp, lse};
}

// out = grad_logp * (onehot - softmax): the backward of logprobs, from the saved lse.
Tensor logprobs_backward(const Tensor& logits, const Tensor& labels, const Tensor& lse, const Tensor& grad_logp,
                         int64_t ignore_index, Tensor out) {
  check_rows(labels, {logits, out});
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == logits.scalar_type(), "out must be contiguous, logits' dtype");
  const Rows r = rows_of(logits, "logits");
  const int64_t n = labels.size(0);
  Tensor g = grad_logp.to(at::kFloat).contiguous(), l = lse.contiguous();
  const int64_t* y = labels.data_ptr<int64_t>();
  const float *gp = g.data_ptr<float>(), *lp = l.data_ptr<float>();
  dispatch_dtype(logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    T* o = out.data_ptr<T>();
    at::parallel_for(0, n, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        T* orow = o + i * r.vocab;
        if (y[i] == ignore_index) { zero_row(orow, r.vocab); continue; }
        const T* x = r.row<T>(i);
        row_grad(x, orow, r.vocab, lp[i], gp[i], y[i], static_cast<float>(x[y[i]]));
      }
    });
  });
  return out;
}

Tensor weak_log_ratio(const Tensor& aligned, const Tensor& base, const Tensor& labels, int64_t ignore_index) {
  check_rows(labels, {aligned, base});
  TORCH_CHECK(aligned.scalar_type() == base.scalar_type(), "aligned and base logits must share a dtype");
  const Rows ra = rows_of(aligned, "aligned"), rb = rows_of(base, "base");
  const int64_t n = labels.size(0);
  Tensor out = per_row(aligned, n);
  const int64_t* y = labels.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  dispatch_dtype(aligned.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, n, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (y[i] == ignore_index) { o[i] = 0.f; continue; }
        auto [la, za] = row_stats<T>(ra, i, y[i]);
        auto [lw, zw] = row_stats<T>(rb, i, y[i]);
        o[i] = (za - la) - (zw - lw);
      }
    });
  });
  return out;
}

// Shared tail of both WSPO kernels: loss and (optionally) the policy gradient of row i.
template <typename T>
inline void policy_row(const Rows& p, T* grad, int64_t i, int64_t y, float k, float w, float gamma, float* loss,
                       float* logp) {
  auto [lse, z] = row_stats<T>(p, i, y);
  const float lp = z - lse, d = gamma * lp - k;
  logp[i] = lp;
  loss[i] = w * d * d;
  if (grad != nullptr) row_grad(p.row<T>(i), grad + i * p.vocab, p.vocab, lse, 2.f * gamma * w * d, y, z);
}

template <typename T>
inline T* grad_ptr(const c10::optional<Tensor>& grad, const Tensor& policy) {
  if (!grad.has_value()) return nullptr;
  TORCH_CHECK(grad->scalar_type() == policy.scalar_type() && grad->sizes() == policy.sizes() &&
                  grad->stride(1) == 1 && grad->stride(0) == policy.size(1),
              "grad must be a contiguous [N, V] buffer of the policy's dtype");
  return grad->data_ptr<T>();
}

// Both WSPO kernels: with `frozen` (ref, aligned, base logits) the one-pass kernel reads the three
// frozen rows and fills logps [4, N]; without, k = gamma * l^r + l^a - l^w is given and logps is [N].
std::tuple<Tensor, Tensor> wspo(const Tensor& policy, const Tensor* frozen, const c10::optional<Tensor>& k,
                                const Tensor& labels, const Tensor& weight, double gamma, int64_t ignore_index,
                                const c10::optional<Tensor>& grad) {
  check_rows(labels, {policy, weight});
  const Rows p = rows_of(policy, "policy");
  Rows fr[3] = {p, p, p};
  if (frozen != nullptr) {
    check_rows(labels, {frozen[0], frozen[1], frozen[2]});
    for (int m = 0; m < 3; ++m) {
      TORCH_CHECK(frozen[m].scalar_type() == policy.scalar_type(), "the one-pass kernel needs one dtype for all four");
      fr[m] = rows_of(frozen[m], "frozen logits");
    }
  }
  const int64_t n = labels.size(0);
  Tensor wc = weight.to(at::kFloat).contiguous(), kc = k.has_value() ? k->to(at::kFloat).contiguous() : Tensor();
  Tensor loss = per_row(policy, n), logps = at::empty({frozen ? 4 : 1, n}, policy.options().dtype(at::kFloat));
  const int64_t* y = labels.data_ptr<int64_t>();
  const float *wp = wc.data_ptr<float>(), *kp = k.has_value() ? kc.data_ptr<float>() : nullptr;
  float *lo = loss.data_ptr<float>(), *l4 = logps.data_ptr<float>();
  const int n_logps = frozen ? 4 : 1;
  const float g = static_cast<float>(gamma);
  dispatch_dtype(policy.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    T* gr = grad_ptr<T>(grad, policy);
    at::parallel_for(0, n, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (y[i] == ignore_index) {
          lo[i] = 0.f;
          for (int m = 0; m < n_logps; ++m) l4[m * n + i] = 0.f;
          if (gr != nullptr) zero_row(gr + i * p.vocab, p.vocab);
          continue;
        }
        float ki;
        if (frozen != nullptr) {
          float l[3];
          for (int m = 0; m < 3; ++m) {
            auto [lse, z] = row_stats<T>(fr[m], i, y[i]);
            l[m] = z - lse;
            l4[(m + 1) * n + i] = l[m];
          }
          ki = g * l[0] + l[1] - l[2];
        } else {
          ki = kp[i];
        }
        policy_row<T>(p, gr, i, y[i], ki, wp[i], g, lo, l4);
      }
    });
  });
  return {loss, frozen ? logps : logps[0]};
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

// grad[i, :] *= scale[i] in float32, in place: the backward of the WSPO kernels for per-row upstream grads.
void scale_rows_(Tensor grad, const Tensor& scale) {
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous() && grad.device().is_cpu(), "grad must be contiguous [N, V]");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == grad.size(0), "scale must be [N]");
  Tensor sc = scale.to(at::kFloat).contiguous();
  const float* sp = sc.data_ptr<float>();
  const int64_t n = grad.size(0), V = grad.size(1);
  dispatch_dtype(grad.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using IO = RowIO<T>;
    T* g = grad.data_ptr<T>();
    at::parallel_for(0, n, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (sp[i] == 1.f) continue;  // the usual case (mean / sum reductions): nothing to do
        T* row = g + i * V;
        const Vec vs(sp[i]);
        Vec a, b;
        int64_t j = 0;
        for (; j + IO::kStep <= V; j += IO::kStep) {
          IO::load(row + j, a, b);
          IO::store(row + j, a * vs, b * vs);
        }
        if (j < V) {
          IO::load_tail(row + j, V - j, 0.f, a, b);
          IO::store_tail(row + j, V - j, a * vs, b * vs);
        }
      }
    });
  });
}

}  // namespace wspo_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "wspo-kernels native CPU row kernels (one build per CPU capability)";
  m.attr("capability") = WSPO_CAPABILITY_NAME;
  m.def("logprobs", &wspo_cpu::logprobs, "per-row (logp, lse)");
  m.def("logprobs_backward", &wspo_cpu::logprobs_backward, "grad_logp * (onehot - softmax) into out");
  m.def("weak_log_ratio", &wspo_cpu::weak_log_ratio, "l^aligned - l^base per row");
  m.def("wspo_rows", &wspo_cpu::wspo_rows, "WSPO loss terms and policy gradient from k = gamma*l^r + l^a - l^w");
  m.def("wspo_four", &wspo_cpu::wspo_four, "one-pass WSPO from four logits");
  m.def("scale_rows_", &wspo_cpu::scale_rows_, "grad[i, :] *= scale[i] in place");
}
