// CPU kernel of dtkernels::group_norm_act (inference only): the specification is
// dtkernels.reference.group_norm_act_op,
//
//     out[b, c, s] = act((x[b, c, s] - mean[b, g]) * rstd[b, g] * w[c] + bias[c]) * (1 + scale[b, c]) + shift[b, c]),
//     g = c / (C / G), rstd = 1 / sqrt(var + eps), mean and biased var over the group's channels and all positions s,
//
// written as one fused pass per element with per-channel coefficients (computed in double, rounded once):
//
//     out = act((x - mean) * a[b, c] + d[b, c]),  a = rstd * w * (1 + scale),  d = bias * (1 + scale) + shift.
//
// x - mean first (not x * a + (d - mean * a)): no cancellation between two large terms when |mean| >> std.
//
// Statistics: x is read in chunks that fit in L1 (kChunk elements); each chunk's mean and centred sum of squares are
// computed by two passes over the chunk (the second from L1) in the accumulation type (float; double for double),
// with the centring point's rounding corrected (M2 -= (sum of deviations)^2 / n); chunks are merged in a fixed
// order with Chan et al.'s pairwise update in double. So the variance is sound for data whose mean is large
// against its spread (no E[x^2] - E[x]^2), and the result does not depend on the thread count.
//
// Layouts, each without a copy (x viewed as [B, C, S], the spatial dimensions flattened; any rank >= 2):
//   * rows: x and out have unit spatial stride (NCHW-contiguous, or channel-sliced views of it). at::parallel_for
//     over (b, g) tiles; a tile's statistics pass reads its cpg rows from memory (one span when they are adjacent),
//     its write pass re-reads them from L2 / L3 (a group of [2, 256, 256, 256] is 2 MiB), so DRAM sees x once and
//     out once.
//   * pixels: x and out have unit channel stride (channels_last). A group's channels are interleaved with the
//     others' in every pixel, so per batch of samples (up to kBatchBytes of x): the statistics of blocks of pixels
//     (in parallel; per-channel two-pass moments of the block in register strips, folded into per-group moments),
//     merged per group in block order, then the write pass over the blocks (in parallel). x is read twice; the
//     second read hits L3 only when the batch fits there.
//   * anything else (spatially sliced views): computed on a contiguous copy, then copied into empty_like(x).
// Large outputs (kStreamBytes) are written with streaming stores (no read-for-ownership, no cache pollution).
//
// SiLU is y / (1 + exp(-y)) (float: a 20-ulp exp and a refined reciprocal estimate, see activate()); NaN and Inf
// propagate as in the reference (an Inf or NaN in a group makes its statistics, and so the group's output, NaN).
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "utils.h"

