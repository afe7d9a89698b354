// exp(a) for a <= 0 in float32, branch-free so that it vectorizes (Cody-Waite reduction,
// degree-6 polynomial: relative error below 2e-7 over the range used); shared by the GELU and
// attention kernels. A file that wants it vectorized compiles with
// `#pragma GCC optimize("no-trapping-math")` before including this header: the selects and the
// float-to-int conversion are only if-converted when operations may be assumed not to trap.
#pragma once

#include <cstdint>

// 0 below float's normal range, and for a NaN `a` (callers that can see NaN handle it).
__attribute__((always_inline)) inline float exp_nonpositive(float a) {
  const float clamped = a > -87.0f ? a : -87.0f;
  const int32_t k = int32_t(clamped * 1.44269504088896341f - 0.5f);  // round(a / ln 2), a <= 0
  const float n = float(k);
  float r = clamped - n * 0.693145751953125f;  // ln 2, high part (exact in float)
  r = r - n * 1.428606765330187045e-06f;        // ln 2, low part
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float scale = __builtin_bit_cast(float, (k + 127) << 23);
  return a > -87.0f ? p * scale : 0.0f;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HF_HAVE_AVX512_EXP 1

// Whether the AVX-512 forms may run (the CPU has them and avx512_allowed() is true; tests turn
// it off through _C.set_avx512_allowed to run the portable forms on an AVX-512 machine too).
inline bool& avx512_allowed() {
  static bool allowed = true;
  return allowed;
}
inline bool use_avx512() {
  static const bool present = __builtin_cpu_supports("avx512f");
  return present && avx512_allowed();
}

// The same reduction and polynomial, 16 floats at a time (GCC vectorizes the scalar form only
// for SSE2, 4 floats). k rounds to nearest here (the scalar form truncates a - 1/2), so the two
// may differ in the last bit.
__attribute__((target("avx512f"), always_inline)) inline __m512 exp_nonpositive_avx512(__m512 a) {
  const __m512 low = _mm512_set1_ps(-87.0f);
  const __m512 clamped = _mm512_max_ps(a, low);  // a NaN a gives -87 here, then 0 below
  const __m512i k = _mm512_cvt_roundps_epi32(_mm512_mul_ps(clamped, _mm512_set1_ps(1.44269504088896341f)),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 n = _mm512_cvtepi32_ps(k);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), clamped);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(k, _mm512_set1_epi32(127)), 23));
  const __mmask16 in_range = _mm512_cmp_ps_mask(a, low, _CMP_GT_OQ);
  return _mm512_maskz_mul_ps(in_range, p, scale);
}
#endif
