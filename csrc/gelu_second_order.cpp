// The x-term of the second derivative of GELU's input gradient, fused
// (harmonizer_fast.training.activation_double_backward, exact GELU y = x Phi(x)):
//
//   out = y''(x) * g * u,   y''(x) = phi(x) (2 - x^2),   phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
//
// one pass reading x, g, u and writing out, against six elementwise passes in torch ops; and
// the training backward with the closed form's x-gradient added, out = y'(x) g + a, in one pass.
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
// out[i] = term(x, g, u) over [b, e), 16 lanes at a time and a masked tail
template <typename Term>
__attribute__((target("avx512f"), always_inline)) inline void map16(Term&& term, const float* x, const float* g,
                                                                    const float* u, float* out, int64_t b, int64_t e) {
  int64_t i = b;
  for (; i + 16 <= e; i += 16)
    _mm512_storeu_ps(out + i, term(_mm512_loadu_ps(x + i), _mm512_loadu_ps(g + i), _mm512_loadu_ps(u + i)));
  if (i < e) {
    const __mmask16 tail = __mmask16((1u << (e - i)) - 1u);
    _mm512_mask_storeu_ps(out + i, tail, term(_mm512_maskz_loadu_ps(tail, x + i), _mm512_maskz_loadu_ps(tail, g + i),
                                              _mm512_maskz_loadu_ps(tail, u + i)));
  }
}

// The same term 16 floats at a time (the loop above vectorizes for SSE2 only): ~2x faster alone.
__attribute__((target("avx512f"))) void block_f32_avx512(const float* x, const float* g, const float* u, float* out,
                                                          int64_t b, int64_t e) {
  const __m512 half = _mm512_set1_ps(-0.5f), two = _mm512_set1_ps(2.0f), c = _mm512_set1_ps(float(kInvSqrt2Pi));
  auto term = [&](__m512 xv, __m512 gv, __m512 uv) {
    const __m512 x2 = _mm512_mul_ps(xv, xv);
    const __m512 pdf = _mm512_mul_ps(c, exp_nonpositive_avx512(_mm512_mul_ps(half, x2)));
    return _mm512_mul_ps(_mm512_mul_ps(pdf, _mm512_sub_ps(two, x2)), _mm512_mul_ps(gv, uv));
  };
  map16(term, x, g, u, out, b, e);
}
#endif


void block_f64(const double* x, const double* g, const double* u, double* out, int64_t b, int64_t e) {
  for (int64_t i = b; i < e; ++i) {
    const double x2 = x[i] * x[i];
    out[i] = kInvSqrt2Pi * std::exp(-0.5 * x2) * (2.0 - x2) * g[i] * u[i];
  }
}

// Both outputs of the GELU input gradient's backward in one pass over x, g and u (gelu_backward
// of u and the x-term read x and u twice):
//   gg_grad = y'(x) u,  y'(x) = Phi(x) + x phi(x);   gg_x = phi(x) (2 - x^2) g u.
// float32 Phi(x) = erfc(-x / sqrt 2) / 2 from a = |x| / sqrt 2: below a = 0.75 the Taylor series
// of erf (9 terms), above it erfc(a) = exp(-a^2) R(a) with R a degree-10 polynomial in
// 1 / (1 + a), least-squares fitted to scipy's erfc on [0.75, 9.5] (relative error 2e-7 in
// float32 arithmetic; Phi's absolute error below 1.5e-7, as torch's 0.5 (1 + erf)).
constexpr float kErfTaylor[9] = {1.128379167e+00f, -3.761263890e-01f, 1.128379167e-01f, -2.686617065e-02f,
                                 5.223977625e-03f, -8.548327023e-04f, 1.205533298e-04f, -1.492565036e-05f,
                                 1.646211437e-06f};
constexpr float kErfcTail[11] = {1.010704297e-06f, 5.641472201e-01f, 5.649079369e-01f,  2.761238648e-01f,
                                 -2.636737094e-01f, -6.096937937e-01f, -1.370358276e+00f, 7.258006290e+00f,
                                 -1.108075823e+01f, 7.968504864e+00f, -2.326092097e+00f};

