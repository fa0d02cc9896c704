// CUDA row kernels of wspo-kernels: one thread block per row, online softmax, vectorised loads.
//
// Same contract as the CPU kernels (csrc/cpu/wspo_cpu.cpp) and the portable backend: rows of logits
// [N, V] or [B, T, V] with unit stride along V and any row strides (row i = (i / T, i % T), so views
// are read and written in place), labels [N] int64 already shifted, ignore_index rows contribute 0
// and are never read, float32 accumulation for fp32 / bf16 / fp16 inputs.
//
// Online log-sum-exp: each thread keeps a running (m, s) over the 16-byte packs it reads (4 fp32 or 8
// bf16 / fp16 elements, kUnroll packs in flight per thread): per pack its max M, one rescale
//     M > m:  s = s * exp(m - M), m = M          then  s += sum_j exp(x_j - m)
// (one exp per element, computed as ex2.approx((x - m) * log2 e): x - m is formed first, so logits
// with a large common offset stay exact, which exp2(fma(x, log2 e, -m log2 e)) would not be, as m log2 e
// rounds), then the block merges the pairs (m, s) ⊕ (m', s') = (M, s e^{m-M} + s' e^{m'-M}).  The
// pack max propagates NaN (a NaN logit in a counted row gives a NaN logp, as on the CPU).  Rows are
// peeled to their first 16-byte boundary, so packs are aligned whatever V or the row stride.
// The label's own term is left out of the sum (it only raises the max): r = sum_{v != y} exp(z_v - m),
// s = r + exp(z_y - m).  The statistics (m, s, r) stay apart: q = r / s = 1 - p_y and
// logp = log1p(-q) if q < 1/2 else (z_y - m) - log(s) are exact for logits with a large common offset
// and as p_y -> 1; softmax_v = exp(z_v - m) / s.  WSPO: per row the four statistics,
// d = gamma (l^p - l^r) - (l^a - l^w), loss = w d^2, and the policy gradient -c exp(z_v - m) / s, label
// entry c q, c = 2 gamma w d, written in a second sweep of the policy row (usually still in L2).
// Row offsets are int64 (N * V may exceed 2^31).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "../common.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace wspo_cuda {

using at::Tensor;

constexpr int kThreads = 512;          // threads per row (block)
constexpr int kPackBytes = 16;         // vectorised load width
constexpr int kUnroll = 4;             // packs in flight per thread (64 bytes)
constexpr float kNegInf = -INFINITY;
constexpr float kLog2e = 1.4426950408889634f;

// 2^x in one MUFU instruction (max relative error ~2^-22), flushed to 0 below 2^-126: terms that
// small change no sum that holds the max's own 1, and gradients that small are 0 in every dtype.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float exp_minus(float x, float m) { return exp2_ftz((x - m) * kLog2e); }

// max that propagates NaN (fmaxf drops it).
__device__ __forceinline__ float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float y;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));
  return y;
#else
  return (a != a || a > b) ? a : b;
#endif
}

struct MS {  // running max and sum of exp(x - max)
  float m, s;
};

