// Attention's first and second derivatives, one (batch x head) slice at a time
// (harmonizer_fast.training.attention_double_backward; the math is in its docstring).
//
// For P = softmax(S) (L x S), S = s Q K^T + B, O = P V and an output gradient G, four steps of
// a harmonized step run here:
//   forward:              P = softmax(s Q K^T + B), O = P V
//   input_grad:           dV = P^T G, E = G V^T - <G, O>, dS = P * E, dQ = s dS K, dK = s dS^T Q
//   input_grad_backward:  E as above (recomputed: one product of the slice in cache is cheaper
//                         than a P-sized tensor kept from the saliency pass: the saliency pass
//                         with fresh output tensors took 5.4 ms per ViT-Tiny layer, 3.0 reused),
//                         W = s (U_Q K^T + Q U_K^T) + U_S, W_c = W - <W, P>, Z = P * W_c,
//                         G' = Z V + P U_V, V' = Z^T G, Q' = s dS U_K, K' = s dS^T U_Q,
//                         P' = G U_V^T + W_c * E; with fold_p (no bias gradient wanted) P' goes
//                         through the softmax here, T' = P (P' - <P', P>), Q' += s T' K,
//                         K' += s T'^T Q: two more products on the slice in cache instead of a
//                         P-sized P' handed to the training backward (its fresh pages, a write
//                         and a read from memory; the Python side folds only when the heap does
//                         not keep freed memory, since without page faults handing P' over wins)
//   backward:             T = P * (D - <D, P>), D = G V^T + grad_P,
//                         dQ = s T K, dK = s T^T Q, dV = P^T G
// Torch runs each product over all slices at once, so the (L x S)-sized temporaries (W, Z, dS,
// ...: 24 slices of 197 x 197 are 3.7 MB per ViT-Tiny layer) go to memory between products. Here
// each thread takes whole slices and runs all products of a slice (single-threaded GEMMs) while
// its L x S blocks stay in the core's L2 cache; only P and the small operands are read.
//
// The GEMMs are the BLAS torch itself uses (MKL's Fortran sgemm_/dgemm_ in libtorch_cpu), found
// by the Python side and handed over once with set_blas(); without them the Python side keeps
// the torch formulas. Arrays of P's size (P, bias, dS, U_S, P', T) are C-contiguous (slices, L, S);
// the others are 4-D (outer, inner, rows, cols) strided views (Slices), all of one float dtype.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

// the softmax's exp vectorizes only when operations may be assumed not to trap (exp_nonpositive.h)
#pragma GCC optimize("no-trapping-math")
#include "exp_nonpositive.h"

#ifdef HF_HAVE_OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

template <typename T>
using FortranGemm = void (*)(const char*, const char*, const int*, const int*, const int*, const T*, const T*,
                             const int*, const T*, const int*, const T*, T*, const int*);

FortranGemm<float> g_sgemm = nullptr;
FortranGemm<double> g_dgemm = nullptr;

template <typename T>
FortranGemm<T> blas();
template <>
FortranGemm<float> blas<float>() { return g_sgemm; }
template <>
FortranGemm<double> blas<double>() { return g_dgemm; }

