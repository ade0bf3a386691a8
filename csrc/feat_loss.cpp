// CPU kernel of dtkernels::feat_loss (multi-level DreamTeacher feature-distillation loss and its student gradient).
//
// The op computes exactly dtkernels.reference.feat_loss_op; the formulas (whitening, MSE, attention transfer and the
// analytic gradient) are written out in the docstring of dtkernels/reference.py.
//
// Work decomposition
// ------------------
// A level's student / teacher are [B, C, H, W]; an element lives at b*sb + c*sc + j*shw with j = h*W + w (H and W
// must flatten: stride_h == W * stride_w). Two layouts run without a copy:
//   * kHW ("NCHW-like", shw == 1, which includes channel-sliced views x[:, ::2]): vectorized over positions j. A work
//     item (chunk) is a range of positions of one sample, walked by rows (c outer), so every pass streams contiguous
//     row segments; per-position accumulators (teacher mean / M2, a_s, a_t) stay in L1/L2. Pass 1 sums 16 rows at
//     a time per position, in registers (tiles of two vectors, shifted sums) while the sample fits in L2 or rows
//     are short, else row by row with Welford's update in L1 buffers; blocks are merged with Chan's formula.
//   * kC ("NHWC-like", sc == 1, channels_last): vectorized over channels, one position (a row of C contiguous
//     values, L1 resident) at a time, so the LayerNorm statistics are a two-pass over the row.
// Anything else (e.g. spatially sliced views whose H and W do not flatten) is copied to NCHW-contiguous; a teacher
// whose layout does not match the student's is copied to the student's memory format; and when
// torch.empty_like(student) (the gradient's required layout) does not fit the kernel layout, the gradient is
// written to a scratch tensor and copied into it.
//
// The gradient needs per-sample norms of the attention maps over all H*W positions, i.e. a second touch of s and t
// after a per-sample reduction, so all passes of a sample run close together in time and pass 2 re-reads the sample
// from L2 / L3. With many samples (>= 4 per thread, the training case) every thread takes whole samples from a
// shared counter and runs pass 1, the per-sample scalars and pass 2 (backwards, so the most recently read data is
// reused first) on its own: one parallel region, no barrier. With few samples they are processed in "waves" of
// whole samples whose student + teacher bytes fit in the shared L3 (kWaveBytes), split over the threads by position
// chunks: pass 1 runs in parallel over the wave's chunks (whitening statistics,
// attention maps a_s / a_t, and the MSE when it needs no statistics); then the per-sample attention scalars are
// computed; then pass 2 re-reads s and t (from L2 / L3: every thread gets the same contiguous, element-balanced range
// of chunks in both passes and walks it backwards in pass 2, so the most recently read data is reused first), sums
// the whitened MSE and writes the gradient with streaming stores. Forward-only calls need pass 2 only for the
// whitened MSE of the kHW layout (and for sample whitening); otherwise everything is a single pass and wave.
//
// Determinism: every partial sum is stored per chunk (the chunk decomposition depends only on the shapes) and merged
// in a fixed order on one thread, so results do not depend on the thread count or on scheduling.
// Accumulation is in float for float / Half / BFloat16 inputs (per-position sums over C, per-row sums in double)
// and in double for double inputs; per-sample attention scalars are computed in double.
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "utils.h"

namespace dtkernels {
namespace {

constexpr const char* kOp = "feat_loss";
constexpr double kAtNormEps = 1e-12;  // dtkernels.reference.AT_NORM_EPS
constexpr int64_t kChunkElems = int64_t(1) << 18;      // target elements per work item (1 MiB of float32)
// Student + teacher bytes of one wave. Pass 2 re-reads a wave from the shared L3, which other tenants of the machine
// share too: a wave well below the L3's size is what keeps that re-read a cache hit (larger waves were clearly
// slower in fwd_bwd; benchmarks/README.md has the numbers).
constexpr int64_t kWaveBytes = int64_t(8) << 20;
// Samples (student + teacher bytes) above this size get software prefetch of the next row in the kHW passes.
constexpr int64_t kPrefetchBytes = int64_t(1) << 20;

enum class Layout { kHW, kC };
enum class PowMode { kP1, kP2, kP3, kGeneral };

struct Params {
  Whitening whiten;
  AtMode at_mode;
  double p;
  double mse_w;
  double at_w;
  double eps;
  bool grad;
  bool grad_mse;  // mse_w != 0: the gradient has the MSE term
  bool grad_at;   // at_w != 0: the gradient has the attention term
};

struct View {
  int64_t sb, sc, shw;  // element strides of sample, channel and flattened position
};

struct Chunk {
  int64_t level;
  int64_t b;
  int64_t j0, j1;  // positions [j0, j1) of sample b
};

struct ChunkOut {
  double mse = 0.0;    // sum (s - W(t))^2
  double sum_t = 0.0;  // sum t (sample whitening)
  double sq_t = 0.0;   // sum (t - mean_b)^2 (sample whitening)
};

inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

// |x|^p
template <PowMode PM, typename V>
inline V pow_abs(const V& x, const V& p) {
  if constexpr (PM == PowMode::kP1) {
    return x.abs();
  } else if constexpr (PM == PowMode::kP2) {
    return x * x;
  } else if constexpr (PM == PowMode::kP3) {
    return x.abs() * x * x;
  } else {
    return x.abs().pow(p);
  }
}

// d|x|^p / dx = p |x|^(p-1) sign(x), with torch.sign semantics (sign(0) = sign(nan) = 0).
template <PowMode PM, typename V>
inline V dphi(const V& x, const V& p, const V& pm1) {
  const V zero(0), one(1);
  if constexpr (PM == PowMode::kP1) {
    return ((x > zero) & one) - ((x < zero) & one);
  } else if constexpr (PM == PowMode::kP2) {
    return x + x;
  } else if constexpr (PM == PowMode::kP3) {
    return V(3) * x.abs() * x;
  } else {
    const V sign = ((x > zero) & one) - ((x < zero) & one);
    return p * x.abs().pow(pm1) * sign;
  }
}

class LevelBase {
 public:
  LevelBase(int64_t B, int64_t C, int64_t HW, Layout layout, int64_t elem_bytes, double coef, const Params& P)
      : B(B), C(C), HW(HW), layout(layout), elem_bytes(elem_bytes), coef(coef), P(P), mse_b(B, 0.0), at_b(B, 0.0) {}
  virtual ~LevelBase() = default;

  virtual void pass1(const Chunk& ch, ChunkOut& out) = 0;     // a_s, a_t; channel / none: MSE; sample: sum t
  virtual void pass_var(const Chunk& ch, ChunkOut& out) = 0;  // sample whitening: sum (t - mean_b)^2
  virtual void pass2(const Chunk& ch, ChunkOut& out) = 0;     // gradient; sample whitening: MSE
  virtual void set_sample_stats(int64_t b, double mean, double rstd) = 0;
  virtual void finish_sample(int64_t b) = 0;  // attention scalars of sample b (at_b[b] and the grad coefficients)

  // The MSE of whitened targets needs statistics over a whole position (kHW) or sample, so it is summed in pass 2.
  bool mse_in_pass2() const {
    return layout == Layout::kHW ? P.whiten != Whitening::kNone : P.whiten == Whitening::kSample;
  }

  // Splits sample b into chunks of about kChunkElems elements (whole rows of positions).
  void append_chunks(int64_t level, int64_t b, std::vector<Chunk>& chunks) const {
    int64_t per = std::max<int64_t>(1, kChunkElems / C);
    if (layout == Layout::kHW) per = std::min(HW, divup(per, 16) * 16);  // whole vectors, long row segments
    for (int64_t j0 = 0; j0 < HW; j0 += per) chunks.push_back({level, b, j0, std::min(HW, j0 + per)});
  }

  const int64_t B, C, HW;
  const Layout layout;
  const int64_t elem_bytes;  // bytes of one student + one teacher element
  const double coef;
  const Params& P;
  std::vector<double> mse_b;  // per sample sum of squared differences
  std::vector<double> at_b;   // per sample ||d_b|| (paper) or sum_j d_bj^2 (mean_sq)
};

template <typename T, PowMode PM>
class Level final : public LevelBase {
  using A = acc_type_t<T>;
  using Vec = AccVec<T>;
  static constexpr int64_t kW = Vec::size();