__device__ __forceinline__ MS merge(MS a, MS b) {
  const float m = max_nan(a.m, b.m);  // a NaN m (a thread saw NaN) must survive a merge with an empty part
  if (m == kNegInf) return {kNegInf, 0.f};
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

// Raise the running max to M (a NaN M makes m and s NaN for good).
__device__ __forceinline__ void raise_max(MS& r, float M) {
  if (!(M <= r.m)) {
    r.s = r.m == kNegInf ? 0.f : r.s * exp_minus(r.m, M);
    r.m = M;
  }
}

// P elements starting at column c0; the label's element (column y) raises the max, adds nothing.
template <int P>
__device__ __forceinline__ void push_pack(MS& r, const float (&v)[P], int64_t c0, int64_t y) {
  float M = v[0];
#pragma unroll
  for (int j = 1; j < P; ++j) M = max_nan(M, v[j]);
  raise_max(r, M);
  if (r.m == kNegInf) return;  // nothing but -inf so far: no -inf - -inf
  float add = 0.f;
  if (static_cast<uint64_t>(y - c0) < static_cast<uint64_t>(P)) {  // the pack holding the label (one per row)
#pragma unroll
    for (int j = 0; j < P; ++j) add += c0 + j == y ? 0.f : exp_minus(v[j], r.m);
  } else {
#pragma unroll
    for (int j = 0; j < P; ++j) add += exp_minus(v[j], r.m);
  }
  r.s += add;
}

struct Stats {  // a row's max m, sum s of exp(z - m), that sum r without the label's term, label logit
  float m, s, r, z_y;
};

// (logp, q = 1 - p_y), both accurate as p_y -> 1.
__device__ __forceinline__ float2 logp_q(Stats st) {
  const float q = st.r / st.s;
  return make_float2(q < 0.5f ? log1pf(-q) : (st.z_y - st.m) - logf(st.s), q);
}
__device__ __forceinline__ float logp_of(Stats st) { return logp_q(st).x; }

template <typename T>
__device__ __forceinline__ float to_f(T x) { return static_cast<float>(x); }

// Block-wide merge of (m, s); every thread gets the result.
__device__ MS block_merge(MS r) {
  __shared__ MS warp_part[kThreads / 32];
  __shared__ MS total;
  for (int off = 16; off > 0; off >>= 1) {
    MS o{__shfl_down_sync(0xffffffff, r.m, off), __shfl_down_sync(0xffffffff, r.s, off)};
    r = merge(r, o);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_part[warp] = r;
  __syncthreads();
  if (warp == 0) {
    r = lane < kThreads / 32 ? warp_part[lane] : MS{kNegInf, 0.f};
    for (int off = 16; off > 0; off >>= 1) {
      MS o{__shfl_down_sync(0xffffffff, r.m, off), __shfl_down_sync(0xffffffff, r.s, off)};
      r = merge(r, o);
    }
    if (lane == 0) total = r;
  }
  __syncthreads();
  MS out = total;
  __syncthreads();  // the shared slots are reused by the next call
  return out;
}

// Elements before the row's first 16-byte boundary (at most V).
template <typename T>
__device__ __forceinline__ int64_t head_of(const T* x, int64_t V) {
  const int64_t mis = reinterpret_cast<uintptr_t>(x) % kPackBytes;
  return min(V, mis == 0 ? int64_t{0} : (kPackBytes - mis) / static_cast<int64_t>(sizeof(T)));
}

template <typename T>
struct alignas(kPackBytes) Pack {
  static constexpr int P = kPackBytes / sizeof(T);
  T v[P];
  __device__ __forceinline__ void to_float(float (&f)[P]) const {
#pragma unroll
    for (int j = 0; j < P; ++j) f[j] = to_f(v[j]);
  }
};

// Statistics of one row (label y): a scalar head up to the 16-byte boundary, kUnroll aligned packs in
// flight per thread, a scalar tail.
template <typename T>
__device__ Stats row_stats(const T* __restrict__ x, int64_t V, int64_t y) {
  using PackT = Pack<T>;
  constexpr int P = PackT::P;
  MS r{kNegInf, 0.f};
  const int64_t head = head_of(x, V), n_packs = (V - head) / P;
  for (int64_t i = threadIdx.x; i < head; i += kThreads) {
    const float v[1] = {to_f(x[i])};
    push_pack<1>(r, v, i, y);
  }
  const PackT* xp = reinterpret_cast<const PackT*>(x + head);
  for (int64_t i0 = threadIdx.x; i0 < n_packs; i0 += int64_t{kThreads} * kUnroll) {
    PackT p[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // every load issued before any is used
      const int64_t i = i0 + int64_t{u} * kThreads;
      if (i < n_packs) p[u] = xp[i];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = i0 + int64_t{u} * kThreads;
      if (i < n_packs) {
        float v[P];
        p[u].to_float(v);
        push_pack<P>(r, v, head + i * P, y);
      }
    }
  }
  for (int64_t i = head + n_packs * P + threadIdx.x; i < V; i += kThreads) {
    const float v[1] = {to_f(x[i])};
    push_pack<1>(r, v, i, y);
  }
  r = block_merge(r);
  const float z_y = to_f(x[y]);
  return {r.m, r.s + expf(z_y - r.m), r.s, z_y};
}

// out = coef * (onehot(y) - exp(x - m) / s), the label entry coef * q; out may alias x.  Loads are
// aligned packs after the head; stores are packs too when out shares x's alignment (else elements).
template <typename T>
__device__ void row_grad(const T* x, T* out, int64_t V, Stats st, float coef, int64_t y, float q) {
  using PackT = Pack<T>;
  constexpr int P = PackT::P;
  __syncthreads();  // in place (out == x): every thread has read z_y and its inputs before any write
  const float scale = -coef / st.s;
  const int64_t head = head_of(x, V), n_packs = (V - head) / P;
  const bool out_aligned = (reinterpret_cast<uintptr_t>(out) - reinterpret_cast<uintptr_t>(x)) % kPackBytes == 0;
  for (int64_t i = threadIdx.x; i < head; i += kThreads) out[i] = static_cast<T>(scale * exp_minus(to_f(x[i]), st.m));
  const PackT* xp = reinterpret_cast<const PackT*>(x + head);
  for (int64_t i0 = threadIdx.x; i0 < n_packs; i0 += int64_t{kThreads} * kUnroll) {
    PackT p[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = i0 + int64_t{u} * kThreads;
      if (i < n_packs) p[u] = xp[i];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = i0 + int64_t{u} * kThreads;
      if (i >= n_packs) continue;
#pragma unroll
      for (int j = 0; j < P; ++j) p[u].v[j] = static_cast<T>(scale * exp_minus(to_f(p[u].v[j]), st.m));
      T* o = out + head + i * P;
      if (out_aligned) {
        *reinterpret_cast<PackT*>(o) = p[u];
      } else {
#pragma unroll
        for (int j = 0; j < P; ++j) o[j] = p[u].v[j];
      }
    }
  }
  for (int64_t i = head + n_packs * P + threadIdx.x; i < V; i += kThreads)
    out[i] = static_cast<T>(scale * exp_minus(to_f(x[i]), st.m));
  __syncthreads();  // every thread's writes land before the label entry is fixed
  if (threadIdx.x == 0) out[y] = static_cast<T>(coef * q);
}

template <typename T>
__device__ void zero_row(T* out, int64_t V) {
  for (int64_t i = threadIdx.x; i < V; i += kThreads) out[i] = static_cast<T>(0.f);
}

// Rows of an [N, V] or [B, T, V] tensor with unit stride along V: row i = (i / inner, i % inner).
struct Rows {
  void* data;
  int64_t outer_stride, inner_stride, inner, vocab;
};

template <typename T>
__device__ __forceinline__ T* row_ptr(const Rows& r, int64_t i) {
  return static_cast<T*>(r.data) + (i / r.inner) * r.outer_stride + (i % r.inner) * r.inner_stride;
}

// ------------------------------------------------------------------------------------------ kernels
template <typename T>
__global__ void logprobs_kernel(Rows r, const int64_t* labels, int64_t ignore_index, float* logp, float* stats,
                                int64_t n) {
  const int64_t i = blockIdx.x;
  const int64_t y = labels[i];
  if (y == ignore_index) {
    if (threadIdx.x == 0) {
      logp[i] = stats[i] = stats[2 * n + i] = 0.f;
      stats[n + i] = 1.f;
    }
    return;
  }
  const Stats st = row_stats(row_ptr<T>(r, i), r.vocab, y);
  if (threadIdx.x == 0) {
    stats[i] = st.m;
    stats[n + i] = st.s;
    stats[2 * n + i] = st.r;
    logp[i] = logp_of(st);
  }
}

template <typename T>
__global__ void logprobs_backward_kernel(Rows r, const int64_t* labels, int64_t ignore_index, const float* stats,
                                         int64_t n, const float* grad_logp, Rows out) {
  const int64_t i = blockIdx.x;
  const int64_t y = labels[i];
  T* o = row_ptr<T>(out, i);
  if (y == ignore_index) return zero_row(o, r.vocab);
  const T* x = row_ptr<T>(r, i);
  const Stats st{stats[i], stats[n + i], stats[2 * n + i], 0.f};
  row_grad(x, o, r.vocab, st, grad_logp[i], y, st.r / st.s);
}

template <typename T>
__global__ void weak_log_ratio_kernel(Rows a, Rows b, const int64_t* labels, int64_t ignore_index, float* out) {
  const int64_t i = blockIdx.x;
  const int64_t y = labels[i];
  if (y == ignore_index) {
    if (threadIdx.x == 0) out[i] = 0.f;
    return;
  }
  const T *xa = row_ptr<T>(a, i), *xb = row_ptr<T>(b, i);
  const Stats sa = row_stats(xa, a.vocab, y), sb = row_stats(xb, b.vocab, y);
  if (threadIdx.x == 0) out[i] = logp_of(sa) - logp_of(sb);
}

// frozen_k != nullptr: k given (wspo_rows); otherwise the three frozen rows are read (wspo_four).
template <typename T>
__global__ void wspo_kernel(Rows p, Rows ref, Rows al, Rows ba, const float* frozen_k, const int64_t* labels,
                            const float* weight, float gamma, int64_t ignore_index, float* loss, float* logps,
                            int64_t n, Rows grad, bool write_grad) {
  const int64_t i = blockIdx.x;
  const int64_t y = labels[i];
  if (y == ignore_index) {
    if (threadIdx.x == 0) {
      loss[i] = 0.f;
      for (int m = 0; m < (frozen_k ? 1 : 4); ++m) logps[m * n + i] = 0.f;
    }
    if (write_grad) zero_row(row_ptr<T>(grad, i), p.vocab);
    return;
  }
  float k;
  if (frozen_k != nullptr) {
    k = frozen_k[i];
  } else {
    const T *xr = row_ptr<T>(ref, i), *xa = row_ptr<T>(al, i), *xb = row_ptr<T>(ba, i);
    const float lr = logp_of(row_stats(xr, ref.vocab, y));
    const float la = logp_of(row_stats(xa, al.vocab, y));
    const float lb = logp_of(row_stats(xb, ba.vocab, y));
    k = gamma * lr + la - lb;
    if (threadIdx.x == 0) {
      logps[n + i] = lr;
      logps[2 * n + i] = la;
      logps[3 * n + i] = lb;
    }
  }
  const T* xp = row_ptr<T>(p, i);
  const Stats st = row_stats(xp, p.vocab, y);
  const float2 lq = logp_q(st);
  const float lp = lq.x, d = gamma * lp - k, w = weight[i];
  if (threadIdx.x == 0) {
    logps[i] = lp;
    loss[i] = w * d * d;
  }
  if (write_grad) row_grad(xp, row_ptr<T>(grad, i), p.vocab, st, 2.f * gamma * w * d, y, lq.y);
}

template <typename T>
__global__ void scale_rows_kernel(Rows grad, const float* scale) {
  const int64_t i = blockIdx.x, V = grad.vocab;
  const float s = scale[i];
  if (s == 1.f) return;
  T* row = row_ptr<T>(grad, i);
  for (int64_t j = threadIdx.x; j < V; j += kThreads) row[j] = static_cast<T>(to_f(row[j]) * s);
}

// ------------------------------------------------------------------------------------------ launchers
template <typename F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  wspo::dispatch_dtype(dtype, "CUDA kernels", std::forward<F>(f));
}

Rows rows_of(const Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.is_cuda() && (t.dim() == 2 || t.dim() == 3) && (t.stride(-1) == 1 || t.size(-1) == 1), name,
              " must be a CUDA [N, V] or [B, T, V] tensor with unit stride along V");
  const int64_t rows = t.numel() / std::max<int64_t>(t.size(-1), 1);
  TORCH_CHECK(rows == n, name, " has ", rows, " rows, labels have ", n);
  if (t.dim() == 3) return Rows{t.data_ptr(), t.stride(0), t.stride(1), std::max<int64_t>(t.size(1), 1), t.size(2)};
  return Rows{t.data_ptr(), 0, t.stride(0), std::max<int64_t>(n, 1), t.size(1)};
}