// Row-major C (m x n) = alpha op(A) op(B) + beta C, A with leading dimension lda, etc.: the
// column-major call computing C^T = op(B)^T op(A)^T.
template <typename T>
inline void gemm(bool trans_a, bool trans_b, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb,
                 T beta, T* c, int ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  blas<T>()(&tb, &ta, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

template <typename T>
inline T dot(const T* a, const T* b, int n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int j = 0; j < n; ++j) acc += a[j] * b[j];
  return acc;
}

// One row of the softmax Jacobian-vector product in place: t = p * (t - <t, p>).
template <typename T>
inline void softmax_vjp_row(T* t, const T* p, int n) {
  const T c = dot<T>(t, p, n);
#pragma omp simd
  for (int j = 0; j < n; ++j) t[j] = p[j] * (t[j] - c);
}

// E = G V^T - <G, O> (rows of the slice) into `out` (rows of S); with `times_p`, dS = P * E instead.
template <typename T>
inline void scores_grad(const T* G, int ldg, const T* V, int ldv, const T* O, int ldo, const T* P, int L, int S,
                        int Ev, T* out, bool times_p) {
  gemm<T>(false, true, L, S, Ev, 1, G, ldg, V, ldv, 0, out, S);  // dP = G V^T
  for (int i = 0; i < L; ++i) {
    const T c = dot(G + size_t(i) * ldg, O + size_t(i) * ldo, Ev);
    T* er = out + size_t(i) * S;
    const T* pr = P + size_t(i) * S;
    if (times_p) {
#pragma omp simd
      for (int j = 0; j < S; ++j) er[j] = pr[j] * (er[j] - c);
    } else {
#pragma omp simd
      for (int j = 0; j < S; ++j) er[j] -= c;
    }
  }
}

template <typename T>
using Arr = py::array_t<T, py::array::c_style>;

// Slice b of a 4-D array (outer, inner, rows, cols) with any non-negative strides and unit column
// stride: (b / inner, b % inner). q, k, v, O, G and their gradients come this way, so that views
// of one (tokens, 3, heads, head_dim) tensor (timm's qkv.unbind(0)) and transposed gradients need
// no copy: each slice is a matrix with leading dimension `ld` for the GEMMs.
template <typename T>
struct Slices {
  T* data = nullptr;
  int64_t inner = 1, outer_stride = 0, inner_stride = 0;
  int ld = 1;
  T* at(int64_t b) const { return data + (b / inner) * outer_stride + (b % inner) * inner_stride; }
  explicit operator bool() const { return data != nullptr; }
};

struct Dims {
  int64_t slices, outer, inner;
  int l, s, e, ev;
};

// `o` as Slices of `rows` x `cols` (None -> empty unless `required`); an output must be writeable
// (a converted copy would lose what is written).
template <typename T>
Slices<T> slices(py::handle o, const Dims& d, int64_t rows, int64_t cols, const char* fn, const char* name,
                 bool output, bool required) {
  Slices<T> r;
  if (o.is_none()) {
    if (required) throw std::invalid_argument(std::string(fn) + ": `" + name + "` is needed");
    return r;
  }
  if (!py::array_t<T>::check_(o))
    throw std::invalid_argument(std::string(fn) + ": `" + name + "` must be an array of the inputs' dtype");
  auto a = py::reinterpret_borrow<py::array>(o);
  if (a.ndim() != 4 || a.shape(0) != d.outer || a.shape(1) != d.inner || a.shape(2) != rows || a.shape(3) != cols)
    throw std::invalid_argument(std::string(fn) + ": `" + name + "` must be (" + std::to_string(d.outer) + ", " +
                                std::to_string(d.inner) + ", " + std::to_string(rows) + ", " +
                                std::to_string(cols) + ")");
  const auto item = py::ssize_t(sizeof(T));
  for (int i = 0; i < 4; ++i)
    if (a.strides(i) < 0 || a.strides(i) % item)
      throw std::invalid_argument(std::string(fn) + ": `" + name +
                                  "` needs non-negative strides in whole items");
  const int64_t row = a.strides(2) / item, col = a.strides(3) / item;
  if ((cols > 1 && col != 1) || (rows > 1 && row < cols))
    throw std::invalid_argument(std::string(fn) + ": `" + name +
                                "` needs a unit column stride and a row stride of at least its columns");
  if (output && !a.writeable()) throw std::invalid_argument(std::string(fn) + ": `" + name + "` is read-only");
  r.data = static_cast<T*>(const_cast<void*>(a.data()));
  r.inner = d.inner;
  r.outer_stride = a.strides(0) / item;
  r.inner_stride = a.strides(1) / item;
  r.ld = int(std::max<int64_t>(1, rows > 1 ? row : cols));
  return r;
}

// rows x cols of a strided slice set to zero
template <typename T>
void zero_rows(T* x, int rows, int cols, int ld) {
  for (int i = 0; i < rows; ++i) std::fill(x + size_t(i) * ld, x + size_t(i) * ld + cols, T(0));
}

// The (slices, rows, cols) C-contiguous arrays of P's size: P, the bias, dS, U_S, P', T.
template <typename T>
const T* in(const Arr<T>& a, int64_t slices, int64_t rows, int64_t cols, const char* fn, const char* name) {
  if (a.ndim() != 3 || a.shape(0) != slices || a.shape(1) != rows || a.shape(2) != cols)
    throw std::invalid_argument(std::string(fn) + ": `" + name + "` must be (" + std::to_string(slices) + ", " +
                                std::to_string(rows) + ", " + std::to_string(cols) + ")");
  return a.data();
}

// An optional P-sized array: None -> nullptr; outputs must be exact (a converted copy would lose them).
template <typename T>
T* opt(py::object o, int64_t slices, int64_t rows, int64_t cols, const char* fn, const char* name) {
  if (o.is_none()) return nullptr;
  if (!Arr<T>::check_(o))
    throw std::invalid_argument(std::string(fn) + ": `" + name + "` must be a C-contiguous array of the inputs' dtype");
  auto a = o.cast<Arr<T>>();
  in<T>(a, slices, rows, cols, fn, name);
  return const_cast<T*>(a.data());
}

// q (outer, inner, L, E), k (outer, inner, S, E), v (outer, inner, S, Ev) as Slices, and their sizes.
template <typename T>
Dims check(py::handle q, py::handle k, py::handle v, const char* fn, Slices<T>* sq, Slices<T>* sk, Slices<T>* sv) {
  if (blas<T>() == nullptr) throw std::runtime_error(std::string(fn) + ": no BLAS set (set_blas)");
  for (auto [a, name] : {std::pair<py::handle, const char*>{q, "q"}, {k, "k"}, {v, "v"}})
    if (!py::array_t<T>::check_(a) || py::reinterpret_borrow<py::array>(a).ndim() != 4)
      throw std::invalid_argument(std::string(fn) + ": `" + name +
                                  "` must be an array (outer, inner, rows, cols) of one float dtype");
  auto aq = py::reinterpret_borrow<py::array>(q), ak = py::reinterpret_borrow<py::array>(k),
       av = py::reinterpret_borrow<py::array>(v);
  Dims d{aq.shape(0) * aq.shape(1), aq.shape(0), aq.shape(1), int(aq.shape(2)), int(ak.shape(2)),
         int(aq.shape(3)), int(av.shape(3))};
  *sq = slices<T>(q, d, d.l, d.e, fn, "q", false, true);
  *sk = slices<T>(k, d, d.s, d.e, fn, "k", false, true);
  *sv = slices<T>(v, d, d.s, d.ev, fn, "v", false, true);
  return d;
}

// Runs body(slice, scratch) over the slices, `threads` threads, each with its own scratch of
// `scratch_values` values. Inside a parallel region of two or more threads MKL runs each GEMM on
// the calling thread; with one thread there is no region, so that MKL keeps its own threads (a
// one-thread region made it start nested teams per call: ~10x slower).
template <typename T, typename Body>
void for_slices(int64_t slices, int threads, size_t scratch_values, Body&& body) {
  threads = int(std::max<int64_t>(1, std::min<int64_t>(threads, slices)));
  py::gil_scoped_release release;
  // each thread keeps its scratch between calls (fresh pages cost more here than the products;
  // one layer's worth, at most 16 MB per thread, is kept)
  auto run = [&](int64_t begin, int64_t end) {
    static thread_local std::vector<T> scratch;
    if (scratch.size() < scratch_values) scratch.resize(scratch_values);
    for (int64_t b = begin; b < end; ++b) body(b, scratch.data());
    if (scratch.size() * sizeof(T) > (size_t(16) << 20)) std::vector<T>().swap(scratch);
  };
#ifdef HF_HAVE_OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
      run(slices * t / nt, slices * (t + 1) / nt);
    }
    return;
  }
