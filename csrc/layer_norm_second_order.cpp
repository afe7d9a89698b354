// Second derivative of a layer norm's input gradient, fused per row
// (harmonizer_fast.ops.layer_norm_double_backward; the math is in its docstring).
//
// For each row of M values: x_hat = (x - mean) * rstd, h = w * g_y. The first backward
// computed g_x = rstd (h - mean(h) - x_hat mean(h x_hat)); for an upstream u of g_x this
// returns
//   gg_gy = w * gg_h,            gg_h = rstd (u - V/M - x_hat C/M)
//   gg_w  = sum_rows g_y * gg_h
//   gg_x  = rstd^2 (x_hat k1 - (C/M)(h - a) - b (u - V/M)),  k1 = (3 b C - P + a V) / M
// with a = mean(h), b = mean(h x_hat), V = sum(u), C = sum(u x_hat), P = sum(u h).
// Two passes over each row (the five sums, then the outputs) while the row sits in cache,
// against ~15 elementwise and reduction passes over the whole tensor in torch ops.
// Inputs are C-contiguous (rows, M) arrays of one float dtype; mean/rstd (rows,).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallel_ranges.h"

namespace py = pybind11;

namespace {

struct Rows {
  int64_t rows, m;
  bool has_weight, need_gy, need_x, need_w;
};

// One block of rows [begin, end); weight-gradient partial sums go to acc_w (m doubles). The
// wanted outputs are template flags and `w` always points at m values (ones without a weight):
// with run-time flags inside the loops GCC left the output pass scalar ("control flow in loop"),
// 0.2 of the 0.5 ms of a ViT-Tiny layer's call (8 x 197 rows of 192).
template <typename T, bool NEED_GY, bool NEED_W, bool NEED_X>
__attribute__((always_inline)) inline void rows_kernel(int64_t m, int64_t begin, int64_t end, const T* x,
                                                       const T* gy, const T* up, const T* w, const T* mean,
                                                       const T* rstd, T* out_gy, T* out_x, double* acc_w) {
  const T inv_m = T(1) / T(m);
  for (int64_t r = begin; r < end; ++r) {
    const T* xr = x + r * m;
    const T* gr = gy + r * m;
    const T* ur = up + r * m;
    const T mu = mean[r], sd = rstd[r];
    T sum_h = 0, sum_hx = 0, sum_u = 0, sum_ux = 0, sum_uh = 0;
#pragma omp simd reduction(+ : sum_h, sum_hx, sum_u, sum_ux, sum_uh)
    for (int64_t j = 0; j < m; ++j) {
      const T xh = (xr[j] - mu) * sd;
      const T h = w[j] * gr[j];
      sum_h += h;
      sum_hx += h * xh;
      sum_u += ur[j];
      sum_ux += ur[j] * xh;
      sum_uh += ur[j] * h;
    }
    const T a = sum_h * inv_m, b = sum_hx * inv_m, v_m = sum_u * inv_m, c_m = sum_ux * inv_m;
    const T k1 = (T(3) * b * sum_ux - sum_uh + a * sum_u) * inv_m;
    const T f = sd * sd;
    T* og = NEED_GY ? out_gy + r * m : nullptr;
    T* ox = NEED_X ? out_x + r * m : nullptr;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      const T xh = (xr[j] - mu) * sd;
      if constexpr (NEED_GY || NEED_W) {
        const T gg_h = sd * (ur[j] - v_m - xh * c_m);
        if constexpr (NEED_GY) og[j] = w[j] * gg_h;
        if constexpr (NEED_W) acc_w[j] += double(gr[j] * gg_h);
      }
      if constexpr (NEED_X) ox[j] = f * (xh * k1 - c_m * (w[j] * gr[j] - a) - b * (ur[j] - v_m));
    }
  }
}

