// CPU kernels of dtkernels::soft_ce and dtkernels::soft_ce_backward (temperature-scaled soft cross-entropy).
//
// They compute exactly dtkernels.reference.soft_ce_op / soft_ce_backward_op; the formulas, the mask and the mean
// semantics are written out above those functions in dtkernels/reference.py. Per position p (x = logits / tau):
//
//     loss_p = lse(xs) - sum_k pt_k xs_k = log(Ss) - D / St,
//     Ss = sum_k exp(xs_k - ms), St = sum_k exp(xt_k - mt), D = sum_k exp(xt_k - mt) (xs_k - ms),
//     grad_pk = c_p (ps_k - pt_k) = c_p (exp(xs_k - ms) / Ss - exp(xt_k - mt) / St),
//
// with ms, mt the maxima over the K classes and c_p = w_p * scale / tau (w_p: the mask, times 1 / sum(mask) for
// mean, times grad_loss[b, p] in the backward op). Nothing of size [B, K, P] is allocated except the gradient.
// Math is in float for float / Half / BFloat16 logits and in double for double students (teacher converted to the
// student's compute type); per-tile loss sums are in double.
//
// Work decomposition: inputs are canonical [B, K, P] views with arbitrary (and per tensor different) strides.
//   * Position path (class axis strided, positions contiguous: NCHW, sp == 1; also the generic fallback): a tile
//     is `tp` positions of one sample across all K classes. Pass 1 reads the tile from memory once (vector loads of
//     K rows of `tp` contiguous positions; a strided gather for tensors whose positions are not contiguous),
//     converts to the compute type, scales by 1/tau and packs it into a per-thread buffer [K][tp] while taking the
//     running per-position maximum. Pass 2 (vectorized over positions, loop over classes) computes the exps once,
//     the sums Ss, St, D and the loss, and keeps exp(xs - ms) / exp(xt - mt) in the buffer; pass 3 writes the
//     gradient from them. The buffer is sized to stay in L2, so only pass 1 touches memory: s and t are read once
//     and the gradient is written once. (A single-sweep online softmax over the rows, with running max and
//     rescaled sums, needs an extra exp per element for the rescale and recomputes both exps for the gradient,
//     4 exps per element against 2 here; the tile is cache resident either way, so the memory traffic is the same.)
//     While a tile computes, the next tile's rows of s and t and this tile's gradient rows are software-prefetched
//     (the hardware prefetchers do not follow K short row streams, and without it the tile loop waits on memory).
//   * Row path (classes contiguous, positions not: channels_last, [N, K] row-major) when K >= kMinRowClasses: one
//     position at a time, vectorized over the K contiguous classes (a row is packed into a buffer the same way).
//   * Anything else takes the position path, gathering the tensors whose positions are not contiguous element by
//     element (in memory order) into the packed tile: channels_last / [N, K] with few classes (a row of 19 is too
//     short to vectorize over: the gather beats the row path there), student and teacher in different
//     layouts, sliced views. Correct for any strides; no input is ever copied.
// The gradient tensor is torch.empty_like(student); it is written through its own strides (vector stores when
// contiguous along the vectorized axis, element by element otherwise).
//
// Masked positions (mask == 0) are skipped: a tile or row with no valid position is not computed at all (its
// gradient is written as zeros), and in partially valid tiles the invalid lanes are computed but selected away, so
// NaN there does not propagate. NaN at a valid position gives a NaN loss and a NaN gradient for that position.
//
// Determinism: each tile's loss sum is stored by tile index (tiles depend only on the shapes) and merged in order.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <vector>

#include "utils.h"

namespace dtkernels {
namespace {

constexpr const char* kOp = "soft_ce";
constexpr int64_t kMaxTp = 1024;                       // max positions of a position-path tile
constexpr int64_t kTileBudget = int64_t(320) << 10;    // bytes of both packed [K][tp] buffers (fits in L2)
constexpr int64_t kRowTileElems = 32768;               // target K * rows of a row-path tile
constexpr int64_t kMinRowClasses = 64;                 // class-contiguous inputs with fewer classes: position path

inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename A>
using Vec = at::vec::Vectorized<A>;

// Load n <= W elements of `in_t` as compute type A (the remaining lanes are zero).
template <typename A, typename in_t>
inline Vec<A> load_as(const in_t* p, int64_t n) {
  constexpr int64_t kW = Vec<A>::size();
  if constexpr (std::is_same_v<acc_type_t<in_t>, A>) {
    return n == kW ? load_acc(p) : load_acc(p, n);
  } else {  // mixed precision (e.g. double teacher, float student): convert element by element
    __at_align__ A tmp[kW];
    for (int64_t i = 0; i < kW; ++i) tmp[i] = i < n ? static_cast<A>(p[i]) : A(0);
    return Vec<A>::loadu(tmp);
  }
}

// exp(x) for x <= 0 (logit minus its maximum), NaN in -> NaN out. float: Cody-Waite reduction x = n ln2 + r with a
// degree-5 polynomial (the coefficients of ATen's exp_u20) and 2^n built in the exponent bits; inputs below -87 are
// clamped (exp(-87) ~ 1.6e-38 instead of 0: negligible against a softmax denominator >= 1). About 11 vector ops, a
// third fewer than exp_u20, whose overflow handling is useless here; max error ~2 ulp. double: Sleef (1 ulp).
template <typename A>
inline Vec<A> vexp(const Vec<A>& x) {
  if constexpr (std::is_same_v<A, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 t = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);  // NaN in the second operand is returned
    const __m512 magic = _mm512_set1_ps(12582912.0f + 127.0f);  // 1.5 * 2^23 + bias: round to nearest integer
    const __m512 j = _mm512_fmadd_ps(t, _mm512_set1_ps(1.44269504f), magic);
    const __m512 n = _mm512_sub_ps(j, magic);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), t);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_fmadd_ps(r, _mm512_set1_ps(0.00828929059f), _mm512_set1_ps(0.0418978221f));
    p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(0.166676521f));
    p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(0.499991506f));
    p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(0.999999701f));
    p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(1.0f));
    const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(j), 23));  // 2^n
    return Vec<A>(_mm512_mul_ps(p, scale));
