// Alignment metrics between two stacks of maps (harmonizer_fast.evaluation.metrics).
//
// Inputs are C-contiguous (N, P) arrays (P = H * W pixels per map), float32 or float64.
// Maps are independent, so OpenMP splits the N maps over threads, each with its own scratch
// buffers. NaN/inf are detected here, in the passes that read each map anyway (a separate
// NumPy isfinite pass cost a full extra read of both stacks): the call then raises
// ValueError naming the first offending map, and Python words the user-facing message.
//
// Exactness contract (tested against scipy/numpy):
//  * spearman: ranks with ties averaged (scipy.stats.rankdata 'average'), Pearson of the
//    ranks in double precision; a constant map gives NaN as scipy.stats.spearmanr does.
//  * thresholds: bit-identical to np.percentile(map, 100 - percentile) with the default
//    'linear' method and a Python-number q, i.e. numpy's _lerp evaluated in the map dtype.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#ifdef HF_HAVE_OPENMP
#include <omp.h>
#endif
#ifdef __SSE2__
#include <emmintrin.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>  // AVX2 kernels are compiled with a target attribute, run if the CPU has it
#define HF_METRICS_AVX2 1
#endif

namespace py = pybind11;

namespace {

// Unsigned integer key whose order is the numeric order of the float.
template <typename T>
using KeyOf = typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type;

template <typename T>
inline KeyOf<T> order_key(T x) {
  using K = KeyOf<T>;
  constexpr K sign = K(1) << (sizeof(K) * 8 - 1);
  // -0.0 and +0.0 are equal (a tie for rankdata), so they must share one key.
  if (x == T(0)) x = T(0);
  K bits;
  std::memcpy(&bits, &x, sizeof(K));
  return (bits & sign) ? ~bits : (bits | sign);
}

// Bits of a float without its sign; the value is NaN or infinite iff they are >= this.
template <typename T>
constexpr KeyOf<T> non_finite_magnitude() {
  return sizeof(T) == 4 ? KeyOf<T>(0x7f800000u) : KeyOf<T>(0x7ff0000000000000ull);
}

template <typename T>
inline KeyOf<T> magnitude_bits(T x) {
  KeyOf<T> bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits & (~KeyOf<T>(0) >> 1);
}

// Whether x[0..n) is free of NaN and inf: integer compares, which vectorise (the map then
// sits in cache for the selection passes that follow).
template <typename T>
bool all_finite(const T* x, size_t n) {
  uint32_t bad = 0;
  for (size_t i = 0; i < n; ++i) bad |= uint32_t(magnitude_bits(x[i]) >= non_finite_magnitude<T>());
  return bad == 0;
}

// Radix digits: 16 bits (two passes for float32 keys) for large maps, where the 64K-bucket
// histograms cost little next to the pixels; 11 bits otherwise. On 224x224 float32 maps
// 16-bit digits took ~0.8x the CPU time of 11-bit ones and 8-bit ones ~1.25x.
constexpr int kWideDigitBits = 16;
constexpr int kNarrowDigitBits = 11;
constexpr size_t kMinPixelsForWideDigits = size_t(1) << 15;

// A radix-sort item packs a pixel's order key above its index, so that one array (one
// write stream per scatter) carries both: 64 bits for float32 maps, 128 for float64.
__extension__ typedef unsigned __int128 uint128_t;
__extension__ typedef __int128 int128_t;

template <typename T>
struct RankItem {
  using K = KeyOf<T>;
  using Item = typename std::conditional<sizeof(T) == 4, uint64_t, uint128_t>::type;
  static constexpr int kIndexShift = int(sizeof(K)) * 8;
  static Item make(K key, uint32_t index) { return (Item(key) << kIndexShift) | Item(index); }
  static K key(Item item) { return K(item >> kIndexShift); }
  static uint32_t payload(Item item) { return uint32_t(item); }
};

// Per-thread scratch space, reused across the maps a thread processes.
template <typename T>
struct RankScratch {
  using Item = typename RankItem<T>::Item;
  std::vector<Item> items, items_tmp;
  std::vector<uint32_t> twice_centred_a;  // int32 bit patterns, |d| <= n < 2^31
  std::vector<uint32_t> hist;
  void resize(size_t n) {
    items.resize(n);
    items_tmp.resize(n);
    twice_centred_a.resize(n);
  }
};

// LSD radix sort of the map's pixels by order key: linear time, which is what makes
// ranking 50k-pixel maps cheap (a comparison sort dominates otherwise).
// On return s.items holds (key, payload) items in ascending key order; returns false
// (items unsorted) if the map holds NaN or inf.
template <int DigitBits, typename T>
bool radix_argsort_digits(const T* x, const uint32_t* payload, size_t n, RankScratch<T>& s) {
  using R = RankItem<T>;
  using K = typename R::K;
  constexpr uint32_t buckets = 1u << DigitBits;
  constexpr int passes = (int(sizeof(K)) * 8 + DigitBits - 1) / DigitBits;
  s.hist.assign(size_t(passes) * buckets, 0);
  uint32_t* hist = s.hist.data();
  K non_finite = 0;
  for (size_t i = 0; i < n; ++i) {
    non_finite |= K(magnitude_bits(x[i]) >= non_finite_magnitude<T>());
    const K k = order_key(x[i]);
    s.items[i] = R::make(k, payload != nullptr ? payload[i] : uint32_t(i));
    for (int p = 0; p < passes; ++p) ++hist[p * buckets + ((k >> (p * DigitBits)) & (buckets - 1))];
  }
  if (non_finite) return false;
  for (int p = 0; p < passes; ++p) {
    uint32_t* h = hist + p * buckets;
    const int shift = R::kIndexShift + p * DigitBits;
    // A digit shared by every key (e.g. the sign and exponent bits of maps in [0, 1))
    // leaves the order unchanged: skip the pass.
    if (h[uint32_t(s.items[0] >> shift) & (buckets - 1)] == n) continue;
    uint32_t total = 0;
    for (uint32_t b = 0; b < buckets; ++b) {
      const uint32_t c = h[b];
      h[b] = total;
      total += c;
    }
    for (size_t i = 0; i < n; ++i) {
      const auto item = s.items[i];
      s.items_tmp[h[uint32_t(item >> shift) & (buckets - 1)]++] = item;
    }
    s.items.swap(s.items_tmp);
  }
  return true;
}

// payload: 32 bits carried along with each pixel (nullptr: the pixel index).
template <typename T>
bool radix_argsort(const T* x, const uint32_t* payload, size_t n, RankScratch<T>& s) {
  if (sizeof(T) == 4 && n >= kMinPixelsForWideDigits)
    return radix_argsort_digits<kWideDigitBits>(x, payload, n, s);
  return radix_argsort_digits<kNarrowDigitBits>(x, payload, n, s);
}

// Which of a map pair holds NaN or inf (reported to Python, which names the argument).
enum class NonFinite { kNone = 0, kMapA = 1, kMapB = 2 };

// Calls visit(first, last, d) for each run of equal keys in the sorted items, where
// d = 2 r - (n + 1) is twice the centred rank and r the average of the 1-based ranks
// first+1 .. last (scipy's 'average' tie rule): an exact integer.
template <typename T, typename Visit>
inline void for_each_tie_group(const RankScratch<T>& s, size_t n, Visit visit) {
  using R = RankItem<T>;
  size_t i = 0;
  while (i < n) {
    const auto key = R::key(s.items[i]);
    size_t j = i + 1;
    while (j < n && R::key(s.items[j]) == key) ++j;
    visit(i, j, int64_t(i + 1 + j) - int64_t(n + 1));
    i = j;
  }
}

// Pearson correlation of the ranks computed on twice-centred ranks d (integers), with
// 128-bit integer sums: the sums are exact, so the only rounding is in the final
// cov / sqrt(var_a var_b), and the result does not depend on summation order.
template <typename T>
double spearman_one(const T* a, const T* b, size_t n, RankScratch<T>& s, NonFinite& bad) {
  using R = RankItem<T>;
  s.resize(n);
  int128_t var_a = 0, var_b = 0, cov = 0;
  if (!radix_argsort(a, static_cast<const uint32_t*>(nullptr), n, s)) {
    bad = NonFinite::kMapA;
    return 0.0;
  }
  for_each_tie_group(s, n, [&](size_t first, size_t last, int64_t d) {
    var_a += int128_t(last - first) * d * d;
    for (size_t k = first; k < last; ++k) s.twice_centred_a[R::payload(s.items[k])] = uint32_t(int32_t(d));
  });
  // b's items carry a's twice-centred rank of their pixel, so that b's tie groups read
  // it in sorted order instead of gathering it by pixel index.
  if (!radix_argsort(b, s.twice_centred_a.data(), n, s)) {
    bad = NonFinite::kMapB;
    return 0.0;
  }
  for_each_tie_group(s, n, [&](size_t first, size_t last, int64_t d) {
    var_b += int128_t(last - first) * d * d;
    int64_t sum_a = 0;
    for (size_t k = first; k < last; ++k) sum_a += int32_t(R::payload(s.items[k]));
    cov += int128_t(d) * sum_a;
  });
  if (var_a == 0 || var_b == 0) return std::numeric_limits<double>::quiet_NaN();
  const double rho = double(cov) / std::sqrt(double(var_a) * double(var_b));
  return std::max(-1.0, std::min(1.0, rho));  // np.corrcoef clips to [-1, 1] too
}

// numpy's _lerp(a, b, t) in the map dtype, t a Python float (weak promotion): t and
// 1 - t are rounded to T, each product is rounded before the addition (volatile keeps the
// compiler from fusing them into an FMA, which would round once and change the result).
template <typename T>
T numpy_lerp(T lower, T upper, double t) {
  volatile T diff = upper - lower;
  if (t >= 0.5) {
    volatile T scaled = diff * T(1.0 - t);
    return upper - scaled;
  }
  volatile T scaled = diff * T(t);
  return lower + scaled;
}

// Order statistics lo and lo + 1 (0-based, ascending) of data[0..n), reordering data.
template <typename T>
void select_pair(T* data, size_t n, size_t lo, T& lower, T& upper) {
  std::nth_element(data, data + lo, data + n);
  lower = data[lo];
  upper = *std::min_element(data + lo + 1, data + n);
}

// select_pair for data[0..m) known to lie in [low, high], with k + 1 < m: a histogram of
// the order keys (relative to low's) finds the buckets holding ranks k and k + 1, and only
// the pixels in those buckets are selected on. Both passes are branch-free, where
// nth_element on all m mispredicts about once per element. Reorders data.
template <typename T>
void select_pair_bracketed(T* data, size_t m, size_t k, T low, T high, T& lower, T& upper) {
  using K = KeyOf<T>;
  constexpr size_t kBuckets = 256;
  if (m < 4 * kBuckets) {
    select_pair(data, m, k, lower, upper);
    return;
  }
  const K base = order_key(low), range = order_key(high) - base;
  int shift = 0;
  while ((range >> shift) >= K(kBuckets)) ++shift;
  std::array<uint32_t, kBuckets> hist{};
  for (size_t i = 0; i < m; ++i) ++hist[size_t((order_key(data[i]) - base) >> shift)];
  size_t before = 0, first = 0;
  while (before + hist[first] <= k) before += hist[first++];
  size_t last = first, through = before + hist[first];
  while (through <= k + 1) through += hist[++last];
  size_t kept = 0;
  for (size_t i = 0; i < m; ++i) {
    const size_t bucket = size_t((order_key(data[i]) - base) >> shift);
    data[kept] = data[i];
    kept += (bucket >= first) & (bucket <= last);
  }
  select_pair(data, kept, k - before, lower, upper);
}

// Scratch space for the thresholds: a pixel sample and the candidates between two pivots.
template <typename T>
struct SelectScratch {
  std::vector<T> sample, candidates;
};

constexpr size_t kSampleSize = 1024;
constexpr size_t kMinSampledPixels = 8 * kSampleSize;

// Copies the values of x[0..n) lying in [low, high] to out (in order) and counts those
// below low into below; returns the number copied. Branch-free: every value is written,
// only those in range advance the output (a branch would mispredict on ~5% of pixels).
template <typename T>
size_t filter_between_scalar(const T* x, size_t n, T low, T high, T* out, size_t& below) {
  size_t count_below = 0, kept = 0;
  for (size_t i = 0; i < n; ++i) {
    const T v = x[i];
    out[kept] = v;
    count_below += v < low;
    kept += (v >= low) & (v <= high);
  }
  below = count_below;
  return kept;
}

template <typename T>
size_t filter_between(const T* x, size_t n, T low, T high, T* out, size_t& below) {
  return filter_between_scalar(x, n, low, high, out, below);
}

#ifdef HF_METRICS_AVX2
// Lane indices that move the set lanes of an 8-bit mask to the front, in order.
struct LeftPackTable {
  alignas(32) uint32_t lanes[256][8];
  LeftPackTable() {
    for (unsigned mask = 0; mask < 256; ++mask) {
      unsigned k = 0;
      for (unsigned lane = 0; lane < 8; ++lane)
        if (mask & (1u << lane)) lanes[mask][k++] = lane;
      for (; k < 8; ++k) lanes[mask][k] = 0;
    }
  }
};
const LeftPackTable kLeftPack;

// float32 filter with AVX2 (chosen at run time): 8 pixels per step, and the in-range
// pixels packed to the front of the vector by a permutation and stored whole (out needs
// 8 spare slots), so that no branch depends on the data: the SSE2 version's per-hit loop
// mispredicted on most steps that kept a pixel.
__attribute__((target("avx2,popcnt"))) size_t filter_between_avx2(const float* x, size_t n,
                                                                 float low, float high,
                                                                 float* out, size_t& below) {
  const __m256 vlow = _mm256_set1_ps(low), vhigh = _mm256_set1_ps(high);
  __m256i below_lanes = _mm256_setzero_si256();
  size_t kept = 0, i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 lt = _mm256_cmp_ps(v, vlow, _CMP_LT_OQ);
    below_lanes = _mm256_sub_epi32(below_lanes, _mm256_castps_si256(lt));
    const unsigned in_range =
        unsigned(_mm256_movemask_ps(_mm256_andnot_ps(lt, _mm256_cmp_ps(v, vhigh, _CMP_LE_OQ))));
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kLeftPack.lanes[in_range]));
    _mm256_storeu_ps(out + kept, _mm256_permutevar8x32_ps(v, perm));
    kept += unsigned(__builtin_popcount(in_range));
  }
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), below_lanes);
  size_t tail_below = 0;
  const size_t tail_kept = filter_between_scalar(x + i, n - i, low, high, out + kept, tail_below);
  below = tail_below;
  for (uint32_t c : lanes) below += c;
  return kept + tail_kept;
}

