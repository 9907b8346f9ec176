// fastattn._C: the thin pybind11 layer over the CUDA kernels. It takes raw device pointers (Python
// ints from tensor.data_ptr()), int64 element strides, sizes and the CUDA stream handle, fills the
// params structs, and launches. No PyTorch headers: allocation, validation and device/stream choice
// happen in fastattn/launchers/cuda_attention.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "attn_params.h"

namespace py = pybind11;
using fastattn::BwdParams;
using fastattn::FwdParams;

namespace {

template <typename P>
P* ptr(std::uintptr_t x) { return reinterpret_cast<P*>(x); }

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("fastattn._C.") + what + ": " + cudaGetErrorString(err));
}

void expect(const std::vector<int64_t>& v, std::size_t n, const char* name) {
  if (v.size() != n) {
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(n) + " values, got " +
                                std::to_string(v.size()));
  }
}

fastattn::DType dtype_of(int code) {
  if (code != fastattn::kFloat16 && code != fastattn::kBFloat16) throw std::invalid_argument("dtype code must be 0 or 1");
  return static_cast<fastattn::DType>(code);
}

void set_sizes(int& batch, int& sq, int& sk, int& hq, int& hkv, int& d, const std::vector<int64_t>& sizes) {
  expect(sizes, 6, "sizes (B, Sq, Sk, Hq, Hkv, D)");
  batch = static_cast<int>(sizes[0]);
  sq = static_cast<int>(sizes[1]);
  sk = static_cast<int>(sizes[2]);
  hq = static_cast<int>(sizes[3]);
  hkv = static_cast<int>(sizes[4]);
  d = static_cast<int>(sizes[5]);
  if (!fastattn::head_dim_supported(d)) throw std::invalid_argument("head dim " + std::to_string(d) + " not built");
  if (hkv <= 0 || hq % hkv != 0) throw std::invalid_argument("heads_q must be a positive multiple of heads_kv");
}

// strides: q (b, s, h), k (b, s, h), v (b, s, h), out (b, s, h), lse (b, h), kpm (b) -> 15 values.
void fwd(int dtype, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out, std::uintptr_t lse,
         std::uintptr_t kpm, std::uintptr_t kv_bounds, const std::vector<int64_t>& strides,
         const std::vector<int64_t>& sizes, double scale, bool causal, std::uintptr_t stream) {
  expect(strides, 15, "strides");
  FwdParams p{};
  p.q = ptr<const void>(q);
  p.k = ptr<const void>(k);
  p.v = ptr<const void>(v);
  p.out = ptr<void>(out);
  p.lse = ptr<float>(lse);
  p.kpm = ptr<const uint8_t>(kpm);
  p.kv_bounds = ptr<const int32_t>(kv_bounds);
  const int64_t* s = strides.data();
  p.q_stride_b = s[0], p.q_stride_s = s[1], p.q_stride_h = s[2];
  p.k_stride_b = s[3], p.k_stride_s = s[4], p.k_stride_h = s[5];
  p.v_stride_b = s[6], p.v_stride_s = s[7], p.v_stride_h = s[8];
  p.o_stride_b = s[9], p.o_stride_s = s[10], p.o_stride_h = s[11];
  p.lse_stride_b = s[12], p.lse_stride_h = s[13];
  p.kpm_stride_b = s[14];
  set_sizes(p.batch, p.seqlen_q, p.seqlen_k, p.heads_q, p.heads_kv, p.head_dim, sizes);
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.dtype = dtype_of(dtype);
  p.stream = reinterpret_cast<cudaStream_t>(stream);
  check(p.dtype == fastattn::kFloat16 ? fastattn::run_fwd_fp16(p) : fastattn::run_fwd_bf16(p), "fwd");
}

// strides: q, k, v, out, dout, dq, dk, dv (b, s, h each), lse (b, h) -> 26 values; kpm_stride_b separate.
void bwd(int dtype, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out, std::uintptr_t dout,
         std::uintptr_t lse, std::uintptr_t dlse, std::uintptr_t delta, std::uintptr_t dq, std::uintptr_t dk,
         std::uintptr_t dv, std::uintptr_t kpm, std::uintptr_t kv_bounds, int64_t kpm_stride_b,
         const std::vector<int64_t>& strides, const std::vector<int64_t>& sizes, double scale, bool causal,
         std::uintptr_t stream) {
  expect(strides, 26, "strides");
  BwdParams p{};
  p.q = ptr<const void>(q);
  p.k = ptr<const void>(k);
  p.v = ptr<const void>(v);
  p.out = ptr<const void>(out);
  p.dout = ptr<const void>(dout);
  p.lse = ptr<const float>(lse);
  p.dlse = ptr<const float>(dlse);
  p.delta = ptr<float>(delta);
  p.dq = ptr<void>(dq);
  p.dk = ptr<void>(dk);
  p.dv = ptr<void>(dv);
  p.kpm = ptr<const uint8_t>(kpm);
  p.kv_bounds = ptr<const int32_t>(kv_bounds);
  const int64_t* s = strides.data();
  p.q_stride_b = s[0], p.q_stride_s = s[1], p.q_stride_h = s[2];
  p.k_stride_b = s[3], p.k_stride_s = s[4], p.k_stride_h = s[5];
  p.v_stride_b = s[6], p.v_stride_s = s[7], p.v_stride_h = s[8];
  p.o_stride_b = s[9], p.o_stride_s = s[10], p.o_stride_h = s[11];
  p.do_stride_b = s[12], p.do_stride_s = s[13], p.do_stride_h = s[14];
  p.dq_stride_b = s[15], p.dq_stride_s = s[16], p.dq_stride_h = s[17];
  p.dk_stride_b = s[18], p.dk_stride_s = s[19], p.dk_stride_h = s[20];
  p.dv_stride_b = s[21], p.dv_stride_s = s[22], p.dv_stride_h = s[23];
  p.lse_stride_b = s[24], p.lse_stride_h = s[25];
  p.kpm_stride_b = kpm_stride_b;
  set_sizes(p.batch, p.seqlen_q, p.seqlen_k, p.heads_q, p.heads_kv, p.head_dim, sizes);
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.dtype = dtype_of(dtype);
  p.stream = reinterpret_cast<cudaStream_t>(stream);
  check(p.dtype == fastattn::kFloat16 ? fastattn::run_bwd_fp16(p) : fastattn::run_bwd_bf16(p), "bwd");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastattn CUDA kernels (FlashAttention-2 forward/backward, mma.sync; sm_80+)";
  py::list dims;
#define FASTATTN_APPEND(d) dims.append(d);
  FASTATTN_HEAD_DIMS(FASTATTN_APPEND)
#undef FASTATTN_APPEND
  m.attr("HEAD_DIMS") = py::tuple(dims);
  m.def("fwd", &fwd, "attention forward", py::arg("dtype"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("kpm"), py::arg("kv_bounds"), py::arg("strides"), py::arg("sizes"),
        py::arg("scale"), py::arg("causal"), py::arg("stream"));
  m.def("bwd", &bwd, "attention backward (dq, dk, dv)", py::arg("dtype"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("dout"), py::arg("lse"), py::arg("dlse"), py::arg("delta"), py::arg("dq"),
        py::arg("dk"), py::arg("dv"), py::arg("kpm"), py::arg("kv_bounds"), py::arg("kpm_stride_b"),
        py::arg("strides"), py::arg("sizes"), py::arg("scale"), py::arg("causal"), py::arg("stream"));
}
