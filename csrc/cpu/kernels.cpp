// Native CPU row kernels of wspo-kernels: vectorised (ATen Vectorized<float>), one row range per call.
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
// (no cancellation as p_y -> 1); the first sweep keeps its exps, so the second only rescales them
// (see "one exp per element"), and that second sweep runs inside the next row's statistics sweeps
// (see "pipelined gradient").  wspo_rows is the same with the frozen models folded into
// k = gamma * l^r + l^a - l^w.  Nothing is saved: the caller keeps the gradient; the gradient
// buffer may be the policy logits (in place, any non-overlapping layout), as each element is read
// before it is written.  Large gradients are written with streaming stores (see GradRow).
//
// This file is compiled once per CPU instruction set with that set's flags (setup.py); CPU_CAPABILITY
// names this copy's namespace (ATen's Vectorized lives in an inline namespace of the same name, so the
// copies share no symbols) and WSPO_TABLE names the KernelTable it fills.  It sees raw pointers only
// (kernels.h); the bindings in wspo_cpu.cpp, compiled for the baseline ISA, choose the copy at run time.
#include "kernels.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>

namespace wspo_cpu {
namespace CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;

constexpr int64_t kBlock = 4096;                  // elements per online-statistics block (16 KB of fp32)
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

// ------------------------------------------------------------------------------------------ gradient stores
// A gradient row is written once and not read again here.  With ordinary stores each of its cache lines
// is first read from memory (read-for-ownership): a third memory pass beside reading the logits and
// writing the gradient, a third of the traffic of the precomputed path.  So on AVX-512 and AVX2 a large
// gradient goes out with non-temporal (streaming) stores, which write whole lines without reading them.
// A small one keeps ordinary stores (it may still be in cache when the caller reads it), and so does a
// row that does not start on a vector boundary (the streaming stores fault on an unaligned address; rows
// of a V that is not a multiple of the vector's width start on one only now and then).  A streamed row
// ends with a store fence, so the stores after it (the label's entry) and the other threads see it in order.
constexpr int64_t kStreamMinBytes = int64_t{16} << 20;

// One vector, streamed: float lanes, or the 16-bit lanes of a bf16 / fp16 vector.
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kCanStream = true;
inline void stream_vec(float* p, __m512 v) { _mm512_stream_ps(p, v); }
inline void stream_vec(void* p, __m512i v) { _mm512_stream_si512(static_cast<__m512i*>(p), v); }
inline void stream_fence() { _mm_sfence(); }
#elif defined(CPU_CAPABILITY_AVX2)
constexpr bool kCanStream = true;
inline void stream_vec(float* p, __m256 v) { _mm256_stream_ps(p, v); }
inline void stream_vec(void* p, __m256i v) { _mm256_stream_si256(static_cast<__m256i*>(p), v); }
inline void stream_fence() { _mm_sfence(); }
#else
constexpr bool kCanStream = false;
inline void stream_fence() {}
#endif

// One step (two float vectors' worth) streamed; only called where kCanStream.
template <typename T>
inline void stream_step(T* p, const Vec& a, const Vec& b) {
  if constexpr (!kCanStream) {
    RowIO<T>::store(p, a, b);
  } else if constexpr (std::is_same_v<T, float>) {
    stream_vec(p, a);
    stream_vec(p + Vec::size(), b);
  } else {
    stream_vec(static_cast<void*>(p), at::vec::convert_from_float<T>(a, b));
  }
}

// The stores of one gradient row: streamed when the whole gradient is large and the row is aligned
// (every step of the row then is: kBlock and kStep span whole vectors).
template <typename T>
struct GradRow {
  T* out;
  bool stream;
  GradRow(T* row, int64_t total_bytes)
      : out(row),
        stream(kCanStream && total_bytes >= kStreamMinBytes &&
               reinterpret_cast<uintptr_t>(row) % sizeof(Vec) == 0) {}
  inline void step(int64_t j, const Vec& a, const Vec& b) const {
    if (stream) {
      stream_step(out + j, a, b);
    } else {
      RowIO<T>::store(out + j, a, b);
    }
  }
  inline void tail(int64_t j, int64_t n, const Vec& a, const Vec& b) const { RowIO<T>::store_tail(out + j, n, a, b); }
  inline void zero(int64_t j, int64_t n) const {  // out[j, j + n) = 0
    const Vec z(0.f);
    int64_t c = 0;
    for (; c + RowIO<T>::kStep <= n; c += RowIO<T>::kStep) step(j + c, z, z);
    if (c < n) tail(j + c, n - c, z, z);
  }
  inline void finish() const {
    if (stream) stream_fence();
  }
};

// The gradient row i of a job.
template <typename T>
inline GradRow<T> grad_row(const Job& j, int64_t i) {
  return GradRow<T>(j.grad->row<T>(i), j.n * j.x.vocab * static_cast<int64_t>(sizeof(T)));
}

// ------------------------------------------------------------------------------------------ row math
// Vector exp of x <= 0 (every exponent in these kernels is a logit minus a running max at least as
// large).  x = n ln2 + t, |t| <= ln2/2, exp(x) = 2^n p(t), p the degree-5 polynomial of ATen's
// exp_u20 (at most 20 ulp: ~1.2e-6 relative, far inside the documented 1e-5 tolerances), ln2 split
// in two so t is exact; x below log(FLT_MIN) gives 0 (exactly 0 for -inf).  On AVX-512 and AVX2 it is
// written for that domain: no overflow path, 2^n by scalef (AVX-512) or exponent bits (AVX2), ~10 and
// ~15 instructions instead of exp_u20's ~18 -- these kernels are bound by it -- and NaN gives NaN, so a
// NaN logit in a counted row makes its sum, and so its logp and gradient, NaN (the block max there is
// a bare max instruction, which drops NaN; see vmax).  Elsewhere ATen's exp_u20 (or its 1-ulp exp on a
// torch without it), which maps NaN to a finite value: there the block max propagates NaN instead.
constexpr float kExpUnderflow = -87.33654f;  // log(FLT_MIN)
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.42860682030941723e-06f;  // ln 2 = hi + lo, hi exact in 16 bits
constexpr float kExpC1 = 0.999999701f, kExpC2 = 0.499991506f, kExpC3 = 0.166676521f, kExpC4 = 0.0418978221f,
                kExpC5 = 0.00828929059f;

// Max for the block maxima: one instruction where vexp propagates NaN (ATen's NaN-propagating
// maximum takes three), else ATen's maximum.
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kMaxDropsNaN = true;
inline Vec vmax(const Vec& a, const Vec& b) { return _mm512_max_ps(a, b); }
#elif defined(CPU_CAPABILITY_AVX2)
constexpr bool kMaxDropsNaN = true;
inline Vec vmax(const Vec& a, const Vec& b) { return _mm256_max_ps(a, b); }
#else
constexpr bool kMaxDropsNaN = false;
inline Vec vmax(const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }
#endif

template <typename V, typename = void>
struct HasExpU20 : std::false_type {};
template <typename V>
struct HasExpU20<V, std::void_t<decltype(std::declval<const V&>().exp_u20())>> : std::true_type {};

#if defined(CPU_CAPABILITY_AVX512)
constexpr const char* kExpVariant = "deg-5 polynomial, scalef (x <= 0)";
inline Vec vexp(const Vec& v) {
  // No clamp: scalef takes any n, and lanes below log(FLT_MIN) (-inf, whose t is NaN, included) are
  // zeroed by the mask.
  const __m512 x = v;
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 t = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  t = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), t);
  __m512 p = _mm512_fmadd_ps(t, _mm512_set1_ps(kExpC5), _mm512_set1_ps(kExpC4));
  p = _mm512_fmadd_ps(t, p, _mm512_set1_ps(kExpC3));
  p = _mm512_fmadd_ps(t, p, _mm512_set1_ps(kExpC2));
  p = _mm512_fmadd_ps(t, p, _mm512_set1_ps(kExpC1));
  p = _mm512_fmadd_ps(t, p, _mm512_set1_ps(1.f));
  const __mmask16 keep = _mm512_cmp_ps_mask(v, _mm512_set1_ps(kExpUnderflow), _CMP_NLT_UQ);  // NaN kept
  return _mm512_maskz_scalef_ps(keep, p, n);
}
#elif defined(CPU_CAPABILITY_AVX2)
constexpr const char* kExpVariant = "deg-5 polynomial, exponent bits (x <= 0)";
inline Vec vexp(const Vec& v) {
  const __m256 floor_x = _mm256_set1_ps(kExpUnderflow);
  const __m256 x = _mm256_max_ps(floor_x, v);  // n >= -126: 2^n is a normal float; NaN stays NaN
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 t = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  t = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), t);
  __m256 p = _mm256_fmadd_ps(t, _mm256_set1_ps(kExpC5), _mm256_set1_ps(kExpC4));
  p = _mm256_fmadd_ps(t, p, _mm256_set1_ps(kExpC3));
  p = _mm256_fmadd_ps(t, p, _mm256_set1_ps(kExpC2));
  p = _mm256_fmadd_ps(t, p, _mm256_set1_ps(kExpC1));
  p = _mm256_fmadd_ps(t, p, _mm256_set1_ps(1.f));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 keep = _mm256_cmp_ps(v, floor_x, _CMP_NLT_UQ);  // NaN kept
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(two_n)), keep);
}
#else
constexpr const char* kExpVariant = HasExpU20<Vec>::value ? "ATen exp_u20" : "ATen exp (1 ulp)";
inline Vec vexp(const Vec& x) {
  if constexpr (HasExpU20<Vec>::value) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}
