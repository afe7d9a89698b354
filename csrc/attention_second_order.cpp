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
//                         and a read from memory)
//   backward:             T = P * (D - <D, P>), D = G V^T + grad_P,
//                         dQ = s T K, dK = s T^T Q, dV = P^T G
// Torch runs each product over all slices at once, so the (L x S)-sized temporaries (W, Z, dS,
// ...: 24 slices of 197 x 197 are 3.7 MB per ViT-Tiny layer) go to memory between products. Here
// each thread takes whole slices and runs all products of a slice (single-threaded GEMMs) while
// its L x S blocks stay in the core's L2 cache; only P and the small operands are read.
//
// The GEMMs are the BLAS torch itself uses (MKL's Fortran sgemm_/dgemm_ in libtorch_cpu), found
// by the Python side and handed over once with set_blas(); without them the Python side keeps
// the torch formulas. All arrays are C-contiguous (slices, rows, cols) of one float dtype.
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

// E = G V^T - <G, O> (rows of the slice) into `out`; with `times_p`, dS = P * E instead.
template <typename T>
inline void scores_grad(const T* G, const T* V, const T* O, const T* P, int L, int S, int Ev, T* out, bool times_p) {
  gemm<T>(false, true, L, S, Ev, 1, G, Ev, V, Ev, 0, out, S);  // dP = G V^T
  for (int i = 0; i < L; ++i) {
    const T c = dot(G + i * Ev, O + i * Ev, Ev);
    T* er = out + i * S;
    const T* pr = P + i * S;
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

struct Dims {
  int64_t slices;
  int l, s, e, ev;
};

template <typename T>
const T* in(const Arr<T>& a, int64_t slices, int64_t rows, int64_t cols, const char* fn, const char* name) {
  if (a.ndim() != 3 || a.shape(0) != slices || a.shape(1) != rows || a.shape(2) != cols)
    throw std::invalid_argument(std::string(fn) + ": `" + name + "` must be (" + std::to_string(slices) + ", " +
                                std::to_string(rows) + ", " + std::to_string(cols) + ")");
  return a.data();
}

// An optional array: None -> nullptr; outputs must be exact (a converted copy would lose them).
template <typename T>
T* opt(py::object o, int64_t slices, int64_t rows, int64_t cols, const char* fn, const char* name) {
  if (o.is_none()) return nullptr;
  if (!Arr<T>::check_(o))
    throw std::invalid_argument(std::string(fn) + ": `" + name + "` must be a C-contiguous array of the inputs' dtype");
  auto a = o.cast<Arr<T>>();
  in<T>(a, slices, rows, cols, fn, name);
  return const_cast<T*>(a.data());
}

template <typename T>
Dims check(const Arr<T>& q, const Arr<T>& k, const Arr<T>& v, const char* fn) {
  if (blas<T>() == nullptr) throw std::runtime_error(std::string(fn) + ": no BLAS set (set_blas)");
  if (q.ndim() != 3 || k.ndim() != 3 || v.ndim() != 3)
    throw std::invalid_argument(std::string(fn) + ": q, k, v must be (slices, rows, cols)");
  Dims d{q.shape(0), int(q.shape(1)), int(k.shape(1)), int(q.shape(2)), int(v.shape(2))};
  in<T>(k, d.slices, d.s, d.e, fn, "k");
  in<T>(v, d.slices, d.s, d.ev, fn, "v");
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
void forward(Arr<T> q, Arr<T> k, Arr<T> v, py::object bias, double scale, bool safe, py::object out,
             py::object out_p, int threads) {
  const char* fn = "attention_forward";
  const Dims d = check<T>(q, k, v, fn);
  const int L = d.l, S = d.s, E = d.e, Ev = d.ev;
  const int64_t n = d.slices;
  const T *pq = q.data(), *pk = k.data(), *pv = v.data();
  const T* pb = opt<T>(bias, n, L, S, fn, "bias");
  T* oo = opt<T>(out, n, L, Ev, fn, "out");
  T* op = opt<T>(out_p, n, L, S, fn, "out_p");
  if (!oo || !op) throw std::invalid_argument(std::string(fn) + ": out and out_p are needed");
  const T s = T(scale);
  for_slices<T>(n, threads, 0, [&](int64_t b, T*) {
    const T *Q = pq + b * L * E, *K = pk + b * S * E, *V = pv + b * S * Ev;
    T* P = op + b * L * S;
    if (pb) std::copy(pb + b * L * S, pb + (b + 1) * L * S, P);
    gemm<T>(false, true, L, S, E, s, Q, E, K, E, pb ? 1 : 0, P, S);  // S = s Q K^T + B
    softmax_rows<T>(P, L, S, safe);
    gemm<T>(false, false, L, Ev, S, 1, P, S, V, Ev, 0, oo + b * L * Ev, Ev);  // O = P V
  });
}

template <typename T>
void input_grad(Arr<T> g, Arr<T> q, Arr<T> k, Arr<T> v, Arr<T> o, Arr<T> p, double scale, py::object out_q,
                py::object out_k, py::object out_v, py::object out_s, int threads) {
  const char* fn = "attention_input_grad";
  const Dims d = check<T>(q, k, v, fn);
  const int L = d.l, S = d.s, E = d.e, Ev = d.ev;
  const T *pg = in<T>(g, d.slices, L, Ev, fn, "g"), *pq = q.data(), *pk = k.data(), *pv = v.data();
  const T *po = in<T>(o, d.slices, L, Ev, fn, "o"), *pp = in<T>(p, d.slices, L, S, fn, "p");
  T* oq = opt<T>(out_q, d.slices, L, E, fn, "out_q");
  T* ok = opt<T>(out_k, d.slices, S, E, fn, "out_k");
  T* ov = opt<T>(out_v, d.slices, S, Ev, fn, "out_v");
  T* os = opt<T>(out_s, d.slices, L, S, fn, "out_s");
  if (!oq || !ok || !ov) throw std::invalid_argument(std::string(fn) + ": out_q, out_k, out_v are needed");
  const T s = T(scale);
  for_slices<T>(d.slices, threads, os ? 0 : size_t(L) * S, [&](int64_t b, T* scratch) {
    const T *G = pg + b * L * Ev, *Q = pq + b * L * E, *K = pk + b * S * E, *V = pv + b * S * Ev;
    const T *O = po + b * L * Ev, *P = pp + b * L * S;
    T* dS = os ? os + b * L * S : scratch;
    gemm<T>(true, false, S, Ev, L, 1, P, S, G, Ev, 0, ov + b * S * Ev, Ev);  // dV = P^T G
    scores_grad<T>(G, V, O, P, L, S, Ev, dS, true);                          // dS = P (G V^T - <G, O>)
    gemm<T>(false, false, L, E, S, s, dS, S, K, E, 0, oq + b * L * E, E);  // dQ = s dS K
    gemm<T>(true, false, S, E, L, s, dS, S, Q, E, 0, ok + b * S * E, E);   // dK = s dS^T Q
  });
}

template <typename T>
void input_grad_backward(Arr<T> g, Arr<T> q, Arr<T> k, Arr<T> v, Arr<T> o, Arr<T> p, py::object up_q,
                         py::object up_k, py::object up_v, py::object up_s, double scale, bool fold_p,
                         py::object out_g, py::object out_q, py::object out_k, py::object out_v, py::object out_p,
                         int threads) {
  const char* fn = "attention_input_grad_backward";
  const Dims d = check<T>(q, k, v, fn);
  const int L = d.l, S = d.s, E = d.e, Ev = d.ev;
  const int64_t n = d.slices;
  const T *pg = in<T>(g, n, L, Ev, fn, "g"), *pq = q.data(), *pk = k.data(), *pv = v.data();
  const T *pp = in<T>(p, n, L, S, fn, "p"), *po = in<T>(o, n, L, Ev, fn, "o");
  const T* uq = opt<T>(up_q, n, L, E, fn, "up_q");
  const T* uk = opt<T>(up_k, n, S, E, fn, "up_k");
  const T* uv = opt<T>(up_v, n, S, Ev, fn, "up_v");
  const T* us = opt<T>(up_s, n, L, S, fn, "up_s");
  T* og = opt<T>(out_g, n, L, Ev, fn, "out_g");
  T* oq = opt<T>(out_q, n, L, E, fn, "out_q");
  T* ok = opt<T>(out_k, n, S, E, fn, "out_k");
  T* ov = opt<T>(out_v, n, S, Ev, fn, "out_v");
  T* op = opt<T>(out_p, n, L, S, fn, "out_p");
  const bool has_w = uq || uk || us, has_p = has_w || uv;
  const std::string names = fold_p ? "out_g, out_q, out_k" : "out_g, out_p";
  if (has_w && !(og && ov)) throw std::invalid_argument(std::string(fn) + ": U_Q, U_K or U_S needs out_g, out_v");
  if (has_p && !(og && (fold_p ? oq && ok : op != nullptr)))
    throw std::invalid_argument(std::string(fn) + ": upstreams need " + names);
  if (fold_p && op) throw std::invalid_argument(std::string(fn) + ": fold_p returns no out_p");
  if ((uk && !oq) || (uq && !ok)) throw std::invalid_argument(std::string(fn) + ": U_K needs out_q, U_Q out_k");
  const T s = T(scale);
  const size_t block = size_t(L) * S;
  for_slices<T>(n, threads, (fold_p ? 3 : 2) * block, [&](int64_t b, T* scratch) {
    const T *G = pg + b * L * Ev, *Q = pq + b * L * E, *K = pk + b * S * E, *V = pv + b * S * Ev;
    const T *P = pp + b * L * S, *O = po + b * L * Ev;
    const T *UQ = uq ? uq + b * L * E : nullptr, *UK = uk ? uk + b * S * E : nullptr;
    const T *UV = uv ? uv + b * S * Ev : nullptr, *US = us ? us + b * L * S : nullptr;
    T *W = scratch, *Ep = scratch + block;  // Ep: E, then dS = P * E
    if (has_w) scores_grad<T>(G, V, O, P, L, S, Ev, Ep, false);
    T* Pbar = fold_p ? scratch + 2 * block : op ? op + b * L * S : nullptr;
    T* Gbar = og ? og + b * L * Ev : nullptr;
    if (has_w) {
      T beta = 0;
      if (US) {
        std::copy(US, US + block, W);
        beta = 1;
      }
      if (UQ) { gemm<T>(false, true, L, S, E, s, UQ, E, K, E, beta, W, S); beta = 1; }  // s U_Q K^T
      if (UK) gemm<T>(false, true, L, S, E, s, Q, E, UK, E, beta, W, S);               // + s Q U_K^T
      for (int i = 0; i < L; ++i) {  // W_c = W - <W, P>; P' = W_c E; Z = P W_c (into W)
        T* wr = W + i * S;
        const T *pr = P + i * S, *er = Ep + i * S;
        T* qr = Pbar + i * S;
        const T c = dot<T>(wr, pr, S);
#pragma omp simd
        for (int j = 0; j < S; ++j) {
          const T wc = wr[j] - c;
          qr[j] = wc * er[j];
          wr[j] = pr[j] * wc;
        }
      }
      gemm<T>(false, false, L, Ev, S, 1, W, S, V, Ev, 0, Gbar, Ev);                // G' = Z V
      gemm<T>(true, false, S, Ev, L, 1, W, S, G, Ev, 0, ov + b * S * Ev, Ev);      // V' = Z^T G
    } else if (ov) {
      std::fill(ov + b * S * Ev, ov + (b + 1) * S * Ev, T(0));
    }
    if (UV) {
      gemm<T>(false, false, L, Ev, S, 1, P, S, UV, Ev, has_w ? 1 : 0, Gbar, Ev);   // G' += P U_V
      gemm<T>(false, true, L, S, Ev, 1, G, Ev, UV, Ev, has_w ? 1 : 0, Pbar, S);    // P' += G U_V^T
    } else if (!has_w) {
      if (Gbar) std::fill(Gbar, Gbar + size_t(L) * Ev, T(0));
      if (Pbar) std::fill(Pbar, Pbar + block, T(0));
    }
    if (UQ || UK) {
      T* dS = Ep;
      for (size_t j = 0; j < block; ++j) dS[j] = P[j] * Ep[j];
      if (UK) gemm<T>(false, false, L, E, S, s, dS, S, UK, E, 0, oq + b * L * E, E);  // Q' = s dS U_K
      if (UQ) gemm<T>(true, false, S, E, L, s, dS, S, UQ, E, 0, ok + b * S * E, E);   // K' = s dS^T U_Q
    }
    const bool fold_here = fold_p && has_p;
    if (fold_here) {  // P' through the softmax here: T' = P (P' - <P', P>), Q' += s T' K, K' += s T'^T Q
      for (int i = 0; i < L; ++i) softmax_vjp_row<T>(Pbar + i * S, P + i * S, S);
      gemm<T>(false, false, L, E, S, s, Pbar, S, K, E, UK ? 1 : 0, oq + b * L * E, E);
      gemm<T>(true, false, S, E, L, s, Pbar, S, Q, E, UQ ? 1 : 0, ok + b * S * E, E);
    }
    if (oq && !UK && !fold_here) std::fill(oq + b * L * E, oq + (b + 1) * L * E, T(0));
    if (ok && !UQ && !fold_here) std::fill(ok + b * S * E, ok + (b + 1) * S * E, T(0));
  });
}

template <typename T>
void backward(py::object g, py::object grad_p, Arr<T> q, Arr<T> k, Arr<T> v, Arr<T> p, double scale,
              py::object out_q, py::object out_k, py::object out_v, py::object out_t, int threads) {
  const char* fn = "attention_backward";
  const Dims d = check<T>(q, k, v, fn);
  const int L = d.l, S = d.s, E = d.e, Ev = d.ev;
  const int64_t n = d.slices;
  const T *pq = q.data(), *pk = k.data(), *pv = v.data(), *pp = in<T>(p, n, L, S, fn, "p");
  const T* pg = opt<T>(g, n, L, Ev, fn, "g");
  const T* pgp = opt<T>(grad_p, n, L, S, fn, "grad_p");
  T* oq = opt<T>(out_q, n, L, E, fn, "out_q");
  T* ok = opt<T>(out_k, n, S, E, fn, "out_k");
  T* ov = opt<T>(out_v, n, S, Ev, fn, "out_v");
  T* ot = opt<T>(out_t, n, L, S, fn, "out_t");
  if (!pg && !pgp) throw std::invalid_argument(std::string(fn) + ": needs g or grad_p");
  if (ov && !pg) throw std::invalid_argument(std::string(fn) + ": out_v needs g");
  const T s = T(scale);
  const size_t block = size_t(L) * S;
  for_slices<T>(n, threads, ot ? 0 : block, [&](int64_t b, T* scratch) {
    const T *Q = pq + b * L * E, *K = pk + b * S * E, *V = pv + b * S * Ev, *P = pp + b * L * S;
    const T* G = pg ? pg + b * L * Ev : nullptr;
    T* Tm = ot ? ot + b * L * S : scratch;
    const T* GP = pgp ? pgp + b * L * S : nullptr;
    if (G) gemm<T>(false, true, L, S, Ev, 1, G, Ev, V, Ev, 0, Tm, S);  // D = G V^T (+ grad_P per row)
    for (int i = 0; i < L; ++i) {  // T = P (D - <D, P>)
      T* tr = Tm + i * S;
      const T* pr = P + i * S;
      if (GP && G) {
#pragma omp simd
        for (int j = 0; j < S; ++j) tr[j] += GP[i * S + j];
      } else if (GP) {
        std::copy(GP + i * S, GP + (i + 1) * S, tr);
      }
      softmax_vjp_row<T>(tr, pr, S);
    }
    if (oq) gemm<T>(false, false, L, E, S, s, Tm, S, K, E, 0, oq + b * L * E, E);  // dQ = s T K
    if (ok) gemm<T>(true, false, S, E, L, s, Tm, S, Q, E, 0, ok + b * S * E, E);   // dK = s T^T Q
    if (ov) gemm<T>(true, false, S, Ev, L, 1, P, S, G, Ev, 0, ov + b * S * Ev, Ev);  // dV = P^T G
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
  const char* doc_b = "Attention backward per slice from G and/or grad_P: writes dQ, dK, dV and (out_t) T.";
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
        py::arg("out_t"), py::arg("num_threads"), doc_b);
  HF_ATTN_DEFS("f32", float)
  HF_ATTN_DEFS("f64", double)
#undef HF_ATTN_DEFS
}
