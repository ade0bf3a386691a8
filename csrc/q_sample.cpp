// CPU kernel of dtkernels::q_sample (one-step forward diffusion, "stochastic encoding").
//
// It computes exactly dtkernels.reference.q_sample_op: per sample b of x0 [B, ...],
//
//     x_t = sqrt(abar[t_b]) * x0 + sqrt(1 - abar[t_b]) * eps,   abar = alphas_cumprod [T],
//
// with eps either given (`noise`) or drawn inside the kernel from the counter-based stream written out above
// dtkernels.reference.philox_normal: element i of x0 in LOGICAL row-major order is word i % 4 of
// Philox4x32-10(key = (seed & 0xffffffff, seed >> 32), counter = (g & 0xffffffff, g >> 32, 0, 0)), g = i / 4; a
// word becomes a uniform as Triton's uint_to_uniform_float does (int32 x, x < 0 -> -x - 1, times 4.6566127342e-10,
// rounded to float32) and
// the pairs (words 0, 1), (2, 3) become normals by Box-Muller (u1 clamped to >= 1e-7; r = sqrt(-2 ln u1);
// (r cos 2 pi u2, r sin 2 pi u2)). That is tl.randn4x, so a seed gives the same noise here and on CUDA (within
// ~1e-6: compiled Triton rounds the uniforms and its float32 log / sin / cos slightly differently).
//
// Noise generation is the whole cost of the op: several cycles per element of integer and transcendental math
// against 8 bytes of memory traffic per float32 element, so the op is compute-bound, well below copy bandwidth
// (and still faster than torch.randn_like plus the arithmetic; benchmarks/README.md has the numbers).
//   * Philox runs on blocks of kGroups counters at once, one 32-bit lane per counter (SoA: one vector per word),
//     with AVX2 / AVX-512 intrinsics: lo = vpmulld, hi from two vpmuludq (GCC's vectorization of the portable
//     uint64 loops is much slower; the DEFAULT build and the rare blocks whose low counter word wraps use those).
//   * Box-Muller runs on at::vec::Vectorized<float> (Vectorized<double> for float64 x0, where the reference does the
//     float part in double): sqrt exact, log and sin / cos from Sleef (the library at::vec uses). sin / cos of
//     2 pi u2 are Sleef's sincospi(2 u2): 2 u2 is exact, so there is no rounded 2 pi u2 argument. float32 uses the
//     3.5-ulp variants (logf_u35, sincospif_u35: half the cost of the 1-ulp ones; measured max |eps - float64
//     reference| = 6.0e-7 over 2**20 normals; 3.6e-7 with the 1-ulp ones on the test shapes; the rounding of r
//     dominates); float64 uses log_u10 and sincospi_u05 (within 2e-15 of the reference).
//   * The four per-word normal vectors are interleaved back into element order with two levels of
//     at::vec::interleave2 and written to a small per-thread buffer, which the combine pass reads from L1.
//
// Work decomposition (no copy for NCHW-contiguous and channels_last x0):
//   * contiguous x0 (memory order == logical order): at::parallel_for over tiles of kTile elements (a multiple of
//     4, so tiles start on Philox groups); per tile the normals are generated into a buffer, then one vectorized
//     pass reads x0, writes x_t (and eps when return_noise) with the per-sample coefficients.
//   * channels_last x0 [B, C, H, W] (memory order b, h, w, c): tiles of S spatial positions of one sample; the noise
//     of channel c is the logical range [b C HW + c HW + s0, +S), generated per channel into a [C][S] buffer,
//     transposed to the tile's memory order [S][C], then the same combine pass runs over the tile's contiguous
//     memory.
//   * anything else (sliced views, other dense permutations) is copied to contiguous, computed, and copied into
//     torch.empty_like(x0), as the reference does.
// With noise given: one fused pass sqrt(abar) x0 + sqrt(1 - abar) noise in memory order when x0 is dense with the
// batch outermost and noise has x0's strides (noise in another layout is first copied to x0's layout; noise of
// another dtype is converted to the compute dtype, as the reference converts it).
//
// Every element depends only on its index, the seed and its sample's coefficients, so the result does not depend on
// the thread count or the tiling. Math is in float for float / Half / BFloat16 x0 (rounded once to the output
// dtype) and in double for double x0.
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <sleef.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "utils.h"