namespace dtkernels {
namespace {

constexpr const char* kOp = "group_norm_act";

constexpr int64_t kChunk = 2048;              // elements of one two-pass statistics chunk (8 KiB of float: L1)
constexpr int64_t kPixelBlockElems = 8192;    // channels_last: pixels per block = ceil(kPixelBlockElems / C)
constexpr int64_t kStreamBytes = int64_t(8) << 20;  // outputs at least this large: streaming stores
constexpr int64_t kBatchBytes = int64_t(16) << 20;  // channels_last: samples per batch of the two passes

// Running moments (count, mean, centred sum of squares), merged with Chan et al.'s update in a fixed order.
struct Moments {
  double n = 0.0, mean = 0.0, m2 = 0.0;
  void merge(double nb, double mean_b, double m2_b) {
    if (nb == 0.0) return;
    if (n == 0.0) {
      n = nb;
      mean = mean_b;
      m2 = m2_b;
      return;
    }
    const double total = n + nb;
    const double delta = mean_b - mean;
    mean += delta * (nb / total);
    m2 += m2_b + delta * delta * (n * nb / total);
    n = total;
  }
};

template <typename T>
using V = AccVec<T>;

// Mean and centred sum of squares of p[0, n), n <= kChunk: two passes, the second from L1.
template <typename T>
inline void chunk_moments(const T* p, int64_t n, double& mean, double& m2) {
  using A = acc_type_t<T>;
  constexpr int64_t kW = V<T>::size();
  V<T> s0(A(0)), s1(A(0)), s2(A(0)), s3(A(0));
  int64_t i = 0;
  for (; i + 4 * kW <= n; i += 4 * kW) {
    s0 += load_acc(p + i);
    s1 += load_acc(p + i + kW);
    s2 += load_acc(p + i + 2 * kW);
    s3 += load_acc(p + i + 3 * kW);
  }
  for (; i + kW <= n; i += kW) s0 += load_acc(p + i);
  if (i < n) s1 += load_acc(p + i, n - i);  // lanes past n are zero
  const A mu = static_cast<A>(hsum((s0 + s1) + (s2 + s3)) / static_cast<double>(n));
  const V<T> vmu(mu);
  V<T> q0(A(0)), q1(A(0)), d0(A(0)), d1(A(0));
  i = 0;
  for (; i + 2 * kW <= n; i += 2 * kW) {
    const V<T> a = load_acc(p + i) - vmu;
    const V<T> b = load_acc(p + i + kW) - vmu;
    d0 += a;
    d1 += b;
    q0 = at::vec::fmadd(a, a, q0);
    q1 = at::vec::fmadd(b, b, q1);
  }
  for (; i + kW <= n; i += kW) {
    const V<T> a = load_acc(p + i) - vmu;
    d0 += a;
    q0 = at::vec::fmadd(a, a, q0);
  }
  if (i < n) {
    const V<T> a = keep_first(load_acc(p + i, n - i) - vmu, n - i);
    d1 += a;
    q1 = at::vec::fmadd(a, a, q1);
  }
  const double nd = static_cast<double>(n);
  const double dev = hsum(d0 + d1);  // sum of (x - mu): mu is the rounded mean
  mean = static_cast<double>(mu) + dev / nd;
  m2 = std::max(hsum(q0 + q1) - dev * dev / nd, 0.0);
}

// 1 / d for float lanes: the hardware estimate (12 bits with AVX2, 14 with AVX-512) and one Newton step, ~1 ulp
// short of the division and a fraction of its cost (the division was a third of the SiLU pass).
inline at::vec::Vectorized<float> reciprocal_nr(const at::vec::Vectorized<float>& d) {
  using VF = at::vec::Vectorized<float>;
#if defined(CPU_CAPABILITY_AVX512)
  const VF r = _mm512_rcp14_ps(d);
#elif defined(CPU_CAPABILITY_AVX2)
  const VF r = _mm256_rcp_ps(d);
#else
  return VF(1.0f) / d;
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return r * at::vec::fnmadd(d, r, VF(2.0f));  // r (2 - d r)
#endif
}

// SiLU y * sigmoid(y) = y / (1 + exp(-y)). float: at::vec's exp_u20 (a degree-5 polynomial, ~20 ulp at most, far
// below the rounding of the float32 inputs it is applied to; Sleef's 1-ulp expf made the write pass compute-bound)
// and reciprocal_nr; double: Sleef's exp and a division. NaN stays NaN; exp(-y) saturates instead of overflowing.
template <typename T>
inline V<T> activate(const V<T>& y, Activation act) {
  using A = acc_type_t<T>;
  if (act == Activation::kSilu) {
    if constexpr (std::is_same_v<A, float>) {
      return y * reciprocal_nr(V<T>(A(1)) + y.neg().exp_u20());
    } else {
      return y / (V<T>(A(1)) + y.neg().exp());
    }
  }
  return y;
}

// out[0, n) = act((x - mean) * a + d); streaming stores where allowed (the head up to the first aligned vector and
// the tail use ordinary stores).
template <typename T>
inline void apply_span(const T* x, T* out, int64_t n, const V<T>& vm, const V<T>& va, const V<T>& vd,
                       Activation act, bool stream) {
  constexpr int64_t kW = V<T>::size();
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    if (stream) {
      constexpr uintptr_t kAlign = sizeof(T) * kW;
      const uintptr_t addr = reinterpret_cast<uintptr_t>(out);
      if (addr % sizeof(T) == 0) {
        int64_t head = static_cast<int64_t>(((kAlign - addr % kAlign) % kAlign) / sizeof(T));
        head = std::min(head, n);
        if (head > 0) {
          store_acc(out, activate<T>(at::vec::fmadd(load_acc(x, head) - vm, va, vd), act), head);
          i = head;
        }
        for (; i + kW <= n; i += kW) {
          stream_store(out + i, activate<T>(at::vec::fmadd(load_acc(x + i) - vm, va, vd), act));
        }
      }
    }
  }
  for (; i + kW <= n; i += kW) store_acc(out + i, activate<T>(at::vec::fmadd(load_acc(x + i) - vm, va, vd), act));
  if (i < n) store_acc(out + i, activate<T>(at::vec::fmadd(load_acc(x + i, n - i) - vm, va, vd), act), n - i);
}

// x viewed as [B, C, S]: the strides of b, c and the flattened spatial index.
struct View3 {
  int64_t sb, sc, ss;
};

// The stride of the flattened spatial dimensions of t [B, C, *spatial], when they flatten (size-1 dims ignored).
std::optional<int64_t> spatial_stride(const at::Tensor& t) {
  int64_t st = -1, expect = -1;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) == 1) continue;
    if (st < 0) {
      st = t.stride(d);
      expect = st * t.size(d);
    } else {
      if (t.stride(d) != expect) return std::nullopt;
      expect *= t.size(d);
    }
  }
  return st < 0 ? 1 : st;
}