 public:
  Level(const T* s, const T* t, T* g, View vs, View vt, View vg, int64_t B, int64_t C, int64_t HW, Layout layout,
        double coef, const Params& P)
      : LevelBase(B, C, HW, layout, 2 * int64_t(sizeof(T)), coef, P),
        s_(s), t_(t), g_(g), vs_(vs), vt_(vt), vg_(vg) {
    // Per-position arrays, padded by one vector so full-vector loads at the end of the last sample stay in bounds.
    const int64_t n = B * HW + kW;
    as_.assign(n, A(0));
    at_.assign(n, A(0));
    if (P.whiten == Whitening::kChannel) {
      pmean_.assign(n, A(0));
      prstd_.assign(n, A(0));
    }
    if (P.grad) ga_.assign(n, A(0));
    smean_.assign(B, A(0));
    srstd_.assign(B, A(1));
  }

  void pass1(const Chunk& ch, ChunkOut& out) override {
    if (layout == Layout::kHW) {
      pass1_hw(ch, out);
    } else {
      pass1_c(ch, out);
    }
  }
  void pass_var(const Chunk& ch, ChunkOut& out) override {
    if (layout == Layout::kHW) {
      pass_var_hw(ch, out);
    } else {
      pass_var_c(ch, out);
    }
  }
  void pass2(const Chunk& ch, ChunkOut& out) override {
    if (layout == Layout::kHW) {
      pass2_hw(ch, out);
    } else {
      pass2_c(ch, out);
    }
  }

  void set_sample_stats(int64_t b, double mean, double rstd) override {
    smean_[b] = static_cast<A>(mean);
    srstd_[b] = static_cast<A>(rstd);
  }

  void finish_sample(int64_t b) override {
    const A* as = as_.data() + b * HW;
    const A* at = at_.data() + b * HW;
    const double ns = std::sqrt(sum_positions([&](int64_t j) { return double(as[j]) * double(as[j]); }));
    const double nt = std::sqrt(sum_positions([&](int64_t j) { return double(at[j]) * double(at[j]); }));
    // F.normalize: divide by max(norm, eps); a NaN norm stays NaN.
    const double dens = ns < kAtNormEps ? kAtNormEps : ns;
    const double dent = nt < kAtNormEps ? kAtNormEps : nt;
    // q = a / max(||a||, eps), each quotient rounded on its own, and d = q_s - q_t their plain difference. Not
    // (a_s * den_t - a_t * den_s) / (den_s * den_t), nor a * (1 / den): the compiler contracts a*b - c*d into an
    // FMA, which leaves one product unrounded, so identical maps gave d ~ 1e-17 instead of 0 and the ||d|| == 0
    // subgradient below never applied. A quotient is never contracted (and without -freciprocal-math never
    // rewritten as a product), so d is exactly 0 wherever the reference's q_s and q_t are equal: identical maps,
    // maps that differ by a power of two, any two nonzero 1x1 maps. The two divisions per position run once per
    // sample (a loop the compiler vectorizes), into a buffer the three loops below read.
    static thread_local std::vector<double> qbuf;
    qbuf.resize(2 * HW);
    double* const qs = qbuf.data();
    double* const dq = qs + HW;
    for (int64_t j = 0; j < HW; ++j) {
      const double q = double(as[j]) / dens;
      qs[j] = q;
      dq[j] = q - double(at[j]) / dent;
    }
    const double dn2 = sum_positions([&](int64_t j) { return dq[j] * dq[j]; });
    at_b[b] = P.at_mode == AtMode::kPaper ? std::sqrt(dn2) : dn2;
    if (!P.grad) return;
    A* ga = ga_.data() + b * HW;
    if (!P.grad_at) {
      std::fill(ga, ga + HW, A(0));
      return;
    }
    const double cw = coef * P.at_w;
    double scale;
    bool zero = false;
    if (P.at_mode == AtMode::kPaper) {
      const double dn = std::sqrt(dn2);
      zero = !(dn > 0.0);  // g_q = 0 where ||d_b|| == 0 or NaN (torch.where(dn > 0, ..., 0))
      scale = zero ? 0.0 : cw / (double(B) * dn);
    } else {
      scale = 2.0 * cw / (double(B) * double(HW));
    }
    // <g_q, q_s>, with g_q = scale * d; with g_q zeroed it is sum(0 * q_s): 0, or NaN where a q_s is NaN (as in the
    // reference, whose where() zeroes g_q even where d is NaN).
    const double inner = zero ? sum_positions([&](int64_t j) { return qs[j] * 0.0; })
                              : scale * sum_positions([&](int64_t j) { return dq[j] * qs[j]; });
    // Backward of x / max(||x||, eps): (g - q * <g, q>) / ||x|| above eps, g / eps below.
    const bool big = ns > kAtNormEps;
    const double rn = big ? 1.0 / ns : 1.0 / kAtNormEps;
    const double inner_used = big ? inner : 0.0;
    for (int64_t j = 0; j < HW; ++j) {
      const double gq = zero ? 0.0 : dq[j] * scale;
      ga[j] = static_cast<A>((gq - qs[j] * inner_used) * rn);
    }
  }

  // Sum of f(j) over the positions of a sample in double, four independent partial sums (the compiler keeps them in
  // one vector register instead of a chain of dependent scalar additions).
  template <typename F>
  double sum_positions(F f) const {
    double acc[4] = {0.0, 0.0, 0.0, 0.0};
    int64_t j = 0;
    for (; j + 4 <= HW; j += 4) {
      for (int k = 0; k < 4; ++k) acc[k] += f(j + k);
    }
    for (; j < HW; ++j) acc[0] += f(j);
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
  }

 private:
  // ------------------------------------------------------------------------------------------------------------
  // kHW layout: vectorized over positions. A chunk is a range of positions [j0, j1) of one sample, walked row by
  // row (c outer): every row is a contiguous segment, so each pass is a few long sequential streams. Per-position
  // accumulators (Welford mean / M2, a_s, a_t) live in the level's [B*HW] arrays, L1 / L2 resident for a chunk.
  // The last vector of a sample is partial; its loads and stores are masked so a chunk never touches positions of
  // another chunk.
  // ------------------------------------------------------------------------------------------------------------
  struct Span {
    int64_t nv, rem;      // vectors and lanes of the last one
    int64_t nfull, tail;  // full vectors, and lanes of a partial last vector (0: none)
    explicit Span(int64_t n)
        : nv(divup(n, kW)), rem(n - (divup(n, kW) - 1) * kW), nfull(n / kW), tail(n - (n / kW) * kW) {}
    int64_t lanes(int64_t v) const { return v + 1 < nv ? kW : rem; }
  };
  // Vectors per 64-byte cache line of T (software prefetch once per line).
  static constexpr int64_t kLineVecs = std::max<int64_t>(1, 64 / (kW * int64_t(sizeof(T))));
  // Partial MSE sums are flushed from float lanes to double every kFlushVecs vectors (rows can be 1-2 vectors).
  static constexpr int64_t kFlushVecs = 128;
  // 1 / (k + 1) for Welford's update of the k-th row of a block, as A(1) / A(k + 1).
  static constexpr int64_t kRowBlock = 16;
  static inline const std::array<A, kRowBlock> inv_count_ = [] {
    std::array<A, kRowBlock> r{};
    for (int64_t k = 0; k < kRowBlock; ++k) r[k] = A(1) / static_cast<A>(k + 1);
    return r;
  }();
  template <typename U>
  static Vec ld(const U* p, int64_t n) {
    if constexpr (std::is_same_v<U, A>) {
      return n == kW ? Vec::loadu(p) : Vec::loadu(p, n);
    } else {
      return n == kW ? load_acc(p) : load_acc(p, n);
    }
  }
  static void st(A* p, const Vec& x, int64_t n) {
    if (n == kW) {
      x.store(p);
    } else {
      x.store(p, n);
    }
  }