namespace dtkernels {
namespace {

constexpr const char* kOp = "q_sample";

// Philox4x32 constants (Salmon et al., 2011), as in dtkernels.reference and triton.language.random.
constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
constexpr int kRounds = 10;

constexpr int64_t kGroups = 32;                  // Philox counters per generation block
constexpr int64_t kBlockElems = 4 * kGroups;     // normals per block
constexpr int64_t kTile = 64 * kBlockElems;      // elements per tile of the contiguous path (32 KiB of float)
constexpr int64_t kMinTilesPerTask = 4;          // at::parallel_for grain, in tiles

struct PhiloxKey {
  uint32_t k0, k1;
};

inline PhiloxKey key_of(int64_t seed) {
  const uint64_t s = static_cast<uint64_t>(seed);  // the op's int is signed; the key is its unsigned reinterpretation
  return {static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32)};
}

// Philox4x32-10 of the counters (g0 + i, 0, 0) for i in [0, kGroups): w[j][i] is word j of group g0 + i. Portable
// version: plain loops that GCC vectorizes (zero-extend, vpmuludq, repack).
inline void philox_block_scalar(uint64_t g0, PhiloxKey key, uint32_t (&w)[4][kGroups]) {
  alignas(64) uint32_t c0[kGroups], c1[kGroups], c2[kGroups], c3[kGroups];
  for (int64_t i = 0; i < kGroups; ++i) {
    const uint64_t g = g0 + static_cast<uint64_t>(i);
    c0[i] = static_cast<uint32_t>(g);
    c1[i] = static_cast<uint32_t>(g >> 32);
    c2[i] = 0;
    c3[i] = 0;
  }
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int r = 0; r < kRounds; ++r) {
    for (int64_t i = 0; i < kGroups; ++i) {
      const uint64_t p0 = static_cast<uint64_t>(c0[i]) * kM0;
      const uint64_t p1 = static_cast<uint64_t>(c2[i]) * kM1;
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[i] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[i] ^ k1;
      c1[i] = static_cast<uint32_t>(p1);
      c3[i] = static_cast<uint32_t>(p0);
      c0[i] = n0;
      c2[i] = n2;
    }
    k0 += kW0;
    k1 += kW1;
  }
  std::memcpy(w[0], c0, sizeof(c0));
  std::memcpy(w[1], c1, sizeof(c1));
  std::memcpy(w[2], c2, sizeof(c2));
  std::memcpy(w[3], c3, sizeof(c3));
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// Hand-vectorized Philox, much faster than what GCC makes of the loops above: per vector
// of 32-bit lanes, lo = vpmulld, hi = the high halves of two vpmuludq (even lanes, odd lanes shifted down) blended.
#if defined(CPU_CAPABILITY_AVX512)
using IVec = __m512i;
constexpr int kLanes = 16;
inline IVec iset1(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
inline IVec ixor(IVec a, IVec b) { return _mm512_xor_si512(a, b); }
inline IVec iadd(IVec a, IVec b) { return _mm512_add_epi32(a, b); }
inline IVec iiota() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
inline void istore(uint32_t* p, IVec v) { _mm512_storeu_si512(p, v); }
inline void mulhilo(IVec a, IVec m, IVec& hi, IVec& lo) {
  const IVec even = _mm512_mul_epu32(a, m);
  const IVec odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  lo = _mm512_mullo_epi32(a, m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}
#else
using IVec = __m256i;
constexpr int kLanes = 8;
inline IVec iset1(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }
inline IVec ixor(IVec a, IVec b) { return _mm256_xor_si256(a, b); }
inline IVec iadd(IVec a, IVec b) { return _mm256_add_epi32(a, b); }
inline IVec iiota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
inline void istore(uint32_t* p, IVec v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
inline void mulhilo(IVec a, IVec m, IVec& hi, IVec& lo) {
  const IVec even = _mm256_mul_epu32(a, m);
  const IVec odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  lo = _mm256_mullo_epi32(a, m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}
#endif
static_assert(kGroups % kLanes == 0, "kGroups must be a multiple of the integer vector width");

inline void philox_block(uint64_t g0, PhiloxKey key, uint32_t (&w)[4][kGroups]) {
  const uint32_t lo0 = static_cast<uint32_t>(g0);
  if (lo0 > UINT32_MAX - static_cast<uint32_t>(kGroups)) {  // the low counter word wraps inside this block
    philox_block_scalar(g0, key, w);
    return;
  }
  constexpr int V = static_cast<int>(kGroups / kLanes);
  IVec c0[V], c1[V], c2[V], c3[V];
  for (int v = 0; v < V; ++v) {
    c0[v] = iadd(iset1(lo0 + static_cast<uint32_t>(v * kLanes)), iiota());
    c1[v] = iset1(static_cast<uint32_t>(g0 >> 32));
    c2[v] = iset1(0);
    c3[v] = iset1(0);
  }
  const IVec m0 = iset1(kM0), m1 = iset1(kM1);
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int r = 0; r < kRounds; ++r) {
    const IVec vk0 = iset1(k0), vk1 = iset1(k1);
    for (int v = 0; v < V; ++v) {
      IVec hi0, lo0v, hi1, lo1v;
      mulhilo(c0[v], m0, hi0, lo0v);
      mulhilo(c2[v], m1, hi1, lo1v);
      c0[v] = ixor(ixor(hi1, c1[v]), vk0);
      c2[v] = ixor(ixor(hi0, c3[v]), vk1);
      c1[v] = lo1v;
      c3[v] = lo0v;
    }
    k0 += kW0;
    k1 += kW1;
  }
  for (int v = 0; v < V; ++v) {
    istore(&w[0][v * kLanes], c0[v]);
    istore(&w[1][v * kLanes], c1[v]);
    istore(&w[2][v * kLanes], c2[v]);
    istore(&w[3][v * kLanes], c3[v]);
  }
}
#else
inline void philox_block(uint64_t g0, PhiloxKey key, uint32_t (&w)[4][kGroups]) { philox_block_scalar(g0, key, w); }
#endif

// A word as a uniform in [0, 1), exactly as dtkernels.reference.philox_normal: reinterpret as int32, x < 0 -> -x - 1
// (== ~x), times 4.6566127342e-10 (Triton's uint_to_uniform_float constant) in double, rounded once to float32.
// (Compiled Triton rounds x to float32 first and multiplies by the constant rounded down to float32, 0x2FFFFFFF,
// which differs from this in the last bit of some uniforms; the interpreter computes it the way written here.)
inline float word_to_uniform(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);
  x ^= (x >> 31);
  return static_cast<float>(static_cast<double>(x) * 4.6566127342e-10);
}

template <typename A>
using Vec = at::vec::Vectorized<A>;

// (sin(pi x), cos(pi x)) lane by lane.
template <typename A>
inline void sincospi(const Vec<A>& x, Vec<A>& s, Vec<A>& c) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    const Sleef___m512_2 r = Sleef_sincospif16_u35(x);
    s = r.x;
    c = r.y;
  } else {
    const Sleef___m512d_2 r = Sleef_sincospid8_u05(x);
    s = r.x;
    c = r.y;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) {
    const Sleef___m256_2 r = Sleef_sincospif8_u35avx2(x);
    s = r.x;
    c = r.y;
  } else {
    const Sleef___m256d_2 r = Sleef_sincospid4_u05avx2(x);
    s = r.x;
    c = r.y;
  }
#else
  __at_align__ A in[Vec<A>::size()], so[Vec<A>::size()], co[Vec<A>::size()];
  x.store(in);
  for (int64_t i = 0; i < Vec<A>::size(); ++i) {
    const double th = M_PI * static_cast<double>(in[i]);
    so[i] = static_cast<A>(std::sin(th));
    co[i] = static_cast<A>(std::cos(th));
  }
  s = Vec<A>::loadu(so);
  c = Vec<A>::loadu(co);
#endif
}

template <typename A>
inline Vec<A> vlog(const Vec<A>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    return Sleef_logf16_u35(x);
  } else {
    return Sleef_logd8_u10(x);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) {
    return Sleef_logf8_u35avx2(x);
  } else {
    return Sleef_logd4_u10avx2(x);
  }
#else
  return x.log();
#endif
}