#endif

struct Stats {  // a row's max m, sum s of exp(z - m), and that sum r without the label's term
  float m, s, r;
};

// Software prefetch: the max sweep of block b+1 reads from memory with only as many cache lines in
// flight as the out-of-order window (full of block b's exps) holds, so each step also prefetches
// kPrefetchBytes ahead, into L2 (prefetcht1), where more misses can be in flight than in L1.  Measured on
// Zen 4, 2 threads, [4096, 32000], three processes per variant, interleaved rounds, against 2 KB ahead
// into L1 (the earlier choice): fp32 logprobs 1.17x and wspo_four 1.26x faster; bf16 and the AVX2 copy
// unchanged.  wspo_rows' time is bimodal from one process to the next under every variant tried (0.037
// or 0.048-0.053 s fp32, tight within a process), so it could not tell them apart.  A prefetch never
// faults, so reaching past the row (into the next one) is harmless.
constexpr int64_t kCacheLine = 64;
constexpr int64_t kPrefetchBytes = 8192;
inline void prefetch(const char* p) { __builtin_prefetch(p, 0, 2); }  // locality 2: prefetcht1, into L2
template <typename T>
constexpr int64_t kStepBytes = RowIO<T>::kStep * static_cast<int64_t>(sizeof(T));

// Whether n elements hold a NaN (the rare path of a block whose max came out -inf: see row_stats_impl).
template <typename T>
inline bool has_nan(const T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(static_cast<float>(x[i]))) return true;
  }
  return false;
}