const bool kHaveAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
#endif

#ifdef __SSE2__
// float32 maps: 8 pixels per step with SSE2 compares; the in-range mask is usually empty,
// and its set bits are copied one by one. ~1.5x faster than the scalar filter.
template <>
size_t filter_between<float>(const float* x, size_t n, float low, float high, float* out,
                             size_t& below) {
#ifdef HF_METRICS_AVX2
  if (kHaveAvx2) return filter_between_avx2(x, n, low, high, out, below);
#endif
  const __m128 vlow = _mm_set1_ps(low), vhigh = _mm_set1_ps(high);
  __m128i below_lanes = _mm_setzero_si128();  // each lane counts down by -1 per hit
  size_t kept = 0, i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128 v0 = _mm_loadu_ps(x + i), v1 = _mm_loadu_ps(x + i + 4);
    const __m128 lt0 = _mm_cmplt_ps(v0, vlow), lt1 = _mm_cmplt_ps(v1, vlow);
    below_lanes = _mm_sub_epi32(below_lanes, _mm_castps_si128(lt0));
    below_lanes = _mm_sub_epi32(below_lanes, _mm_castps_si128(lt1));
    unsigned in_range = unsigned(_mm_movemask_ps(_mm_andnot_ps(lt0, _mm_cmple_ps(v0, vhigh)))) |
                        (unsigned(_mm_movemask_ps(_mm_andnot_ps(lt1, _mm_cmple_ps(v1, vhigh)))) << 4);
    while (in_range) {
      out[kept++] = x[i + unsigned(__builtin_ctz(in_range))];
      in_range &= in_range - 1;
    }
  }
  alignas(16) uint32_t lanes[4];
  _mm_store_si128(reinterpret_cast<__m128i*>(lanes), below_lanes);
  size_t tail_below = 0;
  const size_t tail_kept = filter_between_scalar(x + i, n - i, low, high, out + kept, tail_below);
  below = size_t(lanes[0]) + lanes[1] + lanes[2] + lanes[3] + tail_below;
  return kept + tail_kept;
}
#endif