// kBlockElems standard normals of the groups [g0, g0 + kGroups) in element order (element 4 (g - g0) + j).
template <typename A>
inline void normal_block(uint64_t g0, PhiloxKey key, A* out) {
  constexpr int64_t kW = Vec<A>::size();
  static_assert(kGroups % kW == 0, "kGroups must be a multiple of the vector width");
  alignas(64) uint32_t w[4][kGroups];
  philox_block(g0, key, w);
  alignas(64) float u[4][kGroups];
  for (int j = 0; j < 4; ++j) {
    for (int64_t i = 0; i < kGroups; ++i) u[j][i] = word_to_uniform(w[j][i]);
  }
  const Vec<A> lo(static_cast<A>(1e-7f)), minus2(A(-2)), two(A(2));
  for (int64_t i = 0; i < kGroups; i += kW) {
    Vec<A> n[4];
    for (int p = 0; p < 2; ++p) {
      Vec<A> u1, u2;
      if constexpr (std::is_same_v<A, float>) {
        u1 = Vec<A>::loadu(&u[2 * p][i]);
        u2 = Vec<A>::loadu(&u[2 * p + 1][i]);
      } else {
        __at_align__ A t1[kW], t2[kW];
        for (int64_t k = 0; k < kW; ++k) {
          t1[k] = static_cast<A>(u[2 * p][i + k]);
          t2[k] = static_cast<A>(u[2 * p + 1][i + k]);
        }
        u1 = Vec<A>::loadu(t1);
        u2 = Vec<A>::loadu(t2);
      }
      u1 = at::vec::maximum(u1, lo);
      const Vec<A> r = (minus2 * vlog<A>(u1)).sqrt();
      Vec<A> s, c;
      sincospi<A>(two * u2, s, c);  // 2 u2 is exact
      n[2 * p] = r * c;
      n[2 * p + 1] = r * s;
    }
    // Element order 4g + j: interleave (n0, n2) and (n1, n3), then the two results.
    const auto a = at::vec::interleave2(n[0], n[2]);  // n0_0 n2_0 n0_1 n2_1 ...
    const auto b = at::vec::interleave2(n[1], n[3]);  // n1_0 n3_0 ...
    const auto lo_pair = at::vec::interleave2(a.first, b.first);
    const auto hi_pair = at::vec::interleave2(a.second, b.second);
    A* o = out + 4 * i;
    lo_pair.first.store(o);
    lo_pair.second.store(o + kW);
    hi_pair.first.store(o + 2 * kW);
    hi_pair.second.store(o + 3 * kW);
  }
}