// The per-channel parameters ([C] or [B, C], any strides) as double host arrays in row-major order; empty when
// absent. Read in place: a .to(kDouble).contiguous() per parameter was a third of a small call's time.
std::vector<double> as_doubles(const std::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return {};
  const at::Tensor& v = *t;
  const int64_t rows = v.dim() == 2 ? v.size(0) : 1, cols = v.size(v.dim() - 1);
  const int64_t s_row = v.dim() == 2 ? v.stride(0) : 0, s_col = v.stride(v.dim() - 1);
  std::vector<double> out(static_cast<size_t>(rows * cols));
  DTK_DISPATCH_FLOATING_TYPES(v.scalar_type(), "dtkernels::group_norm_act params", [&] {
    const scalar_t* p = v.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < cols; ++j) out[i * cols + j] = static_cast<double>(p[i * s_row + j * s_col]);
    }
  });
  return out;
}

struct Params {
  std::vector<double> w, bias, scale, shift;
  double eps;
};

// (a, d) of channel c of sample b: a = rstd * w * (1 + scale), d = bias * (1 + scale) + shift.
inline std::pair<double, double> channel_coefs(const Params& P, int64_t b, int64_t c, int64_t C, double rstd) {
  const double w = P.w.empty() ? 1.0 : P.w[c];
  const double bi = P.bias.empty() ? 0.0 : P.bias[c];
  const double s1 = 1.0 + (P.scale.empty() ? 0.0 : P.scale[b * C + c]);
  const double sh = P.shift.empty() ? 0.0 : P.shift[b * C + c];
  return {rstd * w * s1, bi * s1 + sh};
}

inline double rstd_of(const Moments& mo, double eps) { return 1.0 / std::sqrt(mo.m2 / mo.n + eps); }

// The kernels subtract the mean rounded to the accumulation type, m = A(mean), and fold the rounding error into the
// offset: (x - mean) a + d == (x - m) a + (d - (mean - m) a). Without it, a mean that is large against the spread
// (1000 + 0.01 randn) would shift every output by up to half an ulp of the mean times a.
template <typename A>
inline A folded_offset(double mean, A m, double a, double d) {
  return static_cast<A>(d - (mean - static_cast<double>(m)) * a);
}

// NCHW-like: unit spatial stride for x and out. One (b, g) tile: statistics, then the write pass.
template <typename T>
void run_rows(const T* x, T* out, int64_t B, int64_t C, int64_t S, int64_t G, View3 xv, View3 ov, const Params& P,
              Activation act, bool stream) {
  using A = acc_type_t<T>;
  const int64_t cpg = C / G;
  at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t b = tile / G, g = tile % G;
      // Rows that follow each other in memory (NCHW-contiguous) are one span of cpg * S elements, chunked as a
      // whole: short rows (8x8 positions) would otherwise pay a chunk's fixed cost every few vectors.
      const bool one_span = xv.sc == S || cpg == 1;
      const int64_t n_rows = one_span ? 1 : cpg, row_len = one_span ? cpg * S : S;
      Moments mo;
      for (int64_t r = 0; r < n_rows; ++r) {
        const T* row = x + b * xv.sb + (g * cpg + r) * xv.sc;
        for (int64_t s0 = 0; s0 < row_len; s0 += kChunk) {
          const int64_t n = std::min(kChunk, row_len - s0);
          double mean, m2;
          chunk_moments<T>(row + s0, n, mean, m2);
          mo.merge(static_cast<double>(n), mean, m2);
        }
      }
      const double rstd = rstd_of(mo, P.eps);
      const A m = static_cast<A>(mo.mean);
      const V<T> vm(m);
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
        const auto [a, d] = channel_coefs(P, b, c, C, rstd);
        const V<T> va(static_cast<A>(a)), vd(folded_offset<A>(mo.mean, m, a, d));
        apply_span<T>(x + b * xv.sb + c * xv.sc, out + b * ov.sb + c * ov.sc, S, vm, va, vd, act, stream);
      }
    }
    if (stream) stream_fence();  // this thread's streaming stores, before the region's join
  });
}