template <typename T, bool GY, bool W, bool X>
void rows_default(const Rows& s, int64_t b, int64_t e, const T* x, const T* gy, const T* up, const T* w,
                  const T* mean, const T* rstd, T* og, T* ox, double* acc) {
  rows_kernel<T, GY, W, X>(s.m, b, e, x, gy, up, w, mean, rstd, og, ox, acc);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define HF_LN_AVX2 1
template <typename T, bool GY, bool W, bool X>
__attribute__((target("avx2,fma"))) void rows_avx2(const Rows& s, int64_t b, int64_t e, const T* x, const T* gy,
                                                   const T* up, const T* w, const T* mean, const T* rstd, T* og,
                                                   T* ox, double* acc) {
  rows_kernel<T, GY, W, X>(s.m, b, e, x, gy, up, w, mean, rstd, og, ox, acc);
}
#endif

template <typename T>
using RowsFn = void (*)(const Rows&, int64_t, int64_t, const T*, const T*, const T*, const T*, const T*, const T*,
                        T*, T*, double*);

template <typename T, bool GY, bool W, bool X>
RowsFn<T> rows_instance(bool avx2) {
#ifdef HF_LN_AVX2
  if (avx2) return &rows_avx2<T, GY, W, X>;
#endif
  (void)avx2;
  return &rows_default<T, GY, W, X>;
}

// The kernel instance for the wanted outputs.
template <typename T>
RowsFn<T> pick_rows(bool avx2, bool gy, bool w, bool x) {
  const RowsFn<T> table[8] = {rows_instance<T, 0, 0, 0>(avx2), rows_instance<T, 0, 0, 1>(avx2),
                              rows_instance<T, 0, 1, 0>(avx2), rows_instance<T, 0, 1, 1>(avx2),
                              rows_instance<T, 1, 0, 0>(avx2), rows_instance<T, 1, 0, 1>(avx2),
                              rows_instance<T, 1, 1, 0>(avx2), rows_instance<T, 1, 1, 1>(avx2)};
  return table[int(gy) * 4 + int(w) * 2 + int(x)];
}

template <typename T>
using Arr = py::array_t<T, py::array::c_style>;

template <typename T>
void check_rows(const Arr<T>& a, int64_t rows, int64_t m, const char* name) {
  if (a.ndim() != 2 || a.shape(0) != rows || a.shape(1) != m)
    throw std::invalid_argument(std::string("layer_norm_double_backward: `") + name + "` must be (rows, M)");
}

template <typename T>
void layer_norm_double_backward(Arr<T> x, Arr<T> grad_out, Arr<T> upstream, py::object weight, Arr<T> mean,
                                Arr<T> rstd, py::object out_grad_out, py::object out_x, py::object out_weight,
                                int num_threads) {
  if (x.ndim() != 2) throw std::invalid_argument("layer_norm_double_backward: `x` must be (rows, M)");
  const int64_t rows = x.shape(0), m = x.shape(1);
  check_rows(grad_out, rows, m, "grad_out");
  check_rows(upstream, rows, m, "upstream");
  if (mean.size() != rows || rstd.size() != rows)
    throw std::invalid_argument("layer_norm_double_backward: `mean` and `rstd` must have one value per row");
  Rows s{rows, m, !weight.is_none(), !out_grad_out.is_none(), !out_x.is_none(), !out_weight.is_none()};
  if (s.need_w && !s.has_weight)
    throw std::invalid_argument("layer_norm_double_backward: a weight gradient needs the weight");
  Arr<T> w_arr, og_arr, ox_arr, ow_arr;
  const T* w = nullptr;
  T *og = nullptr, *ox = nullptr, *ow = nullptr;
  // outputs are written in place: a converted copy would silently lose them
  auto exact = [](py::object o, const char* name) {
    if (!Arr<T>::check_(o))
      throw std::invalid_argument(std::string("layer_norm_double_backward: `") + name +
                                  "` must be a C-contiguous array of the inputs' dtype");
    return o.cast<Arr<T>>();
  };
  auto vector_of = [m, &exact](py::object o, const char* name) {
    auto a = exact(o, name);
    if (a.size() != m) throw std::invalid_argument(std::string("layer_norm_double_backward: `") + name + "` must have M values");
    return a;
  };
  std::vector<T> ones;  // h = w * g_y with w = 1 when there is no weight (one loop form)
  if (s.has_weight) {
    w_arr = vector_of(weight, "weight");
    w = w_arr.data();
  } else {
    ones.assign(size_t(m), T(1));
    w = ones.data();
  }
  if (s.need_gy) { og_arr = exact(out_grad_out, "out_grad_out"); check_rows(og_arr, rows, m, "out_grad_out"); og = og_arr.mutable_data(); }
  if (s.need_x) { ox_arr = exact(out_x, "out_x"); check_rows(ox_arr, rows, m, "out_x"); ox = ox_arr.mutable_data(); }
  if (s.need_w) { ow_arr = vector_of(out_weight, "out_weight"); ow = ow_arr.mutable_data(); }
  const T *px = x.data(), *pg = grad_out.data(), *pu = upstream.data(), *pm = mean.data(), *pr = rstd.data();
  bool avx2 = false;
#ifdef HF_LN_AVX2
  avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  const RowsFn<T> kernel = pick_rows<T>(avx2, s.need_gy, s.need_w, s.need_x);
  const int threads = threads_for(num_threads, rows * m, rows);
  std::vector<double> acc(s.need_w ? size_t(threads) * size_t(m) : 0, 0.0);
  {
    py::gil_scoped_release release;
    parallel_ranges(rows, threads, 1, [&](int64_t begin, int64_t end, int t) {
      kernel(s, begin, end, px, pg, pu, w, pm, pr, og, ox, s.need_w ? acc.data() + size_t(t) * size_t(m) : nullptr);
    });
    if (s.need_w) {
      for (int64_t j = 0; j < m; ++j) {
        double total = 0;
        for (int t = 0; t < threads; ++t) total += acc[size_t(t) * size_t(m) + size_t(j)];
        ow[j] = T(total);
      }
    }
  }
}

}  // namespace

void register_layer_norm(py::module_& m) {
  const char* doc =
      "Second derivative of a layer norm's input gradient over the last dimension: writes "
      "gg_grad_out, gg_x (rows, M) and gg_weight (M,) into the given C-contiguous arrays (None: "
      "not wanted) for x, grad_out, upstream (rows, M), weight (M,) or None, mean and rstd (rows,).";
  m.def("layer_norm_double_backward_f32", &layer_norm_double_backward<float>, py::arg("x"), py::arg("grad_out"),
        py::arg("upstream"), py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("out_grad_out"),
        py::arg("out_x"), py::arg("out_weight"), py::arg("num_threads"), doc);
  m.def("layer_norm_double_backward_f64", &layer_norm_double_backward<double>, py::arg("x"), py::arg("grad_out"),
        py::arg("upstream"), py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("out_grad_out"),
        py::arg("out_x"), py::arg("out_weight"), py::arg("num_threads"), doc);
}