// Normals of the logical elements [start, start + n) into out[0, n).
template <typename A>
void fill_normals(uint64_t start, int64_t n, PhiloxKey key, A* out) {
  alignas(64) A tmp[kBlockElems];
  uint64_t g = start / 4;
  int64_t skip = static_cast<int64_t>(start % 4);
  while (n > 0) {
    if (skip == 0 && n >= kBlockElems) {
      normal_block<A>(g, key, out);
      out += kBlockElems;
      n -= kBlockElems;
    } else {
      normal_block<A>(g, key, tmp);
      const int64_t take = std::min(n, kBlockElems - skip);
      std::memcpy(out, tmp + skip, take * sizeof(A));
      out += take;
      n -= take;
      skip = 0;
    }
    g += kGroups;
  }
}

// A product rounded on its own: an empty asm on the register stops the compiler from contracting it with the sum
// that follows into an FMA (GCC contracts vector intrinsics too under its default -ffp-contract=fast, and ignores
// the optimize("fp-contract=off") pragma for the inlined at::vec operators).
template <typename A>
inline Vec<A> rounded(const Vec<A>& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    __m512 r = v;
    __asm__("" : "+v"(r));
#else
    __m256 r = v;
    __asm__("" : "+x"(r));
#endif
    return Vec<A>(r);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    __m512d r = v;
    __asm__("" : "+v"(r));
#else
    __m256d r = v;
    __asm__("" : "+x"(r));
#endif
    return Vec<A>(r);
  }
#else
  __at_align__ volatile A tmp[Vec<A>::size()];
  __at_align__ A out[Vec<A>::size()];
  v.store(const_cast<A*>(tmp));
  for (int64_t i = 0; i < Vec<A>::size(); ++i) out[i] = tmp[i];
  return Vec<A>::loadu(out);
#endif
}

