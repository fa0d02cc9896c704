// Native CPU row kernels of wspo-kernels: vectorised (ATen Vectorized<float>), parallel over rows.
//
// Every kernel works on rows: logits [N, V] or [B, T, V] with unit stride along V and any strides
// across rows (row i is (b, t) = (i / T, i % T): a vocab-sliced, transposed or expanded view is read
// in place), labels [N] int64, rows whose label is ignore_index contribute 0 and are never read
// (NaN or inf there changes nothing).  Accumulation is float32 for fp32 / bf16 / fp16 inputs.
//
// Online log-sum-exp, one sweep of the row from memory: the row is cut into blocks of kBlock
// elements (small enough to stay in L1); for each block
//     M = max_j z_j;  m' = max(m, M);  s = s * exp(m - m') + sum_j exp(z_j - m')
// so the block is read twice from L1 and once from memory; the label's own term is left out of the
// sum: r = sum_{v != y} exp(z_v - m), s = r + exp(z_y - m).  The statistics (m, s, r) are kept apart:
// logp = (z_y - m) - log(s) stays exact for logits with a large common offset (m + log(s) would round
// to the offset's ulp), and q = r / s = 1 - p_y keeps its relative accuracy as p_y -> 1, where
// logp = log1p(-q) (used when q < 1/2).  softmax_v = exp(z_v - m) / s.
//
// WSPO in one pass (wspo_four): per row, the statistics of ref, aligned and base (each row read once),
// then the policy's; d = gamma * (l^p - l^r) - (l^a - l^w), loss = w * d^2 with the per-token weight
// w (m_t / n_b / B'), and the policy gradient of sum_t loss_t written in a second sweep of the policy
// row (from cache):  g_v = -c * exp(z_v - m) / s,  g_y = c * q,  c = 2 * gamma * w * d
// (no cancellation as p_y -> 1).  wspo_rows is the same with the frozen models folded into
// k = gamma * l^r + l^a - l^w.  Nothing is saved: the caller keeps the gradient; the gradient
// buffer may be the policy logits (in place, any non-overlapping layout), as each element is read
// before it is written.
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
struct Stats {  // a row's max m, sum s of exp(z - m), and that sum r without the label's term
  float m, s, r;
};

template <typename T>
Stats row_stats_of(const T* x, int64_t V, int64_t y) {
  float m = kNegInf, r = 0.f;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const T* xb = x + b0;
    const int64_t n = std::min(kBlock, V - b0);
    Vec vmax(kNegInf);
    for_steps(xb, n, kNegInf, [&](const Vec& a, const Vec& b) { vmax = at::vec::maximum(vmax, at::vec::maximum(a, b)); });
    const float block_max = hmax(vmax);
    if (block_max == kNegInf) continue;  // nothing to add (and no -inf - -inf)
    const float m_new = std::max(m, block_max);
    r *= std::exp(m - m_new);
    m = m_new;
    const Vec vm(m);
    Vec vsum(0.f);
    auto add = [&](const Vec& a, const Vec& b) { vsum += (a - vm).exp() + (b - vm).exp(); };
    const int64_t yl = y - b0;
    if (yl >= 0 && yl < n) {  // the block holding the label: sum around it
      for_steps(xb, yl, kNegInf, add);
      for_steps(xb + yl + 1, n - yl - 1, kNegInf, add);
    } else {
      for_steps(xb, n, kNegInf, add);
    }
    r += hsum(vsum);
  }
  return {m, r + std::exp(static_cast<float>(x[y]) - m), r};
}

// (logp, q = 1 - p_y) of a row, both accurate as p_y -> 1.
inline std::pair<float, float> logp_q(float z_y, Stats st) {
  const float q = st.r / st.s;
  return {q < 0.5f ? std::log1p(-q) : (z_y - st.m) - std::log(st.s), q};
}
inline float logp_of(float z_y, Stats st) { return logp_q(z_y, st).first; }