  // Channel statistics and attention sums of pass 1 for TV vectors of positions at offset o over the rows
  // [c0, c0 + cn) of a block, in registers across the rows (L1 buffers loaded and stored for every row made the
  // coarse levels' one- or two-vector rows wait on store-to-load forwarding), then Chan's merge into the chunk's
  // accumulators. Within the block, sums of the data shifted by the block's first row, d = x - x_c0: mean =
  // x_c0 + S1 / n and M2 = S2 - S1^2 / n. The shift is one of the values being summed, so it is within the data's
  // spread of their mean and the subtraction loses no more than Welford's update would over 16 rows (a teacher
  // with a mean 1000x its spread is tested); each row is then one add and one FMA on independent registers instead
  // of Welford's subtract -> FMA chain through the running mean, which bounded this loop by latency. kTail: the
  // last vector has `tail` lanes (loaded zero-filled, stored masked).
  static constexpr int64_t kTileVecs = 2;
  template <int TV, bool kTail>
  void welford_tile(const T* tbase, const T* sbase, int64_t c0, int64_t cn, int64_t o, int64_t tail, A* mean,
                    A* m2, A* at, A* as, const Vec& vp, const Vec& wb, const Vec& wab, bool pf) {
    Vec shift[TV], s1[TV], s2[TV], ta[TV], sa[TV];
    // Row r of the tile: (x, y) of vector k, prefetching the next block's row first.
    auto row = [&](int64_t r, auto&& body) {
      const T* tr = tbase + (c0 + r) * vt_.sc + o;
      const T* sr = sbase + (c0 + r) * vs_.sc + o;
      if (pf) {  // the same positions kRowBlock rows on (the next block); one line covers the tile
        __builtin_prefetch(tr + kRowBlock * vt_.sc, 0, 2);
        __builtin_prefetch(sr + kRowBlock * vs_.sc, 0, 2);
      }
#pragma GCC unroll 4
      for (int k = 0; k < TV; ++k) {
        const bool part = kTail && k == TV - 1;
        body(k, part ? load_acc(tr + k * kW, tail) : load_acc(tr + k * kW),
             part ? load_acc(sr + k * kW, tail) : load_acc(sr + k * kW));
      }
    };
    row(0, [&](int k, const Vec& x, const Vec& y) {
      shift[k] = x;
      s1[k] = s2[k] = Vec(A(0));
      ta[k] = pow_abs<PM>(x, vp);
      sa[k] = pow_abs<PM>(y, vp);
    });
    for (int64_t r = 1; r < cn; ++r) {
      row(r, [&](int k, const Vec& x, const Vec& y) {
        const Vec d = x - shift[k];
        s1[k] = s1[k] + d;
        s2[k] = at::vec::fmadd(d, d, s2[k]);
        ta[k] = ta[k] + pow_abs<PM>(x, vp);
        sa[k] = sa[k] + pow_abs<PM>(y, vp);
      });
    }
    const Vec inv_n(A(1) / static_cast<A>(cn)), zero(A(0));
#pragma GCC unroll 4
    for (int k = 0; k < TV; ++k) {
      const int64_t n = kTail && k == TV - 1 ? tail : kW, ok = o + k * kW;
      const Vec mu = at::vec::fmadd(s1[k], inv_n, shift[k]);
      // S2 >= S1^2 / n exactly; the clamp keeps rounding from making M2 negative (NaN passes through).
      const Vec q = at::vec::maximum(at::vec::fnmadd(s1[k] * s1[k], inv_n, s2[k]), zero);
      const Vec m = ld(mean + ok, n);
      const Vec delta = mu - m;
      st(mean + ok, at::vec::fmadd(delta, wb, m), n);
      st(m2 + ok, ld(m2 + ok, n) + q + delta * delta * wab, n);
      st(at + ok, ld(at + ok, n) + ta[k], n);
      st(as + ok, ld(as + ok, n) + sa[k], n);
    }
  }

  // welford_tile's work for a whole span, row by row: the block's accumulators in L1 buffers, loaded and stored for
  // every row (sequential reads of every row; the long-row path).
  void welford_rows(const T* tbase, const T* sbase, int64_t c0, int64_t cn, const Span& sp, A* mean, A* m2, A* at,
                    A* as, const Vec& vp, const Vec& wb, const Vec& wab) {
    const int64_t npad = sp.nv * kW;
    static thread_local std::vector<A> buf;
    buf.assign(4 * npad, A(0));
    A* bas = buf.data();
    A* bat = bas + npad;
    A* bmu = bat + npad;
    A* bm2 = bmu + npad;
    for (int64_t c = c0; c < c0 + cn; ++c) {
      const T* tr = tbase + c * vt_.sc;
      const T* sr = sbase + c * vs_.sc;
      const bool pf = prefetch_ && c + 1 < C;
      const Vec inv(inv_count_[c - c0]);
      auto update = [&](const Vec& x, const Vec& y, int64_t o) {
        Vec mu = Vec::loadu(bmu + o);
        const Vec delta = x - mu;
        mu = at::vec::fmadd(delta, inv, mu);
        mu.store(bmu + o);
        at::vec::fmadd(delta, x - mu, Vec::loadu(bm2 + o)).store(bm2 + o);
        (Vec::loadu(bat + o) + pow_abs<PM>(x, vp)).store(bat + o);
        (Vec::loadu(bas + o) + pow_abs<PM>(y, vp)).store(bas + o);
      };
      for (int64_t v = 0; v < sp.nfull; ++v) {
        const int64_t o = v * kW;
        if (pf && v % kLineVecs == 0) {
          __builtin_prefetch(tr + vt_.sc + o, 0, 2);
          __builtin_prefetch(sr + vs_.sc + o, 0, 2);
        }
        update(load_acc(tr + o), load_acc(sr + o), o);
      }
      if (sp.tail > 0) {
        const int64_t o = sp.nfull * kW;
        update(load_acc(tr + o, sp.tail), load_acc(sr + o, sp.tail), o);
      }
    }
    for (int64_t v = 0; v < sp.nv; ++v) {
      const int64_t n = sp.lanes(v), o = v * kW;
      const Vec mu = ld(mean + o, n);
      const Vec delta = Vec::loadu(bmu + o) - mu;
      st(mean + o, at::vec::fmadd(delta, wb, mu), n);
      st(m2 + o, ld(m2 + o, n) + Vec::loadu(bm2 + o) + delta * delta * wab, n);
      st(at + o, ld(at + o, n) + Vec::loadu(bat + o), n);
      st(as + o, ld(as + o, n) + Vec::loadu(bas + o), n);
    }
  }