#endif
  run(0, slices);
}

// One row of softmax in place, as torch's: NaN when the row has a NaN or a +inf score; a row of
// only -inf scores gives zeros when `safe` (torch's masked softmax), else NaN. Returns false
// for those rows (already written), true when the row's maximum `m` is finite.
template <typename T>
inline bool softmax_row_special(T* x, int n, bool safe, T m, T total) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  if (std::isnan(total) || m == inf || (m == -inf && !safe)) {
    std::fill(x, x + n, std::numeric_limits<T>::quiet_NaN());
    return false;
  }
  if (m == -inf) {
    std::fill(x, x + n, T(0));
    return false;
  }
  return true;
}

template <typename T>
inline void softmax_row(T* x, int n, bool safe) {
  T m = -std::numeric_limits<T>::infinity(), total = 0;
  for (int j = 0; j < n; ++j) {
    m = x[j] > m ? x[j] : m;
    total += x[j];
  }
  if (!softmax_row_special(x, n, safe, m, total)) return;
  T sum = 0;
  if constexpr (std::is_same<T, float>::value) {
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < n; ++j) {
      x[j] = exp_nonpositive(x[j] - m);
      sum += x[j];
    }
  } else {
    for (int j = 0; j < n; ++j) {
      x[j] = std::exp(x[j] - m);
      sum += x[j];
    }
  }
  const T inv = T(1) / sum;
