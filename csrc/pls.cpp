// NIPALS inner loop of the PLS readout (harmonizer_fast/neural/pls_nipals.py), in target space, and
// the per-component deflation step with the choice of the next start column.
//
// Each PLS component runs a power iteration v <- M v / ||M v|| on the small symmetric
// M = S^T S (t x t, S the p x t cross-covariance of the deflated data) until the X weights
// u_i = S v_i / (||S v_i|| + eps) move by less than tol (squared norm), evaluated from M alone:
//   ||u_i - u_{i-1}||^2 = c_i^2 v_i.M v_i + c_{i-1}^2 v_{i-1}.M v_{i-1} - 2 c_i c_{i-1} v_i.M v_{i-1},
// with c_i = 1 / (||S v_i|| + eps). The iterates and the stopping iteration are those of
// scikit-learn's NIPALS. In Python each iteration costs ~8 NumPy calls (~30 us of overhead
// at t = 40, where the arithmetic takes ~2 us); this loop removes the overhead.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

using f64_array = py::array_t<double, py::array::c_style | py::array::forcecast>;

// Eight independent partial sums: the compiler vectorises them (a single running sum cannot
// be reordered without -ffast-math), ~4x faster at t = 500; the order is fixed, so are the bits.
double dot(const double* a, const double* b, int64_t t) {
  double part[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t j = 0;
  for (; j + 8 <= t; j += 8)
    for (int k = 0; k < 8; ++k) part[k] += a[j + k] * b[j + k];
  double s = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; j < t; ++j) s += a[j] * b[j];
  return s;
}

// out = M v for a row-major symmetric (t, t) M.
void symv(const double* M, const double* v, double* out, int64_t t) {
  for (int64_t j = 0; j < t; ++j) out[j] = dot(M + j * t, v, t);
}

// Returns (v, n_iter): the last target-space iterate (unit norm except at the start vector
// e_start) and the NIPALS iteration count (max_iter when tol was not reached).
py::tuple power_iteration(f64_array M_arr, int64_t start, double tol, int64_t max_iter, double eps) {
  if (M_arr.ndim() != 2 || M_arr.shape(0) != M_arr.shape(1))
    throw std::invalid_argument("pls_power_iteration: M must be square (t, t), got ndim " +
                                std::to_string(M_arr.ndim()));
  const int64_t t = M_arr.shape(0);
  if (start < 0 || start >= t)
    throw std::invalid_argument("pls_power_iteration: start " + std::to_string(start) + " outside [0, " +
                                std::to_string(t) + ")");
  if (max_iter < 1) throw std::invalid_argument("pls_power_iteration: max_iter must be >= 1");
  const double* M = M_arr.data();
  py::array_t<double> v_out((py::ssize_t)t);
  int64_t n_iter = max_iter;
  {
    py::gil_scoped_release release;
    std::vector<double> v(t, 0.0), Mv(t), prev_v(t), prev_Mv(t);
    v[start] = 1.0;
    for (int64_t j = 0; j < t; ++j) Mv[j] = M[j * t + start];
    double norm_sq = Mv[start];  // v.Mv = ||S v||^2
    bool have_prev = false;
    double prev_scale = 0.0;
    for (int64_t i = 0; i < max_iter; ++i) {
      const double scale = 1.0 / (std::sqrt(std::max(norm_sq, 0.0)) + eps);
      if (have_prev) {
        const double u_sq = scale * scale * norm_sq;
        const double prev_u_sq = prev_scale * prev_scale * dot(prev_v.data(), prev_Mv.data(), t);
        const double cross = scale * prev_scale * dot(v.data(), prev_Mv.data(), t);
        if (u_sq + prev_u_sq - 2.0 * cross < tol) {
          n_iter = i + 1;
          break;
        }
      }
      if (i == max_iter - 1) break;  // scikit-learn keeps the last iterate's weights
      // the next v is proportional to S^T u_i = scale * M v_i: normalised so the recursion
      // neither overflows nor underflows (only directions matter)
      std::swap(prev_v, v);
      std::swap(prev_Mv, Mv);
      prev_scale = scale;
      have_prev = true;
      const double inv_norm = 1.0 / std::sqrt(dot(prev_Mv.data(), prev_Mv.data(), t));
      for (int64_t j = 0; j < t; ++j) v[j] = prev_Mv[j] * inv_norm;
      symv(M, v.data(), Mv.data(), t);
      norm_sq = dot(v.data(), Mv.data(), t);
    }
    std::copy(v.begin(), v.end(), v_out.mutable_data());
  }
  return py::make_tuple(v_out, n_iter);
}


