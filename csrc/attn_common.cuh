// fastattn CUDA backend: device primitives shared by the forward and backward kernels (sm_80+).
//
// Tensor-core fragment layouts used throughout (PTX ISA, "Warp-level matrix fragments for
// mma.m16n8k16" with .f16/.bf16 inputs and .f32 accumulators). For a lane of a warp let
//   g = lane >> 2  (the "groupID")   and   t = lane & 3  (the "threadID_in_group").
//   A (16x16, row-major, 4 x .b32 regs, 2 elements each, low half first):
//     a0 = A[g    ][2t, 2t+1]   a1 = A[g + 8][2t, 2t+1]
//     a2 = A[g    ][2t+8, 2t+9] a3 = A[g + 8][2t+8, 2t+9]
//   B (16x8, K x N, "col" = stored N-major, 2 x .b32 regs):
//     b0 = B[2t, 2t+1][g]       b1 = B[2t+8, 2t+9][g]
//   C/D (16x8, 4 x .f32 regs):
//     c0, c1 = C[g][2t, 2t+1]   c2, c3 = C[g + 8][2t, 2t+1]
// ldmatrix.m8n8.x4.b16 (PTX ISA, "ldmatrix"): lanes 8j..8j+7 give the 8 row addresses of matrix j
// (16 contiguous bytes each); lane l receives in register j the 2 elements M_j[l >> 2][2(l & 3), +1].
// With .trans it receives M_j[2(l & 3)][l >> 2] and M_j[2(l & 3) + 1][l >> 2] (the transpose).
// tests/test_cuda_fragments.py models these maps (and the address formulas below) in numpy and
// checks that they reproduce Q K^T and P V.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <math_constants.h>

#include "attn_params.h"

namespace fastattn {

constexpr int kThreads = 128;  // 4 warps per CTA in every attention kernel
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T> struct TypeTraits;
template <> struct TypeTraits<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t x) {
    return __half22float2(*reinterpret_cast<__half2*>(&x));
  }
};
template <> struct TypeTraits<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t x) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&x));
  }
};