#elif defined(CPU_CAPABILITY_AVX2)
    const __m256 t = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);
    const __m256 magic = _mm256_set1_ps(12582912.0f + 127.0f);
    const __m256 j = _mm256_fmadd_ps(t, _mm256_set1_ps(1.44269504f), magic);
    const __m256 n = _mm256_sub_ps(j, magic);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), t);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_fmadd_ps(r, _mm256_set1_ps(0.00828929059f), _mm256_set1_ps(0.0418978221f));
    p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(0.166676521f));
    p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(0.499991506f));
    p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(0.999999701f));
    p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(1.0f));
    const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(j), 23));
    return Vec<A>(_mm256_mul_ps(p, scale));
#else
    return x.exp_u20();
#endif
  } else {
    return x.exp();
  }
}

// Maximum of the lanes; NaN if any lane is NaN.
template <typename A>
inline A hmax_nan(const Vec<A>& v) {
  __at_align__ A tmp[Vec<A>::size()];
  v.store(tmp);
  A m = tmp[0];
  for (int64_t i = 1; i < Vec<A>::size(); ++i) m = (tmp[i] > m || std::isnan(tmp[i])) && !std::isnan(m) ? tmp[i] : m;
  return m;
}

// ---------------------------------------------------------------------------------------------------------------
// Position path: typed pack (pass 1) and gradient write (pass 3), called through function pointers so the core is
// compiled once per compute type whatever the student / teacher dtypes.
// ---------------------------------------------------------------------------------------------------------------

// base points at element (b, 0, p0). Writes dst[k * ld + j] = x[b, k, p0 + j] / tau for j < np (0 for np <= j <
// npv) and mx[j] = max_k dst[k * ld + j] (garbage, but finite, in padding lanes).
template <typename A>
using PackPosFn = void (*)(const void* base, int64_t sk, int64_t sp, int64_t K, int64_t np, int64_t npv, A inv_tau,
                           A* dst, int64_t ld, A* mx);

template <typename in_t, typename A>
void pack_positions(const void* base_v, int64_t sk, int64_t sp, int64_t K, int64_t np, int64_t npv, A inv_tau,
                    A* dst, int64_t ld, A* mx) {
  constexpr int64_t kW = Vec<A>::size();
  const in_t* base = static_cast<const in_t*>(base_v);
  const Vec<A> vs(inv_tau);
  if (sp == 1) {
    // Row 0 initializes the maxima.
    for (int64_t k = 0; k < K; ++k) {
      const in_t* row = base + k * sk;
      A* d = dst + k * ld;
      for (int64_t j = 0; j < npv; j += kW) {
        const Vec<A> v = (j + kW <= np ? load_as<A>(row + j, kW) : load_as<A>(row + j, np - j)) * vs;
        v.store(d + j);
        if (k == 0) {
          v.store(mx + j);
        } else {
          at::vec::maximum(Vec<A>::loadu(mx + j), v).store(mx + j);
        }
      }
    }
  } else {
    if (sk == 1) {  // channels_last-like: each position's K classes are contiguous; read them in order
      for (int64_t j = 0; j < np; ++j) {
        const in_t* col = base + j * sp;
        for (int64_t k = 0; k < K; ++k) dst[k * ld + j] = static_cast<A>(col[k]) * inv_tau;
      }
    } else {
      for (int64_t k = 0; k < K; ++k) {
        const in_t* row = base + k * sk;
        A* d = dst + k * ld;
        for (int64_t j = 0; j < np; ++j) d[j] = static_cast<A>(row[j * sp]) * inv_tau;
      }
    }
    for (int64_t k = 0; k < K; ++k) {
      A* d = dst + k * ld;
      for (int64_t j = np; j < npv; ++j) d[j] = A(0);
      for (int64_t j = 0; j < npv; j += kW) {
        const Vec<A> v = Vec<A>::loadu(d + j);
        (k == 0 ? v : at::vec::maximum(Vec<A>::loadu(mx + j), v)).store(mx + j);
      }
    }
  }
}

