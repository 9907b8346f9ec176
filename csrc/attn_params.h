// fastattn CUDA backend: parameter structs shared by the kernels and the pybind11 binding.
// No PyTorch headers here (docs/design.md, "Kernels"): raw device pointers, int64 element strides,
// sizes, and the stream to launch on. Layout is FlashAttention's: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D),
// each addressed as ptr + b*stride_b + s*stride_s + h*stride_h + d (the head dim is contiguous).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace fastattn {

enum DType : int { kFloat16 = 0, kBFloat16 = 1 };

struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;                  // (B, Hq, Sq) float32, natural log; row stride 1
  const uint8_t* kpm;          // optional (B, Sk) key-padding mask, nonzero = real key; nullptr = none
  const int32_t* kv_bounds;    // optional (B, 2): [first real key, last real key + 1]; nullptr = [0, Sk)
  int64_t q_stride_b, q_stride_s, q_stride_h;
  int64_t k_stride_b, k_stride_s, k_stride_h;
  int64_t v_stride_b, v_stride_s, v_stride_h;
  int64_t o_stride_b, o_stride_s, o_stride_h;
  int64_t lse_stride_b, lse_stride_h;
  int64_t kpm_stride_b;
  int batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim;
  float scale;                 // softmax scale (applied to q.k)
  bool causal;                 // bottom-right: query i sees keys j <= i + Sk - Sq
  DType dtype;
  cudaStream_t stream;
};

struct BwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const void* dout;
  const float* lse;            // (B, Hq, Sq) as written by the forward
  const float* dlse;           // optional (B, Hq, Sq), same strides as lse; nullptr = none
  float* delta;                // scratch (B, Hq, Sq), same strides as lse: rowsum(dO * O) - dlse
  void* dq;
  void* dk;
  void* dv;
  const uint8_t* kpm;
  const int32_t* kv_bounds;
  int64_t q_stride_b, q_stride_s, q_stride_h;
  int64_t k_stride_b, k_stride_s, k_stride_h;
  int64_t v_stride_b, v_stride_s, v_stride_h;
  int64_t o_stride_b, o_stride_s, o_stride_h;
  int64_t do_stride_b, do_stride_s, do_stride_h;
  int64_t dq_stride_b, dq_stride_s, dq_stride_h;
  int64_t dk_stride_b, dk_stride_s, dk_stride_h;
  int64_t dv_stride_b, dv_stride_s, dv_stride_h;
  int64_t lse_stride_b, lse_stride_h;
  int64_t kpm_stride_b;
  int batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim;
  float scale;
  bool causal;
  DType dtype;
  cudaStream_t stream;
};

// Launchers (defined in attn_fwd_*.cu / attn_bwd_*.cu). They return cudaSuccess, a launch error, or
// cudaErrorInvalidValue for a head dim / dtype without an instantiated kernel.
cudaError_t run_fwd_fp16(const FwdParams& p);
cudaError_t run_fwd_bf16(const FwdParams& p);
cudaError_t run_bwd_fp16(const BwdParams& p);
cudaError_t run_bwd_bf16(const BwdParams& p);

// The head dims with instantiated kernels (X-macro: each costs a forward and two backward kernels per
// dtype and arch in build time). The kernels themselves take any multiple of 8 up to 128.
#define FASTATTN_HEAD_DIMS(X) X(32) X(40) X(64) X(80) X(96) X(128)

inline bool head_dim_supported(int d) {
#define FASTATTN_IS(x) d == x ||
  return FASTATTN_HEAD_DIMS(FASTATTN_IS) false;
#undef FASTATTN_IS
}

}  // namespace fastattn
