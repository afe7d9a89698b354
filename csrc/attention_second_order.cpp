// The P-sized elementwise part of attention's double backward, fused per row
// (harmonizer_fast.training.attention_double_backward, _AttentionInputGrad.backward):
//
//   W_c = W - <W, P>  (row-wise),   Z = P * W_c,   Pbar = W_c * E,   dS = P * E
//
// one pass per row reading W, P, E and writing Z, Pbar (over W) and dS, against five torch
// passes (a row dot, a subtraction, three products) over (heads x tokens x tokens) tensors.
// Inputs are C-contiguous (rows, S) arrays of one float dtype.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "parallel_ranges.h"

namespace py = pybind11;

namespace {

template <typename T>
__attribute__((always_inline)) inline void rows_kernel(int64_t begin, int64_t end, int64_t s, T* w, const T* p,
                                                       const T* e, T* z, T* grad_s) {
  for (int64_t r = begin; r < end; ++r) {
    T* wr = w + r * s;
    const T* pr = p + r * s;
    const T* er = e + r * s;
    T* zr = z + r * s;
    T dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < s; ++j) dot += wr[j] * pr[j];
    if (grad_s != nullptr) {
      T* gr = grad_s + r * s;
#pragma omp simd
      for (int64_t j = 0; j < s; ++j) {
        const T wc = wr[j] - dot;
        zr[j] = pr[j] * wc;
        gr[j] = pr[j] * er[j];
        wr[j] = wc * er[j];
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < s; ++j) {
        const T wc = wr[j] - dot;
        zr[j] = pr[j] * wc;
        wr[j] = wc * er[j];
      }
    }
  }
}

template <typename T>
void rows_default(int64_t b, int64_t e_, int64_t s, T* w, const T* p, const T* e, T* z, T* g) {
  rows_kernel<T>(b, e_, s, w, p, e, z, g);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define HF_ATTN_AVX2 1
template <typename T>
__attribute__((target("avx2,fma"))) void rows_avx2(int64_t b, int64_t e_, int64_t s, T* w, const T* p, const T* e,
                                                   T* z, T* g) {
  rows_kernel<T>(b, e_, s, w, p, e, z, g);
}
#endif

template <typename T>
using Arr = py::array_t<T, py::array::c_style>;

template <typename T>
void attention_centered_products(py::object w_obj, py::object p_obj, py::object e_obj, py::object z_obj,
                                 py::object grad_s_obj, int num_threads) {
  auto exact = [](py::object o, const char* name) {
    if (!Arr<T>::check_(o))
      throw std::invalid_argument(std::string("attention_centered_products: `") + name +
                                  "` must be a C-contiguous array of one float dtype");
    Arr<T> a = o.cast<Arr<T>>();
    if (a.ndim() != 2) throw std::invalid_argument(std::string("attention_centered_products: `") + name + "` must be 2-D");
    return a;
  };
  Arr<T> w = exact(w_obj, "w"), p = exact(p_obj, "probs"), e = exact(e_obj, "e"), z = exact(z_obj, "out_z");
  const int64_t rows = w.shape(0), s = w.shape(1);
  auto same = [&](const Arr<T>& a) { return a.shape(0) == rows && a.shape(1) == s; };
  Arr<T> g;
  const bool want_s = !grad_s_obj.is_none();
  if (want_s) g = exact(grad_s_obj, "out_grad_s");
  if (!same(p) || !same(e) || !same(z) || (want_s && !same(g)))
    throw std::invalid_argument("attention_centered_products: all arrays must have the shape of `w`");
  T* pw = w.mutable_data();
  const T *pp = p.data(), *pe = e.data();
  T *pz = z.mutable_data(), *pg = want_s ? g.mutable_data() : nullptr;
  auto kernel = &rows_default<T>;
#ifdef HF_ATTN_AVX2
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) kernel = &rows_avx2<T>;
#endif
  const int threads = threads_for(num_threads, rows * s, rows);
  py::gil_scoped_release release;
  parallel_ranges(rows, threads, 1, [&](int64_t begin, int64_t end, int) { kernel(begin, end, s, pw, pp, pe, pz, pg); });
}

}  // namespace

void register_attention(py::module_& m) {
  const char* doc =
      "Row-wise W_c = W - <W, P>; writes Z = P * W_c into out_z, W_c * E over w and P * E into "
      "out_grad_s (None: not wanted); C-contiguous (rows, S) arrays of one dtype.";
  m.def("attention_centered_products_f32", &attention_centered_products<float>, py::arg("w"), py::arg("probs"),
        py::arg("e"), py::arg("out_z"), py::arg("out_grad_s"), py::arg("num_threads"), doc);
  m.def("attention_centered_products_f64", &attention_centered_products<double>, py::arg("w"), py::arg("probs"),
        py::arg("e"), py::arg("out_z"), py::arg("out_grad_s"), py::arg("num_threads"), doc);
}
