// Entry point of harmonizer_fast._C: each csrc/*.cpp file exposes a register_* function.
#include <pybind11/pybind11.h>

#include "exp_nonpositive.h"

#ifdef HF_HAVE_OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

// register_* declarations (one per csrc/*.cpp file)
void register_crc32c(py::module_& m);
void register_metrics(py::module_& m);
void register_ridge(py::module_& m);
void register_pls(py::module_& m);
void register_layer_norm(py::module_& m);
void register_gelu(py::module_& m);
void register_attention(py::module_& m);
void register_harmonization_term(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "harmonizer_fast native kernels (pybind11 + OpenMP)";
  m.def("openmp_max_threads", []() {
#ifdef HF_HAVE_OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
  m.def(
      "set_avx512_allowed",
      [](bool allowed) {
#ifdef HF_HAVE_AVX512_EXP
        avx512_allowed() = allowed;
#else
        (void)allowed;
#endif
      },
      py::arg("allowed"),
      "Allow (default) or forbid the AVX-512 forms of the GELU and attention kernels; forbidding "
      "runs the portable forms, which tests compare on AVX-512 machines too.");
  // register_* calls
  register_crc32c(m);
  register_metrics(m);
  register_ridge(m);
  register_pls(m);
  register_layer_norm(m);
  register_gelu(m);
  register_attention(m);
  register_harmonization_term(m);
}