#pragma omp simd
  for (int j = 0; j < n; ++j) x[j] *= inv;
}

#ifdef HF_HAVE_AVX512_EXP
// softmax_row for float32 rows, 16 lanes (the scalar form's max and NaN check did not vectorize:
// ~1.5 of the 2.6 ms of a ViT-Tiny layer's forward)
__attribute__((target("avx512f"))) void softmax_rows_avx512(float* x, int rows, int n, bool safe) {
  for (int i = 0; i < rows; ++i, x += n) {
    __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), vsum = _mm512_setzero_ps();
    int j = 0;
    for (; j + 16 <= n; j += 16) {
      const __m512 v = _mm512_loadu_ps(x + j);
      vmax = _mm512_max_ps(vmax, v);
      vsum = _mm512_add_ps(vsum, v);
    }
    const __mmask16 tail = __mmask16((1u << (n - j)) - 1u);
    if (j < n) {
      const __m512 v = _mm512_maskz_loadu_ps(tail, x + j);
      vmax = _mm512_mask_max_ps(vmax, tail, vmax, v);
      vsum = _mm512_add_ps(vsum, v);
    }
    const float m = _mm512_reduce_max_ps(vmax), total = _mm512_reduce_add_ps(vsum);
    // max_ps drops NaN operands, but a NaN reaches `total`
    if (!softmax_row_special(x, n, safe, m, total)) continue;
    const __m512 vm = _mm512_set1_ps(m);
    __m512 acc = _mm512_setzero_ps();
    for (j = 0; j + 16 <= n; j += 16) {
      const __m512 e = exp_nonpositive_avx512(_mm512_sub_ps(_mm512_loadu_ps(x + j), vm));
      _mm512_storeu_ps(x + j, e);
      acc = _mm512_add_ps(acc, e);
    }
    if (j < n) {
      const __m512 e = _mm512_maskz_mov_ps(tail, exp_nonpositive_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, x + j), vm)));
      _mm512_mask_storeu_ps(x + j, tail, e);
      acc = _mm512_add_ps(acc, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(acc));
    for (j = 0; j + 16 <= n; j += 16) _mm512_storeu_ps(x + j, _mm512_mul_ps(_mm512_loadu_ps(x + j), inv));
    if (j < n) _mm512_mask_storeu_ps(x + j, tail, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, x + j), inv));
  }
}
#endif

template <typename T>
void softmax_rows(T* x, int rows, int n, bool safe) {
#ifdef HF_HAVE_AVX512_EXP
  if constexpr (std::is_same<T, float>::value) {
    if (use_avx512()) return softmax_rows_avx512(x, rows, n, safe);
  }
#endif
  for (int i = 0; i < rows; ++i) softmax_row<T>(x + size_t(i) * n, n, safe);
}