// out[i] = a * x[i] + s * e[i] for i in [0, n) (and eps[i] = e[i] when eps != nullptr), math in A. Two products
// and a sum, each rounded, as eager PyTorch (and diffusers' add_noise) computes it; the tail goes through the same
// vector code, so an element's value does not depend on where a tile or sample boundary falls.
template <typename T, typename A, typename E>
void combine(const T* x, const E* e, T* out, T* eps, int64_t n, A a, A s) {
  constexpr int64_t kW = Vec<A>::size();
  const Vec<A> va(a), vs(s);
  for (int64_t i = 0; i < n; i += kW) {
    const int64_t m = std::min(kW, n - i);
    Vec<A> ve;
    if constexpr (std::is_same_v<E, A>) {
      ve = m == kW ? Vec<A>::loadu(e + i) : Vec<A>::loadu(e + i, m);
    } else {
      ve = load_acc(e + i, m);
    }
    const Vec<A> prod_x = rounded<A>(va * load_acc(x + i, m));
    const Vec<A> prod_e = rounded<A>(vs * ve);
    store_acc(out + i, prod_x + prod_e, m);
    if (eps != nullptr) {
      if constexpr (std::is_same_v<E, T>) {
        std::memcpy(eps + i, e + i, m * sizeof(T));
      } else {
        store_acc(eps + i, ve, m);
      }
    }
  }
}

template <typename A>
struct Coefs {
  std::vector<A> a, s;  // sqrt(abar[t_b]), sqrt(1 - abar[t_b]) per sample
};

// The per-sample coefficients with the same ATen ops as the reference (abar = alphas.to(dt)[t]; abar.sqrt();
// (1 - abar).sqrt()), so they are bit-identical to it (ATen's float32 sqrt of a short tensor is not always the
// correctly rounded std::sqrt).
template <typename A>
Coefs<A> coefficients(const at::Tensor& t, const at::Tensor& alphas) {
  const at::Tensor tl = t.to(at::kLong).contiguous();
  const int64_t n_steps = alphas.numel();
  const int64_t* tp = tl.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < tl.numel(); ++b) {
    DTK_CHECK(kOp, tp[b] >= 0 && tp[b] < n_steps, "t must hold timesteps in [0, ", n_steps,
              ") (len(alphas_cumprod)), got t[", b, "] = ", tp[b]);
  }
  const at::Tensor abar = alphas.to(c10::CppTypeToScalarType<A>::value).index_select(0, tl);
  const at::Tensor a = abar.sqrt().contiguous();
  const at::Tensor s = (1.0 - abar).sqrt().contiguous();
  Coefs<A> c;
  c.a.assign(a.const_data_ptr<A>(), a.const_data_ptr<A>() + a.numel());
  c.s.assign(s.const_data_ptr<A>(), s.const_data_ptr<A>() + s.numel());
  return c;
}

// Logical row-major == memory order (contiguous x0, out and eps). Noise drawn from the stream.
template <typename T, typename A>
void generate_contiguous(const T* x, T* out, T* eps, int64_t numel, int64_t per_sample, const Coefs<A>& cf,
                         PhiloxKey key) {
  const int64_t n_tiles = (numel + kTile - 1) / kTile;
  at::parallel_for(0, n_tiles, kMinTilesPerTask, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(kTile);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t start = tile * kTile;
      const int64_t n = std::min(kTile, numel - start);
      fill_normals<A>(static_cast<uint64_t>(start), n, key, buf.data());
      int64_t i = start;
      while (i < start + n) {  // split at sample boundaries
        const int64_t b = i / per_sample;
        const int64_t stop = std::min(start + n, (b + 1) * per_sample);
        combine<T, A, A>(x + i, buf.data() + (i - start), out + i, eps == nullptr ? nullptr : eps + i, stop - i,
                         cf.a[b], cf.s[b]);
        i = stop;
      }
    }
  });
}

