// One contiguous range of work per OpenMP thread, for the elementwise second-order kernels.
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef HF_HAVE_OPENMP
#include <omp.h>
#endif

// Threads to use for `work` values over `n` independent units: at most `requested` and `n`, and
// one below ~32K values, where starting a second thread costs more than it saves.
inline int threads_for(int requested, int64_t work, int64_t n) {
  if (work < (int64_t(1) << 15)) return 1;
  return int(std::max<int64_t>(1, std::min<int64_t>(std::max(1, requested), n)));
}

// Runs body(begin, end, thread) on `threads` threads over [0, n), the boundaries at multiples of
// `align` units (so that threads do not write the same cache line).
template <typename Body>
void parallel_ranges(int64_t n, int threads, int64_t align, Body&& body) {
  const int64_t blocks = (n + align - 1) / align;
#ifdef HF_HAVE_OPENMP
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
  {
    const int t = 0, nt = 1;
    (void)threads;
#endif
    body(std::min(n, blocks * t / nt * align), std::min(n, blocks * (t + 1) / nt * align), t);
  }
}