// The maximum of n elements (n <= kBlock), -inf for n = 0; NaN propagates unless kMaxDropsNaN.
template <typename T>
inline float block_max(const T* xb, int64_t n) {
  Vec running(kNegInf);
  for_steps(xb, n, kNegInf, [&](const Vec& a, const Vec& b) { running = vmax(running, vmax(a, b)); });
  return hmax(running);
}

// The row statistics in one sweep from memory; with kKeepExp the exps e_v = exp(z_v - m_b) are also
// stored to `e` (an fp32 row) and each block's running max m_b to `block_m`, for the
// one-exp gradient sweep below.  z_y is read first; the label's slot of `e` gets 0 (it is not summed).
//
// Software-pipelined: block b's exps (from L1, compute-bound) run in the same loop as block b+1's max
// (from memory, latency-bound), so the memory reads overlap the exps instead of alternating with
// them; only block 0's max runs alone.
struct NoPending {  // row_stats_impl without a gradient to write alongside
  inline void step() {}
};

template <bool kKeepExp, typename T, typename P = NoPending>
Stats row_stats_impl(const T* x, float* e, int64_t V, int64_t y, float* block_m, P&& pending = NoPending{}) {
  using IO = RowIO<T>;
  const int64_t vs = Vec::size();
  const float z_y = static_cast<float>(x[y]);
  float m = kNegInf, r = 0.f;
  float next_max = block_max(x, std::min(kBlock, V));
  for (int64_t b0 = 0, bi = 0; b0 < V; b0 += kBlock, ++bi) {
    const T* xb = x + b0;
    const T* xn = xb + kBlock;  // the next block, n_next (<= n) elements
    const int64_t n = std::min(kBlock, V - b0), n_next = std::max<int64_t>(0, std::min(kBlock, V - b0 - kBlock));
    const float bmax = next_max;
    if constexpr (kKeepExp) block_m[bi] = bmax;
    if (bmax == kNegInf) {  // nothing to add (and no -inf - -inf); the gradient sweep zeroes it
      if (kMaxDropsNaN && has_nan(xb, n)) {  // -inf and NaN only, the NaN dropped by vmax (rare: a scan)
        r = std::numeric_limits<float>::quiet_NaN();
        if constexpr (kKeepExp) block_m[bi] = r;
      }
      next_max = block_max(xn, n_next);
      continue;
    }
    const float m_new = (bmax > m || std::isnan(bmax)) ? bmax : m;  // NaN sticks
    r *= std::exp(m - m_new);
    m = m_new;
    if constexpr (kKeepExp) block_m[bi] = m;
    const Vec vm(m);
    const int64_t yl = y - b0;                                     // the label's offset in this block
    const int64_t jy = yl >= 0 && yl < n ? yl - yl % IO::kStep : -1;  // the step holding it
    Vec vsum(0.f), running(kNegInf);
    auto exps = [&](int64_t j, Vec a, Vec b, int64_t len) {  // one step of block b: exps, kept and summed
      a = vexp(a - vm);
      b = vexp(b - vm);
      if (j == jy) {  // leave the label out of r (once per row)
        alignas(64) float tmp[2 * Vec::size()];
        a.store(tmp);
        b.store(tmp + vs);
        tmp[yl - j] = 0.f;
        a = Vec::loadu(tmp);
        b = Vec::loadu(tmp + vs);
      }
      if constexpr (kKeepExp) {
        if (len == IO::kStep) {
          a.store(e + b0 + j);
          b.store(e + b0 + j + vs);
        } else {
          RowIO<float>::store_tail(e + b0 + j, len, a, b);
        }
      }
      vsum += a + b;
      pending.step();  // one step of the previous row's gradient per step of exps (see PendingGrad)
    };
    Vec a, b, c, d;
    int64_t j = 0;
    const char* ahead = reinterpret_cast<const char*>(xn) + kPrefetchBytes;
    for (; j + IO::kStep <= n_next; j += IO::kStep) {  // both blocks full here (n_next <= n)
      for (int64_t line = 0; line < kStepBytes<T>; line += kCacheLine) prefetch(ahead + j * sizeof(T) + line);
      IO::load(xb + j, a, b);
      IO::load(xn + j, c, d);
      running = vmax(running, vmax(c, d));
      exps(j, a, b, IO::kStep);
    }
    if (j < n_next) {  // the next block's tail
      IO::load_tail(xn + j, n_next - j, kNegInf, c, d);
      running = vmax(running, vmax(c, d));
    }
    for (; j + IO::kStep <= n; j += IO::kStep) {
      IO::load(xb + j, a, b);
      exps(j, a, b, IO::kStep);
    }
    if (j < n) {
      IO::load_tail(xb + j, n - j, kNegInf, a, b);
      exps(j, a, b, n - j);
    }
    r += hsum(vsum);
    next_max = hmax(running);
  }
  return {m, r + std::exp(z_y - m), r};
}

