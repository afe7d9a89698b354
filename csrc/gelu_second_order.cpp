// The x-term of the second derivative of GELU's input gradient, fused
// (harmonizer_fast.training.activation_double_backward, exact GELU y = x Phi(x)):
//
//   out = y''(x) * g * u,   y''(x) = phi(x) (2 - x^2),   phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
//
// one pass reading x, g, u and writing out, against six elementwise passes in torch ops.
// float32 uses a vectorizable exp (Cody-Waite reduction, degree-6 polynomial: relative error
// below 2e-7 over the range used; AVX-512 intrinsics where the CPU has them, else the compiler's
// SSE2 vectorization); float64 uses std::exp.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

// The selects and the float-to-int conversion of exp_nonpositive are only if-converted (and the
// loop vectorized) when floating-point operations may be assumed not to trap and to be finite
// (a NaN or infinite x still gives NaN: the factor 2 - x^2 carries it).
// GCC 12 vectorizes it (SSE2, 4 floats) under this pragma; an avx2-target clone stayed scalar.
#pragma GCC optimize("no-trapping-math")
#include "exp_nonpositive.h"
#include "parallel_ranges.h"

namespace py = pybind11;

namespace {

constexpr double kInvSqrt2Pi = 0.39894228040143267794;

__attribute__((always_inline)) inline void kernel_f32(const float* x, const float* g, const float* u, float* out,
                                                      int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float x2 = x[i] * x[i];
    out[i] = float(kInvSqrt2Pi) * exp_nonpositive(-0.5f * x2) * (2.0f - x2) * g[i] * u[i];
  }
}

void block_f32_default(const float* x, const float* g, const float* u, float* out, int64_t b, int64_t e) {
  kernel_f32(x, g, u, out, b, e);
}

#ifdef HF_HAVE_AVX512_EXP
// The same term 16 floats at a time (the loop above vectorizes for SSE2 only): ~2x faster alone.
__attribute__((target("avx512f"))) void block_f32_avx512(const float* x, const float* g, const float* u, float* out,
                                                          int64_t b, int64_t e) {
  const __m512 half = _mm512_set1_ps(-0.5f), two = _mm512_set1_ps(2.0f), c = _mm512_set1_ps(float(kInvSqrt2Pi));
  auto term = [&](__m512 xv, __m512 gv, __m512 uv) {
    const __m512 x2 = _mm512_mul_ps(xv, xv);
    const __m512 pdf = _mm512_mul_ps(c, exp_nonpositive_avx512(_mm512_mul_ps(half, x2)));
    return _mm512_mul_ps(_mm512_mul_ps(pdf, _mm512_sub_ps(two, x2)), _mm512_mul_ps(gv, uv));
  };
  int64_t i = b;
  for (; i + 16 <= e; i += 16)
    _mm512_storeu_ps(out + i, term(_mm512_loadu_ps(x + i), _mm512_loadu_ps(g + i), _mm512_loadu_ps(u + i)));
  if (i < e) {
    const __mmask16 tail = __mmask16((1u << (e - i)) - 1u);
    _mm512_mask_storeu_ps(out + i, tail, term(_mm512_maskz_loadu_ps(tail, x + i), _mm512_maskz_loadu_ps(tail, g + i),
                                              _mm512_maskz_loadu_ps(tail, u + i)));
  }
}
#endif


void block_f64(const double* x, const double* g, const double* u, double* out, int64_t b, int64_t e) {
  for (int64_t i = b; i < e; ++i) {
    const double x2 = x[i] * x[i];
    out[i] = kInvSqrt2Pi * std::exp(-0.5 * x2) * (2.0 - x2) * g[i] * u[i];
  }
}

template <typename T>
using Arr = py::array_t<T, py::array::c_style>;

template <typename T>
void gelu_second_order_term(py::object x_obj, py::object g_obj, py::object u_obj, py::object out_obj, int num_threads) {
  auto exact = [](py::object o, const char* name) {
    if (!Arr<T>::check_(o))
      throw std::invalid_argument(std::string("gelu_second_order_term: `") + name +
                                  "` must be a C-contiguous array of one float dtype");
    return o.cast<Arr<T>>();
  };
  Arr<T> x = exact(x_obj, "x"), g = exact(g_obj, "grad"), u = exact(u_obj, "upstream"), out = exact(out_obj, "out");
  const int64_t n = x.size();
  if (g.size() != n || u.size() != n || out.size() != n)
    throw std::invalid_argument("gelu_second_order_term: `x`, `grad`, `upstream` and `out` must have the same size");
  const T *px = x.data(), *pg = g.data(), *pu = u.data();
  T* po = out.mutable_data();
  const int threads = threads_for(num_threads, n, n);
  py::gil_scoped_release release;
  parallel_ranges(n, threads, 16, [&](int64_t begin, int64_t end, int) {
    if constexpr (std::is_same<T, float>::value) {
#ifdef HF_HAVE_AVX512_EXP
      static const bool avx512 = __builtin_cpu_supports("avx512f");
      if (avx512) return block_f32_avx512(px, pg, pu, po, begin, end);
#endif
      block_f32_default(px, pg, pu, po, begin, end);
    } else {
      block_f64(px, pg, pu, po, begin, end);
    }
  });
}

}  // namespace

void register_gelu(py::module_& m) {
  const char* doc =
      "out = y''(x) * grad * upstream for exact GELU (y'' = phi(x) (2 - x^2)), written into `out`; "
      "all C-contiguous arrays of one size and dtype.";
  m.def("gelu_second_order_term_f32", &gelu_second_order_term<float>, py::arg("x"), py::arg("grad"),
        py::arg("upstream"), py::arg("out"), py::arg("num_threads"), doc);
  m.def("gelu_second_order_term_f64", &gelu_second_order_term<double>, py::arg("x"), py::arg("grad"),
        py::arg("upstream"), py::arg("out"), py::arg("num_threads"), doc);
}