// A C-contiguous float64 array the kernel may write into (the deflated Y and its cross-product).
double* writable(py::array& a, const char* what, py::ssize_t ndim) {
  if (!py::isinstance<py::array_t<double>>(a) || a.ndim() != ndim || !(a.flags() & py::array::c_style) ||
      !a.writeable())
    throw std::invalid_argument(std::string("pls: ") + what + " must be a writable C-contiguous float64 array of " +
                                std::to_string(ndim) + " dimension(s)");
  return static_cast<double*>(a.mutable_data());
}

// The start column of the next NIPALS component, as scikit-learn chooses it: columns of Y whose
// largest |entry| is below 10 eps are zeroed (in Y and in its cross-product `cross`, one
// column per target), then the first column whose largest |entry| exceeds eps starts the power
// iteration; -1 when there is none (the residual is constant).
int64_t start_from(double* y, int64_t n, int64_t t, double* cross, int64_t m, const std::vector<double>& largest,
                   double eps) {
  int64_t first = -1;
  for (int64_t j = 0; j < t; ++j) {
    if (largest[j] < 10.0 * eps) {
      for (int64_t i = 0; i < n; ++i) y[i * t + j] = 0.0;
      for (int64_t r = 0; r < m; ++r) cross[r * t + j] = 0.0;
    } else if (first < 0 && largest[j] > eps) {
      first = j;
    }
  }
  return first;
}

void check_cross(const py::array& y, const py::array& cross) {
  if (cross.shape(1) != y.shape(1))
    throw std::invalid_argument("pls: Y and its cross-product must have as many columns, got " +
                                std::to_string(y.shape(1)) + " and " + std::to_string(cross.shape(1)));
}

int64_t start_column(py::array y_arr, py::array cross_arr, double eps) {
  double* y = writable(y_arr, "Y", 2);
  double* cross = writable(cross_arr, "cross", 2);
  check_cross(y_arr, cross_arr);
  const int64_t n = y_arr.shape(0), t = y_arr.shape(1), m = cross_arr.shape(0);
  py::gil_scoped_release release;
  std::vector<double> largest(t, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < t; ++j) largest[j] = std::max(largest[j], std::fabs(y[i * t + j]));
  return start_from(y, n, t, cross, m, largest, eps);
}

// One deflation step of NIPALS in one pass: Y -= xi delta^T, cross -= coeff (g delta^T)
// (the products rounded in NumPy's order: outer product first, then the scale), then the next
// start column as start_column() finds it. Replaces ~10 small NumPy calls per component.
int64_t deflate(py::array y_arr, f64_array xi_arr, f64_array delta_arr, py::array cross_arr, f64_array g_arr,
                double coeff, double eps) {
  double* y = writable(y_arr, "Y", 2);
  double* cross = writable(cross_arr, "cross", 2);
  check_cross(y_arr, cross_arr);
  const int64_t n = y_arr.shape(0), t = y_arr.shape(1), m = cross_arr.shape(0);
  if (xi_arr.ndim() != 1 || xi_arr.shape(0) != n || delta_arr.ndim() != 1 || delta_arr.shape(0) != t ||
      g_arr.ndim() != 1 || g_arr.shape(0) != m)
    throw std::invalid_argument("pls_deflate: xi, delta, g must be 1-D of lengths " + std::to_string(n) + ", " +
                                std::to_string(t) + ", " + std::to_string(m));
  const double* xi = xi_arr.data();
  const double* delta = delta_arr.data();
  const double* g = g_arr.data();
  py::gil_scoped_release release;
  std::vector<double> largest(t, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    double* row = y + i * t;
    for (int64_t j = 0; j < t; ++j) {
      row[j] -= xi[i] * delta[j];
      largest[j] = std::max(largest[j], std::fabs(row[j]));
    }
  }
  for (int64_t r = 0; r < m; ++r) {
    double* row = cross + r * t;
    for (int64_t j = 0; j < t; ++j) row[j] -= coeff * (g[r] * delta[j]);
  }
  return start_from(y, n, t, cross, m, largest, eps);
}

}  // namespace

void register_pls(py::module_& m) {
  m.def("pls_power_iteration", &power_iteration, py::arg("M"), py::arg("start"), py::arg("tol"),
        py::arg("max_iter"), py::arg("eps"),
        "NIPALS power iteration of one PLS component in target space: returns (v, n_iter).");
  m.def("pls_start_column", &start_column, py::arg("Y"), py::arg("cross"), py::arg("eps"),
        "Zero the constant columns of Y and cross (in place); the first non-constant column, or -1.");
  m.def("pls_deflate", &deflate, py::arg("Y"), py::arg("xi"), py::arg("delta"), py::arg("cross"), py::arg("g"),
        py::arg("coeff"), py::arg("eps"),
        "Y -= outer(xi, delta), cross -= coeff * outer(g, delta) in place, then pls_start_column(Y, cross).");
}
