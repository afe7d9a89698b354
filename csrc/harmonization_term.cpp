// The harmonization term of the loss (steps 2-5 of harmonizer_fast.training.harmonization) on the
// CPU, one map at a time, with its gradient with respect to the input gradient computed in the
// same pass (harmonizer_fast.ops.harmonization_term_cpu; the pure-torch reference_harmonization_term
// is the specification). For an input gradient G (N, C, H, W), human maps M (N, H, W), tokens t:
//
//   s = mean_c G                          z = (s - mu_s) / (sigma_s + eps),  a = relu(z)
//   h = relu((M - mu_M) / (sigma_M + eps)) / (max h + eps_max) * (max a + eps_max)   (max a: no gradient)
//   d_0 = a - h,  d_{l+1} = D d_l        (D: 5x5 binomial, stride 2, TensorFlow 'SAME' zero padding)
//   loss = (1 / L) sum_l (1 / (N h_l w_l)) sum_n t_n |d_l[n]|^2
//
// with population standard deviations over each map (sigma = 0: z = 0). The gradient, for an
// upstream 1: r_l = 2 t_n / (L N h_l w_l) d_l, back through the pyramid u_{L-1} = r_{L-1},
// u_l = r_l + D^T u_{l+1}; then g_z = u_0 [z > 0] and, with c = s - mu_s, S = sigma_s + eps and P
// the H W pixels of a map,
//
//   ds = (g_z - mean g_z) / S - c <g_z, c> / (P sigma_s S^2)      (last term 0 when sigma_s = 0)
//
// and dG[n, c] = ds / C: the caller scales ds by the upstream gradient and broadcasts it over the
// channels. Each map's statistics accumulate in double; the maps run in parallel (OpenMP), and
// their loss terms are summed in map order afterwards (the same value for any thread count).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

// the relu selects below are only vectorized when operations may be assumed not to trap (as in
// gelu_second_order.cpp); functions of the headers above (std::max) are then not inlined into this
// file's loops, which write their selects out
#pragma GCC optimize("no-trapping-math")

#ifdef HF_HAVE_OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

constexpr int kTaps = 5;

// TensorFlow 'SAME' for one side of length n, kernel 5, stride 2: ceil(n / 2) outputs and the
// padding before them (the total max((out - 1) 2 + 5 - n, 0), its floor half first).
struct Side {
  int in, out, before;
  explicit Side(int n) : in(n), out((n + 1) / 2), before(std::max((out - 1) * 2 + kTaps - n, 0) / 2) {}
};

// One pyramid step on an h x w map: y = D x (separable: along the rows, then the columns).
// `tmp` holds h x out_w values, `row` 4 (out_w + 2): a zero-padded row and its even and odd
// entries, so that the 5 taps read unit-stride arrays.
template <typename T>
void downsample(const T* x, const Side& rows, const Side& cols, const T* taps, T* tmp, T* row, T* y) {
  const int half = cols.out + 2;  // the padded row, 2 (out - 1) + 5 values, fits in 2 half
  T *padded = row, *even = row + 2 * half, *odd = row + 3 * half;
  std::fill(padded, padded + 2 * half, T(0));
  for (int r = 0; r < rows.in; ++r) {
    std::copy(x + size_t(r) * cols.in, x + size_t(r + 1) * cols.in, padded + cols.before);
#pragma omp simd
    for (int m = 0; m < half; ++m) {
      even[m] = padded[2 * m];
      odd[m] = padded[2 * m + 1];
    }
    T* tr = tmp + size_t(r) * cols.out;
#pragma omp simd
    for (int j = 0; j < cols.out; ++j)  // padded 2j + k: even[j], odd[j], even[j+1], odd[j+1], even[j+2]
      tr[j] = taps[0] * even[j] + taps[1] * odd[j] + taps[2] * even[j + 1] + taps[3] * odd[j + 1] +
              taps[4] * even[j + 2];
  }
  for (int i = 0; i < rows.out; ++i) {
    T* yr = y + size_t(i) * cols.out;
    std::fill(yr, yr + cols.out, T(0));
    for (int k = 0; k < kTaps; ++k) {
      const int r = 2 * i + k - rows.before;
      if (r < 0 || r >= rows.in) continue;
      const T* tr = tmp + size_t(r) * cols.out;
      const T tap = taps[k];
#pragma omp simd
      for (int j = 0; j < cols.out; ++j) yr[j] += tap * tr[j];
    }
  }
}