// Phi(x) and phi(x) for float32 (the scheme above).
__attribute__((always_inline)) inline void cdf_pdf_f32(float x, float* cdf, float* pdf) {
  const float x2 = x * x, a = std::fabs(x) * 0.70710678118654752f, a2 = 0.5f * x2;
  float s = kErfTaylor[8];
  for (int i = 7; i >= 0; --i) s = s * a2 + kErfTaylor[i];
  const float w = 1.0f / (1.0f + a);
  float r = kErfcTail[10];
  for (int i = 9; i >= 0; --i) r = r * w + kErfcTail[i];
  const float e = exp_nonpositive(-a2);  // exp(-x^2 / 2) = exp(-a^2)
  const float erfc_a = a < 0.75f ? 1.0f - a * s : e * r;
  *cdf = x < 0.0f ? 0.5f * erfc_a : 1.0f - 0.5f * erfc_a;
  *pdf = float(kInvSqrt2Pi) * e;
}

__attribute__((always_inline)) inline void both_f32_one(float x, float g, float u, float* gg_grad, float* gg_x) {
  float cdf, pdf;
  cdf_pdf_f32(x, &cdf, &pdf);
  *gg_grad = (cdf + x * pdf) * u;
  *gg_x = pdf * (2.0f - x * x) * g * u;
}

void both_block_f32_default(const float* x, const float* g, const float* u, float* og, float* ox, int64_t b,
                            int64_t e) {
#pragma omp simd
  for (int64_t i = b; i < e; ++i) both_f32_one(x[i], g[i], u[i], og + i, ox + i);
}

#ifdef HF_HAVE_AVX512_EXP
// cdf_pdf_f32, 16 lanes
__attribute__((target("avx512f"), always_inline)) inline void cdf_pdf_f32_avx512(__m512 xv, __m512* cdf, __m512* pdf) {
  const __m512 one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f), zero = _mm512_setzero_ps();
  const __m512 a2 = _mm512_mul_ps(half, _mm512_mul_ps(xv, xv));
  const __m512 a = _mm512_mul_ps(_mm512_abs_ps(xv), _mm512_set1_ps(0.70710678118654752f));
  __m512 s = _mm512_set1_ps(kErfTaylor[8]);
  for (int i = 7; i >= 0; --i) s = _mm512_fmadd_ps(s, a2, _mm512_set1_ps(kErfTaylor[i]));
  const __m512 w = _mm512_div_ps(one, _mm512_add_ps(one, a));
  __m512 r = _mm512_set1_ps(kErfcTail[10]);
  for (int i = 9; i >= 0; --i) r = _mm512_fmadd_ps(r, w, _mm512_set1_ps(kErfcTail[i]));
  const __m512 ex = exp_nonpositive_avx512(_mm512_sub_ps(zero, a2));
  const __mmask16 small = _mm512_cmp_ps_mask(a, _mm512_set1_ps(0.75f), _CMP_LT_OQ);
  const __m512 erfc_a = _mm512_mask_blend_ps(small, _mm512_mul_ps(ex, r), _mm512_fnmadd_ps(a, s, one));
  const __m512 tail = _mm512_mul_ps(half, erfc_a);
  const __mmask16 negative = _mm512_cmp_ps_mask(xv, zero, _CMP_LT_OQ);
  *cdf = _mm512_mask_blend_ps(negative, _mm512_sub_ps(one, tail), tail);
  *pdf = _mm512_mul_ps(_mm512_set1_ps(float(kInvSqrt2Pi)), ex);
}

__attribute__((target("avx512f"))) void both_block_f32_avx512(const float* x, const float* g, const float* u,
                                                               float* og, float* ox, int64_t b, int64_t e) {
  const __m512 two = _mm512_set1_ps(2.0f);
  auto both = [&](__m512 xv, __m512 gv, __m512 uv, __m512* gg_grad, __m512* gg_x) {
    __m512 cdf, pdf;
    cdf_pdf_f32_avx512(xv, &cdf, &pdf);
    *gg_grad = _mm512_mul_ps(_mm512_fmadd_ps(xv, pdf, cdf), uv);
    *gg_x = _mm512_mul_ps(_mm512_mul_ps(pdf, _mm512_sub_ps(two, _mm512_mul_ps(xv, xv))), _mm512_mul_ps(gv, uv));
  };
  int64_t i = b;
  __m512 rg, rx;
  for (; i + 16 <= e; i += 16) {
    both(_mm512_loadu_ps(x + i), _mm512_loadu_ps(g + i), _mm512_loadu_ps(u + i), &rg, &rx);
    _mm512_storeu_ps(og + i, rg);
    _mm512_storeu_ps(ox + i, rx);
  }
  if (i < e) {
    const __mmask16 m = __mmask16((1u << (e - i)) - 1u);
    both(_mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, g + i), _mm512_maskz_loadu_ps(m, u + i), &rg, &rx);
    _mm512_mask_storeu_ps(og + i, m, rg);
    _mm512_mask_storeu_ps(ox + i, m, rx);
  }
}
#endif