  void pass1_hw(const Chunk& ch, ChunkOut& out) {
    const int64_t b = ch.b, j0 = ch.j0;
    const Span sp(ch.j1 - j0);
    const int64_t npad = sp.nv * kW;
    const T* sbase = s_ + b * vs_.sb + j0;
    const T* tbase = t_ + b * vt_.sb + j0;
    const Vec vp(static_cast<A>(P.p));
    A* as = as_.data() + b * HW + j0;
    A* at = at_.data() + b * HW + j0;
    // Sums over C are blocked: kRowBlock rows are accumulated (in registers or block buffers, fresh per block) and
    // then added to the chunk's accumulators, so a position's sum is ~kRowBlock + C / kRowBlock roundings deep
    // instead of C (a plain running sum in float is ~4x less accurate than torch's cascade sums for C = 512).
    if (P.whiten == Whitening::kChannel) {
      // LayerNorm statistics over C at each position: Welford's update within a block of rows, blocks merged with
      // Chan's formula; mean then biased variance, never E[t^2] - E[t]^2.
      A* mean = pmean_.data() + b * HW + j0;
      A* m2 = prstd_.data() + b * HW + j0;
      // Register tiles walk the block's rows column by column; that is faster while the sample fits in L2 or the
      // rows are short, and slower for long rows streamed from memory (the r50 levels), which keep the row-by-row
      // walk the hardware prefetchers follow.
      const bool tiled = !prefetch_ || sp.nv <= 8;
      for (int64_t c0 = 0; c0 < C; c0 += kRowBlock) {
        const int64_t cn = std::min(kRowBlock, C - c0);
        // Chan et al.: the block (cn, mu, q) is merged into (c0, mean, m2) with these weights.
        const A na = static_cast<A>(c0), nb = static_cast<A>(cn), nn = na + nb;
        const Vec wb(nb / nn), wab(na * nb / nn);
        const bool pf = c0 + cn < C;
        if (!tiled) {
          welford_rows(tbase, sbase, c0, cn, sp, mean, m2, at, as, vp, wb, wab);
          continue;
        }
        int64_t v = 0;
        for (; v + kTileVecs <= sp.nfull; v += kTileVecs) {
          welford_tile<kTileVecs, false>(tbase, sbase, c0, cn, v * kW, 0, mean, m2, at, as, vp, wb, wab, pf);
        }
        for (; v < sp.nfull; ++v) {
          welford_tile<1, false>(tbase, sbase, c0, cn, v * kW, 0, mean, m2, at, as, vp, wb, wab, pf);
        }
        if (sp.tail > 0) {
          welford_tile<1, true>(tbase, sbase, c0, cn, v * kW, sp.tail, mean, m2, at, as, vp, wb, wab, pf);
        }
      }
      const Vec vC(static_cast<A>(C)), veps(static_cast<A>(P.eps)), one(A(1));
      for (int64_t v = 0; v < sp.nv; ++v) {
        const int64_t n = sp.lanes(v), o = v * kW;
        st(m2 + o, one / (ld(m2 + o, n) / vC + veps).sqrt(), n);  // rstd (biased variance, eps inside the sqrt)
      }
    } else {
      // No whitening: the MSE is computed here. Sample whitening: sum t for the sample mean.
      static thread_local std::vector<A> buf;
      buf.resize(2 * npad);
      A* bas = buf.data();
      A* bat = bas + npad;
      double acc = 0.0;
      for (int64_t c0 = 0; c0 < C; c0 += kRowBlock) {
        const int64_t cn = std::min(kRowBlock, C - c0);
        std::fill(bas, bas + 2 * npad, A(0));
        for (int64_t c = c0; c < c0 + cn; ++c) {
          const T* tr = tbase + c * vt_.sc;
          const T* sr = sbase + c * vs_.sc;
          Vec racc(A(0));
          for (int64_t v = 0; v < sp.nv; ++v) {
            const int64_t n = sp.lanes(v), o = v * kW;
            const Vec x = ld(tr + o, n), y = ld(sr + o, n);
            if (P.whiten == Whitening::kNone) {
              const Vec d = y - x;  // zero in masked lanes
              racc = at::vec::fmadd(d, d, racc);
            } else {
              racc = racc + x;
            }
            (Vec::loadu(bat + o) + pow_abs<PM>(x, vp)).store(bat + o);
            (Vec::loadu(bas + o) + pow_abs<PM>(y, vp)).store(bas + o);
          }
          acc += hsum(racc);
        }
        for (int64_t v = 0; v < sp.nv; ++v) {
          const int64_t n = sp.lanes(v), o = v * kW;
          st(at + o, ld(at + o, n) + Vec::loadu(bat + o), n);
          st(as + o, ld(as + o, n) + Vec::loadu(bas + o), n);
        }
      }
      if (P.whiten == Whitening::kNone) {
        out.mse += acc;
      } else {
        out.sum_t += acc;
      }
    }
  }

  void pass_var_hw(const Chunk& ch, ChunkOut& out) {
    const int64_t b = ch.b;
    const Span sp(ch.j1 - ch.j0);
    const T* tbase = t_ + b * vt_.sb + ch.j0;
    const Vec mean(smean_[b]);
    double acc = 0.0;
    for (int64_t c = C - 1; c >= 0; --c) {  // backwards: the end of the chunk is the most recently read
      const T* tr = tbase + c * vt_.sc;
      Vec racc(A(0));
      for (int64_t v = 0; v < sp.nv; ++v) {
        const int64_t n = sp.lanes(v);
        const Vec d = keep_first(ld(tr + v * kW, n) - mean, n);
        racc = at::vec::fmadd(d, d, racc);
      }
      acc += hsum(racc);
    }
    out.sq_t += acc;
  }

  // pass2_hw for channel whitening, the default, either with a gradient of both the MSE and attention terms (the
  // training call, kGrad) or without a gradient (evaluation). The arithmetic of the general loop below, per element;
  // the branches on the options are hoisted out of the loops, full vectors run without lane checks (the partial
  // last vector after them) and the MSE partial sums go from float lanes to double every kFlushVecs vectors instead
  // of after every row (rows of the coarse levels are one or two vectors long). This is the hot loop of training,
  // so it is worth the specialization over the general loop.
  template <bool kGrad>
  void pass2_hw_channel(const Chunk& ch, ChunkOut& out) {
    const int64_t b = ch.b, j0 = ch.j0;
    const Span sp(ch.j1 - j0);
    const T* sbase = s_ + b * vs_.sb + j0;
    const T* tbase = t_ + b * vt_.sb + j0;
    T* gbase = kGrad ? g_ + b * vg_.sb + j0 : nullptr;
    const Vec vp(static_cast<A>(P.p)), vpm1(static_cast<A>(P.p - 1.0));
    const double n_el = double(B) * double(C) * double(HW);
    const Vec kmse(static_cast<A>(coef * P.mse_w * 2.0 / n_el));
    const bool use_nt = kGrad && stream_store_supported() && !is_reduced_v<T>;  // see pass2_hw
    const A* pm = pmean_.data() + b * HW + j0;
    const A* pr = prstd_.data() + b * HW + j0;
    const A* ga = kGrad ? ga_.data() + b * HW + j0 : nullptr;
    double acc = 0.0;
    // Two partial sums of diff^2: one FMA chain was this loop's latency bound.
    Vec racc(A(0)), racc2(A(0));
    int64_t pending = 0;
    for (int64_t c = C - 1; c >= 0; --c) {  // backwards: the end of the chunk is the most recently read
      const T* const sr = sbase + c * vs_.sc;
      const T* const tr = tbase + c * vt_.sc;
      T* const gr = kGrad ? gbase + c * vg_.sc : nullptr;
      const bool pf = prefetch_ && c > 0;
      // One full vector at offset o: the whitened difference, its square into r, and the gradient (pointers are
      // captured by value so that the stores through gr cannot make the compiler reload them).
      auto step = [=, &vp, &vpm1, &kmse](int64_t o, Vec& r, auto stream) {
        const Vec y = load_acc(sr + o);
        const Vec diff = y - (load_acc(tr + o) - Vec::loadu(pm + o)) * Vec::loadu(pr + o);
        r = at::vec::fmadd(diff, diff, r);
        if constexpr (kGrad) {
          const Vec g = at::vec::fmadd(Vec::loadu(ga + o), dphi<PM>(y, vp, vpm1), kmse * diff);
          if constexpr (decltype(stream)::value) {
            stream_store(gr + o, g);
          } else {
            store_acc(gr + o, g);
          }
        }
      };
      auto prefetch = [=, this](int64_t v) {
        if (pf && v % kLineVecs == 0) {
          __builtin_prefetch(sr - vs_.sc + v * kW, 0, 2);
          __builtin_prefetch(tr - vt_.sc + v * kW, 0, 2);
        }
      };
      auto row = [&](auto stream) {
        int64_t v = 0;
        for (; v + 2 <= sp.nfull; v += 2) {
          prefetch(v);
          prefetch(v + 1);
          step(v * kW, racc, stream);
          step((v + 1) * kW, racc2, stream);
        }
        if (v < sp.nfull) step(v * kW, racc, stream);
      };
      if (use_nt && reinterpret_cast<uintptr_t>(gr) % sizeof(Vec) == 0) {
        row(std::true_type{});
      } else {
        row(std::false_type{});
      }
      if (sp.tail > 0) {
        const int64_t o = sp.nfull * kW;
        const Vec y = load_acc(sr + o, sp.tail);
        const Vec diff = y - (load_acc(tr + o, sp.tail) - Vec::loadu(pm + o)) * Vec::loadu(pr + o);
        const Vec d = keep_first(diff, sp.tail);
        racc = at::vec::fmadd(d, d, racc);
        if constexpr (kGrad) {
          store_acc(gr + o, at::vec::fmadd(Vec::loadu(ga + o), dphi<PM>(y, vp, vpm1), kmse * diff), sp.tail);
        }
      }
      pending += sp.nv;
      if (pending >= kFlushVecs) {
        acc += hsum(racc + racc2);
        racc = racc2 = Vec(A(0));
        pending = 0;
      }
    }
    racc = racc + racc2;
    acc += hsum(racc);
    if (use_nt) stream_fence();
    out.mse += acc;
  }