template <typename T>
void forward(py::object q, py::object k, py::object v, py::object bias, double scale, bool safe, py::object out,
             py::object out_p, int threads) {
  const char* fn = "attention_forward";
  Slices<T> Q, K, V;
  const Dims d = check<T>(q, k, v, fn, &Q, &K, &V);
  const int L = d.l, S = d.s, E = d.e, Ev = d.ev;
  const int64_t n = d.slices;
  const T* pb = opt<T>(bias, n, L, S, fn, "bias");
  const Slices<T> O = slices<T>(out, d, L, Ev, fn, "out", true, true);
  T* op = opt<T>(out_p, n, L, S, fn, "out_p");
  if (!op) throw std::invalid_argument(std::string(fn) + ": `out_p` is needed");
  const T s = T(scale);
  const size_t block = size_t(L) * S;
  for_slices<T>(n, threads, 0, [&](int64_t b, T*) {
    T* P = op + b * block;
    if (pb) std::copy(pb + b * block, pb + (b + 1) * block, P);
    gemm<T>(false, true, L, S, E, s, Q.at(b), Q.ld, K.at(b), K.ld, pb ? 1 : 0, P, S);  // S = s Q K^T + B
    softmax_rows<T>(P, L, S, safe);
    gemm<T>(false, false, L, Ev, S, 1, P, S, V.at(b), V.ld, 0, O.at(b), O.ld);  // O = P V
  });
}

template <typename T>
void input_grad(py::object g, py::object q, py::object k, py::object v, py::object o, Arr<T> p, double scale,
                py::object out_q, py::object out_k, py::object out_v, py::object out_s, int threads) {
  const char* fn = "attention_input_grad";
  Slices<T> Q, K, V;
  const Dims d = check<T>(q, k, v, fn, &Q, &K, &V);
  const int L = d.l, S = d.s, E = d.e, Ev = d.ev;
  const Slices<T> G = slices<T>(g, d, L, Ev, fn, "g", false, true), O = slices<T>(o, d, L, Ev, fn, "o", false, true);
  const T* pp = in<T>(p, d.slices, L, S, fn, "p");
  const Slices<T> oq = slices<T>(out_q, d, L, E, fn, "out_q", true, true);
  const Slices<T> ok = slices<T>(out_k, d, S, E, fn, "out_k", true, true);
  const Slices<T> ov = slices<T>(out_v, d, S, Ev, fn, "out_v", true, true);
  T* os = opt<T>(out_s, d.slices, L, S, fn, "out_s");
  const T s = T(scale);
  const size_t block = size_t(L) * S;
  for_slices<T>(d.slices, threads, os ? 0 : block, [&](int64_t b, T* scratch) {
    const T* P = pp + b * block;
    T* dS = os ? os + b * block : scratch;
    gemm<T>(true, false, S, Ev, L, 1, P, S, G.at(b), G.ld, 0, ov.at(b), ov.ld);     // dV = P^T G
    scores_grad<T>(G.at(b), G.ld, V.at(b), V.ld, O.at(b), O.ld, P, L, S, Ev, dS, true);  // dS = P (G V^T - <G, O>)
    gemm<T>(false, false, L, E, S, s, dS, S, K.at(b), K.ld, 0, oq.at(b), oq.ld);    // dQ = s dS K
    gemm<T>(true, false, S, E, L, s, dS, S, Q.at(b), Q.ld, 0, ok.at(b), ok.ld);     // dK = s dS^T Q
  });
}