template <typename T, typename P = NoPending>
Stats row_stats_of(const T* x, int64_t V, int64_t y, P&& pending = NoPending{}) {
  return row_stats_impl<false>(x, static_cast<float*>(nullptr), V, y, nullptr, pending);
}

// (logp, q = 1 - p_y) of a row, both accurate as p_y -> 1.
inline std::pair<float, float> logp_q(float z_y, Stats st) {
  const float q = st.r / st.s;
  return {q < 0.5f ? std::log1p(-q) : (z_y - st.m) - std::log(st.s), q};
}
inline float logp_of(float z_y, Stats st) { return logp_q(z_y, st).first; }

// out = coef * (onehot(y) - exp(x - m) / s), the label entry coef * q; out may alias x.
template <typename T>
void row_grad(const T* x, const GradRow<T>& out, int64_t V, Stats st, float coef, int64_t y, float q) {
  using IO = RowIO<T>;
  const Vec vm(st.m), vc(-coef / st.s);
  Vec a, b;
  int64_t j = 0;
  for (; j + IO::kStep <= V; j += IO::kStep) {
    IO::load(x + j, a, b);
    out.step(j, vexp(a - vm) * vc, vexp(b - vm) * vc);
  }
  if (j < V) {
    IO::load_tail(x + j, V - j, kNegInf, a, b);
    out.tail(j, V - j, vexp(a - vm) * vc, vexp(b - vm) * vc);
  }
  out.finish();
  out.out[y] = static_cast<T>(coef * q);  // c (1 - p_y) without cancellation as p_y -> 1
}