// x += D^T y (the adjoint of downsample): y is out_h x out_w, x is h x w; `tmp` holds h x out_w,
// `row` 5 (out_w + 2) values.
template <typename T>
void downsample_adjoint_add(const T* y, const Side& rows, const Side& cols, const T* taps, T* tmp, T* row, T* x) {
  std::fill(tmp, tmp + size_t(rows.in) * cols.out, T(0));
  for (int i = 0; i < rows.out; ++i) {
    const T* yr = y + size_t(i) * cols.out;
    for (int k = 0; k < kTaps; ++k) {
      const int r = 2 * i + k - rows.before;
      if (r < 0 || r >= rows.in) continue;
      T* tr = tmp + size_t(r) * cols.out;
      const T tap = taps[k];
#pragma omp simd
      for (int j = 0; j < cols.out; ++j) tr[j] += tap * yr[j];
    }
  }
  // padded entry 2m gets taps 0, 2, 4 of outputs m, m - 1, m - 2; entry 2m + 1 taps 1, 3 of m, m - 1
  const int half = cols.out + 2;
  T *shifted = row, *even = row + half, *odd = row + 2 * half, *padded = row + 3 * half;  // shifted[j + 2] = tmp[j]
  std::fill(row, row + 5 * half, T(0));
  for (int r = 0; r < rows.in; ++r) {
    std::copy(tmp + size_t(r) * cols.out, tmp + size_t(r + 1) * cols.out, shifted + 2);
#pragma omp simd
    for (int m = 0; m < cols.out; ++m) {
      even[m] = taps[0] * shifted[m + 2] + taps[2] * shifted[m + 1] + taps[4] * shifted[m];
      odd[m] = taps[1] * shifted[m + 2] + taps[3] * shifted[m + 1];
    }
    even[cols.out] = taps[2] * shifted[cols.out + 1] + taps[4] * shifted[cols.out];  // m = out, out + 1
    odd[cols.out] = taps[3] * shifted[cols.out + 1];
    even[cols.out + 1] = taps[4] * shifted[cols.out + 1];
#pragma omp simd
    for (int m = 0; m < half; ++m) {
      padded[2 * m] = even[m];
      padded[2 * m + 1] = odd[m];
    }
    T* xr = x + size_t(r) * cols.in;
    const T* inside = padded + cols.before;
#pragma omp simd
    for (int c = 0; c < cols.in; ++c) xr[c] += inside[c];
  }
}

// Mean and population standard deviation of n values (two passes, in double).
template <typename T>
void moments(const T* x, int64_t n, double* mean, double* sigma) {
  double total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) total += double(x[i]);
  const double mu = total / double(n);
  double squares = 0;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < n; ++i) {
    const double c = double(x[i]) - mu;
    squares += c * c;
  }
  *mean = mu;
  *sigma = std::sqrt(squares / double(n));
}