  void pass2_hw(const Chunk& ch, ChunkOut& out) {
    if (P.whiten == Whitening::kChannel && P.grad && P.grad_mse && P.grad_at) {
      pass2_hw_channel<true>(ch, out);
      return;
    }
    if (P.whiten == Whitening::kChannel && !P.grad) {
      pass2_hw_channel<false>(ch, out);
      return;
    }
    const int64_t b = ch.b, j0 = ch.j0;
    const Span sp(ch.j1 - j0);
    const T* sbase = s_ + b * vs_.sb + j0;
    const T* tbase = t_ + b * vt_.sb + j0;
    T* gbase = P.grad ? g_ + b * vg_.sb + j0 : nullptr;
    const Vec vp(static_cast<A>(P.p)), vpm1(static_cast<A>(P.p - 1.0));
    const double n_el = double(B) * double(C) * double(HW);
    const Vec kmse(static_cast<A>(coef * P.mse_w * 2.0 / n_el));
    const bool do_grad = P.grad;
    const bool mse_here = mse_in_pass2();  // whitened MSE needs the statistics of pass 1
    const bool read_t = mse_here || (do_grad && P.grad_mse);
    const bool use_ga = do_grad && P.grad_at;
    // Streaming stores for the gradient (written once, never re-read here): they skip the read-for-ownership of
    // every gradient line, a large share of fwd_bwd's memory traffic at the r50 sizes.
    const bool use_nt = do_grad && stream_store_supported() && !is_reduced_v<T>;
    const Vec smean(smean_[b]), srstd(srstd_[b]);
    const A* pm = P.whiten == Whitening::kChannel ? pmean_.data() + b * HW + j0 : nullptr;
    const A* pr = P.whiten == Whitening::kChannel ? prstd_.data() + b * HW + j0 : nullptr;
    const A* ga = do_grad ? ga_.data() + b * HW + j0 : nullptr;
    double acc = 0.0;
    for (int64_t c = C - 1; c >= 0; --c) {  // backwards: the end of the chunk is the most recently read
      const T* sr = sbase + c * vs_.sc;
      const T* tr = tbase + c * vt_.sc;
      T* gr = do_grad ? gbase + c * vg_.sc : nullptr;
      const bool nt_row = use_nt && reinterpret_cast<uintptr_t>(gr) % sizeof(Vec) == 0;
      const bool pf = prefetch_ && c > 0;
      Vec racc(A(0));
      for (int64_t v = 0; v < sp.nv; ++v) {
        const int64_t n = sp.lanes(v), o = v * kW;
        if (pf && (o * int64_t(sizeof(T))) % 64 == 0) {
          __builtin_prefetch(sr - vs_.sc + o, 0, 2);
          if (read_t) __builtin_prefetch(tr - vt_.sc + o, 0, 2);
        }
        const Vec y = ld(sr + o, n);
        Vec diff(A(0));
        if (read_t) {
          const Vec x = ld(tr + o, n);
          if (P.whiten == Whitening::kChannel) {
            diff = y - (x - ld(pm + o, n)) * ld(pr + o, n);
          } else if (P.whiten == Whitening::kSample) {
            diff = y - (x - smean) * srstd;
          } else {
            diff = y - x;
          }
          if (mse_here) {
            const Vec d = keep_first(diff, n);
            racc = at::vec::fmadd(d, d, racc);
          }
        }
        if (!do_grad) continue;
        Vec g = P.grad_mse ? kmse * diff : Vec(A(0));
        if (use_ga) g = at::vec::fmadd(ld(ga + o, n), dphi<PM>(y, vp, vpm1), g);
        if (n != kW) {
          store_acc(gr + o, g, n);
        } else if (nt_row) {
          stream_store(gr + o, g);
        } else {
          store_acc(gr + o, g);
        }
      }
      if (mse_here) acc += hsum(racc);
    }
    if (use_nt) stream_fence();
    out.mse += acc;
  }
  // ------------------------------------------------------------------------------------------------------------
  // kC layout (channels_last): vectorized over channels, one position (C contiguous values) at a time.
  // ------------------------------------------------------------------------------------------------------------
  void pass1_c(const Chunk& ch, ChunkOut& out) {
    const int64_t b = ch.b;
    const Vec vp(static_cast<A>(P.p));
    const int64_t nv = divup(C, kW);
    const int64_t rem = C - (nv - 1) * kW;
    A* as = as_.data() + b * HW;
    A* at = at_.data() + b * HW;
    double mse = 0.0, st = 0.0;
    for (int64_t j = ch.j0; j < ch.j1; ++j) {
      const T* tr = t_ + b * vt_.sb + j * vt_.shw;
      const T* sr = s_ + b * vs_.sb + j * vs_.shw;
      auto ld = [&](const T* p, int64_t v) { return v + 1 < nv ? load_acc(p + v * kW) : load_acc(p + v * kW, rem); };
      Vec vas(A(0)), vat(A(0)), vmse(A(0));
      if (P.whiten == Whitening::kChannel) {
        Vec vsum(A(0));
        for (int64_t v = 0; v < nv; ++v) {
          const Vec x = ld(tr, v);
          vsum = vsum + x;
          vat = vat + pow_abs<PM>(x, vp);
        }
        const A mean = static_cast<A>(hsum(vsum) / double(C));
        const Vec vmean(mean);
        Vec vvar(A(0));
        for (int64_t v = 0; v < nv; ++v) {
          const Vec d = keep_first(ld(tr, v) - vmean, v + 1 < nv ? kW : rem);
          vvar = vvar + d * d;
        }
        const A var = static_cast<A>(hsum(vvar) / double(C));
        const A rstd = A(1) / std::sqrt(var + static_cast<A>(P.eps));
        const Vec vrstd(rstd);
        for (int64_t v = 0; v < nv; ++v) {
          const Vec x = ld(tr, v);
          const Vec y = ld(sr, v);
          const Vec d = keep_first(y - (x - vmean) * vrstd, v + 1 < nv ? kW : rem);
          vmse = vmse + d * d;
          vas = vas + pow_abs<PM>(y, vp);
        }
        pmean_[b * HW + j] = mean;
        prstd_[b * HW + j] = rstd;
        mse += hsum(vmse);
      } else if (P.whiten == Whitening::kNone) {
        for (int64_t v = 0; v < nv; ++v) {
          const Vec x = ld(tr, v);
          const Vec y = ld(sr, v);
          const Vec d = y - x;  // zero in the padding lanes
          vmse = vmse + d * d;
          vat = vat + pow_abs<PM>(x, vp);
          vas = vas + pow_abs<PM>(y, vp);
        }
        mse += hsum(vmse);
      } else {
        Vec vsum(A(0));
        for (int64_t v = 0; v < nv; ++v) {
          const Vec x = ld(tr, v);
          const Vec y = ld(sr, v);
          vsum = vsum + x;
          vat = vat + pow_abs<PM>(x, vp);
          vas = vas + pow_abs<PM>(y, vp);
        }
        st += hsum(vsum);
      }
      as[j] = static_cast<A>(hsum(vas));
      at[j] = static_cast<A>(hsum(vat));
    }
    out.mse += mse;
    out.sum_t += st;
  }

  void pass_var_c(const Chunk& ch, ChunkOut& out) {
    const int64_t b = ch.b;
    const int64_t nv = divup(C, kW);
    const int64_t rem = C - (nv - 1) * kW;
    const Vec mean(smean_[b]);
    double sq = 0.0;
    for (int64_t j = ch.j0; j < ch.j1; ++j) {
      const T* tr = t_ + b * vt_.sb + j * vt_.shw;
      Vec acc(A(0));
      for (int64_t v = 0; v < nv; ++v) {
        const int64_t n = v + 1 < nv ? kW : rem;
        const Vec d = keep_first((n == kW ? load_acc(tr + v * kW) : load_acc(tr + v * kW, n)) - mean, n);
        acc = acc + d * d;
      }
      sq += hsum(acc);
    }
    out.sq_t += sq;
  }

