// Shared helpers of the dtkernels CPU kernels: argument checks, dtype dispatch and vector load/store helpers that
// move float / double / Half / BFloat16 data to and from the accumulation type (float, or double for double input).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/all.h>

#include <cstdint>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

// ---------------------------------------------------------------------------------------------------------------
// Argument checks. `op` is the op name (a string literal), `what` names the argument, e.g. "student[2]"; every
// message starts with the op name so the user knows which call failed.
// ---------------------------------------------------------------------------------------------------------------
#define DTK_CHECK(op, cond, ...) TORCH_CHECK((cond), op, ": ", __VA_ARGS__)

#define CHECK_DEFINED(op, x, what) DTK_CHECK(op, (x).defined(), what, " is an undefined tensor")

#define CHECK_CPU(op, x, what) \
  DTK_CHECK(op, (x).device().is_cpu(), what, " must be a CPU tensor, got device ", (x).device())

#define CHECK_DIM(op, x, n, what) \
  DTK_CHECK(op, (x).dim() == (n), what, " must have ", (n), " dimensions, got shape ", (x).sizes())

#define CHECK_FLOATING(op, x, what)                                                                               \
  DTK_CHECK(op, ::dtkernels::is_supported_float((x).scalar_type()), what,                                         \
            " must be float32, float64, float16 or bfloat16, got ", (x).scalar_type())

#define CHECK_SAME_SHAPE(op, x, y, what_x, what_y) \
  DTK_CHECK(op, (x).sizes() == (y).sizes(), what_x, " and ", what_y, " must have the same shape, got ", (x).sizes(), \
            " and ", (y).sizes())

#define CHECK_SAME_DTYPE(op, x, y, what_x, what_y)                                                                 \
  DTK_CHECK(op, (x).scalar_type() == (y).scalar_type(), what_x, " and ", what_y,                                  \
            " must have the same dtype, got ", (x).scalar_type(), " and ", (y).scalar_type())

#define CHECK_NONEMPTY(op, x, what) \
  DTK_CHECK(op, (x).numel() > 0, what, " must not have a zero-size dimension, got shape ", (x).sizes())

// float, double, Half, BFloat16 (the dtypes every dtkernels kernel accepts).
#define DTK_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

namespace dtkernels {

// ---------------------------------------------------------------------------------------------------------------
// Modes. The ops take them as int64 (a schema has no enum type); the values are those of dtkernels/modes.py, which
// is where each name gets its number (tests/test_modes.py checks that these match it). Kernels compare the enums,
// never the integers; to_mode() is the only conversion, and it rejects values outside the enum.
// ---------------------------------------------------------------------------------------------------------------
enum class Whitening : int64_t { kNone = 0, kChannel = 1, kSample = 2 };
enum class AtMode : int64_t { kPaper = 0, kMeanSq = 1 };
enum class Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };
enum class Activation : int64_t { kNone = 0, kSilu = 1 };

template <typename E>
struct ModeInfo;
template <>
struct ModeInfo<Whitening> {
  static constexpr Whitening kLast = Whitening::kSample;
  static constexpr const char* kExpected = "Whitening (dtkernels.modes.Whitening: none, channel, sample)";
};
template <>
struct ModeInfo<AtMode> {
  static constexpr AtMode kLast = AtMode::kMeanSq;
  static constexpr const char* kExpected = "AtMode (dtkernels.modes.AtMode: paper, mean_sq)";
};
template <>
struct ModeInfo<Reduction> {
  static constexpr Reduction kLast = Reduction::kSum;
  static constexpr const char* kExpected = "Reduction (dtkernels.modes.Reduction: none, mean, sum)";
};
template <>
struct ModeInfo<Activation> {
  static constexpr Activation kLast = Activation::kSilu;
  static constexpr const char* kExpected = "Activation (dtkernels.modes.Activation: none, silu)";
};