// Strips of kStrip vectors of channels: the channels_last passes keep a strip's accumulators (or coefficients) in
// registers while they walk a block's pixels, instead of loading and storing a per-channel array for every vector.
constexpr int64_t kStrip = 4;

// Lanes of vector j of the strip starting at channel c0 (0 past the last channel).
template <typename T>
inline int64_t strip_lanes(int64_t C, int64_t c0, int64_t j) {
  return std::clamp<int64_t>(C - (c0 + j * V<T>::size()), 0, V<T>::size());
}

template <typename T>
inline V<T> load_lanes(const T* p, int64_t n) {
  using A = acc_type_t<T>;
  if (n == V<T>::size()) return load_acc(p);
  return n > 0 ? load_acc(p, n) : V<T>(A(0));
}

// channels_last-like: unit channel stride for x and out; pixel p of sample b at b * sb + p * ss. Per sample: the
// moments of blocks of pixels (per channel: two passes over the block, from L1 / L2, folded into per-group moments),
// merged per group in block order, then the write pass over the blocks.
template <typename T>
void run_pixels(const T* x, T* out, int64_t B, int64_t C, int64_t S, int64_t G, View3 xv, View3 ov,
                const Params& P, Activation act, bool stream) {
  using A = acc_type_t<T>;
  constexpr int64_t kW = V<T>::size();
  constexpr int64_t kStripC = kStrip * kW;
  const int64_t cpg = C / G;
  const int64_t P_blk = std::max<int64_t>(1, (kPixelBlockElems + C - 1) / C);
  const int64_t nblk = (S + P_blk - 1) / P_blk;
  const int64_t C_pad = (C + kStripC - 1) / kStripC * kStripC;
  const bool dense = xv.ss == C && ov.ss == C;
  // Samples in batches of at most kBatchBytes of x (at least one sample): two parallel regions per batch, and the
  // write pass re-reads a batch that the statistics pass has just left in L3.
  const int64_t sample_bytes = C * S * static_cast<int64_t>(sizeof(T));
  const int64_t per_batch = std::clamp<int64_t>(kBatchBytes / std::max<int64_t>(sample_bytes, 1), 1, B);
  std::vector<double> part_mean(per_batch * nblk * G), part_m2(per_batch * nblk * G);
  // The batch's coefficients, [per_batch, C_pad]: out = act((x - m) * a + d).
  std::vector<A> m(per_batch * C_pad), a(per_batch * C_pad), d(per_batch * C_pad);
  for (int64_t b0 = 0; b0 < B; b0 += per_batch) {
    const int64_t nb = std::min(per_batch, B - b0);
    at::parallel_for(0, nb * nblk, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> mean(C_pad), dev(C_pad), sq(C_pad);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bi = task / nblk, k = task % nblk;
        const T* xb = x + (b0 + bi) * xv.sb;
        const int64_t p0 = k * P_blk, np = std::min(P_blk, S - p0);
        const A inv = A(1) / static_cast<A>(np);
        for (int64_t c0 = 0; c0 < C; c0 += kStripC) {
          int64_t n[kStrip];
          for (int64_t j = 0; j < kStrip; ++j) n[j] = strip_lanes<T>(C, c0, j);
          V<T> s[kStrip];
          for (int64_t j = 0; j < kStrip; ++j) s[j] = V<T>(A(0));
          for (int64_t p = p0; p < p0 + np; ++p) {
            const T* row = xb + p * xv.ss + c0;
            for (int64_t j = 0; j < kStrip; ++j) s[j] += load_lanes(row + j * kW, n[j]);
          }
          V<T> mu[kStrip], dv[kStrip], q[kStrip];
          for (int64_t j = 0; j < kStrip; ++j) {
            mu[j] = s[j] * V<T>(inv);  // the channel means over the block (rounded; corrected below by dv)
            dv[j] = V<T>(A(0));
            q[j] = V<T>(A(0));
          }
          for (int64_t p = p0; p < p0 + np; ++p) {
            const T* row = xb + p * xv.ss + c0;
            for (int64_t j = 0; j < kStrip; ++j) {
              const V<T> e = keep_first(load_lanes(row + j * kW, n[j]) - mu[j], n[j]);
              dv[j] += e;
              q[j] = at::vec::fmadd(e, e, q[j]);
            }
          }
          for (int64_t j = 0; j < kStrip; ++j) {
            mu[j].store(mean.data() + c0 + j * kW);
            dv[j].store(dev.data() + c0 + j * kW);
            q[j].store(sq.data() + c0 + j * kW);
          }
        }
        // Fold the block's channels into per-group moments. Every channel has np values, so the parallel formula
        // needs no division per channel (a Chan update per channel cost more than the block's passes): mean_g =
        // sum_c mean_c / cpg, M2_g = sum_c M2_c + np sum_c (mean_c - mean_g)^2, where mean_c and M2_c are corrected
        // for the rounded centre (mean_c = mu_c + dev_c / np, M2_c = sq_c - dev_c^2 / np).
        const double npd = static_cast<double>(np), inv_np = 1.0 / npd, inv_cpg = 1.0 / static_cast<double>(cpg);
        for (int64_t g = 0; g < G; ++g) {
          double msum = 0.0, m2sum = 0.0;
          for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
            const double e = static_cast<double>(dev[c]);
            msum += static_cast<double>(mean[c]) + e * inv_np;
            m2sum += std::max(static_cast<double>(sq[c]) - e * e * inv_np, 0.0);
          }
          const double mg = msum * inv_cpg;
          double spread = 0.0;
          for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
            const double dm = static_cast<double>(mean[c]) + static_cast<double>(dev[c]) * inv_np - mg;
            spread += dm * dm;
          }
          part_mean[(bi * nblk + k) * G + g] = mg;
          part_m2[(bi * nblk + k) * G + g] = m2sum + npd * spread;
        }
      }
    });
    // Merge each group's block moments in block order, on this thread (no parallel region: cheap). The full
    // blocks have equal counts (P_blk * cpg values): the equal-count formula, no division per block; a shorter
    // last block joins by Chan's update.
    const int64_t n_full = S / P_blk, tail = S - n_full * P_blk;
    for (int64_t bi = 0; bi < nb; ++bi) {
      for (int64_t g = 0; g < G; ++g) {
        const double* pm = part_mean.data() + bi * nblk * G + g;
        const double* pq = part_m2.data() + bi * nblk * G + g;
        Moments mo;
        if (n_full > 0) {
          double msum = 0.0, m2sum = 0.0;
          for (int64_t k = 0; k < n_full; ++k) {
            msum += pm[k * G];
            m2sum += pq[k * G];
          }
          const double mean = msum / static_cast<double>(n_full);
          double spread = 0.0;
          for (int64_t k = 0; k < n_full; ++k) spread += (pm[k * G] - mean) * (pm[k * G] - mean);
          const double per_block = static_cast<double>(P_blk * cpg);
          mo.merge(per_block * static_cast<double>(n_full), mean, m2sum + per_block * spread);
        }
        if (tail > 0) mo.merge(static_cast<double>(tail * cpg), pm[n_full * G], pq[n_full * G]);
        const double rstd = rstd_of(mo, P.eps);
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
          const auto [ac, dc] = channel_coefs(P, b0 + bi, c, C, rstd);
          const int64_t i = bi * C_pad + c;
          m[i] = static_cast<A>(mo.mean);
          a[i] = static_cast<A>(ac);
          d[i] = folded_offset<A>(mo.mean, m[i], ac, dc);
        }
      }
    }
    at::parallel_for(0, nb * nblk, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bi = task / nblk, k = task % nblk;
        const T* xb = x + (b0 + bi) * xv.sb;
        T* ob = out + (b0 + bi) * ov.sb;
        const A* mb = m.data() + bi * C_pad;
        const A* ab = a.data() + bi * C_pad;
        const A* db = d.data() + bi * C_pad;
        const int64_t p0 = k * P_blk, np = std::min(P_blk, S - p0);
        if (dense) {  // the block is one contiguous span of np * C elements, channels repeating every C
          // Strip by strip would write partial cache lines; with whole rows the span is written in order.
          for (int64_t p = p0; p < p0 + np; ++p) {
            const T* row = xb + p * C;
            T* orow = ob + p * C;
            int64_t c = 0;
            for (; c + kW <= C; c += kW) {
              const V<T> y = activate<T>(at::vec::fmadd(load_acc(row + c) - V<T>::loadu(mb + c),
                                                        V<T>::loadu(ab + c), V<T>::loadu(db + c)),
                                         act);
              if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
                if (stream && reinterpret_cast<uintptr_t>(orow + c) % (kW * sizeof(T)) == 0) {
                  stream_store(orow + c, y);
                  continue;
                }
              }
              store_acc(orow + c, y);
            }
            if (c < C) {
              const int64_t r = C - c;
              const V<T> y = activate<T>(at::vec::fmadd(load_acc(row + c, r) - V<T>::loadu(mb + c),
                                                        V<T>::loadu(ab + c), V<T>::loadu(db + c)),
                                         act);
              store_acc(orow + c, y, r);
            }
          }
          continue;
        }
        for (int64_t p = p0; p < p0 + np; ++p) {
          const T* row = xb + p * xv.ss;
          T* orow = ob + p * ov.ss;
          for (int64_t c = 0; c < C; c += kW) {
            const int64_t r = std::min(kW, C - c);
            const V<T> y = activate<T>(at::vec::fmadd(load_lanes(row + c, r) - V<T>::loadu(mb + c),
                                                      V<T>::loadu(ab + c), V<T>::loadu(db + c)),
                                       act);
            store_acc(orow + c, y, r);
          }
        }
      }
      if (stream) stream_fence();
    });
  }
}