template <typename T>
void input_grad_backward(py::object g, py::object q, py::object k, py::object v, py::object o, Arr<T> p,
                         py::object up_q, py::object up_k, py::object up_v, py::object up_s, double scale, bool fold_p,
                         py::object out_g, py::object out_q, py::object out_k, py::object out_v, py::object out_p,
                         int threads) {
  const char* fn = "attention_input_grad_backward";
  Slices<T> Q, K, V;
  const Dims d = check<T>(q, k, v, fn, &Q, &K, &V);
  const int L = d.l, S = d.s, E = d.e, Ev = d.ev;
  const int64_t n = d.slices;
  const Slices<T> G = slices<T>(g, d, L, Ev, fn, "g", false, true), O = slices<T>(o, d, L, Ev, fn, "o", false, true);
  const T* pp = in<T>(p, n, L, S, fn, "p");
  const Slices<T> UQ = slices<T>(up_q, d, L, E, fn, "up_q", false, false);
  const Slices<T> UK = slices<T>(up_k, d, S, E, fn, "up_k", false, false);
  const Slices<T> UV = slices<T>(up_v, d, S, Ev, fn, "up_v", false, false);
  const T* us = opt<T>(up_s, n, L, S, fn, "up_s");
  const Slices<T> og = slices<T>(out_g, d, L, Ev, fn, "out_g", true, false);
  const Slices<T> oq = slices<T>(out_q, d, L, E, fn, "out_q", true, false);
  const Slices<T> ok = slices<T>(out_k, d, S, E, fn, "out_k", true, false);
  const Slices<T> ov = slices<T>(out_v, d, S, Ev, fn, "out_v", true, false);
  T* op = opt<T>(out_p, n, L, S, fn, "out_p");
  const bool has_w = UQ || UK || us, has_p = has_w || bool(UV);
  const std::string names = fold_p ? "out_g, out_q, out_k" : "out_g, out_p";
  if (has_w && !(og && ov)) throw std::invalid_argument(std::string(fn) + ": U_Q, U_K or U_S needs out_g, out_v");
  if (has_p && !(og && (fold_p ? oq && ok : op != nullptr)))
    throw std::invalid_argument(std::string(fn) + ": upstreams need " + names);
  if (fold_p && op) throw std::invalid_argument(std::string(fn) + ": fold_p returns no out_p");
  if ((UK && !oq) || (UQ && !ok)) throw std::invalid_argument(std::string(fn) + ": U_K needs out_q, U_Q out_k");
  const T s = T(scale);
  const size_t block = size_t(L) * S;
  for_slices<T>(n, threads, (fold_p ? 3 : 2) * block, [&](int64_t b, T* scratch) {
    const T *Gb = G.at(b), *Qb = Q.at(b), *Kb = K.at(b), *Vb = V.at(b), *P = pp + b * block;
    const T *UQb = UQ ? UQ.at(b) : nullptr, *UKb = UK ? UK.at(b) : nullptr, *UVb = UV ? UV.at(b) : nullptr;
    const T* US = us ? us + b * block : nullptr;
    T *W = scratch, *Ep = scratch + block;  // Ep: E, then dS = P * E
    if (has_w) scores_grad<T>(Gb, G.ld, Vb, V.ld, O.at(b), O.ld, P, L, S, Ev, Ep, false);
    T* Pbar = fold_p ? scratch + 2 * block : op ? op + b * block : nullptr;
    T* Gbar = og ? og.at(b) : nullptr;
    if (has_w) {
      T beta = 0;
      if (US) {
        std::copy(US, US + block, W);
        beta = 1;
      }
      if (UQb) { gemm<T>(false, true, L, S, E, s, UQb, UQ.ld, Kb, K.ld, beta, W, S); beta = 1; }  // s U_Q K^T
      if (UKb) gemm<T>(false, true, L, S, E, s, Qb, Q.ld, UKb, UK.ld, beta, W, S);               // + s Q U_K^T
      for (int i = 0; i < L; ++i) {  // W_c = W - <W, P>; P' = W_c E; Z = P W_c (into W)
        T* wr = W + size_t(i) * S;
        const T *pr = P + size_t(i) * S, *er = Ep + size_t(i) * S;
        T* qr = Pbar + size_t(i) * S;
        const T c = dot<T>(wr, pr, S);
#pragma omp simd
        for (int j = 0; j < S; ++j) {
          const T wc = wr[j] - c;
          qr[j] = wc * er[j];
          wr[j] = pr[j] * wc;
        }
      }
      gemm<T>(false, false, L, Ev, S, 1, W, S, Vb, V.ld, 0, Gbar, og.ld);         // G' = Z V
      gemm<T>(true, false, S, Ev, L, 1, W, S, Gb, G.ld, 0, ov.at(b), ov.ld);      // V' = Z^T G
    } else if (ov) {
      zero_rows<T>(ov.at(b), S, Ev, ov.ld);
    }
    if (UVb) {
      gemm<T>(false, false, L, Ev, S, 1, P, S, UVb, UV.ld, has_w ? 1 : 0, Gbar, og.ld);  // G' += P U_V
      gemm<T>(false, true, L, S, Ev, 1, Gb, G.ld, UVb, UV.ld, has_w ? 1 : 0, Pbar, S);   // P' += G U_V^T
    } else if (!has_w) {
      if (Gbar) zero_rows<T>(Gbar, L, Ev, og.ld);
      if (Pbar) std::fill(Pbar, Pbar + block, T(0));
    }
    if (UQb || UKb) {
      T* dS = Ep;
      for (size_t j = 0; j < block; ++j) dS[j] = P[j] * Ep[j];
      if (UKb) gemm<T>(false, false, L, E, S, s, dS, S, UKb, UK.ld, 0, oq.at(b), oq.ld);  // Q' = s dS U_K
      if (UQb) gemm<T>(true, false, S, E, L, s, dS, S, UQb, UQ.ld, 0, ok.at(b), ok.ld);   // K' = s dS^T U_Q
    }
    const bool fold_here = fold_p && has_p;
    if (fold_here) {  // P' through the softmax here: T' = P (P' - <P', P>), Q' += s T' K, K' += s T'^T Q
      for (int i = 0; i < L; ++i) softmax_vjp_row<T>(Pbar + size_t(i) * S, P + size_t(i) * S, S);
      gemm<T>(false, false, L, E, S, s, Pbar, S, Kb, K.ld, UKb ? 1 : 0, oq.at(b), oq.ld);
      gemm<T>(true, false, S, E, L, s, Pbar, S, Qb, Q.ld, UQb ? 1 : 0, ok.at(b), ok.ld);
    }
    if (oq && !UKb && !fold_here) zero_rows<T>(oq.at(b), L, E, oq.ld);
    if (ok && !UQb && !fold_here) zero_rows<T>(ok.at(b), S, E, ok.ld);
  });
}

