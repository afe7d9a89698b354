// Fused per-target reductions for the ridge / PLS readouts (harmonizer_fast.neural).
//
// The matrix products of the readouts stay in NumPy's BLAS (OpenBLAS dgemm/dsyrk; see
// harmonizer_fast/neural/_backend.py for the measurements). What BLAS cannot do is the
// epilogue of each alpha: residuals r = (Y - M) / d reduced per target. NumPy needs several
// passes and an (n, t) temporary for it; the loops below do one pass with no temporary, row
// blocks of fixed size, one accumulator per block (rows are contiguous in t, so the inner
// loop vectorises): 0.3-0.6 ms instead of 1.1-18 ms at 3200 x 168.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef HF_HAVE_OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

using f64_array = py::array_t<double, py::array::c_style | py::array::forcecast>;

int n_threads_for(int64_t work) {
#ifdef HF_HAVE_OPENMP
  // These passes are memory-bound: one thread reads 3200 x 168 in ~1 ms. On the shared 2-core
  // machine a second thread made the median 60x worse (83 ms vs 1.4 ms minimum: the team's
  // barrier waits for a descheduled thread), so threads start only for really large arrays.
  return work < (1 << 23) ? 1 : omp_get_max_threads();
#else
  (void)work;
  return 1;
#endif
}

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// Rows per accumulation block: a function of n only (at least 512 rows, at most 256 blocks),
// so the order of the floating-point sums, hence every result bit, is the same whatever
// the number of threads (OMP_NUM_THREADS, OMP_DYNAMIC, the machine's load).
int64_t rows_per_block(int64_t n) { return std::max<int64_t>(512, (n + 255) / 256); }

// Calls body(i, acc) for every row i, rows grouped in fixed blocks that each add into their own
// accumulator of `width` doubles (blocks run in parallel); returns the block accumulators
// summed in block order.
template <typename Body>
std::vector<double> reduce_rows(int64_t n, int64_t width, int nt, Body body) {
  const int64_t block = rows_per_block(n);
  const int64_t n_blocks = std::max<int64_t>(1, (n + block - 1) / block);
  std::vector<double> acc((size_t)n_blocks * width, 0.0);
#ifdef HF_HAVE_OPENMP
#pragma omp parallel for schedule(static) num_threads(nt)
#else
  (void)nt;
#endif
  for (int64_t b = 0; b < n_blocks; ++b) {
    double* local = acc.data() + (size_t)b * width;
    const int64_t stop = std::min(n, (b + 1) * block);
    for (int64_t i = b * block; i < stop; ++i) body(i, local);
  }
  std::vector<double> total(acc.begin(), acc.begin() + width);
  for (int64_t b = 1; b < n_blocks; ++b)
    for (int64_t k = 0; k < width; ++k) total[k] += acc[(size_t)b * width + k];
  return total;
}