// channels_last x0 [B, C, H, W] (memory order b, h, w, c; out and eps have the same strides).
template <typename T, typename A>
void generate_channels_last(const T* x, T* out, T* eps, int64_t B, int64_t C, int64_t HW, const Coefs<A>& cf,
                            PhiloxKey key) {
  // S positions per tile: a multiple of 4 (tiles of one channel start on Philox groups whenever HW % 4 == 0), about
  // kTile elements over all channels, at least 4.
  const int64_t S = std::min(std::max<int64_t>(4, (kTile / C) / 4 * 4), (HW + 3) / 4 * 4);
  const int64_t tiles_per_sample = (HW + S - 1) / S;
  const int64_t grain = std::max<int64_t>(1, kMinTilesPerTask * kTile / (S * C));
  at::parallel_for(0, B * tiles_per_sample, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> noise_cs(C * S), noise_sc(C * S);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / tiles_per_sample;
      const int64_t s0 = (item % tiles_per_sample) * S;
      const int64_t ns = std::min(S, HW - s0);
      for (int64_t c = 0; c < C; ++c) {
        fill_normals<A>(static_cast<uint64_t>((b * C + c) * HW + s0), ns, key, noise_cs.data() + c * S);
      }
      for (int64_t s = 0; s < ns; ++s) {
        for (int64_t c = 0; c < C; ++c) noise_sc[s * C + c] = noise_cs[c * S + s];
      }
      const int64_t off = (b * HW + s0) * C;
      combine<T, A, A>(x + off, noise_sc.data(), out + off, eps == nullptr ? nullptr : eps + off, ns * C, cf.a[b],
                       cf.s[b]);
    }
  });
}

// Given noise with x0's strides, x0 dense with the batch outermost: one pass in memory order.
template <typename T, typename A, typename E>
void combine_given(const T* x, const E* e, T* out, int64_t numel, int64_t per_sample, const Coefs<A>& cf) {
  const int64_t n_tiles = (numel + kTile - 1) / kTile;
  at::parallel_for(0, n_tiles, kMinTilesPerTask, [&](int64_t begin, int64_t end) {
    const int64_t stop_all = std::min(numel, end * kTile);
    int64_t i = begin * kTile;
    while (i < stop_all) {
      const int64_t b = i / per_sample;
      const int64_t stop = std::min(stop_all, (b + 1) * per_sample);
      combine<T, A, E>(x + i, e + i, out + i, nullptr, stop - i, cf.a[b], cf.s[b]);
      i = stop;
    }
  });
}

// x0 dense, the batch the outermost dimension in memory (contiguous, channels_last, ...): element b of the batch
// occupies the memory range [b * per_sample, (b + 1) * per_sample) of the storage from the data pointer.
bool batch_outer_dense(const at::Tensor& x) {
  if (!x.is_non_overlapping_and_dense()) return false;
  const int64_t per_sample = x.size(0) == 0 ? 0 : x.numel() / x.size(0);
  return x.size(0) == 1 || x.stride(0) == per_sample;
}