  void pass2_c(const Chunk& ch, ChunkOut& out) {
    const int64_t b = ch.b;
    const int64_t nv = divup(C, kW);
    const int64_t rem = C - (nv - 1) * kW;
    const Vec vp(static_cast<A>(P.p)), vpm1(static_cast<A>(P.p - 1.0));
    const double n_el = double(B) * double(C) * double(HW);
    const Vec kmse(static_cast<A>(coef * P.mse_w * 2.0 / n_el));
    const bool do_grad = P.grad;
    const bool mse_here = mse_in_pass2();
    const bool read_t = mse_here || (do_grad && P.grad_mse);
    const bool use_ga = do_grad && P.grad_at;
    const bool use_nt = do_grad && stream_store_supported() && !is_reduced_v<T>;  // see pass2_hw
    double mse = 0.0;
    for (int64_t j = ch.j1 - 1; j >= ch.j0; --j) {  // backwards: the last rows read by pass 1 are still cached
      const T* sr = s_ + b * vs_.sb + j * vs_.shw;
      const T* tr = t_ + b * vt_.sb + j * vt_.shw;
      T* gr = do_grad ? g_ + b * vg_.sb + j * vg_.shw : nullptr;
      const bool nt_row = use_nt && reinterpret_cast<uintptr_t>(gr) % sizeof(Vec) == 0;
      A mean = 0, rstd = 1;
      if (P.whiten == Whitening::kChannel) {
        mean = pmean_[b * HW + j];
        rstd = prstd_[b * HW + j];
      } else if (P.whiten == Whitening::kSample) {
        mean = smean_[b];
        rstd = srstd_[b];
      }
      const Vec vmean(mean), vrstd(rstd);
      const Vec vga(do_grad ? ga_[b * HW + j] : A(0));
      Vec vmse(A(0));
      for (int64_t v = 0; v < nv; ++v) {
        const int64_t n = v + 1 < nv ? kW : rem;
        const Vec y = n == kW ? load_acc(sr + v * kW) : load_acc(sr + v * kW, n);
        Vec diff(A(0));
        if (read_t) {
          const Vec x = n == kW ? load_acc(tr + v * kW) : load_acc(tr + v * kW, n);
          diff = P.whiten == Whitening::kNone ? y - x : y - (x - vmean) * vrstd;
          if (mse_here) {
            const Vec d = keep_first(diff, n);
            vmse = vmse + d * d;
          }
        }
        if (!do_grad) continue;
        Vec g = P.grad_mse ? kmse * diff : Vec(A(0));
        if (use_ga) g = at::vec::fmadd(vga, dphi<PM>(y, vp, vpm1), g);
        if (n != kW) {
          store_acc(gr + v * kW, g, n);
        } else if (nt_row) {
          stream_store(gr + v * kW, g);
        } else {
          store_acc(gr + v * kW, g);
        }
      }
      if (mse_here) mse += hsum(vmse);
    }
    if (use_nt) stream_fence();
    out.mse += mse;
  }

  const T* s_;
  const T* t_;
  T* g_;
  View vs_, vt_, vg_;
  // kHW passes walk a chunk row by row (c outer); a row segment is a few KiB, about one page, so the hardware
  // prefetcher retrains on every row. When a sample is larger than a core's L2 (it streams from L3 / DRAM), the
  // next row's segment is prefetched into L2 while the current one is processed. Samples that fit in L2 do not
  // benefit (they were slightly slower with it), hence the size threshold.
  const bool prefetch_ = int64_t(C) * HW * 2 * int64_t(sizeof(T)) > kPrefetchBytes;
  std::vector<A> as_, at_;        // attention maps sum_c |x|^p, [B*HW] (+ padding)
  std::vector<A> pmean_, prstd_;  // channel whitening statistics per position
  std::vector<A> ga_;             // d loss / d a_s per position
  std::vector<A> smean_, srstd_;  // sample whitening statistics per sample
};

// ---------------------------------------------------------------------------------------------------------------
// Layouts
// ---------------------------------------------------------------------------------------------------------------

// Stride of the flattened H*W position, if H and W flatten into one dimension.
bool flat_hw_stride(const at::Tensor& x, int64_t& shw) {
  const int64_t H = x.size(2), W = x.size(3);
  if (H * W <= 1) {
    shw = 1;
    return true;
  }
  if (W == 1) {
    shw = x.stride(2);
    return true;
  }
  if (H == 1 || x.stride(2) == W * x.stride(3)) {
    shw = x.stride(3);
    return true;
  }
  return false;
}

bool fits_layout(const at::Tensor& x, Layout layout) {
  int64_t shw;
  if (!flat_hw_stride(x, shw)) return false;
  if (layout == Layout::kHW) return x.size(2) * x.size(3) == 1 || shw == 1;
  return x.size(1) == 1 || x.stride(1) == 1;
}

View make_view(const at::Tensor& x, Layout layout) {
  int64_t shw = 1;
  flat_hw_stride(x, shw);
  View v{x.stride(0), x.stride(1), shw};
  if (layout == Layout::kHW) v.shw = 1;  // H*W == 1 or already 1
  if (layout == Layout::kC) v.sc = 1;    // C == 1 or already 1
  return v;
}

at::MemoryFormat memory_format(Layout layout) {
  return layout == Layout::kHW ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
}

PowMode pow_mode(double p) {
  if (p == 1.0) return PowMode::kP1;
  if (p == 2.0) return PowMode::kP2;
  if (p == 3.0) return PowMode::kP3;
  return PowMode::kGeneral;
}

template <typename T>
std::unique_ptr<LevelBase> make_level_typed(const at::Tensor& s, const at::Tensor& t, const at::Tensor& g,
                                            Layout layout, double coef, const Params& P) {
  const int64_t B = s.size(0), C = s.size(1), HW = s.size(2) * s.size(3);
  const View vs = make_view(s, layout), vt = make_view(t, layout);
  const View vg = g.defined() ? make_view(g, layout) : View{0, 0, 0};
  const T* sp = s.const_data_ptr<T>();
  const T* tp = t.const_data_ptr<T>();
  T* gp = g.defined() ? g.mutable_data_ptr<T>() : nullptr;
  switch (pow_mode(P.p)) {
    case PowMode::kP1:
      return std::make_unique<Level<T, PowMode::kP1>>(sp, tp, gp, vs, vt, vg, B, C, HW, layout, coef, P);
    case PowMode::kP2:
      return std::make_unique<Level<T, PowMode::kP2>>(sp, tp, gp, vs, vt, vg, B, C, HW, layout, coef, P);
    case PowMode::kP3:
      return std::make_unique<Level<T, PowMode::kP3>>(sp, tp, gp, vs, vt, vg, B, C, HW, layout, coef, P);
    default:
      return std::make_unique<Level<T, PowMode::kGeneral>>(sp, tp, gp, vs, vt, vg, B, C, HW, layout, coef, P);
  }
}

// Runs f(i) for the chunks i in [0, n) on at::get_num_threads() threads. Thread k gets the k-th contiguous range of
// chunks holding about 1/nt of the elements, the same range in every pass of a wave (so pass 2 re-reads the data
// the same core read in pass 1); pass 2 walks its range backwards.
template <typename F>
void parallel_chunks(const std::vector<int64_t>& bounds, bool backwards, const F& f) {
  const int64_t nt = static_cast<int64_t>(bounds.size()) - 1;
  at::parallel_for(0, nt, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      if (backwards) {
        for (int64_t i = bounds[k + 1] - 1; i >= bounds[k]; --i) f(i);
      } else {
        for (int64_t i = bounds[k]; i < bounds[k + 1]; ++i) f(i);
      }
    }
  });
}

