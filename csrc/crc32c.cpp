// CRC32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of TFRecord framing.
//
// Two paths: the SSE4.2 `crc32` instruction when the CPU has it (picked at run time, so
// the module still loads on CPUs without it), and a portable slicing-by-8 table method
// that consumes 8 bytes per step with eight 256-entry tables. Both take and return the
// plain (unmasked) CRC and can extend a previous value: crc(a + b) == crc(b, crc(a)).
#include <pybind11/pybind11.h>

#include <array>
#include <cstdint>
#include <cstring>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <nmmintrin.h>
#define HF_CRC32C_X86 1
#endif

namespace py = pybind11;

namespace {

constexpr uint32_t kCastagnoliReflected = 0x82F63B78u;

// tables[k][b]: CRC contribution of byte b followed by k zero bytes.
struct SlicingTables {
  std::array<std::array<uint32_t, 256>, 8> t{};
  SlicingTables() {
    for (uint32_t b = 0; b < 256; ++b) {
      uint32_t crc = b;
      for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ ((crc & 1u) ? kCastagnoliReflected : 0u);
      t[0][b] = crc;
    }
    for (uint32_t b = 0; b < 256; ++b)
      for (int k = 1; k < 8; ++k) t[k][b] = (t[k - 1][b] >> 8) ^ t[0][t[k - 1][b] & 0xFFu];
  }
};

const SlicingTables& tables() {
  static const SlicingTables instance;
  return instance;
}

uint32_t crc32c_slicing8(const uint8_t* data, size_t n, uint32_t crc) {
  const auto& t = tables().t;
  crc = ~crc;
  while (n >= 8) {
    uint32_t lo, hi;
    std::memcpy(&lo, data, 4);  // the tables assume little-endian words (x86, ARM)
    std::memcpy(&hi, data + 4, 4);
    lo ^= crc;
    crc = t[7][lo & 0xFF] ^ t[6][(lo >> 8) & 0xFF] ^ t[5][(lo >> 16) & 0xFF] ^ t[4][lo >> 24] ^
          t[3][hi & 0xFF] ^ t[2][(hi >> 8) & 0xFF] ^ t[1][(hi >> 16) & 0xFF] ^ t[0][hi >> 24];
    data += 8;
    n -= 8;
  }
  while (n--) crc = (crc >> 8) ^ t[0][(crc ^ *data++) & 0xFF];
  return ~crc;
}

#ifdef HF_CRC32C_X86
__attribute__((target("sse4.2"))) uint32_t crc32c_sse42(const uint8_t* data, size_t n, uint32_t crc) {
  crc = ~crc;
#if defined(__x86_64__)
  uint64_t wide = crc;
  while (n >= 8) {
    uint64_t word;
    std::memcpy(&word, data, 8);
    wide = _mm_crc32_u64(wide, word);
    data += 8;
    n -= 8;
  }
  crc = static_cast<uint32_t>(wide);
#endif
  while (n--) crc = _mm_crc32_u8(crc, *data++);
  return ~crc;
}

bool cpu_has_sse42() {
  static const bool has = __builtin_cpu_supports("sse4.2");
  return has;
}
#endif

bool hardware_available() {
#ifdef HF_CRC32C_X86
  return cpu_has_sse42();
#else
  return false;
#endif
}

uint32_t crc32c_dispatch(const uint8_t* data, size_t n, uint32_t crc, bool use_hardware) {
#ifdef HF_CRC32C_X86
  if (use_hardware && cpu_has_sse42()) return crc32c_sse42(data, n, crc);
#endif
  return crc32c_slicing8(data, n, crc);
}

// PyBUF_SIMPLE only succeeds for contiguous buffers, so `len` covers exactly the bytes.
struct ContiguousBytes {
  Py_buffer view{};
  explicit ContiguousBytes(const py::object& obj) {
    if (PyObject_GetBuffer(obj.ptr(), &view, PyBUF_SIMPLE) != 0) throw py::error_already_set();
  }
  ~ContiguousBytes() { PyBuffer_Release(&view); }
  ContiguousBytes(const ContiguousBytes&) = delete;
  ContiguousBytes& operator=(const ContiguousBytes&) = delete;
};

uint32_t crc32c_buffer(const py::object& data, uint32_t value, bool use_hardware) {
  ContiguousBytes bytes(data);
  const auto* ptr = static_cast<const uint8_t*>(bytes.view.buf);
  const size_t n = static_cast<size_t>(bytes.view.len);
  py::gil_scoped_release release;  // the buffer stays pinned until `bytes` is released
  return crc32c_dispatch(ptr, n, value, use_hardware);
}

}  // namespace

void register_crc32c(py::module_& m) {
  m.def("crc32c",
        [](const py::object& data, uint32_t value) { return crc32c_buffer(data, value, true); },
        py::arg("data"), py::arg("value") = 0,
        "CRC32C of a bytes-like object, extending `value` (SSE4.2 when available, else slicing-by-8).");
  m.def("crc32c_portable",
        [](const py::object& data, uint32_t value) { return crc32c_buffer(data, value, false); },
        py::arg("data"), py::arg("value") = 0, "CRC32C with the portable slicing-by-8 tables only.");
  m.def("crc32c_hardware_available", &hardware_available,
        "Whether crc32c() uses the SSE4.2 crc32 instruction on this CPU.");
}