// Order statistics lo and lo + 1 of x[0..n) without copying or sorting the whole map
// (Floyd-Rivest style): two pivots taken from a pixel sample bracket the wanted ranks
// with high probability; one pass counts the pixels below the low pivot and keeps those
// between the pivots, and only these few are selected on. A bracket that misses (rare,
// any data) falls back to selecting on a full copy, so the result is always exact.
template <typename T>
void select_pair_sampled(const T* x, size_t n, size_t lo, T& lower, T& upper,
                         SelectScratch<T>& s) {
  if (n < kMinSampledPixels) {
    if (s.candidates.size() < n) s.candidates.resize(n);
    std::copy(x, x + n, s.candidates.data());
    select_pair(s.candidates.data(), n, lo, lower, upper);
    return;
  }
  // Stratified sample: one pixel at a pseudo-random offset in each of kSampleSize equal
  // slices. Addresses increase, so the hardware prefetcher hides the memory latency that
  // uniform random reads of a map not yet in cache would pay.
  s.sample.resize(kSampleSize);
  const uint64_t slice = n / kSampleSize;  // >= 8 since n >= kMinSampledPixels
  uint64_t state = 0x9E3779B97F4A7C15ull;  // fixed seed: reproducible, any seed is exact
  std::array<uint32_t, kSampleSize> positions;
  for (size_t i = 0; i < kSampleSize; ++i) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    positions[i] = uint32_t(i * slice + (((state >> 32) * slice) >> 32));
  }
  // The map is usually not in cache yet: prefetch a few samples ahead so that the reads
  // overlap (the irregular stride defeats the hardware prefetcher).
  constexpr size_t kPrefetchAhead = 16;
  for (size_t i = 0; i < kSampleSize; ++i) {
    if (i + kPrefetchAhead < kSampleSize) __builtin_prefetch(x + positions[i + kPrefetchAhead]);
    s.sample[i] = x[positions[i]];
  }
  // The sample rank of target rank lo is ~ lo * k / n with a standard deviation of at
  // most sqrt(k p (1 - p)) <= 16 for k = 1024 (9.6 at the default p = 0.9); a margin of
  // 24 keeps ~5% of the pixels as candidates and misses ~1% of the time (then: the exact
  // full selection, ~3x slower for that map).
  const double expected = double(lo) * double(kSampleSize) / double(n);
  const long margin = 24;
  const long i_low = std::max(0L, long(expected) - margin);
  const long i_high = std::min(long(kSampleSize) - 1, long(expected) + 1 + margin);
  std::nth_element(s.sample.begin(), s.sample.begin() + i_low, s.sample.end());
  const T pivot_low = s.sample[i_low];
  std::nth_element(s.sample.begin() + i_low, s.sample.begin() + i_high, s.sample.end());
  const T pivot_high = s.sample[i_high];

  // Never shrunk (no refill per map); 8 spare slots for the AVX2 filter's full-width stores.
  if (s.candidates.size() < n + 8) s.candidates.resize(n + 8);
  T* candidates = s.candidates.data();
  size_t below = 0;
  const size_t kept = filter_between(x, n, pivot_low, pivot_high, candidates, below);
  // Both wanted ranks must fall inside the candidates (ranks below .. below + kept - 1).
  if (lo >= below && lo + 1 < below + kept) {
    select_pair_bracketed(candidates, kept, lo - below, pivot_low, pivot_high, lower, upper);
    return;
  }
  std::copy(x, x + n, candidates);
  select_pair(candidates, n, lo, lower, upper);
}