// An ignored row's gradient: zeros.
template <typename T>
inline void zero_row(const GradRow<T>& out, int64_t V) {
  out.zero(0, V);
  out.finish();
}

// ------------------------------------------------------------------------------------------ one exp per element
// With a gradient to write, the policy row needs one exp per element instead of two: the statistics
// sweep leaves e_v = exp(z_v - m_b) in an fp32 row buffer (m_b: the running max after block b, kept
// per block) and the gradient sweep rescales it, g_v = e_v * exp(m_b - m) * (-c / s), instead of
// recomputing it.  The buffer is per thread (`scratch`, in L2 from one row to the next): two fp32 rows,
// one being filled while the other's gradient is written out (see "pipelined gradient").  A bf16 / fp16
// gradient is still rounded once, and the gradient row is only written, once (streamed when large: see
// GradRow).  The label's slot is not summed (r) and is overwritten with c * q at the end.
constexpr int64_t kMaxBlocks = 128;  // rows up to kMaxBlocks * kBlock columns; longer ones take the two-exp path

// ------------------------------------------------------------------------------------------ pipelined gradient
// The gradient sweep of a row only writes (from its kept exps, in L2) and the statistics sweeps only
// read (from memory) and compute exps, so run separately each leaves one resource idle.  Pipelined, row
// i's gradient is written step by step inside row i+1's statistics sweeps -- one gradient step per step
// of exps of the policy row (wspo_rows), or per three steps of the three frozen rows (wspo_four) -- so its
// stores drain while the exps compute, and the streaming stores never queue up behind a burst.  Measured
// interleaved on Zen 4 (benchmarks/native_kernels.py --ab): 1.1-1.3x on both kernels, both dtypes.  PendingGrad is row i's gradient waiting to be written, g_v = e_v * exp(m_b - m) * (-c / s), zeros for blocks whose max was -inf, the label entry c * q,
// written by `finish` (which also writes whatever the sweep did not reach: a wider row, or the last row).
// The kept exps it reads are in the other half of the two-row scratch, out of the next row's way.
template <typename T>
struct PendingGrad {
  using IO = RowIO<T>;
  const float* e = nullptr;
  GradRow<T> g{nullptr, 0};
  float block_m[kMaxBlocks];
  Stats st{};
  float coef = 0.f, q = 0.f;
  int64_t V = 0, y = 0, j = 0, block_end = 0, bi = 0;
  Vec scale{0.f};
  bool zero = false;
  int every = 1, tick = 0;  // write one step per `every` calls of step()

  bool active() const { return e != nullptr; }

  void start(const float* e_row, const GradRow<T>& out, int64_t V_, const float* bm, Stats st_, float coef_,
             int64_t y_, float q_) {
    e = e_row;
    g = out;
    V = V_;
    y = y_;
    st = st_;
    coef = coef_;
    q = q_;
    std::copy(bm, bm + (V + kBlock - 1) / kBlock, block_m);
    j = 0;
    bi = -1;
    block_end = 0;
  }

  inline void next_block() {
    ++bi;
    block_end = std::min(block_end + kBlock, V);
    zero = block_m[bi] == kNegInf;
    if (!zero) scale = Vec(std::exp(block_m[bi] - st.m) * (-coef / st.s));
  }

  // The next step of the row (kStep elements, fewer at a block's end); nothing once the row is written.
  inline void step() {
    if (j >= V || ++tick < every) return;
    tick = 0;
    if (j == block_end) next_block();
    const int64_t len = std::min(IO::kStep, block_end - j);
    Vec a(0.f), b(0.f);
    if (!zero) {
      if (len == IO::kStep) {
        a = Vec::loadu(e + j) * scale;
        b = Vec::loadu(e + j + Vec::size()) * scale;
      } else {
        RowIO<float>::load_tail(e + j, len, 0.f, a, b);
        a = a * scale;
        b = b * scale;
      }
    }
    if (len == IO::kStep) {
      g.step(j, a, b);
    } else {
      g.tail(j, len, a, b);
    }
    j += len;
  }