void check_labels(const Tensor& labels) {
  TORCH_CHECK(labels.is_cuda() && labels.dim() == 1 && labels.scalar_type() == at::kLong && labels.is_contiguous(),
              "labels must be contiguous CUDA int64 [N]");
}

// An output gradient buffer: the logits' dtype and vocabulary, unit stride along V, any row strides.
Rows grad_rows(const Tensor& grad, const Tensor& like, int64_t n, const char* name) {
  TORCH_CHECK(grad.scalar_type() == like.scalar_type() && grad.size(-1) == like.size(-1), name,
              " must have the logits' dtype and vocabulary size");
  return rows_of(grad, n, name);
}

Tensor f32(const Tensor& t) { return t.to(at::kFloat).contiguous(); }

std::tuple<Tensor, Tensor> logprobs(const Tensor& logits, const Tensor& labels, int64_t ignore_index) {
  check_labels(labels);
  const int64_t n = labels.size(0);
  const Rows r = rows_of(logits, n, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  auto opts = logits.options().dtype(at::kFloat);
  Tensor logp = at::empty({n}, opts), stats = at::empty({3, n}, opts);
  if (n == 0) return {logp, stats};
  dispatch_dtype(logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    logprobs_kernel<T><<<n, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        r, labels.data_ptr<int64_t>(), ignore_index, logp.data_ptr<float>(), stats.data_ptr<float>(), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {logp, stats};
}

Tensor logprobs_backward(const Tensor& logits, const Tensor& labels, const Tensor& stats, const Tensor& grad_logp,
                         int64_t ignore_index, Tensor out) {
  check_labels(labels);
  const int64_t n = labels.size(0);
  const Rows r = rows_of(logits, n, "logits"), o = grad_rows(out, logits, n, "out");
  const c10::cuda::CUDAGuard guard(logits.device());
  if (n == 0) return out;
  Tensor st = f32(stats), g = f32(grad_logp);
  dispatch_dtype(logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    logprobs_backward_kernel<T><<<n, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        r, labels.data_ptr<int64_t>(), ignore_index, st.data_ptr<float>(), n, g.data_ptr<float>(), o);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

Tensor weak_log_ratio(const Tensor& aligned, const Tensor& base, const Tensor& labels, int64_t ignore_index) {
  TORCH_CHECK(aligned.scalar_type() == base.scalar_type(), "aligned and base logits must share a dtype");
  check_labels(labels);
  const int64_t n = labels.size(0);
  const Rows ra = rows_of(aligned, n, "aligned"), rb = rows_of(base, n, "base");
  const c10::cuda::CUDAGuard guard(aligned.device());
  Tensor out = at::empty({n}, aligned.options().dtype(at::kFloat));
  if (n == 0) return out;
  dispatch_dtype(aligned.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    weak_log_ratio_kernel<T><<<n, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        ra, rb, labels.data_ptr<int64_t>(), ignore_index, out.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<Tensor, Tensor> wspo(const Tensor& policy, const Tensor* frozen, const c10::optional<Tensor>& k,
                                const Tensor& labels, const Tensor& weight, double gamma, int64_t ignore_index,
                                const c10::optional<Tensor>& grad) {
  check_labels(labels);
  const int64_t n = labels.size(0);
  const Rows p = rows_of(policy, n, "policy");
  Rows fr[3] = {p, p, p};
  if (frozen != nullptr) {
    for (int m = 0; m < 3; ++m) {
      TORCH_CHECK(frozen[m].scalar_type() == policy.scalar_type(), "the one-pass kernel needs one dtype for all four");
      fr[m] = rows_of(frozen[m], n, "frozen logits");
    }
  }
  const Rows gr = grad.has_value() ? grad_rows(*grad, policy, n, "grad") : p;
  const c10::cuda::CUDAGuard guard(policy.device());
  auto opts = policy.options().dtype(at::kFloat);
  Tensor loss = at::empty({n}, opts), logps = at::empty({frozen ? 4 : 1, n}, opts);
  if (n == 0) return {loss, frozen ? logps : logps[0]};
  Tensor w = f32(weight), kk = k.has_value() ? f32(*k) : Tensor();
  dispatch_dtype(policy.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    wspo_kernel<T><<<n, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        p, fr[0], fr[1], fr[2], k.has_value() ? kk.data_ptr<float>() : nullptr, labels.data_ptr<int64_t>(),
        w.data_ptr<float>(), static_cast<float>(gamma), ignore_index, loss.data_ptr<float>(), logps.data_ptr<float>(),
        n, gr, grad.has_value());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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

// grad may be any non-overlapping rows layout (the policy logits themselves with inplace_grad).
void scale_rows_(Tensor grad, const Tensor& scale) {
  TORCH_CHECK(scale.dim() == 1, "scale must be [N]");
  const int64_t n = scale.size(0);
  const Rows r = rows_of(grad, n, "grad");
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  Tensor s = f32(scale);
  dispatch_dtype(grad.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    scale_rows_kernel<T><<<n, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(r, s.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace wspo_cuda