// np.percentile(x, 100 - percentile) (linear method) by selection instead of a full sort.
template <typename T>
T top_percentile_threshold(const T* x, size_t n, double percentile, SelectScratch<T>& s) {
  const double virtual_index = double(n - 1) * ((100.0 - percentile) / 100.0);
  if (virtual_index >= double(n - 1)) {
    // numpy takes the maximum for both neighbours (and gamma = index + 1: irrelevant).
    return *std::max_element(x, x + n);
  }
  const size_t lo = size_t(std::floor(virtual_index));
  T lower, upper;
  select_pair_sampled(x, n, lo, lower, upper, s);
  return numpy_lerp(lower, upper, virtual_index - double(lo));
}

struct OverlapCounts {
  int64_t intersection, count_a, count_b;
};

template <typename T>
OverlapCounts overlap_one(const T* a, const T* b, size_t n, double percentile,
                          SelectScratch<T>& buf, NonFinite& bad) {
  // Selection on NaN would break std::nth_element's ordering assumptions: check first.
  if (!all_finite(a, n)) {
    bad = NonFinite::kMapA;
    return {0, 0, 0};
  }
  if (!all_finite(b, n)) {
    bad = NonFinite::kMapB;
    return {0, 0, 0};
  }
  const T thr_a = top_percentile_threshold(a, n, percentile, buf);
  const T thr_b = top_percentile_threshold(b, n, percentile, buf);
  // 32-bit counters vectorise better; maps have fewer than 2^32 pixels (checked).
  uint32_t inter = 0, ca = 0, cb = 0;
  for (size_t i = 0; i < n; ++i) {
    const uint32_t in_a = a[i] > thr_a, in_b = b[i] > thr_b;
    inter += in_a & in_b;
    ca += in_a;
    cb += in_b;
  }
  return {int64_t(inter), int64_t(ca), int64_t(cb)};
}