// y'(x) = Phi(x) + x phi(x) in float64, torch's formula; phi(x) into *pdf
inline double slope_f64(double x, double* pdf) {
  *pdf = kInvSqrt2Pi * std::exp(-0.5 * x * x);
  return 0.5 * (1.0 + std::erf(x * 0.70710678118654752440)) + x * *pdf;
}

void both_block_f64(const double* x, const double* g, const double* u, double* og, double* ox, int64_t b, int64_t e) {
  for (int64_t i = b; i < e; ++i) {
    double pdf;
    og[i] = slope_f64(x[i], &pdf) * u[i];
    ox[i] = pdf * (2.0 - x[i] * x[i]) * g[i] * u[i];
  }
}

// The training backward of GELU with the closed form's x-gradient a already there:
//   out = y'(x) g + a   (gelu_backward and autograd's sum of the two gradients in one pass)
void backward_add_block_f32_default(const float* x, const float* g, const float* a, float* out, int64_t b,
                                    int64_t e) {
#pragma omp simd
  for (int64_t i = b; i < e; ++i) {
    float cdf, pdf;
    cdf_pdf_f32(x[i], &cdf, &pdf);
    out[i] = (cdf + x[i] * pdf) * g[i] + a[i];
  }
}

#ifdef HF_HAVE_AVX512_EXP
__attribute__((target("avx512f"))) void backward_add_block_f32_avx512(const float* x, const float* g, const float* a,
                                                                       float* out, int64_t b, int64_t e) {
  auto term = [&](__m512 xv, __m512 gv, __m512 av) {
    __m512 cdf, pdf;
    cdf_pdf_f32_avx512(xv, &cdf, &pdf);
    return _mm512_fmadd_ps(_mm512_fmadd_ps(xv, pdf, cdf), gv, av);
  };
  map16(term, x, g, a, out, b, e);
}
#endif

void backward_add_block_f64(const double* x, const double* g, const double* a, double* out, int64_t b, int64_t e) {
  for (int64_t i = b; i < e; ++i) {
    double pdf;
    out[i] = slope_f64(x[i], &pdf) * g[i] + a[i];
  }
}

template <typename T>
using Arr = py::array_t<T, py::array::c_style>;

// A C-contiguous array of T (outputs are written in place: a converted copy would lose them).
template <typename T>
Arr<T> exact_array(py::object o, const char* fn, const char* name) {
  if (!Arr<T>::check_(o))
    throw std::invalid_argument(std::string(fn) + ": `" + name + "` must be a C-contiguous array of one float dtype");
  return o.cast<Arr<T>>();
}

// Runs block(begin, end) over [0, n) on up to num_threads threads, without the GIL.
template <typename Block>
void run_blocks(int64_t n, int num_threads, Block&& block) {
  const int threads = threads_for(num_threads, n, n);
  py::gil_scoped_release release;
  parallel_ranges(n, threads, 16, [&](int64_t begin, int64_t end, int) { block(begin, end); });
}

using BlockF32 = void (*)(const float*, const float*, const float*, float*, int64_t, int64_t);
using BlockF64 = void (*)(const double*, const double*, const double*, double*, int64_t, int64_t);

// The block functions of a one-output kernel (AVX-512 null where not compiled).
struct OneOutput {
  const char* name;
  const char* third;  // what the third array is
  BlockF32 f32_default, f32_avx512;
  BlockF64 f64;
};

#ifdef HF_HAVE_AVX512_EXP
#define HF_AVX512_OR_NULL(f) &f
#else
#define HF_AVX512_OR_NULL(f) nullptr
#endif
constexpr OneOutput kSecondOrderTerm{"gelu_second_order_term", "upstream", &block_f32_default,
                                     HF_AVX512_OR_NULL(block_f32_avx512), &block_f64};
constexpr OneOutput kBackwardAdd{"gelu_backward_add", "addend", &backward_add_block_f32_default,
                                 HF_AVX512_OR_NULL(backward_add_block_f32_avx512), &backward_add_block_f64};
#undef HF_AVX512_OR_NULL