void check_param(const std::optional<at::Tensor>& t, const char* what, at::IntArrayRef shape, const at::Tensor& x) {
  if (!t.has_value() || !t->defined()) return;
  CHECK_CPU(kOp, *t, what);
  DTK_CHECK(kOp, t->sizes() == shape, what, " must have shape ", shape, ", got ", t->sizes());
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  DTK_CHECK(kOp, t->scalar_type() == x.scalar_type() || t->scalar_type() == acc, what,
            " must have the dtype of x (", x.scalar_type(), ") or ", acc, ", got ", t->scalar_type());
}

at::Tensor group_norm_act_cpu(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                              const std::optional<at::Tensor>& shift, double eps, int64_t act_value) {
  CHECK_DEFINED(kOp, x, "x");
  CHECK_CPU(kOp, x, "x");
  CHECK_FLOATING(kOp, x, "x");
  DTK_CHECK(kOp, x.dim() >= 2, "x must have shape [B, C, *spatial], got ", x.sizes());
  CHECK_NONEMPTY(kOp, x, "x");
  const int64_t B = x.size(0), C = x.size(1);
  DTK_CHECK(kOp, num_groups > 0 && C % num_groups == 0, "num_groups must be a positive divisor of the ", C,
            " channels of x, got ", num_groups);
  check_param(weight, "weight", {C}, x);
  check_param(bias, "bias", {C}, x);
  check_param(scale, "scale", {B, C}, x);
  check_param(shift, "shift", {B, C}, x);
  DTK_CHECK(kOp, eps > 0.0, "eps must be > 0, got ", eps);
  const Activation act = to_mode<Activation>(kOp, "act", act_value);
  const int64_t G = num_groups;
  const int64_t S = x.numel() / (B * C);

  Params P{as_doubles(weight), as_doubles(bias), as_doubles(scale), as_doubles(shift), eps};
  at::Tensor out = at::empty_like(x);
  advise_huge_pages(out);
  const bool stream = static_cast<int64_t>(out.numel()) * out.element_size() >= kStreamBytes;

  DTK_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dtkernels::group_norm_act", [&] {
    using T = scalar_t;
    const auto xs = spatial_stride(x), os = spatial_stride(out);
    if (xs && os) {
      const View3 xv{x.stride(0), x.stride(1), *xs}, ov{out.stride(0), out.stride(1), *os};
      if (xv.ss == 1 && ov.ss == 1) {
        run_rows<T>(x.const_data_ptr<T>(), out.data_ptr<T>(), B, C, S, G, xv, ov, P, act, stream);
        return;
      }
      if (xv.sc == 1 && ov.sc == 1) {
        run_pixels<T>(x.const_data_ptr<T>(), out.data_ptr<T>(), B, C, S, G, xv, ov, P, act, stream);
        return;
      }
    }
    // Any other layout: compute on a contiguous copy, then copy into empty_like(x).
    const at::Tensor xc = x.contiguous();
    at::Tensor oc = at::empty_like(xc, at::MemoryFormat::Contiguous);
    const View3 v{C * S, S, 1};
    run_rows<T>(xc.const_data_ptr<T>(), oc.data_ptr<T>(), B, C, S, G, v, v, P, act, stream);
    out.copy_(oc);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dtkernels, CPU, m) { m.impl("group_norm_act", &group_norm_act_cpu); }

}  // namespace dtkernels