// ---------------------------------------------------------------- pybind11 glue

struct MapPair {
  py::array a, b;
  size_t n_maps, n_pixels;
};

// Both arrays must be C-contiguous (N, P) with the same float dtype; Python guarantees it,
// this re-check turns a misuse of the private API into an exception instead of a crash.
MapPair check_pair(const py::array& a, const py::array& b) {
  if (a.ndim() != 2 || b.ndim() != 2 || a.shape(0) != b.shape(0) || a.shape(1) != b.shape(1))
    throw std::invalid_argument("expected two (N, P) arrays of the same shape");
  if (!a.dtype().equal(b.dtype()))
    throw py::type_error("both arrays must have the same dtype");
  if (!(a.flags() & py::array::c_style) || !(b.flags() & py::array::c_style))
    throw std::invalid_argument("arrays must be C-contiguous");
  if (a.shape(1) < 1) throw std::invalid_argument("maps must have at least one pixel");
  if (uint64_t(a.shape(1)) > uint64_t(std::numeric_limits<uint32_t>::max()))
    throw std::invalid_argument("maps larger than 2^32 pixels are not supported");
  return {a, b, size_t(a.shape(0)), size_t(a.shape(1))};
}

template <typename Fn>
void dispatch_float(const py::array& a, Fn fn) {
  if (py::isinstance<py::array_t<float>>(a)) {
    fn(float{});
  } else if (py::isinstance<py::array_t<double>>(a)) {
    fn(double{});
  } else {
    throw py::type_error("maps must be float32 or float64, got dtype " +
                         std::string(py::str(a.dtype())));
  }
}