// Pass 3: g[b, k, p0 + j] = es[k, j] * ca[j] - et[k, j] * cb[j], zero where valid[j] is false (valid == nullptr:
// every lane valid). base points at element (b, 0, p0) of the gradient.
template <typename A>
using WritePosFn = void (*)(void* base, int64_t sk, int64_t sp, int64_t K, int64_t np, const A* es, const A* et,
                            int64_t ld, const A* ca, const A* cb, const A* valid);

template <typename out_t, typename A>
void write_positions(void* base_v, int64_t sk, int64_t sp, int64_t K, int64_t np, const A* es, const A* et,
                     int64_t ld, const A* ca, const A* cb, const A* valid) {
  constexpr int64_t kW = Vec<A>::size();
  out_t* base = static_cast<out_t*>(base_v);
  const Vec<A> zero(0);
  for (int64_t k = 0; k < K; ++k) {
    out_t* row = base + k * sk;
    const A* ek = es + k * ld;
    const A* tk = et + k * ld;
    for (int64_t j = 0; j < np; j += kW) {
      Vec<A> g = at::vec::fmsub(Vec<A>::loadu(ek + j), Vec<A>::loadu(ca + j), Vec<A>::loadu(tk + j) * Vec<A>::loadu(cb + j));
      if (valid != nullptr) g = Vec<A>::blendv(zero, g, Vec<A>::loadu(valid + j));
      const int64_t n = std::min(kW, np - j);
      if (sp == 1) {
        store_acc(row + j, g, n);
      } else {
        __at_align__ A tmp[kW];
        g.store(tmp);
        for (int64_t i = 0; i < n; ++i) row[(j + i) * sp] = static_cast<out_t>(tmp[i]);
      }
    }
  }
}