// Boundaries of nt contiguous ranges of chunks with about equal element counts.
std::vector<int64_t> partition(const std::vector<int64_t>& cost, int64_t nt) {
  const int64_t n = static_cast<int64_t>(cost.size());
  nt = std::max<int64_t>(1, std::min(nt, n));
  double total = 0.0;
  for (int64_t c : cost) total += double(c);
  std::vector<int64_t> bounds{0};
  double acc = 0.0;
  int64_t i = 0;
  for (int64_t k = 1; k < nt; ++k) {
    const double target = total * double(k) / double(nt);
    // Take chunks while that brings the range closer to its share; keep at least one chunk per range.
    while (i < n - (nt - k) && (i < bounds.back() + 1 || std::abs(acc + cost[i] - target) <= std::abs(acc - target))) {
      acc += double(cost[i]);
      ++i;
    }
    bounds.push_back(i);
  }
  bounds.push_back(n);
  return bounds;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> feat_loss_cpu(
    at::TensorList student, at::TensorList teacher, at::ArrayRef<double> level_coef, double mse_weight,
    double at_weight, double at_p, int64_t at_mode, int64_t whiten, double eps, bool compute_grad) {
  const int64_t L = static_cast<int64_t>(student.size());
  DTK_CHECK(kOp, L > 0, "student must be a non-empty list of tensors");
  DTK_CHECK(kOp, static_cast<int64_t>(teacher.size()) == L, "student and teacher must have the same number of levels, got ",
            L, " and ", teacher.size());
  DTK_CHECK(kOp, static_cast<int64_t>(level_coef.size()) == L, "level_coef must have one entry per level (", L,
            "), got ", level_coef.size());
  const AtMode at_m = to_mode<AtMode>(kOp, "at_mode", at_mode);
  const Whitening wh = to_mode<Whitening>(kOp, "whiten", whiten);
  DTK_CHECK(kOp, std::isfinite(at_p) && at_p >= 1.0, "at_p must be a finite number >= 1, got ", at_p);
  DTK_CHECK(kOp, std::isfinite(eps) && eps >= 0.0, "eps must be a finite number >= 0, got ", eps);
  for (int64_t l = 0; l < L; ++l) {
    const std::string ws = "student[" + std::to_string(l) + "]";
    const std::string wt = "teacher[" + std::to_string(l) + "]";
    const at::Tensor& s = student[l];
    const at::Tensor& t = teacher[l];
    CHECK_DEFINED(kOp, s, ws);
    CHECK_DEFINED(kOp, t, wt);
    CHECK_CPU(kOp, s, ws);
    CHECK_CPU(kOp, t, wt);
    CHECK_FLOATING(kOp, s, ws);
    CHECK_FLOATING(kOp, t, wt);
    CHECK_DIM(kOp, s, 4, ws + " ([B, C, H, W])");
    CHECK_SAME_SHAPE(kOp, s, t, ws, wt);
    CHECK_SAME_DTYPE(kOp, s, t, ws, wt);
    CHECK_NONEMPTY(kOp, s, ws);
  }

  const at::ScalarType out_dtype = student[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto out_opts = student[0].options().dtype(out_dtype);
  Params P{wh, at_m, at_p, mse_weight, at_weight, eps, compute_grad, mse_weight != 0.0, at_weight != 0.0};

  // Per level: pick the kernel layout, copy what does not fit it, allocate the gradient.
  std::vector<at::Tensor> keep;  // inputs / scratch tensors that must outlive the kernels
  std::vector<at::Tensor> grads;
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;  // (gradient, scratch) pairs
  std::vector<std::unique_ptr<LevelBase>> levels;
  for (int64_t l = 0; l < L; ++l) {
    at::Tensor s = student[l];
    at::Tensor t = teacher[l];
    const int64_t C = s.size(1), HW = s.size(2) * s.size(3);
    const bool hw_ok = fits_layout(s, Layout::kHW), c_ok = fits_layout(s, Layout::kC);
    Layout layout;
    if (hw_ok && c_ok) {
      layout = HW >= C ? Layout::kHW : Layout::kC;
    } else if (hw_ok) {
      layout = Layout::kHW;
    } else if (c_ok) {
      layout = Layout::kC;
    } else {
      // Copy: H and W do not flatten (e.g. spatially sliced) or neither C nor H*W has unit stride.
      s = s.contiguous();
      layout = Layout::kHW;
    }
    // Copy: a teacher whose layout differs from the student's is brought to the student's (kernel) layout.
    if (!fits_layout(t, layout)) t = t.contiguous(memory_format(layout));
    at::Tensor g, g_work;
    if (compute_grad) {
      g = at::empty_like(student[l]);
      advise_huge_pages(g);
      g_work = g;
      if (!fits_layout(g, layout)) {
        // Copy: the gradient must have the layout of empty_like(student), which the kernel cannot write directly.
        g_work = at::empty(s.sizes(), s.options().memory_format(memory_format(layout)));
        advise_huge_pages(g_work);
        copy_back.emplace_back(g, g_work);
      }
      grads.push_back(g);
    }
    keep.push_back(s);
    keep.push_back(t);
    keep.push_back(g_work);
    std::unique_ptr<LevelBase> lvl;
    DTK_DISPATCH_FLOATING_TYPES(s.scalar_type(), "feat_loss", [&] {
      lvl = make_level_typed<scalar_t>(s, t, g_work, layout, level_coef[l], P);
    });
    levels.push_back(std::move(lvl));
  }

  // Waves of whole samples (level-major order) whose student + teacher bytes fit in kWaveBytes. Without a gradient
  // and without sample whitening every sample needs a single pass, so everything is one wave.
  bool run_pass2 = compute_grad;
  for (const auto& lv : levels) run_pass2 = run_pass2 || lv->mse_in_pass2();
  const bool single_wave = !run_pass2;
  std::vector<std::pair<int64_t, int64_t>> wave;  // (level, sample)
  int64_t wave_bytes = 0;

  auto run_wave = [&]() {
    if (wave.empty()) return;
    std::vector<Chunk> chunks;
    std::vector<size_t> first;  // first chunk of each sample of the wave, plus the end
    for (const auto& [l, b] : wave) {
      first.push_back(chunks.size());
      levels[l]->append_chunks(l, b, chunks);
    }
    first.push_back(chunks.size());
    const int64_t n = static_cast<int64_t>(chunks.size());
    std::vector<ChunkOut> outs(n);
    std::vector<int64_t> cost(n);
    for (int64_t i = 0; i < n; ++i) cost[i] = (chunks[i].j1 - chunks[i].j0) * levels[chunks[i].level]->C;
    const std::vector<int64_t> bounds = partition(cost, at::get_num_threads());
    parallel_chunks(bounds, false, [&](int64_t i) { levels[chunks[i].level]->pass1(chunks[i], outs[i]); });
    if (wh == Whitening::kSample) {
      for (size_t k = 0; k < wave.size(); ++k) {
        const auto [l, b] = wave[k];
        double st = 0.0;
        for (size_t i = first[k]; i < first[k + 1]; ++i) st += outs[i].sum_t;
        const LevelBase& lv = *levels[l];
        levels[l]->set_sample_stats(b, st / (double(lv.C) * double(lv.HW)), 1.0);
      }
      parallel_chunks(bounds, true, [&](int64_t i) { levels[chunks[i].level]->pass_var(chunks[i], outs[i]); });
      for (size_t k = 0; k < wave.size(); ++k) {
        const auto [l, b] = wave[k];
        double st = 0.0, sq = 0.0;
        for (size_t i = first[k]; i < first[k + 1]; ++i) {
          st += outs[i].sum_t;
          sq += outs[i].sq_t;
        }
        const LevelBase& lv = *levels[l];
        const double cnt = double(lv.C) * double(lv.HW);
        levels[l]->set_sample_stats(b, st / cnt, 1.0 / std::sqrt(sq / cnt + eps));
      }
    }
    for (const auto& [l, b] : wave) levels[l]->finish_sample(b);
    if (run_pass2) {
      parallel_chunks(bounds, true, [&](int64_t i) {
        LevelBase& lv = *levels[chunks[i].level];
        if (compute_grad || lv.mse_in_pass2()) lv.pass2(chunks[i], outs[i]);
      });
    }
    for (size_t k = 0; k < wave.size(); ++k) {
      const auto [l, b] = wave[k];
      double m = 0.0;
      for (size_t i = first[k]; i < first[k + 1]; ++i) m += outs[i].mse;
      levels[l]->mse_b[b] = m;
    }
    wave.clear();
    wave_bytes = 0;
  };

  // Independent samples: each thread takes whole samples from a shared counter and runs all passes of a sample
  // itself, so the call has one parallel region and no barrier.
  auto run_independent = [&](const std::vector<std::pair<int64_t, int64_t>>& items) {
    const int64_t n = static_cast<int64_t>(items.size());
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n), 1, [&](int64_t, int64_t) {
      std::vector<Chunk> chunks;
      std::vector<ChunkOut> outs;
      for (int64_t k = next.fetch_add(1); k < n; k = next.fetch_add(1)) {
        const auto [l, b] = items[k];
        LevelBase& lv = *levels[l];
        chunks.clear();
        lv.append_chunks(l, b, chunks);
        const int64_t nc = static_cast<int64_t>(chunks.size());
        outs.assign(nc, ChunkOut{});
        for (int64_t i = 0; i < nc; ++i) lv.pass1(chunks[i], outs[i]);
        if (wh == Whitening::kSample) {
          double st = 0.0, sq = 0.0;
          for (int64_t i = 0; i < nc; ++i) st += outs[i].sum_t;
          const double cnt = double(lv.C) * double(lv.HW);
          lv.set_sample_stats(b, st / cnt, 1.0);
          for (int64_t i = nc - 1; i >= 0; --i) lv.pass_var(chunks[i], outs[i]);
          for (int64_t i = 0; i < nc; ++i) sq += outs[i].sq_t;
          lv.set_sample_stats(b, st / cnt, 1.0 / std::sqrt(sq / cnt + eps));
        }
        lv.finish_sample(b);
        if (compute_grad || lv.mse_in_pass2()) {
          for (int64_t i = nc - 1; i >= 0; --i) lv.pass2(chunks[i], outs[i]);
        }
        double m = 0.0;
        for (int64_t i = 0; i < nc; ++i) m += outs[i].mse;
        lv.mse_b[b] = m;
      }
    });
  };

  std::vector<std::pair<int64_t, int64_t>> items;
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t b = 0; b < levels[l]->B; ++b) items.emplace_back(l, b);
  }
  // Many samples: independent samples (one parallel region, no barrier: on a shared machine waves stall whenever a
  // worker thread is descheduled at one of their barriers, and the independent schedule was much faster on the
  // training shapes). Few samples: waves split each sample over the threads.
  if (static_cast<int64_t>(items.size()) >= 4 * at::get_num_threads()) {
    run_independent(items);
  } else {
    for (const auto& [l, b] : items) {
      const LevelBase& lv = *levels[l];
      const int64_t bytes = lv.C * lv.HW * lv.elem_bytes;
      if (!single_wave && !wave.empty() && wave_bytes + bytes > kWaveBytes) run_wave();
      wave.emplace_back(l, b);
      wave_bytes += bytes;
    }
    run_wave();
  }

  for (auto& [g, g_work] : copy_back) g.copy_(g_work);

  // Per-level results, merged in level / sample order.
  std::vector<double> mse(L), atv(L);
  double loss = 0.0;
  for (int64_t l = 0; l < L; ++l) {
    const LevelBase& lv = *levels[l];
    double m = 0.0, a = 0.0;
    for (int64_t b = 0; b < lv.B; ++b) {
      m += lv.mse_b[b];
      a += lv.at_b[b];
    }
    mse[l] = m / (double(lv.B) * double(lv.C) * double(lv.HW));
    atv[l] = at_m == AtMode::kPaper ? a / double(lv.B) : a / (double(lv.B) * double(lv.HW));
    loss += level_coef[l] * (mse_weight * mse[l] + at_weight * atv[l]);
  }
  at::Tensor loss_t = at::empty({}, out_opts);
  at::Tensor mse_t = at::empty({L}, out_opts);
  at::Tensor at_t = at::empty({L}, out_opts);
  if (out_dtype == at::kDouble) {
    loss_t.fill_(loss);
    double* mp = mse_t.mutable_data_ptr<double>();
    double* ap = at_t.mutable_data_ptr<double>();
    for (int64_t l = 0; l < L; ++l) {
      mp[l] = mse[l];
      ap[l] = atv[l];
    }
  } else {
    loss_t.fill_(static_cast<float>(loss));
    float* mp = mse_t.mutable_data_ptr<float>();
    float* ap = at_t.mutable_data_ptr<float>();
    for (int64_t l = 0; l < L; ++l) {
      mp[l] = static_cast<float>(mse[l]);
      ap[l] = static_cast<float>(atv[l]);
    }
  }
  return {loss_t, mse_t, at_t, grads};
}