// out = coef * (onehot(y) - exp(x - m) / s), the label entry coef * q; out may alias x.
template <typename T>
void row_grad(const T* x, T* out, int64_t V, Stats st, float coef, int64_t y, float q) {
  using IO = RowIO<T>;
  const Vec vm(st.m), vc(-coef / st.s);
  Vec a, b;
  int64_t j = 0;
  for (; j + IO::kStep <= V; j += IO::kStep) {
    IO::load(x + j, a, b);
    IO::store(out + j, (a - vm).exp() * vc, (b - vm).exp() * vc);
  }
  if (j < V) {
    IO::load_tail(x + j, V - j, kNegInf, a, b);
    IO::store_tail(out + j, V - j, (a - vm).exp() * vc, (b - vm).exp() * vc);
  }
  out[y] = static_cast<T>(coef * q);  // c (1 - p_y) without cancellation as p_y -> 1
}

template <typename T>
inline void zero_row(T* out, int64_t V) {
  std::memset(static_cast<void*>(out), 0, sizeof(T) * V);
}

// Rows of an [N, V] or [B, T, V] tensor with unit stride along V: row i = (i / inner, i % inner).
struct Rows {
  void* data;
  int64_t outer_stride, inner_stride, inner, vocab;
  template <typename T>
  T* row(int64_t i) const {
    return static_cast<T*>(data) + (i / inner) * outer_stride + (i % inner) * inner_stride;
  }
};

inline Rows rows_of(const Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK((t.dim() == 2 || t.dim() == 3) && t.stride(-1) == 1 && t.device().is_cpu(), name,
              " must be a CPU [N, V] or [B, T, V] tensor with unit stride along V");
  const int64_t rows = t.numel() / std::max<int64_t>(t.size(-1), 1);
  TORCH_CHECK(rows == n, name, " has ", rows, " rows, labels have ", n);
  if (t.dim() == 3) return Rows{t.data_ptr(), t.stride(0), t.stride(1), std::max<int64_t>(t.size(1), 1), t.size(2)};
  return Rows{t.data_ptr(), 0, t.stride(0), std::max<int64_t>(n, 1), t.size(1)};
}

// (statistics, label logit) of row i; the label was validated by the caller (and is checked here once more).
template <typename T>
inline std::pair<Stats, float> row_stats(const Rows& r, int64_t i, int64_t y) {
  TORCH_CHECK(y >= 0 && y < r.vocab, "label ", y, " outside [0, ", r.vocab, ")");
  const T* x = r.row<T>(i);
  return {row_stats_of(x, r.vocab, y), static_cast<float>(x[y])};
}

template <typename F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  wspo::dispatch_dtype(dtype, "native CPU kernels", std::forward<F>(f));
}

void check_labels(const Tensor& labels) {
  TORCH_CHECK(labels.dim() == 1 && labels.scalar_type() == at::kLong && labels.is_contiguous() &&
                  labels.device().is_cpu(), "labels must be contiguous CPU int64 [N]");
}

Tensor per_row(const Tensor& like, int64_t n) { return at::empty({n}, like.options().dtype(at::kFloat)); }

// An output gradient buffer: the policy's shape and dtype, unit stride along V, any row strides.
Rows grad_rows(const Tensor& grad, const Tensor& like, int64_t n, const char* name) {
  TORCH_CHECK(grad.scalar_type() == like.scalar_type() && grad.size(-1) == like.size(-1), name,
              " must have the logits' dtype and vocabulary size");
  return rows_of(grad, n, name);
}