// For each of c alphas a: out[a, 0, j] = sum_i r_aij, out[a, 1, j] = sum_i r_aij^2,
// out[a, 2, j] = sum_i y_ij r_aij, with r_aij = (y_ij - m_iaj) / d_ai (d = 1 when absent), or
// r_aij = m_iaj / d_ai when m_is_residual (the caller formed the residual without the
// cancellation of y - m). M is (n, t) (c = 1, d of shape (n,), result (3, t)) or (n, c, t),
// the layout of one product F @ [W_1 B, ..., W_c B] (d of shape (c, n), result (c, 3, t)): a
// chunk of the alpha path in one pass over its rows, Y read once per row for all c alphas.
py::array_t<double> residual_moments(f64_array y, f64_array m, py::object d_obj, bool m_is_residual) {
  const bool stacked = m.ndim() == 3;
  if (y.ndim() != 2 || (m.ndim() != 2 && !stacked) || y.shape(0) != m.shape(0) ||
      y.shape(1) != m.shape(m.ndim() - 1))
    throw std::invalid_argument("residual_moments: Y must be (n, t) and M (n, t) or (n, c, t), got " +
                                shape_str(y) + " and " + shape_str(m));
  const int64_t n = y.shape(0), t = y.shape(1), c = stacked ? m.shape(1) : 1;
  f64_array d;
  const double* dp = nullptr;
  if (!d_obj.is_none()) {
    d = d_obj.cast<f64_array>();
    const bool ok = stacked ? (d.ndim() == 2 && d.shape(0) == c && d.shape(1) == n) : (d.ndim() == 1 && d.shape(0) == n);
    if (!ok)
      throw std::invalid_argument("residual_moments: d must have shape " +
                                  (stacked ? "(" + std::to_string(c) + ", " + std::to_string(n) + ")"
                                           : "(" + std::to_string(n) + ",)") +
                                  ", got " + shape_str(d));
    dp = d.data();
  }
  py::array_t<double> out = stacked ? py::array_t<double>({(py::ssize_t)c, (py::ssize_t)3, (py::ssize_t)t})
                                    : py::array_t<double>({(py::ssize_t)3, (py::ssize_t)t});
  const double* yp = y.data();
  const double* mp = m.data();
  double* op = out.mutable_data();
  {
    py::gil_scoped_release release;
    const std::vector<double> sums =
        reduce_rows(n, 3 * c * t, n_threads_for(n * c * t), [&](int64_t i, double* acc) {
          const double* yr = yp + i * t;
          for (int64_t a = 0; a < c; ++a) {
            const double inv = dp ? 1.0 / dp[a * n + i] : 1.0;
            const double* mr = mp + (i * c + a) * t;
            double* s1 = acc + 3 * a * t;
            double* s2 = s1 + t;
            double* s3 = s2 + t;
            if (m_is_residual) {
#pragma omp simd
              for (int64_t j = 0; j < t; ++j) {
                const double r = mr[j] * inv;
                s1[j] += r;
                s2[j] += r * r;
                s3[j] += yr[j] * r;
              }
            } else {
#pragma omp simd
              for (int64_t j = 0; j < t; ++j) {
                const double r = (yr[j] - mr[j]) * inv;
                s1[j] += r;
                s2[j] += r * r;
                s3[j] += yr[j] * r;
              }
            }
          }
        });
    std::copy(sums.begin(), sums.end(), op);
  }
  return out;
}

// Centres the columns of a row-major (n, p) float32/float64 array in float64: returns
// (Xc = X - mean, mean, sum_i Xc_ij^2). Two passes (the column sums, in row order as NumPy's
// X.mean(axis=0, dtype=float64); then the centred copy and its column sums of squares), where
// NumPy needs four calls (mean, subtract, square-sum, isfinite) that each read the data again.
// A non-finite value of X makes its column's mean non-finite (the caller checks the p means).
template <typename T>
py::tuple centre_columns_impl(py::array_t<T, py::array::c_style | py::array::forcecast> x) {
  if (x.ndim() != 2) throw std::invalid_argument("centre_columns: X must be 2-D, got " + shape_str(x));
  const int64_t n = x.shape(0), p = x.shape(1);
  py::array_t<double> centred({(py::ssize_t)n, (py::ssize_t)p});
  py::array_t<double> mean((py::ssize_t)p);
  py::array_t<double> sumsq((py::ssize_t)p);
  const T* xp = x.data();
  double* cp = centred.mutable_data();
  double* mp = mean.mutable_data();
  double* sp = sumsq.mutable_data();
  {
    py::gil_scoped_release release;
    std::fill(mp, mp + p, 0.0);
    std::fill(sp, sp + p, 0.0);
    for (int64_t i = 0; i < n; ++i) {
      const T* row = xp + i * p;
#pragma omp simd
      for (int64_t j = 0; j < p; ++j) mp[j] += (double)row[j];
    }
    for (int64_t j = 0; j < p; ++j) mp[j] /= (double)n;
    for (int64_t i = 0; i < n; ++i) {
      const T* row = xp + i * p;
      double* out = cp + i * p;
#pragma omp simd
      for (int64_t j = 0; j < p; ++j) {
        const double v = (double)row[j] - mp[j];
        out[j] = v;
        sp[j] += v * v;
      }
    }
  }
  return py::make_tuple(centred, mean, sumsq);
}

py::tuple centre_columns(py::array x) {
  // float32 is read as float32 (no converted copy); everything else as float64
  if (py::isinstance<py::array_t<float>>(x))
    return centre_columns_impl<float>(x.cast<py::array_t<float, py::array::c_style | py::array::forcecast>>());
  return centre_columns_impl<double>(x.cast<f64_array>());
}