// D += A * B, one m16n8k16 tensor-core op (fp32 accumulators), layouts as documented above.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// 16-byte global -> shared copy; when !pred nothing is read and the 16 bytes are zero-filled.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(pred ? 16 : 0));
}
// 4-byte variant (lse / delta rows).
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool pred) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(pred ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Head dims. D (a multiple of 8, <= 128) is padded to DK, a multiple of 16, for the MMAs (the extra
// 16-byte chunks are zero-filled in shared memory, so they add nothing to Q K^T, and the output
// columns they produce are not stored), and shared-memory rows are P >= DK elements apart, a multiple
// of 64, so that the swizzle below has whole groups of 8 chunks to permute.
template <int D>
struct HeadDim {
  static_assert(D % 8 == 0 && D >= 8 && D <= 128, "head dim must be a multiple of 8 in [8, 128]");
  static constexpr int DK = (D + 15) / 16 * 16;  // MMA extent over the head dim
  static constexpr int P = (DK + 63) / 64 * 64;  // shared-memory row pitch (elements)
  static constexpr int CHUNKS = D / 8;           // real 16-byte chunks per row
  static constexpr int KCHUNKS = DK / 8;         // chunks per row that the MMAs read
};

// Shared-memory tiles are ROWS x P elements, row-major, in 16-byte chunks of 8 elements. Chunk c of
// row r is stored at chunk position c ^ (r & 7) (an XOR swizzle): the 8 row addresses of one
// ldmatrix phase (8 consecutive rows, same logical chunk) then hit 8 different 16-byte bank groups,
// and so do the 16-byte cp.async stores. Needs P / 8 >= 8 chunks per row (P a multiple of 64).
template <int P>
__device__ __forceinline__ int swz(int row, int chunk) {
  static_assert(P % 64 == 0, "the swizzle needs whole groups of 8 chunks per row");
  return row * P + ((chunk ^ (row & 7)) << 3);
}

// Copy rows [0, ROWS) of a (row stride `stride` elements) global tile of head dim D into a swizzled
// smem tile: rows >= valid_rows, rows whose `keep` byte is 0 (padded keys, when keep != nullptr) and
// the chunks between D and DK are zero-filled and not read, so garbage there (NaN, inf) never meets
// a zero probability.
template <typename T, int ROWS, int D>
__device__ __forceinline__ void load_tile(T* smem, const T* gmem, int64_t stride, int valid_rows, int tid,
                                          const uint8_t* keep = nullptr) {
  using HD = HeadDim<D>;
  constexpr int kTotal = ROWS * HD::KCHUNKS;
#pragma unroll
  for (int i = 0; i < (kTotal + kThreads - 1) / kThreads; ++i) {
    const int id = tid + i * kThreads;
    if (kTotal % kThreads != 0 && id >= kTotal) break;
    const int row = id / HD::KCHUNKS, chunk = id % HD::KCHUNKS;
    const bool ok = row < valid_rows && chunk < HD::CHUNKS && (keep == nullptr || keep[row] != 0);
    const T* src = ok ? gmem + row * stride + chunk * 8 : gmem;
    cp_async16(smem + swz<HD::P>(row, chunk), src, ok);
  }
}

// Address that lane `lane` passes to ldmatrix_x4 (non-transposed) to read the A fragment
// (16 rows x 16 cols starting at (row0, 16*kk)) of a row-major smem tile of pitch P:
// matrix j = lane >> 3 is rows row0 + 8*(j & 1) .. +7, cols 16kk + 8*(j >> 1) .. +7, so registers
// r0..r3 come out as a0..a3 (a1 = rows +8, a2 = cols +8).
template <int P>
__device__ __forceinline__ int a_frag_offset(int row0, int kk, int lane) {
  return swz<P>(row0 + (lane & 15), kk * 2 + (lane >> 4));
}

// ldmatrix_x4 (non-transposed) address for the B fragments of two n-blocks when B[k][n] = M[n][k]
// (M a row-major smem tile whose rows are the n index: K for S = Q K^T): matrix j = lane >> 3 is
// rows n0 + 8*(j >> 1) .. +7, cols 16kk + 8*(j & 1) .. +7, so r0, r1 = (b0, b1) of n-block n0 and
// r2, r3 = (b0, b1) of n-block n0 + 8.
template <int P>
__device__ __forceinline__ int bt_frag_offset(int n0, int kk, int lane) {
  return swz<P>(n0 + (lane & 7) + ((lane >> 4) << 3), kk * 2 + ((lane >> 3) & 1));
}

// ldmatrix_x4_trans address for the B fragments of two n-blocks when B[k][n] = M[k][n] (M row-major
// in smem with rows the k index: V for O = P V): matrix j = lane >> 3 is rows k0 + 8*(j & 1) .. +7,
// cols (n-chunk 2*np + (j >> 1)), so r0, r1 = (b0, b1) of n-block 16np and r2, r3 those of 16np + 8.
template <int P>
__device__ __forceinline__ int b_frag_offset(int k0, int np, int lane) {
  return swz<P>(k0 + (lane & 7) + (((lane >> 3) & 1) << 3), np * 2 + (lane >> 4));
}

// 2^x with the hardware approximation (ex2.approx: max relative error ~2^-22; 2^-inf = +0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Reductions over the 4 lanes of a quad (the lanes sharing one accumulator row).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// The visible key range [lo, hi) of batch element b and its tile range; causal bounds come later.
struct KeyRange {
  int lo, hi;
};
__device__ __forceinline__ KeyRange key_range(const int32_t* bounds, int b, int seqlen_k) {
  KeyRange r{0, seqlen_k};
  if (bounds != nullptr) {
    r.lo = max(0, bounds[2 * b]);
    r.hi = min(seqlen_k, bounds[2 * b + 1]);
  }
  return r;
}

}  // namespace fastattn