std::tuple<at::Tensor, at::Tensor> q_sample_cpu(const at::Tensor& x0, const at::Tensor& t,
                                                const at::Tensor& alphas_cumprod,
                                                const std::optional<at::Tensor>& noise_opt, int64_t seed,
                                                bool return_noise) {
  CHECK_DEFINED(kOp, x0, "x0");
  CHECK_DEFINED(kOp, t, "t");
  CHECK_DEFINED(kOp, alphas_cumprod, "alphas_cumprod");
  CHECK_CPU(kOp, x0, "x0");
  CHECK_CPU(kOp, t, "t");
  CHECK_CPU(kOp, alphas_cumprod, "alphas_cumprod");
  CHECK_FLOATING(kOp, x0, "x0");
  DTK_CHECK(kOp, x0.dim() >= 1, "x0 must have a batch dimension [B, ...], got a 0-dim tensor");
  CHECK_NONEMPTY(kOp, x0, "x0");
  DTK_CHECK(kOp, !at::isFloatingType(t.scalar_type()) && !at::isComplexType(t.scalar_type()) &&
                     t.scalar_type() != at::kBool,
            "t must be an integer tensor of timesteps, got ", t.scalar_type());
  DTK_CHECK(kOp, t.dim() == 1 && t.size(0) == x0.size(0), "t must have shape [", x0.size(0),
            "] (one timestep per sample of x0), got ", t.sizes());
  DTK_CHECK(kOp, at::isFloatingType(alphas_cumprod.scalar_type()), "alphas_cumprod must be a floating tensor, got ",
            alphas_cumprod.scalar_type());
  DTK_CHECK(kOp, alphas_cumprod.dim() == 1 && alphas_cumprod.numel() > 0,
            "alphas_cumprod must be a non-empty 1-D tensor [T], got shape ", alphas_cumprod.sizes());
  const bool has_noise = noise_opt.has_value() && noise_opt->defined();
  if (has_noise) {
    const at::Tensor& noise = *noise_opt;
    CHECK_CPU(kOp, noise, "noise");
    DTK_CHECK(kOp, at::isFloatingType(noise.scalar_type()), "noise must be a floating tensor, got ",
              noise.scalar_type());
    CHECK_SAME_SHAPE(kOp, x0, noise, "x0", "noise");
  }

  const bool want_eps = return_noise && !has_noise;
  at::Tensor out = at::empty_like(x0);
  at::Tensor eps = want_eps ? at::empty_like(x0) : x0.new_empty({0});
  advise_huge_pages(out);  // fresh large buffers: 2 MiB pages instead of a fault per 4 KiB (utils.h)
  if (want_eps) advise_huge_pages(eps);
  const int64_t numel = x0.numel();
  const int64_t B = x0.size(0);
  const int64_t per_sample = numel / B;
  const PhiloxKey key = key_of(seed);

  DTK_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "dtkernels::q_sample", [&] {
    using T = scalar_t;
    using A = acc_type_t<T>;
    const Coefs<A> cf = coefficients<A>(t, alphas_cumprod);

    if (has_noise) {
      at::Tensor noise = *noise_opt;
      const at::ScalarType cdt = c10::CppTypeToScalarType<A>::value;
      // The reference converts noise to the compute dtype; a noise of another dtype is converted to it here.
      const bool same_dtype = noise.scalar_type() == x0.scalar_type();
      const at::ScalarType ndt = same_dtype ? x0.scalar_type() : cdt;
      at::Tensor xs = x0, os = out;
      if (!batch_outer_dense(x0) || out.strides() != x0.strides()) {
        xs = x0.contiguous();
        os = at::empty_like(xs);
      }
      if (noise.strides() != xs.strides() || noise.scalar_type() != ndt) {
        at::Tensor tmp = at::empty_like(xs, xs.options().dtype(ndt));
        tmp.copy_(noise);
        noise = tmp;
      }
      if (same_dtype) {
        combine_given<T, A, T>(xs.const_data_ptr<T>(), noise.const_data_ptr<T>(), os.data_ptr<T>(), numel,
                               per_sample, cf);
      } else {
        combine_given<T, A, A>(xs.const_data_ptr<T>(), noise.const_data_ptr<A>(), os.data_ptr<T>(), numel,
                               per_sample, cf);
      }
      if (!os.is_same(out)) out.copy_(os);
      return;
    }

    if (x0.is_contiguous() && out.is_contiguous() && (!want_eps || eps.is_contiguous())) {
      generate_contiguous<T, A>(x0.const_data_ptr<T>(), out.data_ptr<T>(), want_eps ? eps.data_ptr<T>() : nullptr,
                                numel, per_sample, cf, key);
      return;
    }
    if (x0.dim() == 4 && x0.is_contiguous(at::MemoryFormat::ChannelsLast) && out.strides() == x0.strides() &&
        (!want_eps || eps.strides() == x0.strides())) {
      generate_channels_last<T, A>(x0.const_data_ptr<T>(), out.data_ptr<T>(),
                                   want_eps ? eps.data_ptr<T>() : nullptr, B, x0.size(1), x0.size(2) * x0.size(3),
                                   cf, key);
      return;
    }
    // Any other layout: compute on a contiguous copy, then copy into empty_like(x0).
    const at::Tensor xc = x0.contiguous();
    at::Tensor oc = at::empty_like(xc, at::MemoryFormat::Contiguous);
    at::Tensor ec = want_eps ? at::empty_like(xc, at::MemoryFormat::Contiguous) : at::Tensor();
    generate_contiguous<T, A>(xc.const_data_ptr<T>(), oc.data_ptr<T>(), want_eps ? ec.data_ptr<T>() : nullptr,
                              numel, per_sample, cf, key);
    out.copy_(oc);
    if (want_eps) eps.copy_(ec);
  });
  return {out, eps};
}

}  // namespace

TORCH_LIBRARY_IMPL(dtkernels, CPU, m) { m.impl("q_sample", &q_sample_cpu); }

}  // namespace dtkernels