  void finish() {
    if (!active()) return;
    while (j < V) step();
    g.finish();
    g.out[y] = static_cast<T>(coef * q);  // c (1 - p_y) without cancellation as p_y -> 1
    e = nullptr;
  }
};

// (statistics, label logit) of row i.
template <typename T, typename P = NoPending>
inline std::pair<Stats, float> row_stats(const Rows& r, int64_t i, int64_t y, P&& pending = NoPending{}) {
  const T* x = r.row<T>(i);
  return {row_stats_of(x, r.vocab, y, pending), static_cast<float>(x[y])};
}

template <typename F>
void dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat: return f(float{});
    case DType::kBFloat16: return f(c10::BFloat16{});
    case DType::kHalf: return f(c10::Half{});
  }
}

// ------------------------------------------------------------------------------------------ kernels
// logp [n] and stats [3, n] = (m, s, r); (0, 1, 0) on ignored rows.
void logprobs(const Job& j, int64_t begin, int64_t end, float* scratch) {
  float *sm = j.stats, *ss = sm + j.n, *sr = ss + j.n;
  dispatch(j.dtype, [&](auto tag) {
    using T = decltype(tag);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = j.labels[i];
      if (y == j.ignore_index) { j.logp[i] = 0.f; sm[i] = 0.f; ss[i] = 1.f; sr[i] = 0.f; continue; }
      auto [st, z] = row_stats<T>(j.x, i, y);
      sm[i] = st.m;
      ss[i] = st.s;
      sr[i] = st.r;
      j.logp[i] = logp_of(z, st);
    }
  });
}

// grad = dL/dlogp * (onehot - softmax): the backward of logprobs, from the saved statistics.
void logprobs_backward(const Job& j, int64_t begin, int64_t end, float* scratch) {
  const float *sm = j.stats_in, *ss = sm + j.n, *sr = ss + j.n;
  dispatch(j.dtype, [&](auto tag) {
    using T = decltype(tag);
    for (int64_t i = begin; i < end; ++i) {
      const GradRow<T> out = grad_row<T>(j, i);
      if (j.labels[i] == j.ignore_index) { zero_row(out, j.x.vocab); continue; }
      const Stats s{sm[i], ss[i], sr[i]};
      row_grad(j.x.row<T>(i), out, j.x.vocab, s, j.scale[i], j.labels[i], s.r / s.s);
    }
  });
}

// l^aligned - l^base per row (aligned in x, base in frozen[0]).
void weak_log_ratio(const Job& j, int64_t begin, int64_t end, float* scratch) {
  dispatch(j.dtype, [&](auto tag) {
    using T = decltype(tag);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = j.labels[i];
      if (y == j.ignore_index) { j.logp[i] = 0.f; continue; }
      auto [sa, za] = row_stats<T>(j.x, i, y);
      auto [sw, zw] = row_stats<T>(j.frozen[0], i, y);
      j.logp[i] = logp_of(za, sa) - logp_of(zw, sw);
    }
  });
}