// Zero gradient of np positions of one sample (a tile without a valid position).
template <typename out_t>
void zero_positions(void* base_v, int64_t sk, int64_t sp, int64_t K, int64_t np) {
  out_t* base = static_cast<out_t*>(base_v);
  for (int64_t k = 0; k < K; ++k) {
    out_t* row = base + k * sk;
    if (sp == 1) {
      std::fill(row, row + np, out_t(0));
    } else {
      for (int64_t j = 0; j < np; ++j) row[j * sp] = out_t(0);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Row path: one position, K contiguous classes.
// ---------------------------------------------------------------------------------------------------------------

// dst[k] = x[k * sk] / tau for k < K, 0 up to the next multiple of W; returns the NaN-propagating max.
template <typename A>
using PackRowFn = A (*)(const void* base, int64_t sk, int64_t K, A inv_tau, A* dst);

template <typename in_t, typename A>
A pack_row(const void* base_v, int64_t sk, int64_t K, A inv_tau, A* dst) {
  constexpr int64_t kW = Vec<A>::size();
  const in_t* base = static_cast<const in_t*>(base_v);
  const Vec<A> vs(inv_tau);
  Vec<A> vmax(-std::numeric_limits<A>::infinity());
  if (sk == 1) {
    for (int64_t k = 0; k < K; k += kW) {
      const int64_t n = std::min(kW, K - k);
      const Vec<A> v = load_as<A>(base + k, n) * vs;
      v.store(dst + k);
      vmax = at::vec::maximum(vmax, n == kW ? v : Vec<A>::set(vmax, v, n));
    }
  } else {
    const int64_t kp = divup(K, kW) * kW;
    for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<A>(base[k * sk]) * inv_tau;
    for (int64_t k = K; k < kp; ++k) dst[k] = A(0);
    for (int64_t k = 0; k < K; k += kW) {
      const int64_t n = std::min(kW, K - k);
      const Vec<A> v = Vec<A>::loadu(dst + k);
      vmax = at::vec::maximum(vmax, n == kW ? v : Vec<A>::set(vmax, v, n));
    }
  }
  return hmax_nan(vmax);
}

// g[k * sk] = es[k] * a - et[k] * b.
template <typename A>
using WriteRowFn = void (*)(void* base, int64_t sk, int64_t K, const A* es, const A* et, A a, A b);

template <typename out_t, typename A>
void write_row(void* base_v, int64_t sk, int64_t K, const A* es, const A* et, A a, A b) {
  constexpr int64_t kW = Vec<A>::size();
  out_t* base = static_cast<out_t*>(base_v);
  const Vec<A> va(a), vb(b);
  for (int64_t k = 0; k < K; k += kW) {
    const Vec<A> g = at::vec::fmsub(Vec<A>::loadu(es + k), va, Vec<A>::loadu(et + k) * vb);
    const int64_t n = std::min(kW, K - k);
    if (sk == 1) {
      store_acc(base + k, g, n);
    } else {
      __at_align__ A tmp[kW];
      g.store(tmp);
      for (int64_t i = 0; i < n; ++i) base[(k + i) * sk] = static_cast<out_t>(tmp[i]);
    }
  }
}

template <typename out_t>
void zero_row(void* base_v, int64_t sk, int64_t K) {
  out_t* base = static_cast<out_t*>(base_v);
  for (int64_t k = 0; k < K; ++k) base[k * sk] = out_t(0);
}

// ---------------------------------------------------------------------------------------------------------------
// The problem, in element strides.
// ---------------------------------------------------------------------------------------------------------------
template <typename A>
struct Problem {
  int64_t B, K, P;
  const char* s;  // student data, element size s_es
  int64_t s_es, s_sb, s_sk, s_sp;
  const char* t;
  int64_t t_es, t_sb, t_sk, t_sp;
  char* g;  // gradient (dtype of the student) or nullptr
  int64_t g_sb, g_sk, g_sp;
  const A* mask;  // [B, P] weights or nullptr
  int64_t m_sb, m_sp;
  const A* gl;  // backward: grad_loss [B, P], or nullptr
  int64_t gl_sb, gl_sp;
  A* loss_map;  // reduction none: [B, P] contiguous, or nullptr
  A inv_tau;
  A scale;  // loss multiplier
  A coef;   // gradient multiplier: scale / tau (/ sum(mask) for mean)
  // Typed kernels.
  PackPosFn<A> pack_s_pos, pack_t_pos;
  WritePosFn<A> write_pos;
  void (*zero_pos)(void*, int64_t, int64_t, int64_t, int64_t);
  PackRowFn<A> pack_s_row, pack_t_row;
  WriteRowFn<A> write_row;
  void (*zero_row)(void*, int64_t, int64_t);

  A weight(int64_t b, int64_t p) const {  // mask weight (1 without mask)
    return mask != nullptr ? mask[b * m_sb + p * m_sp] : A(1);
  }
  A upstream(int64_t b, int64_t p) const {
    return gl != nullptr ? gl[b * gl_sb + p * gl_sp] : A(1);
  }
};

template <typename A>
struct AlignedBuffer {
  explicit AlignedBuffer(int64_t n) : raw(new A[n + 64 / sizeof(A)]) {
    auto addr = reinterpret_cast<uintptr_t>(raw.get());
    data = reinterpret_cast<A*>((addr + 63) & ~uintptr_t(63));
  }
  std::unique_ptr<A[]> raw;
  A* data;
};

// Position path over tiles [begin, end) of `ntp` tiles per sample; tile_sum[i] = sum of the tile's loss terms.
template <typename A>
void run_position_tiles(const Problem<A>& pr, int64_t tp, int64_t ntp, int64_t begin, int64_t end,
                        double* tile_sum) {
  constexpr int64_t kW = Vec<A>::size();
  const int64_t K = pr.K;
  const int64_t ld = tp + 64 / int64_t(sizeof(A));  // row pitch: +1 cache line so a column walk spreads over sets
  AlignedBuffer<A> xs_buf(K * ld), xt_buf(K * ld), lane_buf(6 * tp);
  A* xs = xs_buf.data;
  A* xt = xt_buf.data;
  A* mxs = lane_buf.data;
  A* mxt = mxs + tp;
  A* ca = mxt + tp;
  A* cb = ca + tp;
  A* valid = cb + tp;
  A* contrib = valid + tp;
  const bool grad = pr.g != nullptr;
  const bool need_valid = pr.mask != nullptr;
  const Vec<A> zero(0), vscale(pr.scale), vcoef(pr.coef);

  for (int64_t tile = begin; tile < end; ++tile) {
    const int64_t b = tile / ntp;
    const int64_t p0 = (tile % ntp) * tp;
    const int64_t np = std::min(tp, pr.P - p0);
    const int64_t npv = divup(np, kW) * kW;

    // Lane weights: the mask (1 without), 0 in padding lanes; skip the tile when no position is valid.
    bool any_valid = false;
    for (int64_t j = 0; j < npv; ++j) {
      const A w = j < np ? pr.weight(b, p0 + j) : A(0);
      ca[j] = w;  // weights, turned into gradient coefficients below
      any_valid |= (w != A(0));
    }
    if (!any_valid) {
      tile_sum[tile] = 0.0;
      if (pr.loss_map != nullptr) std::fill(pr.loss_map + b * pr.P + p0, pr.loss_map + b * pr.P + p0 + np, A(0));
      if (grad) pr.zero_pos(pr.g + (b * pr.g_sb + p0 * pr.g_sp) * pr.s_es, pr.g_sk, pr.g_sp, K, np);
      continue;
    }

    // Pass 1: the only read of s and t.
    pr.pack_s_pos(pr.s + (b * pr.s_sb + p0 * pr.s_sp) * pr.s_es, pr.s_sk, pr.s_sp, K, np, npv, pr.inv_tau, xs, ld,
                  mxs);
    pr.pack_t_pos(pr.t + (b * pr.t_sb + p0 * pr.t_sp) * pr.t_es, pr.t_sk, pr.t_sp, K, np, npv, pr.inv_tau, xt, ld,
                  mxt);

    // Software prefetch, spread over pass 2 (one line per class row and j-block): the next tile's s and t rows
    // (so the next pass 1 reads from L2 while this tile computes) and this tile's gradient rows (for writing).
    // Only for tensors whose positions are contiguous (the rows are contiguous runs).
    const char* pf_s = nullptr;
    const char* pf_t = nullptr;
    char* pf_g = nullptr;
    if (tile + 1 < end) {
      const int64_t nb = (tile + 1) / ntp, np0 = ((tile + 1) % ntp) * tp;
      if (pr.s_sp == 1) pf_s = pr.s + (nb * pr.s_sb + np0) * pr.s_es;
      if (pr.t_sp == 1) pf_t = pr.t + (nb * pr.t_sb + np0) * pr.t_es;
    }
    if (grad && pr.g_sp == 1) pf_g = pr.g + (b * pr.g_sb + p0) * pr.s_es;
    const int64_t pf_s_row = pr.s_sk * pr.s_es, pf_t_row = pr.t_sk * pr.t_es, pf_g_row = pr.g_sk * pr.s_es;

    // Pass 2: exps, sums and the loss, vectorized over positions.
    for (int64_t j = 0; j < npv; j += kW) {
      const Vec<A> ms = Vec<A>::loadu(mxs + j), mt = Vec<A>::loadu(mxt + j);
      Vec<A> ss(0), st(0), d(0);
      A* ps = xs + j;
      A* pt = xt + j;
      const int64_t next_np = std::min(tp, pr.P - (((tile + 1) % ntp) * tp));
      const bool pf_in = j < next_np, pf_out = j < np;
      const char* qs = pf_s != nullptr && pf_in ? pf_s + j * pr.s_es : nullptr;
      const char* qt = pf_t != nullptr && pf_in ? pf_t + j * pr.t_es : nullptr;
      char* qg = pf_g != nullptr && pf_out ? pf_g + j * pr.s_es : nullptr;
      if (grad) {
        for (int64_t k = 0; k < K; ++k, ps += ld, pt += ld) {
          if (qs != nullptr) __builtin_prefetch(qs + k * pf_s_row, 0, 2);
          if (qt != nullptr) __builtin_prefetch(qt + k * pf_t_row, 0, 2);
          if (qg != nullptr) __builtin_prefetch(qg + k * pf_g_row, 1, 2);
          const Vec<A> ds = Vec<A>::loadu(ps) - ms;
          const Vec<A> es = vexp<A>(ds), et = vexp<A>(Vec<A>::loadu(pt) - mt);
          ss = ss + es;
          st = st + et;
          d = at::vec::fmadd(et, ds, d);
          es.store(ps);
          et.store(pt);
        }
      } else {
        for (int64_t k = 0; k < K; ++k, ps += ld, pt += ld) {
          if (qs != nullptr) __builtin_prefetch(qs + k * pf_s_row, 0, 2);
          if (qt != nullptr) __builtin_prefetch(qt + k * pf_t_row, 0, 2);
          const Vec<A> ds = Vec<A>::loadu(ps) - ms;
          const Vec<A> es = vexp<A>(ds), et = vexp<A>(Vec<A>::loadu(pt) - mt);
          ss = ss + es;
          st = st + et;
          d = at::vec::fmadd(et, ds, d);
        }
      }
      const Vec<A> loss = ss.log() - d / st;
      const Vec<A> w = Vec<A>::loadu(ca + j);
      const Vec<A> ok = w != zero;  // all-ones lanes where valid
      Vec<A>::blendv(zero, loss * w * vscale, ok).store(contrib + j);
      if (grad) {
        // c = coef * w (* grad_loss); NaN loss (NaN logits at a valid position) -> NaN gradient for the position.
        Vec<A> c = vcoef * w;
        if (pr.gl != nullptr) {
          __at_align__ A up[kW];
          for (int64_t i = 0; i < kW; ++i) up[i] = j + i < np ? pr.upstream(b, p0 + j + i) : A(0);
          c = c * Vec<A>::loadu(up);
        }
        const Vec<A> nan = loss.isnan();
        ((c / ss) | nan).store(ca + j);
        ((c / st) | nan).store(cb + j);
        if (need_valid) ok.store(valid + j);
      }
    }

    double sum = 0.0;
    for (int64_t j = 0; j < np; ++j) sum += static_cast<double>(contrib[j]);
    tile_sum[tile] = sum;
    if (pr.loss_map != nullptr) std::copy(contrib, contrib + np, pr.loss_map + b * pr.P + p0);

    // Pass 3: the gradient from the cached exps.
    if (grad) {
      pr.write_pos(pr.g + (b * pr.g_sb + p0 * pr.g_sp) * pr.s_es, pr.g_sk, pr.g_sp, K, np, xs, xt, ld, ca, cb,
                   need_valid ? valid : nullptr);
    }
  }
}

// Row path over tiles [begin, end) of `rows` positions each (ntr tiles per sample).
template <typename A>
void run_row_tiles(const Problem<A>& pr, int64_t rows, int64_t ntr, int64_t begin, int64_t end, double* tile_sum) {
  constexpr int64_t kW = Vec<A>::size();
  const int64_t K = pr.K;
  const int64_t kp = divup(K, kW) * kW;
  AlignedBuffer<A> xs_buf(kp), xt_buf(kp);
  A* xs = xs_buf.data;
  A* xt = xt_buf.data;
  const bool grad = pr.g != nullptr;

  for (int64_t tile = begin; tile < end; ++tile) {
    const int64_t b = tile / ntr;
    const int64_t p0 = (tile % ntr) * rows;
    const int64_t p1 = std::min(pr.P, p0 + rows);
    double sum = 0.0;
    for (int64_t p = p0; p < p1; ++p) {
      const A w = pr.weight(b, p);
      char* grow = grad ? pr.g + (b * pr.g_sb + p * pr.g_sp) * pr.s_es : nullptr;
      if (w == A(0)) {
        if (pr.loss_map != nullptr) pr.loss_map[b * pr.P + p] = A(0);
        if (grad) pr.zero_row(grow, pr.g_sk, K);
        continue;
      }
      const Vec<A> ms(pr.pack_s_row(pr.s + (b * pr.s_sb + p * pr.s_sp) * pr.s_es, pr.s_sk, K, pr.inv_tau, xs));
      const Vec<A> mt(pr.pack_t_row(pr.t + (b * pr.t_sb + p * pr.t_sp) * pr.t_es, pr.t_sk, K, pr.inv_tau, xt));
      Vec<A> ss(0), st(0), d(0);
      for (int64_t k = 0; k < kp; k += kW) {
        const Vec<A> ds = Vec<A>::loadu(xs + k) - ms;
        Vec<A> es = vexp<A>(ds), et = vexp<A>(Vec<A>::loadu(xt + k) - mt);
        if (k + kW > K) {  // padding lanes contribute nothing
          es = keep_first(es, K - k);
          et = keep_first(et, K - k);
        }
        ss = ss + es;
        st = st + et;
        d = at::vec::fmadd(et, ds, d);
        if (grad) {
          es.store(xs + k);
          et.store(xt + k);
        }
      }
      const double sS = hsum(ss), sT = hsum(st), sD = hsum(d);
      const double loss = std::log(sS) - sD / sT;
      const A term = static_cast<A>(loss * static_cast<double>(w) * static_cast<double>(pr.scale));
      if (pr.loss_map != nullptr) pr.loss_map[b * pr.P + p] = term;
      sum += static_cast<double>(term);
      if (grad) {
        const double c = static_cast<double>(pr.coef) * static_cast<double>(w) * static_cast<double>(pr.upstream(b, p));
        const double nan = std::isnan(loss) ? loss : 0.0;  // propagate NaN logits to the position's gradient
        pr.write_row(grow, pr.g_sk, K, xs, xt, static_cast<A>(c / sS + nan), static_cast<A>(c / sT + nan));
      }
    }
    tile_sum[tile] = sum;
  }
}

template <typename A>
PackPosFn<A> pos_packer(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return &pack_positions<float, A>;
    case at::kDouble: return &pack_positions<double, A>;
    case at::kHalf: return &pack_positions<c10::Half, A>;
    case at::kBFloat16: return &pack_positions<c10::BFloat16, A>;
    default: TORCH_CHECK(false, kOp, ": unsupported dtype ", st);
  }
}

template <typename A>
PackRowFn<A> row_packer(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return &pack_row<float, A>;
    case at::kDouble: return &pack_row<double, A>;
    case at::kHalf: return &pack_row<c10::Half, A>;
    case at::kBFloat16: return &pack_row<c10::BFloat16, A>;
    default: TORCH_CHECK(false, kOp, ": unsupported dtype ", st);
  }
}

// Runs the kernel; returns the sum over positions of scale * w_p * loss_p.
template <typename A>
double run(Problem<A>& pr, at::ScalarType s_type, at::ScalarType t_type) {
  pr.pack_s_pos = pos_packer<A>(s_type);
  pr.pack_t_pos = pos_packer<A>(t_type);
  pr.pack_s_row = row_packer<A>(s_type);
  pr.pack_t_row = row_packer<A>(t_type);
  DTK_DISPATCH_FLOATING_TYPES(s_type, "soft_ce_write", [&] {
    if constexpr (std::is_same_v<acc_type_t<scalar_t>, A>) {
      pr.write_pos = &write_positions<scalar_t, A>;
      pr.zero_pos = &zero_positions<scalar_t>;
      pr.write_row = &write_row<scalar_t, A>;
      pr.zero_row = &zero_row<scalar_t>;
    }
  });

  const int64_t B = pr.B, K = pr.K, P = pr.P;
  const bool pos_contig = P > 1 && pr.s_sp == 1 && pr.t_sp == 1;
  const bool cls_contig = K == 1 || (pr.s_sk == 1 && pr.t_sk == 1);
  // Few classes: a row of K < 64 is too short to vectorize over; the position path gathers it instead.
  const bool use_rows = !pos_contig && cls_contig && K >= kMinRowClasses;

  int64_t per_sample, tp = 0;
  if (use_rows) {
    tp = std::clamp<int64_t>(kRowTileElems / K, 1, 1024);
    per_sample = divup(P, tp);
  } else {
    constexpr int64_t kW = Vec<A>::size();
    // Largest multiple of 16 positions (one 64-byte line of float) whose two packed buffers fit the budget.
    tp = kTileBudget / (2 * K * int64_t(sizeof(A)));
    tp = std::clamp<int64_t>(tp / 16 * 16, 16, kMaxTp);
    tp = std::min(tp, divup(P, kW) * kW);  // small P: one tile per sample
    per_sample = divup(P, tp);
  }
  const int64_t ntiles = B * per_sample;
  std::vector<double> tile_sum(ntiles, 0.0);
  at::parallel_for(0, ntiles, 1, [&](int64_t begin, int64_t end) {
    if (use_rows) {
      run_row_tiles<A>(pr, tp, per_sample, begin, end, tile_sum.data());
    } else {
      run_position_tiles<A>(pr, tp, per_sample, begin, end, tile_sum.data());
    }
  });
  double total = 0.0;
  for (double v : tile_sum) total += v;
  return total;
}

// ---------------------------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------------------------
void check_inputs(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& mask,
                  double tau, double scale) {
  CHECK_DEFINED(kOp, student, "student");
  CHECK_DEFINED(kOp, teacher, "teacher");
  CHECK_CPU(kOp, student, "student");
  CHECK_CPU(kOp, teacher, "teacher");
  CHECK_DIM(kOp, student, 3, "student");
  CHECK_FLOATING(kOp, student, "student");
  CHECK_FLOATING(kOp, teacher, "teacher");
  CHECK_SAME_SHAPE(kOp, student, teacher, "student", "teacher");
  CHECK_NONEMPTY(kOp, student, "student");
  DTK_CHECK(kOp, std::isfinite(tau) && tau > 0, "tau must be finite and > 0, got ", tau);
  DTK_CHECK(kOp, std::isfinite(scale), "scale must be finite, got ", scale);
  if (mask.has_value() && mask->defined()) {
    CHECK_CPU(kOp, *mask, "mask");
    DTK_CHECK(kOp, mask->is_floating_point(), "mask must be a floating tensor, got ", mask->scalar_type());
    DTK_CHECK(kOp, mask->dim() == 2 && mask->size(0) == student.size(0) && mask->size(1) == student.size(2),
              "mask must have shape [B, P] = [", student.size(0), ", ", student.size(2), "], got ", mask->sizes());
  }
}

// A [B, P] tensor in the compute dtype (a view when it already is one: no copy).
at::Tensor as_compute(const at::Tensor& x, at::ScalarType acc) {
  return x.scalar_type() == acc ? x : x.to(acc);
}

template <typename A>
void fill_problem(Problem<A>& pr, const at::Tensor& s, const at::Tensor& t, const at::Tensor& m, const at::Tensor& g,
                  double tau, double scale) {
  pr.B = s.size(0);
  pr.K = s.size(1);
  pr.P = s.size(2);
  pr.s = static_cast<const char*>(s.const_data_ptr());
  pr.s_es = s.element_size();
  pr.s_sb = s.stride(0), pr.s_sk = s.stride(1), pr.s_sp = s.stride(2);
  pr.t = static_cast<const char*>(t.const_data_ptr());
  pr.t_es = t.element_size();
  pr.t_sb = t.stride(0), pr.t_sk = t.stride(1), pr.t_sp = t.stride(2);
  pr.g = nullptr;
  pr.g_sb = pr.g_sk = pr.g_sp = 0;
  if (g.defined()) {
    pr.g = static_cast<char*>(g.data_ptr());
    pr.g_sb = g.stride(0), pr.g_sk = g.stride(1), pr.g_sp = g.stride(2);
  }
  pr.mask = nullptr;
  pr.m_sb = pr.m_sp = 0;
  if (m.defined()) {
    pr.mask = m.const_data_ptr<A>();
    pr.m_sb = m.stride(0), pr.m_sp = m.stride(1);
  }
  pr.gl = nullptr;
  pr.gl_sb = pr.gl_sp = 0;
  pr.loss_map = nullptr;
  pr.inv_tau = static_cast<A>(1.0 / tau);
  pr.scale = static_cast<A>(scale);
  pr.coef = static_cast<A>(scale / tau);
}

// Sum of the mask in double, in a fixed order.
double mask_sum(const at::Tensor& m) {
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "soft_ce_mask_sum", [&] {
    const scalar_t* p = m.const_data_ptr<scalar_t>();
    const int64_t B = m.size(0), P = m.size(1), sb = m.stride(0), sp = m.stride(1);
    for (int64_t b = 0; b < B; ++b) {
      double acc[4] = {0, 0, 0, 0};
      const scalar_t* row = p + b * sb;
      int64_t j = 0;
      for (; j + 4 <= P; j += 4)
        for (int i = 0; i < 4; ++i) acc[i] += static_cast<double>(row[(j + i) * sp]);
      for (; j < P; ++j) acc[0] += static_cast<double>(row[j * sp]);
      total += (acc[0] + acc[1]) + (acc[2] + acc[3]);
    }
  });
  return total;
}