// Runs body(m, row_a, row_b, n_pixels, scratch) -> NonFinite for every map pair m on
// OpenMP threads, with the rows typed by the arrays' dtype, one Scratch<T> per thread, and
// no GIL. If a body reports NaN/inf, raises ValueError naming the first such map (after
// the loop: exceptions must not cross an OpenMP region).
template <template <typename> class Scratch, typename Body>
void parallel_over_maps(const MapPair& p, Body body) {
  const long long n_maps = (long long)p.n_maps;
  long long first_bad = n_maps;
  NonFinite first_bad_kind = NonFinite::kNone;
  dispatch_float(p.a, [&](auto tag) {
    using T = decltype(tag);
    const T* pa = static_cast<const T*>(p.a.data());
    const T* pb = static_cast<const T*>(p.b.data());
    const size_t n = p.n_pixels;
    py::gil_scoped_release release;
#pragma omp parallel
    {
      Scratch<T> scratch;
#pragma omp for schedule(dynamic, 1)
      for (long long m = 0; m < n_maps; ++m) {
        const NonFinite bad = body(size_t(m), pa + size_t(m) * n, pb + size_t(m) * n, n, scratch);
        if (bad != NonFinite::kNone) {
#pragma omp critical(hf_metrics_non_finite)
          if (m < first_bad) {
            first_bad = m;
            first_bad_kind = bad;
          }
        }
      }
    }
  });
  if (first_bad_kind != NonFinite::kNone)
    throw py::value_error("non-finite values (NaN or inf) in map " + std::to_string(first_bad) +
                          " of argument " + (first_bad_kind == NonFinite::kMapA ? "a" : "b"));
}