// Both WSPO kernels: with `four` the one-pass kernel reads the three frozen rows and fills logp
// [4, n] (policy, ref, aligned, base); without, k = gamma * l^r + l^a - l^w is given and logp is [n].
// With a gradient, each row's gradient sweep is pipelined into the next counted row's statistics sweeps
// (PendingGrad): the three frozen rows' with `four`, else the policy row's.
void wspo(const Job& j, int64_t begin, int64_t end, float* scratch) {
  const int n_logps = j.four ? 4 : 1;
  const float g = j.gamma;
  dispatch(j.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t V = j.x.vocab;
    PendingGrad<T> pending;
    pending.every = j.four ? 3 : 1;  // spread over the three frozen sweeps (one over the policy's)
    int64_t half = 0;  // the scratch half the next kept exps go to (the other may hold pending's)
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = j.labels[i];
      if (y == j.ignore_index) {
        j.loss[i] = 0.f;
        for (int m = 0; m < n_logps; ++m) j.logp[m * j.n + i] = 0.f;
        if (j.grad != nullptr) zero_row(grad_row<T>(j, i), V);
        continue;
      }
      float k;
      if (j.four) {
        float l[3];
        for (int m = 0; m < 3; ++m) {
          auto [st, z] = row_stats<T>(j.frozen[m], i, y, pending);
          l[m] = logp_of(z, st);
          j.logp[(m + 1) * j.n + i] = l[m];
        }
        k = g * l[0] + l[1] - l[2];
      } else {
        k = j.k[i];
      }
      if (j.grad != nullptr && V <= kMaxBlocks * kBlock) {  // one exp per element (see row_stats_impl)
        float block_m[kMaxBlocks];
        float* e = scratch + half * V;
        const T* x = j.x.row<T>(i);
        const float z = static_cast<float>(x[y]);
        const Stats st = j.four ? row_stats_impl<true>(x, e, V, y, block_m)
                                : row_stats_impl<true>(x, e, V, y, block_m, pending);
        pending.finish();  // whatever of the previous row the sweep did not reach
        const auto [lp, q] = logp_q(z, st);
        const float d = g * lp - k, w = j.weight[i];
        j.logp[i] = lp;
        j.loss[i] = w * d * d;
        pending.start(e, grad_row<T>(j, i), V, block_m, st, 2.f * g * w * d, y, q);
        if (!j.pipelined) pending.finish();  // the row's gradient sweep right after its statistics
        half = 1 - half;
        continue;
      }
      pending.finish();
      auto [st, z] = row_stats<T>(j.x, i, y);
      const auto [lp, q] = logp_q(z, st);
      const float d = g * lp - k, w = j.weight[i];
      j.logp[i] = lp;
      j.loss[i] = w * d * d;
      if (j.grad != nullptr) row_grad(j.x.row<T>(i), grad_row<T>(j, i), V, st, 2.f * g * w * d, y, q);
    }
    pending.finish();
  });
}

// grad[i, :] *= scale[i] in float32, in place (grad in x).
void scale_rows(const Job& j, int64_t begin, int64_t end, float* scratch) {
  const int64_t V = j.x.vocab;
  dispatch(j.dtype, [&](auto tag) {
    using T = decltype(tag);
    using IO = RowIO<T>;
    for (int64_t i = begin; i < end; ++i) {
      if (j.scale[i] == 1.f) continue;  // the usual case (mean / sum reductions): nothing to do
      T* row = j.x.row<T>(i);
      const Vec vs(j.scale[i]);
      Vec a, b;
      int64_t c = 0;
      for (; c + IO::kStep <= V; c += IO::kStep) {
        IO::load(row + c, a, b);
        IO::store(row + c, a * vs, b * vs);
      }
      if (c < V) {
        IO::load_tail(row + c, V - c, 0.f, a, b);
        IO::store_tail(row + c, V - c, a * vs, b * vs);
      }
    }
  });
}

// buf = exp(buf) with the kernels' vector exp (x <= 0): its accuracy, tested against float64.
void exp_values(float* buf, int64_t n) {
  Vec a, b;
  int64_t j = 0;
  for (; j + 2 * Vec::size() <= n; j += 2 * Vec::size()) {
    RowIO<float>::load(buf + j, a, b);
    RowIO<float>::store(buf + j, vexp(a), vexp(b));
  }
  if (j < n) {
    RowIO<float>::load_tail(buf + j, n - j, 0.f, a, b);
    RowIO<float>::store_tail(buf + j, n - j, vexp(a), vexp(b));
  }
}

// The exp floor of the benchmarks: buf = exp(buf - 1) in place (values stay in (1/e, 1]), L1-resident,
// with the same vector exp the kernels use.
void exp_sweep(float* buf, int64_t n, int64_t repeats) {
  const Vec one(1.f);
  for (int64_t r = 0; r < repeats; ++r) {
    for (int64_t j = 0; j + Vec::size() <= n; j += Vec::size()) vexp(Vec::loadu(buf + j) - one).store(buf + j);
  }
}

}  // namespace CPU_CAPABILITY

const KernelTable& WSPO_TABLE() {
  static const KernelTable table{WSPO_CAPABILITY_NAME,           CPU_CAPABILITY::kExpVariant,
                                 CPU_CAPABILITY::logprobs,
                                 CPU_CAPABILITY::logprobs_backward, CPU_CAPABILITY::weak_log_ratio,
                                 CPU_CAPABILITY::wspo,           CPU_CAPABILITY::scale_rows,
                                 CPU_CAPABILITY::exp_sweep,      CPU_CAPABILITY::exp_values,
                                 CPU_CAPABILITY::kCanStream ? CPU_CAPABILITY::kStreamMinBytes : 0};
  return table;
}

}  // namespace wspo_cpu