std::tuple<at::Tensor, at::Tensor> soft_ce_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                               const std::optional<at::Tensor>& mask, double tau, double scale,
                                               int64_t reduction, bool compute_grad) {
  check_inputs(student, teacher, mask, tau, scale);
  const Reduction red = to_mode<Reduction>(kOp, "reduction", reduction);
  const at::ScalarType acc = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t B = student.size(0), P = student.size(2);
  const at::Tensor m = (mask.has_value() && mask->defined()) ? as_compute(*mask, acc) : at::Tensor();
  const bool grad = compute_grad && red != Reduction::kNone;
  at::Tensor g = grad ? at::empty_like(student) : at::Tensor();
  if (grad) advise_huge_pages(g);  // fresh large buffers: 2 MiB pages instead of a fault per 4 KiB (utils.h)
  at::Tensor loss_map = red == Reduction::kNone ? at::empty({B, P}, student.options().dtype(acc)) : at::Tensor();
  at::Tensor loss = red == Reduction::kNone ? loss_map : at::empty({}, student.options().dtype(acc));

  // Mean: the gradient weight 1 / sum(mask) is needed before the gradient is written.
  double denom = 1.0;
  if (red == Reduction::kMean) denom = m.defined() ? mask_sum(m) : static_cast<double>(B) * static_cast<double>(P);

  AT_DISPATCH_FLOATING_TYPES(acc, "soft_ce_cpu", [&] {
    using A = scalar_t;
    Problem<A> pr;
    fill_problem<A>(pr, student, teacher, m, g, tau, scale);
    if (red == Reduction::kMean) pr.coef = denom != 0.0 ? static_cast<A>(scale / tau / denom) : A(0);
    if (red == Reduction::kNone) pr.loss_map = loss_map.data_ptr<A>();
    const double total = run<A>(pr, student.scalar_type(), teacher.scalar_type());
    if (red != Reduction::kNone) {
      double value = total;
      if (red == Reduction::kMean) value = denom != 0.0 ? total / denom : total * 0.0;
      loss.fill_(static_cast<A>(value));
    }
  });
  return {loss, grad ? g : at::empty({0}, student.options())};
}