// ------------------------------------------------------------------------------------------ kernels
// (logp [N], stats [3, N]): stats rows are m, s, r (0, 1, 0 when ignored).
std::tuple<Tensor, Tensor> logprobs(const Tensor& logits, const Tensor& labels, int64_t ignore_index) {
  check_labels(labels);
  const int64_t n = labels.size(0);
  const Rows r = rows_of(logits, n, "logits");
  Tensor logp = per_row(logits, n), stats = at::empty({3, n}, logits.options().dtype(at::kFloat));
  const int64_t* y = labels.data_ptr<int64_t>();
  float *lp = logp.data_ptr<float>(), *sm = stats.data_ptr<float>(), *ss = sm + n, *sr = ss + n;
  dispatch_dtype(logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, n, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (y[i] == ignore_index) { lp[i] = 0.f; sm[i] = 0.f; ss[i] = 1.f; sr[i] = 0.f; continue; }
        auto [st, z] = row_stats<T>(r, i, y[i]);
        sm[i] = st.m;
        ss[i] = st.s;
        sr[i] = st.r;
        lp[i] = logp_of(z, st);
      }
    });
  });
  return {logp, stats};
}

// out = grad_logp * (onehot - softmax): the backward of logprobs, from the saved statistics.
Tensor logprobs_backward(const Tensor& logits, const Tensor& labels, const Tensor& stats, const Tensor& grad_logp,
                         int64_t ignore_index, Tensor out) {
  check_labels(labels);
  const int64_t n = labels.size(0);
  const Rows r = rows_of(logits, n, "logits"), o = grad_rows(out, logits, n, "out");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 3 && stats.size(1) == n, "stats must be [3, N]");
  Tensor g = grad_logp.to(at::kFloat).contiguous(), st = stats.to(at::kFloat).contiguous();
  const int64_t* y = labels.data_ptr<int64_t>();
  const float *gp = g.data_ptr<float>(), *sm = st.data_ptr<float>(), *ss = sm + n, *sr = ss + n;
  dispatch_dtype(logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, n, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        T* orow = o.row<T>(i);
        if (y[i] == ignore_index) { zero_row(orow, r.vocab); continue; }
        const Stats s{sm[i], ss[i], sr[i]};
        row_grad(r.row<T>(i), orow, r.vocab, s, gp[i], y[i], s.r / s.s);
      }
    });
  });
  return out;
}

Tensor weak_log_ratio(const Tensor& aligned, const Tensor& base, const Tensor& labels, int64_t ignore_index) {
  check_labels(labels);
  TORCH_CHECK(aligned.scalar_type() == base.scalar_type(), "aligned and base logits must share a dtype");
  const int64_t n = labels.size(0);
  const Rows ra = rows_of(aligned, n, "aligned"), rb = rows_of(base, n, "base");
  Tensor out = per_row(aligned, n);
  const int64_t* y = labels.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  dispatch_dtype(aligned.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, n, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (y[i] == ignore_index) { o[i] = 0.f; continue; }
        auto [sa, za] = row_stats<T>(ra, i, y[i]);
        auto [sw, zw] = row_stats<T>(rb, i, y[i]);
        o[i] = logp_of(za, sa) - logp_of(zw, sw);
      }
    });
  });
  return out;
}

// Shared tail of both WSPO kernels: loss and (optionally) the policy gradient of row i.
template <typename T>
inline void policy_row(const Rows& p, const Rows* grad, int64_t i, int64_t y, float k, float w, float gamma,
                       float* loss, float* logp) {
  auto [st, z] = row_stats<T>(p, i, y);
  const auto [lp, q] = logp_q(z, st);
  const float d = gamma * lp - k;
  logp[i] = lp;
  loss[i] = w * d * d;
  if (grad != nullptr) row_grad(p.row<T>(i), grad->row<T>(i), p.vocab, st, 2.f * gamma * w * d, y, q);
}