// add_q, add_k, add_v: out_q, out_k, out_v hold values the gradients are added to (the closed
// form's Q', K', V', so that autograd adds nothing and the gradients keep their layout).
template <typename T>
void backward(py::object g, py::object grad_p, py::object q, py::object k, py::object v, Arr<T> p, double scale,
              py::object out_q, py::object out_k, py::object out_v, py::object out_t, bool add_q, bool add_k,
              bool add_v, int threads) {
  const char* fn = "attention_backward";
  Slices<T> Q, K, V;
  const Dims d = check<T>(q, k, v, fn, &Q, &K, &V);
  const int L = d.l, S = d.s, E = d.e, Ev = d.ev;
  const int64_t n = d.slices;
  const T* pp = in<T>(p, n, L, S, fn, "p");
  const Slices<T> G = slices<T>(g, d, L, Ev, fn, "g", false, false);
  const T* pgp = opt<T>(grad_p, n, L, S, fn, "grad_p");
  const Slices<T> oq = slices<T>(out_q, d, L, E, fn, "out_q", true, false);
  const Slices<T> ok = slices<T>(out_k, d, S, E, fn, "out_k", true, false);
  const Slices<T> ov = slices<T>(out_v, d, S, Ev, fn, "out_v", true, false);
  T* ot = opt<T>(out_t, n, L, S, fn, "out_t");
  if (!G && !pgp) throw std::invalid_argument(std::string(fn) + ": needs g or grad_p");
  if (ov && !G) throw std::invalid_argument(std::string(fn) + ": out_v needs g");
  const T s = T(scale);
  const size_t block = size_t(L) * S;
  for_slices<T>(n, threads, ot ? 0 : block, [&](int64_t b, T* scratch) {
    const T* P = pp + b * block;
    const T* Gb = G ? G.at(b) : nullptr;
    T* Tm = ot ? ot + b * block : scratch;
    const T* GP = pgp ? pgp + b * block : nullptr;
    if (Gb) gemm<T>(false, true, L, S, Ev, 1, Gb, G.ld, V.at(b), V.ld, 0, Tm, S);  // D = G V^T (+ grad_P per row)
    for (int i = 0; i < L; ++i) {  // T = P (D - <D, P>)
      T* tr = Tm + size_t(i) * S;
      const T* pr = P + size_t(i) * S;
      if (GP && Gb) {
#pragma omp simd
        for (int j = 0; j < S; ++j) tr[j] += GP[size_t(i) * S + j];
      } else if (GP) {
        std::copy(GP + size_t(i) * S, GP + size_t(i + 1) * S, tr);
      }
      softmax_vjp_row<T>(tr, pr, S);
    }
    if (oq) gemm<T>(false, false, L, E, S, s, Tm, S, K.at(b), K.ld, add_q ? 1 : 0, oq.at(b), oq.ld);  // dQ = s T K
    if (ok) gemm<T>(true, false, S, E, L, s, Tm, S, Q.at(b), Q.ld, add_k ? 1 : 0, ok.at(b), ok.ld);   // dK = s T^T Q
    if (ov) gemm<T>(true, false, S, Ev, L, 1, P, S, Gb, G.ld, add_v ? 1 : 0, ov.at(b), ov.ld);        // dV = P^T G
  });
}

}  // namespace