at::Tensor soft_ce_backward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                const std::optional<at::Tensor>& mask, const at::Tensor& grad_loss, double tau,
                                double scale) {
  check_inputs(student, teacher, mask, tau, scale);
  CHECK_DEFINED(kOp, grad_loss, "grad_loss");
  CHECK_CPU(kOp, grad_loss, "grad_loss");
  DTK_CHECK(kOp, grad_loss.is_floating_point(), "grad_loss must be a floating tensor, got ", grad_loss.scalar_type());
  DTK_CHECK(kOp, grad_loss.dim() == 2 && grad_loss.size(0) == student.size(0) && grad_loss.size(1) == student.size(2),
            "grad_loss must have shape [B, P] = [", student.size(0), ", ", student.size(2), "], got ",
            grad_loss.sizes());
  const at::ScalarType acc = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor m = (mask.has_value() && mask->defined()) ? as_compute(*mask, acc) : at::Tensor();
  const at::Tensor gl = as_compute(grad_loss, acc);
  at::Tensor g = at::empty_like(student);
  advise_huge_pages(g);
  AT_DISPATCH_FLOATING_TYPES(acc, "soft_ce_backward_cpu", [&] {
    using A = scalar_t;
    Problem<A> pr;
    fill_problem<A>(pr, student, teacher, m, g, tau, scale);
    pr.gl = gl.const_data_ptr<A>();
    pr.gl_sb = gl.stride(0), pr.gl_sp = gl.stride(1);
    run<A>(pr, student.scalar_type(), teacher.scalar_type());
  });
  return g;
}

}  // namespace

TORCH_LIBRARY_IMPL(dtkernels, CPU, m) {
  m.impl("soft_ce", &soft_ce_cpu);
  m.impl("soft_ce_backward", &soft_ce_backward_cpu);
}

}  // namespace dtkernels