// Both WSPO kernels: with `frozen` (ref, aligned, base logits) the one-pass kernel reads the three
// frozen rows and fills logps [4, N]; without, k = gamma * l^r + l^a - l^w is given and logps is [N].
std::tuple<Tensor, Tensor> wspo(const Tensor& policy, const Tensor* frozen, const c10::optional<Tensor>& k,
                                const Tensor& labels, const Tensor& weight, double gamma, int64_t ignore_index,
                                const c10::optional<Tensor>& grad) {
  check_labels(labels);
  const int64_t n = labels.size(0);
  const Rows p = rows_of(policy, n, "policy");
  TORCH_CHECK(weight.numel() == n, "weight must be [N]");
  Rows fr[3] = {p, p, p};
  if (frozen != nullptr) {
    for (int m = 0; m < 3; ++m) {
      TORCH_CHECK(frozen[m].scalar_type() == policy.scalar_type(), "the one-pass kernel needs one dtype for all four");
      fr[m] = rows_of(frozen[m], n, "frozen logits");
    }
  }
  Rows gr{};
  if (grad.has_value()) gr = grad_rows(*grad, policy, n, "grad");
  Tensor wc = weight.to(at::kFloat).contiguous(), kc = k.has_value() ? k->to(at::kFloat).contiguous() : Tensor();
  Tensor loss = per_row(policy, n), logps = at::empty({frozen ? 4 : 1, n}, policy.options().dtype(at::kFloat));
  const int64_t* y = labels.data_ptr<int64_t>();
  const float *wp = wc.data_ptr<float>(), *kp = k.has_value() ? kc.data_ptr<float>() : nullptr;
  float *lo = loss.data_ptr<float>(), *l4 = logps.data_ptr<float>();
  const int n_logps = frozen ? 4 : 1;
  const float g = static_cast<float>(gamma);
  const Rows* gp = grad.has_value() ? &gr : nullptr;
  dispatch_dtype(policy.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, n, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (y[i] == ignore_index) {
          lo[i] = 0.f;
          for (int m = 0; m < n_logps; ++m) l4[m * n + i] = 0.f;
          if (gp != nullptr) zero_row(gp->row<T>(i), p.vocab);
          continue;
        }
        float ki;
        if (frozen != nullptr) {
          float l[3];
          for (int m = 0; m < 3; ++m) {
            auto [st, z] = row_stats<T>(fr[m], i, y[i]);
            l[m] = logp_of(z, st);
            l4[(m + 1) * n + i] = l[m];
          }
          ki = g * l[0] + l[1] - l[2];
        } else {
          ki = kp[i];
        }
        policy_row<T>(p, gp, i, y[i], ki, wp[i], g, lo, l4);
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
// grad may be any non-overlapping rows layout (the policy logits themselves with inplace_grad).
void scale_rows_(Tensor grad, const Tensor& scale) {
  TORCH_CHECK(scale.dim() == 1, "scale must be [N]");
  const int64_t n = scale.size(0);
  const Rows r = rows_of(grad, n, "grad");
  Tensor sc = scale.to(at::kFloat).contiguous();
  const float* sp = sc.data_ptr<float>();
  const int64_t V = r.vocab;
  dispatch_dtype(grad.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using IO = RowIO<T>;
    at::parallel_for(0, n, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (sp[i] == 1.f) continue;  // the usual case (mean / sum reductions): nothing to do
        T* row = r.row<T>(i);
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
  m.def("logprobs", &wspo_cpu::logprobs, "per-row logp [N] and statistics [3, N] (max, sum of exp, that sum without the label)");
  m.def("logprobs_backward", &wspo_cpu::logprobs_backward, "grad_logp * (onehot - softmax) into out");
  m.def("weak_log_ratio", &wspo_cpu::weak_log_ratio, "l^aligned - l^base per row");
  m.def("wspo_rows", &wspo_cpu::wspo_rows, "WSPO loss terms and policy gradient from k = gamma*l^r + l^a - l^w");
  m.def("wspo_four", &wspo_cpu::wspo_four, "one-pass WSPO from four logits");
  m.def("scale_rows_", &wspo_cpu::scale_rows_, "grad[i, :] *= scale[i] in place");
}