double checked_percentile(double percentile) {
  if (!(percentile >= 0.0 && percentile <= 100.0))
    throw std::invalid_argument("percentile must be in [0, 100]");
  return percentile;
}

py::array_t<double> spearman_maps(const py::array& a, const py::array& b) {
  MapPair p = check_pair(a, b);
  py::array_t<double> out(py::ssize_t(p.n_maps));
  double* rho = out.mutable_data();
  parallel_over_maps<RankScratch>(p, [&](size_t m, auto row_a, auto row_b, size_t n, auto& s) {
    NonFinite bad = NonFinite::kNone;
    rho[m] = spearman_one(row_a, row_b, n, s, bad);
    return bad;
  });
  return out;
}

py::tuple overlap_counts(const py::array& a, const py::array& b, double percentile) {
  MapPair p = check_pair(a, b);
  checked_percentile(percentile);
  py::array_t<int64_t> inter(py::ssize_t(p.n_maps)), ca(py::ssize_t(p.n_maps)),
      cb(py::ssize_t(p.n_maps));
  int64_t *pi = inter.mutable_data(), *pca = ca.mutable_data(), *pcb = cb.mutable_data();
  parallel_over_maps<SelectScratch>(p, [&](size_t m, auto row_a, auto row_b, size_t n, auto& s) {
    NonFinite bad = NonFinite::kNone;
    OverlapCounts c = overlap_one(row_a, row_b, n, percentile, s, bad);
    pi[m] = c.intersection;
    pca[m] = c.count_a;
    pcb[m] = c.count_b;
    return bad;
  });
  return py::make_tuple(inter, ca, cb);
}

py::array top_percentile_thresholds(const py::array& x, double percentile) {
  MapPair p = check_pair(x, x);
  checked_percentile(percentile);
  py::array out = py::array(x.dtype(), std::vector<py::ssize_t>{py::ssize_t(p.n_maps)});
  void* data = out.mutable_data();
  parallel_over_maps<SelectScratch>(p, [&](size_t m, auto row, auto, size_t n, auto& s) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(row)>>;
    if (!all_finite(row, n)) return NonFinite::kMapA;
    static_cast<T*>(data)[m] = top_percentile_threshold(row, n, percentile, s);
    return NonFinite::kNone;
  });
  return out;
}

}  // namespace

void register_metrics(py::module_& m) {
  m.def("spearman_maps", &spearman_maps, py::arg("a"), py::arg("b"),
        "Spearman rho (ties averaged) of each row pair of two C-contiguous (N, P) "
        "float32/float64 arrays; float64 (N,), NaN where a row is constant.");
  m.def("overlap_counts", &overlap_counts, py::arg("a"), py::arg("b"), py::arg("percentile"),
        "Binarise each row as row > np.percentile(row, 100 - percentile) and return int64 "
        "(N,) arrays (|A and B|, |A|, |B|).");
  m.def("top_percentile_thresholds", &top_percentile_thresholds, py::arg("x"),
        py::arg("percentile"),
        "np.percentile(row, 100 - percentile) of each row of a C-contiguous (N, P) array, "
        "in its dtype.");
}