// The enum member with value `value`; `op` and `what` name the op and the argument in the error.
template <typename E>
inline E to_mode(const char* op, const char* what, int64_t value) {
  DTK_CHECK(op, value >= 0 && value <= static_cast<int64_t>(ModeInfo<E>::kLast), what, " must be a ",
            ModeInfo<E>::kExpected, " value, got ", value);
  return static_cast<E>(value);
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Accumulation type: double for double inputs, float for float / Half / BFloat16.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_type_t = typename AccType<T>::type;

template <typename T>
using AccVec = at::vec::Vectorized<acc_type_t<T>>;

template <typename T>
constexpr bool is_reduced_v = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;

// Load AccVec<T>::size() elements of T starting at p, converted to the accumulation type.
template <typename T>
inline AccVec<T> load_acc(const T* p) {
  if constexpr (is_reduced_v<T>) {
    at::vec::Vectorized<float> out;
    at::vec::load_to_float<T>(p, out);
    return out;
  } else {
    return AccVec<T>::loadu(p);
  }
}

// Load n <= AccVec<T>::size() elements (the remaining lanes are zero).
template <typename T>
inline AccVec<T> load_acc(const T* p, int64_t n) {
  using A = acc_type_t<T>;
  constexpr int64_t kW = AccVec<T>::size();
  if (n == kW) return load_acc(p);
  __at_align__ A tmp[kW];
  for (int64_t i = 0; i < kW; ++i) tmp[i] = i < n ? static_cast<A>(p[i]) : A(0);
  return AccVec<T>::loadu(tmp);
}

// Store AccVec<T>::size() lanes of v to p as T (round to nearest even for Half / BFloat16).
template <typename T>
inline void store_acc(T* p, const AccVec<T>& v) {
  if constexpr (is_reduced_v<T>) {
    at::vec::convert_from_float<T>(v, v).store(p, AccVec<T>::size());
  } else {
    v.store(p);
  }
}

// Store the first n <= AccVec<T>::size() lanes of v.
template <typename T>
inline void store_acc(T* p, const AccVec<T>& v, int64_t n) {
  using A = acc_type_t<T>;
  constexpr int64_t kW = AccVec<T>::size();
  if (n == kW) return store_acc(p, v);
  __at_align__ A tmp[kW];
  v.store(tmp);
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(tmp[i]);
}

// Non-temporal (streaming) store of a full vector to a vector-aligned address: the line is written without being
// read first (no read-for-ownership) and without displacing the cache. Call stream_fence() before the data is used.
inline bool stream_store_supported() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return true;
#else
  return false;
#endif
}
template <typename T>
inline void stream_store(T* p, const AccVec<T>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    _mm512_stream_ps(p, v);
    return;
  } else if constexpr (std::is_same_v<T, double>) {
    _mm512_stream_pd(p, v);
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    _mm256_stream_ps(p, v);
    return;
  } else if constexpr (std::is_same_v<T, double>) {
    _mm256_stream_pd(p, v);
    return;
  }
#endif
  store_acc(p, v);
}
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Ask the kernel to back a freshly allocated output buffer with transparent huge pages before its first touch.
// Large buffers (the r50 gradient is 63 MB) come straight from mmap, so every call pays one page fault per 4 KiB page
// on first write, a sizeable share of a single-thread fwd_bwd of the ResNet-50 levels. With
// THP in "madvise" or "always" mode the 2 MiB-aligned interior of the buffer faults in 2 MiB pages instead; with THP
// off (or on non-Linux systems) this is a no-op. Memory that glibc recycles (already faulted in) is unaffected apart
// from khugepaged being allowed to collapse it later. Only for buffers of at least kHugeAdviseBytes.
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kHugeAdviseBytes = size_t(4) << 20;
inline void advise_huge_pages(void* ptr, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (ptr == nullptr || nbytes < kHugeAdviseBytes) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + kHugePage - 1) & ~(uintptr_t(kHugePage) - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + nbytes) & ~(uintptr_t(kHugePage) - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice only
#else
  (void)ptr;
  (void)nbytes;
#endif
}
inline void advise_huge_pages(const at::Tensor& t) {
  advise_huge_pages(t.data_ptr(), static_cast<size_t>(t.numel()) * t.element_size());
}

// Sum of the lanes in a fixed order (deterministic), in double.
template <typename V>
inline double hsum(const V& v) {
  using A = typename V::value_type;
  __at_align__ A tmp[V::size()];
  v.store(tmp);
  double s = 0.0;
  for (int64_t i = 0; i < V::size(); ++i) s += static_cast<double>(tmp[i]);
  return s;
}

// Keep the first n lanes of v, zero the others.
template <typename V>
inline V keep_first(const V& v, int64_t n) {
  if (n >= V::size()) return v;
  return V::set(V(0), v, n);
}

}  // namespace dtkernels