// The largest value (a NaN anywhere in a map reaches these maxima through its mean already).
template <typename T>
T max_of(const T* x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

template <typename T>
using Arr = py::array_t<T, py::array::c_style>;

// Returns the loss; writes ds (N, H, W) for an upstream gradient of 1 when `grad` is not None.
template <typename T>
double harmonization_term(Arr<T> gradient, Arr<T> heatmaps, py::array_t<double, py::array::c_style> tokens,
                          int levels, double eps, double max_eps, py::array_t<double, py::array::c_style> taps_1d,
                          py::object grad, int threads) {
  const char* fn = "harmonization_term";
  if (gradient.ndim() != 4) throw std::invalid_argument(std::string(fn) + ": `gradient` must be (N, C, H, W)");
  const int64_t n = gradient.shape(0), channels = gradient.shape(1);
  const int height = int(gradient.shape(2)), width = int(gradient.shape(3));
  if (heatmaps.ndim() != 3 || heatmaps.shape(0) != n || heatmaps.shape(1) != height || heatmaps.shape(2) != width)
    throw std::invalid_argument(std::string(fn) + ": `heatmaps` must be (N, H, W) of the gradient's N, H, W");
  if (tokens.ndim() != 1 || tokens.shape(0) != n) throw std::invalid_argument(std::string(fn) + ": `tokens` must be (N,)");
  if (taps_1d.ndim() != 1 || taps_1d.shape(0) != kTaps) throw std::invalid_argument(std::string(fn) + ": 5 taps");
  if (levels < 1 || n < 1 || channels < 1 || height < 1 || width < 1)
    throw std::invalid_argument(std::string(fn) + ": empty input or no level");
  T* ds = nullptr;
  if (!grad.is_none()) {
    auto g = grad.cast<Arr<T>>();
    if (g.ndim() != 3 || g.shape(0) != n || g.shape(1) != height || g.shape(2) != width || !g.writeable())
      throw std::invalid_argument(std::string(fn) + ": `grad` must be a writeable (N, H, W) array");
    ds = g.mutable_data();
  }
  const T *pg = gradient.data(), *pm = heatmaps.data();
  const double* pt = tokens.data();
  T taps[kTaps];
  for (int k = 0; k < kTaps; ++k) taps[k] = T(taps_1d.data()[k]);
  const int64_t pixels = int64_t(height) * width;

  // the levels' sides and their offsets in one buffer of all levels of a map
  std::vector<Side> rows, cols;
  std::vector<int64_t> offset(levels + 1, 0);
  rows.emplace_back(height);
  cols.emplace_back(width);
  for (int l = 0; l < levels; ++l) {
    if (l > 0) {
      rows.emplace_back(rows[l - 1].out);
      cols.emplace_back(cols[l - 1].out);
    }
    offset[l + 1] = offset[l] + int64_t(rows[l].in) * cols[l].in;
  }
  std::vector<double> per_map(size_t(n) * levels, 0.0);
  int nt = std::max(1, std::min<int>(threads, int(n)));
  if (pixels * channels * n < (int64_t(1) << 15)) nt = 1;

  py::gil_scoped_release release;  // the arrays stay referenced by the arguments
#ifdef HF_HAVE_OPENMP
#pragma omp parallel num_threads(nt)
#endif
  {
    std::vector<T> s(pixels), d(offset[levels]), tmp(size_t(height) * cols[0].out), row(5 * (size_t(width) / 2 + 3)), u;
    if (ds) u.resize(offset[levels]);
#ifdef HF_HAVE_OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t m = 0; m < n; ++m) {
      // s = mean over channels
      const T* gm = pg + m * channels * pixels;
      for (int64_t p = 0; p < pixels; ++p) s[p] = gm[p];
      for (int64_t c = 1; c < channels; ++c) {
        const T* gc = gm + c * pixels;
        for (int64_t p = 0; p < pixels; ++p) s[p] += gc[p];
      }
      const T inv_c = T(1.0 / double(channels));
      for (int64_t p = 0; p < pixels; ++p) s[p] *= inv_c;
      double mu_s, sigma_s;
      moments(s.data(), pixels, &mu_s, &sigma_s);
      const double scale_s = 1.0 / (sigma_s + eps);
      const T mu_t = T(mu_s), scale_t = T(scale_s);
      // d_0 = a - h; s keeps z (its sign is the relu's gradient)
      T* d0 = d.data();
#pragma omp simd
      for (int64_t p = 0; p < pixels; ++p) {
        const T z = (s[p] - mu_t) * scale_t;
        s[p] = z;
        d0[p] = z < T(0) ? T(0) : z;  // NaN stays NaN, as torch's relu
      }
      const T a_max = max_of(d0, pixels);
      const T* hm = pm + m * pixels;
      double mu_h, sigma_h;
      moments(hm, pixels, &mu_h, &sigma_h);
      const T mu_h_t = T(mu_h), scale_h_t = T(1.0 / (sigma_h + eps));
      auto human_cut = [&](int64_t p) {  // relu of the standardized human map
        const T h = (hm[p] - mu_h_t) * scale_h_t;
        return h < T(0) ? T(0) : h;
      };
      T h_max = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : h_max)
      for (int64_t p = 0; p < pixels; ++p) {
        const T cut = human_cut(p);
        h_max = cut > h_max ? cut : h_max;
      }
      const T rescale = T((double(a_max) + max_eps) / (double(h_max) + max_eps));
#pragma omp simd
      for (int64_t p = 0; p < pixels; ++p) d0[p] -= human_cut(p) * rescale;
      // the pyramid of the difference and each level's token-weighted sum of squares
      for (int l = 0; l < levels; ++l) {
        T* dl = d.data() + offset[l];
        if (l > 0) downsample(d.data() + offset[l - 1], rows[l - 1], cols[l - 1], taps, tmp.data(), row.data(), dl);
        const int64_t size = offset[l + 1] - offset[l];
        double squares = 0;
#pragma omp simd reduction(+ : squares)
        for (int64_t p = 0; p < size; ++p) squares += double(dl[p]) * double(dl[p]);
        per_map[size_t(m) * levels + l] = pt[m] * squares / (double(levels) * double(n) * double(size));
      }
      if (!ds) continue;
      // u_l = r_l + D^T u_{l+1}, from the coarsest level
      for (int l = levels - 1; l >= 0; --l) {
        const int64_t size = offset[l + 1] - offset[l];
        const T r = T(2.0 * pt[m] / (double(levels) * double(n) * double(size)));
        const T* dl = d.data() + offset[l];
        T* ul = u.data() + offset[l];
#pragma omp simd
        for (int64_t p = 0; p < size; ++p) ul[p] = r * dl[p];
        if (l + 1 < levels) downsample_adjoint_add(u.data() + offset[l + 1], rows[l], cols[l], taps, tmp.data(), row.data(), ul);
      }
      // g_z = u_0 [z > 0]; ds = (g_z - mean g_z) / S - c <g_z, c> / (P sigma S^2)
      T* u0 = u.data();
      double sum_g = 0, dot_gz = 0;
#pragma omp simd reduction(+ : sum_g, dot_gz)
      for (int64_t p = 0; p < pixels; ++p) {
        const T gz = s[p] > T(0) ? u0[p] : T(0);
        u0[p] = gz;
        sum_g += double(gz);
        dot_gz += double(gz) * double(s[p]);
      }
      const double mean_g = sum_g / double(pixels);
      // c <g_z, c> / (P sigma S^2) = z <g_z, z> / (P sigma), as c = z S
      const double coef = sigma_s > 0 ? dot_gz / (double(pixels) * sigma_s) : 0.0;
      T* dsm = ds + m * pixels;
      const T mean_t = T(mean_g), coef_t = T(coef);
#pragma omp simd
      for (int64_t p = 0; p < pixels; ++p) dsm[p] = (u0[p] - mean_t) * scale_t - s[p] * coef_t;
    }
  }
  double loss = 0;
  for (double v : per_map) loss += v;
  return loss;
}

}  // namespace

void register_harmonization_term(py::module_& m) {
  const char* doc =
      "Loss of the harmonization term (input gradient (N, C, H, W), human maps (N, H, W), tokens (N,) "
      "float64, pyramid levels, standardization epsilon, maxima epsilon, the 5 one-dimensional pyramid "
      "taps) and, into `grad` (N, H, W) when given, its gradient with respect to the channel mean for "
      "an upstream gradient of 1 (csrc/harmonization_term.cpp).";
  m.def("harmonization_term_f32", &harmonization_term<float>, py::arg("gradient"), py::arg("heatmaps"),
        py::arg("tokens"), py::arg("levels"), py::arg("eps"), py::arg("max_eps"), py::arg("taps"),
        py::arg("grad"), py::arg("threads"), doc);
  m.def("harmonization_term_f64", &harmonization_term<double>, py::arg("gradient"), py::arg("heatmaps"),
        py::arg("tokens"), py::arg("levels"), py::arg("eps"), py::arg("max_eps"), py::arg("taps"),
        py::arg("grad"), py::arg("threads"), doc);
}