void register_attention(py::module_& m) {
  m.def(
      "attention_set_blas",
      [](uintptr_t sgemm, uintptr_t dgemm) {
        g_sgemm = reinterpret_cast<FortranGemm<float>>(sgemm);
        g_dgemm = reinterpret_cast<FortranGemm<double>>(dgemm);
      },
      py::arg("sgemm"), py::arg("dgemm"),
      "Sets the Fortran sgemm_/dgemm_ (LP64) used by the attention kernels (addresses; 0: none).");
  const char* doc_f = "Attention forward per slice: writes O and P = softmax(s Q K^T + bias) (bias: None or full).";
  const char* doc_ig = "Attention input gradient per slice: writes dQ, dK, dV and (out_s not None) dS.";
  const char* doc_igb =
      "Backward of the attention input gradient per slice for upstreams U_Q, U_K, U_V, U_S (None: zero): "
      "writes G', Q', K', V' and P' (fold_p: P' pushed into Q', K' instead; module comment of "
      "csrc/attention_second_order.cpp).";
  const char* doc_b =
      "Attention backward per slice from G and/or grad_P: writes dQ, dK, dV (add_*: added to what the out "
      "array holds) and (out_t) T.";
#define HF_ATTN_DEFS(SUFFIX, T)                                                                                  \
  m.def("attention_forward_" SUFFIX, &forward<T>, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("bias"),      \
        py::arg("scale"), py::arg("safe"), py::arg("out"), py::arg("out_p"), py::arg("num_threads"), doc_f);      \
  m.def("attention_input_grad_" SUFFIX, &input_grad<T>, py::arg("g"), py::arg("q"), py::arg("k"), py::arg("v"), \
        py::arg("o"), py::arg("p"), py::arg("scale"), py::arg("out_q"), py::arg("out_k"), py::arg("out_v"),      \
        py::arg("out_s"), py::arg("num_threads"), doc_ig);                                                       \
  m.def("attention_input_grad_backward_" SUFFIX, &input_grad_backward<T>, py::arg("g"), py::arg("q"),             \
        py::arg("k"), py::arg("v"), py::arg("o"), py::arg("p"), py::arg("up_q"), py::arg("up_k"), py::arg("up_v"), \
        py::arg("up_s"), py::arg("scale"), py::arg("fold_p"), py::arg("out_g"), py::arg("out_q"), py::arg("out_k"), py::arg("out_v"), \
        py::arg("out_p"), py::arg("num_threads"), doc_igb);                                                      \
  m.def("attention_backward_" SUFFIX, &backward<T>, py::arg("g"), py::arg("grad_p"), py::arg("q"), py::arg("k"), \
        py::arg("v"), py::arg("p"), py::arg("scale"), py::arg("out_q"), py::arg("out_k"), py::arg("out_v"),      \
        py::arg("out_t"), py::arg("add_q"), py::arg("add_k"), py::arg("add_v"), py::arg("num_threads"), doc_b);
  HF_ATTN_DEFS("f32", float)
  HF_ATTN_DEFS("f64", double)
#undef HF_ATTN_DEFS
}