// ---------------------------------------------------------------------------------------------------------------
// The backward of the ops whose forward writes the student gradient (feat_loss; soft_ce with mean / sum).
//
// scale_grads_cpu is the CPU kernel of dtkernels::scale_grads, which the registered ops' backward
// (dtkernels._dispatch.scale_saved_grads) calls for plain eager CPU tensors, and the backward of FeatLossEager below:
// one C++ formula, two ways of reaching it. Scale each saved gradient by the upstream gradient (a CPU scalar:
// reading it is free); when it is exactly 1 (loss.backward()) the saved tensors are handed on without a multiply.
std::vector<at::Tensor> scale_grads_cpu(at::TensorList grads, const at::Tensor& grad_out) {
  DTK_CHECK("scale_grads", grad_out.numel() == 1, "grad_out must have one element, got shape ", grad_out.sizes());
  const bool unit = grad_out.item<double>() == 1.0;
  std::vector<at::Tensor> out;
  out.reserve(grads.size());
  for (const auto& g : grads) out.push_back(unit ? g : g * grad_out.to(g.scalar_type()));
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// feat_loss_eager: another way of calling dtkernels::feat_loss for plain eager CPU calls, with the same autograd
// formula as the op's registered one (backward = scale_grads_cpu) in a C++ autograd::Function registered at the
// Autograd key, so neither direction re-enters Python. Defined in dtkernels/ops/feat_loss.py, which uses it only for
// plain eager automatic-backend CPU calls (the per-call cost of a Python autograd.Function is a visible share of
// the small levels; benchmarks/README.md); traced calls (torch.compile, fake tensors) keep dtkernels::feat_loss.
struct FeatLossEager : public torch::autograd::Function<FeatLossEager> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, at::TensorList student,
                                                at::TensorList teacher, at::ArrayRef<double> level_coef,
                                                double mse_weight, double at_weight, double at_p, int64_t at_mode,
                                                int64_t whiten, double eps, bool compute_grad) {
    auto [loss, mse, at, grads] =
        feat_loss_cpu(student, teacher, level_coef, mse_weight, at_weight, at_p, at_mode, whiten, eps, compute_grad);
    ctx->set_materialize_grads(false);  // no zero-filled gradients for the unused outputs
    ctx->save_for_backward(grads);
    ctx->saved_data["n_levels"] = static_cast<int64_t>(student.size());
    ctx->mark_non_differentiable({mse, at});
    return {loss, mse, at};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const int64_t L = ctx->saved_data["n_levels"].toInt();
    torch::autograd::variable_list grads = ctx->get_saved_variables();
    TORCH_CHECK(static_cast<int64_t>(grads.size()) == L,
                "dtkernels.feat_loss: backward called on a call made with compute_grad=False");
    // One entry per forward argument: L student gradients, L (none) for the teacher, 8 for the scalars.
    torch::autograd::variable_list out(2 * L + 8);
    const at::Tensor& g = grad_outputs[0];
    if (!g.defined()) return out;  // the loss did not contribute to what is differentiated
    std::vector<at::Tensor> scaled = scale_grads_cpu(grads, g);
    for (int64_t l = 0; l < L; ++l) out[l] = scaled[l];
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> feat_loss_eager_autograd(
    at::TensorList student, at::TensorList teacher, at::ArrayRef<double> level_coef, double mse_weight,
    double at_weight, double at_p, int64_t at_mode, int64_t whiten, double eps, bool compute_grad) {
  for (const auto& t : student) DTK_CHECK(kOp, t.device().is_cpu(), "feat_loss_eager takes CPU tensors only");
  for (const auto& t : teacher) DTK_CHECK(kOp, t.device().is_cpu(), "feat_loss_eager takes CPU tensors only");
  auto out = FeatLossEager::apply(student, teacher, level_coef, mse_weight, at_weight, at_p, at_mode, whiten, eps,
                                  compute_grad);
  return {out[0], out[1], out[2]};
}

// Below autograd (inference mode, or a call that already passed the Autograd key): the forward only.
std::tuple<at::Tensor, at::Tensor, at::Tensor> feat_loss_eager_cpu(
    at::TensorList student, at::TensorList teacher, at::ArrayRef<double> level_coef, double mse_weight,
    double at_weight, double at_p, int64_t at_mode, int64_t whiten, double eps, bool compute_grad) {
  (void)compute_grad;
  auto [loss, mse, at, grads] =
      feat_loss_cpu(student, teacher, level_coef, mse_weight, at_weight, at_p, at_mode, whiten, eps, false);
  (void)grads;
  return {loss, mse, at};
}

}  // namespace

TORCH_LIBRARY_IMPL(dtkernels, CPU, m) {
  m.impl("feat_loss", &feat_loss_cpu);
  m.impl("feat_loss_eager", &feat_loss_eager_cpu);
  m.impl("scale_grads", &scale_grads_cpu);
}

TORCH_LIBRARY_IMPL(dtkernels, Autograd, m) { m.impl("feat_loss_eager", &feat_loss_eager_autograd); }

}  // namespace dtkernels