// Column means of a row-major (n, t) array, accumulated in float64.
template <typename T>
std::vector<double> column_means(const T* a, int64_t n, int64_t t, int nt) {
  std::vector<double> mean = reduce_rows(n, t, nt, [&](int64_t i, double* acc) {
    const T* r = a + i * t;
#pragma omp simd
    for (int64_t j = 0; j < t; ++j) acc[j] += (double)r[j];
  });
  for (int64_t j = 0; j < t; ++j) mean[j] /= (double)n;
  return mean;
}

// Pearson correlation of each column pair, two passes (means, then centred sums) so the
// result does not suffer the cancellation of the one-pass moment formula.
template <typename T>
py::array_t<double> pearson_columns(py::array_t<T, py::array::c_style | py::array::forcecast> a,
                                    py::array_t<T, py::array::c_style | py::array::forcecast> b) {
  if (a.ndim() != 2 || b.ndim() != 2 || a.shape(0) != b.shape(0) || a.shape(1) != b.shape(1))
    throw std::invalid_argument("pearson_per_target: Y_true and Y_pred must be 2-D of the same shape, got " +
                                shape_str(a) + " and " + shape_str(b));
  const int64_t n = a.shape(0), t = a.shape(1);
  py::array_t<double> out((py::ssize_t)t);
  const T* ap = a.data();
  const T* bp = b.data();
  double* op = out.mutable_data();
  {
    py::gil_scoped_release release;
    const int nt = n_threads_for(n * t);
    const std::vector<double> ma = column_means(ap, n, t, nt);
    const std::vector<double> mb = column_means(bp, n, t, nt);
    const double* mav = ma.data();
    const double* mbv = mb.data();
    const std::vector<double> sums = reduce_rows(n, 3 * t, nt, [&](int64_t i, double* acc) {
      const T* ar = ap + i * t;
      const T* br = bp + i * t;
      double* sab = acc;
      double* saa = acc + t;
      double* sbb = acc + 2 * t;
#pragma omp simd
      for (int64_t j = 0; j < t; ++j) {
        const double x = (double)ar[j] - mav[j];
        const double z = (double)br[j] - mbv[j];
        sab[j] += x * z;
        saa[j] += x * x;
        sbb[j] += z * z;
      }
    });
    for (int64_t j = 0; j < t; ++j) {
      const double denom = std::sqrt(sums[t + j]) * std::sqrt(sums[2 * t + j]);
      op[j] = denom > 0.0 ? sums[j] / denom : std::nan("");
    }
  }
  return out;
}

py::array_t<double> pearson_per_target(py::array a, py::array b) {
  // float32 inputs are read as float32 (no converted copy) and accumulated in float64.
  if (py::isinstance<py::array_t<float>>(a) && py::isinstance<py::array_t<float>>(b))
    return pearson_columns<float>(a.cast<py::array_t<float, py::array::c_style | py::array::forcecast>>(),
                                  b.cast<py::array_t<float, py::array::c_style | py::array::forcecast>>());
  return pearson_columns<double>(a.cast<f64_array>(), b.cast<f64_array>());
}

}  // namespace

void register_ridge(py::module_& m) {
  m.def("ridge_residual_moments", &residual_moments, py::arg("Y"), py::arg("M"), py::arg("d") = py::none(),
        py::arg("m_is_residual") = false,
        "Per-column sums of r, r^2 and Y*r for r = (Y - M) / d[:, None], or r = M / d[:, None] when "
        "m_is_residual (float64, (3, n_targets)); with M of shape (n, c, t) and d of shape (c, n), the "
        "same for each of c stacked alphas ((c, 3, n_targets)). Bitwise identical whatever the thread "
        "count.");
  m.def("centre_columns", &centre_columns, py::arg("X"),
        "(X - mean, mean, column sums of squares of X - mean) in float64 for a 2-D float32/float64 array.");
  m.def("pearson_per_target", &pearson_per_target, py::arg("Y_true"), py::arg("Y_pred"),
        "Pearson correlation of each column pair of two (n_samples, n_targets) arrays (NaN where a "
        "column is constant).");
}
