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