// out = kernel(x, g, third) elementwise, all C-contiguous arrays of one size.
template <typename T, const OneOutput& K>
void one_output(py::object x_obj, py::object g_obj, py::object u_obj, py::object out_obj, int num_threads) {
  Arr<T> x = exact_array<T>(x_obj, K.name, "x"), g = exact_array<T>(g_obj, K.name, "grad");
  Arr<T> u = exact_array<T>(u_obj, K.name, K.third), out = exact_array<T>(out_obj, K.name, "out");
  const int64_t n = x.size();
  if (g.size() != n || u.size() != n || out.size() != n)
    throw std::invalid_argument(std::string(K.name) + ": `x`, `grad`, `" + K.third +
                                "` and `out` must have the same size");
  const T *px = x.data(), *pg = g.data(), *pu = u.data();
  T* po = out.mutable_data();
  run_blocks(n, num_threads, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same<T, float>::value) {
#ifdef HF_HAVE_AVX512_EXP
      if (K.f32_avx512 && use_avx512()) return K.f32_avx512(px, pg, pu, po, begin, end);
#endif
      K.f32_default(px, pg, pu, po, begin, end);
    } else {
      K.f64(px, pg, pu, po, begin, end);
    }
  });
}

template <typename T>
void gelu_double_backward(py::object x_obj, py::object g_obj, py::object u_obj, py::object og_obj, py::object ox_obj,
                          int num_threads) {
  const char* fn = "gelu_double_backward";
  Arr<T> x = exact_array<T>(x_obj, fn, "x"), g = exact_array<T>(g_obj, fn, "grad");
  Arr<T> u = exact_array<T>(u_obj, fn, "upstream");
  Arr<T> og = exact_array<T>(og_obj, fn, "out_grad"), ox = exact_array<T>(ox_obj, fn, "out_x");
  const int64_t n = x.size();
  if (g.size() != n || u.size() != n || og.size() != n || ox.size() != n)
    throw std::invalid_argument("gelu_double_backward: all arrays must have the same size");
  const T *px = x.data(), *pg = g.data(), *pu = u.data();
  T *pog = og.mutable_data(), *pox = ox.mutable_data();
  run_blocks(n, num_threads, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same<T, float>::value) {
#ifdef HF_HAVE_AVX512_EXP
      if (use_avx512()) return both_block_f32_avx512(px, pg, pu, pog, pox, begin, end);
#endif
      both_block_f32_default(px, pg, pu, pog, pox, begin, end);
    } else {
      both_block_f64(px, pg, pu, pog, pox, begin, end);
    }
  });
}

}  // namespace

void register_gelu(py::module_& m) {
  const char* doc =
      "out = y''(x) * grad * upstream for exact GELU (y'' = phi(x) (2 - x^2)), written into `out`; "
      "all C-contiguous arrays of one size and dtype.";
  m.def("gelu_second_order_term_f32", &one_output<float, kSecondOrderTerm>, py::arg("x"), py::arg("grad"),
        py::arg("upstream"), py::arg("out"), py::arg("num_threads"), doc);
  m.def("gelu_second_order_term_f64", &one_output<double, kSecondOrderTerm>, py::arg("x"), py::arg("grad"),
        py::arg("upstream"), py::arg("out"), py::arg("num_threads"), doc);
  const char* doc2 =
      "Both outputs of exact GELU's input-gradient backward in one pass: out_grad = y'(x) * upstream and "
      "out_x = y''(x) * grad * upstream; all C-contiguous arrays of one size and dtype.";
  m.def("gelu_double_backward_f32", &gelu_double_backward<float>, py::arg("x"), py::arg("grad"), py::arg("upstream"),
        py::arg("out_grad"), py::arg("out_x"), py::arg("num_threads"), doc2);
  m.def("gelu_double_backward_f64", &gelu_double_backward<double>, py::arg("x"), py::arg("grad"), py::arg("upstream"),
        py::arg("out_grad"), py::arg("out_x"), py::arg("num_threads"), doc2);
  const char* doc3 =
      "GELU's input gradient plus an addend in one pass: out = y'(x) * grad + addend (out may be addend); "
      "all C-contiguous arrays of one size and dtype.";
  m.def("gelu_backward_add_f32", &one_output<float, kBackwardAdd>, py::arg("x"), py::arg("grad"), py::arg("addend"),
        py::arg("out"), py::arg("num_threads"), doc3);
  m.def("gelu_backward_add_f64", &one_output<double, kBackwardAdd>, py::arg("x"), py::arg("grad"), py::arg("addend"),
        py::arg("out"), py::arg("num_threads"), doc3);
}
