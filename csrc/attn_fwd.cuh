// fastattn CUDA backend: FlashAttention-2 forward (one CTA = BM = 64 query rows of one (batch, head);
// 4 warps x 16 rows; K/V tiles of BN = 64 keys stream through shared memory, double-buffered with
// cp.async; S = Q K^T and O += P V on tensor cores (mma.sync m16n8k16, fp32 accumulation); online
// softmax in the exp2 domain with the scale folded in). Included by attn_fwd_{fp16,bf16}.cu.
#pragma once

#include "attn_common.cuh"

namespace fastattn {

template <int D>
struct FwdTile {
  static constexpr int BM = 64, BN = 64, P = HeadDim<D>::P;
  template <typename T>
  static constexpr int smem_bytes() { return (BM * P + 4 * BN * P) * static_cast<int>(sizeof(T)); }
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_fwd_kernel(const FwdParams p) {
  constexpr int BM = FwdTile<D>::BM, BN = FwdTile<D>::BN;
  constexpr int P = HeadDim<D>::P, DK = HeadDim<D>::DK;
  constexpr int KD = DK / 16;    // k-steps of S = Q K^T over the (padded) head dim
  constexpr int NS = BN / 8;     // n-blocks (8 keys) of S per warp
  constexpr int NO = DK / 8;     // n-blocks (8 dims) of O per warp
  using TT = TypeTraits<T>;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * P;           // 2 buffers of BN x P
  T* sV = sK + 2 * BN * P;       // 2 buffers of BN x P

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.heads_q / p.heads_kv);
  const int Sq = p.seqlen_q, Sk = p.seqlen_k;
  const int diag = Sk - Sq;      // bottom-right causal: key j visible from query i iff j <= i + diag

  const T* gq = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h + m0 * p.q_stride_s;
  const T* gk = static_cast<const T*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h;
  const T* gv = static_cast<const T*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h;
  const uint8_t* kpm = p.kpm != nullptr ? p.kpm + b * p.kpm_stride_b : nullptr;

  KeyRange kr = key_range(p.kv_bounds, b, Sk);
  if (p.causal) kr.hi = min(kr.hi, m0 + BM + diag);  // keys past the last row's diagonal are never seen
  const int tile_lo = kr.lo / BN;
  const int tile_hi = kr.hi > kr.lo ? (kr.hi + BN - 1) / BN : tile_lo;

  // This thread's two accumulator rows (g and g + 8 of the warp's 16).
  const int row_a = m0 + warp * 16 + g;

  float acc_o[NO][4];
#pragma unroll
  for (int i = 0; i < NO; ++i) acc_o[i][0] = acc_o[i][1] = acc_o[i][2] = acc_o[i][3] = 0.f;
  float row_max[2] = {-CUDART_INF_F, -CUDART_INF_F};  // running max, log2 domain (scaled)
  float row_sum[2] = {0.f, 0.f};                       // this thread's partial sum of P

  if (tile_lo < tile_hi) {
    const float scale_log2 = p.scale * kLog2e;
    load_tile<T, BM, D>(sQ, gq, p.q_stride_s, Sq - m0, tid);
    load_tile<T, BN, D>(sK, gk + tile_lo * BN * p.k_stride_s, p.k_stride_s, Sk - tile_lo * BN, tid);
    load_tile<T, BN, D>(sV, gv + tile_lo * BN * p.v_stride_s, p.v_stride_s, Sk - tile_lo * BN, tid,
                        kpm ? kpm + tile_lo * BN : nullptr);
    cp_async_commit();

    uint32_t frag_q[KD][4];
    for (int j = tile_lo; j < tile_hi; ++j) {
      const int buf = (j - tile_lo) & 1;
      cp_async_wait_all();
      __syncthreads();  // tile j is visible to all; everyone is done with buffer buf ^ 1
      if (j == tile_lo) {
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) ldmatrix_x4(frag_q[kk], sQ + a_frag_offset<P>(warp * 16, kk, lane));
      }
      if (j + 1 < tile_hi) {  // prefetch tile j + 1 while computing tile j
        const int n1 = (j + 1) * BN;
        load_tile<T, BN, D>(sK + (buf ^ 1) * BN * P, gk + n1 * p.k_stride_s, p.k_stride_s, Sk - n1, tid);
        load_tile<T, BN, D>(sV + (buf ^ 1) * BN * P, gv + n1 * p.v_stride_s, p.v_stride_s, Sk - n1, tid,
                            kpm ? kpm + n1 : nullptr);
        cp_async_commit();
      }
      const T* tK = sK + buf * BN * P;
      const T* tV = sV + buf * BN * P;
      const int n0 = j * BN;

      // S = Q K^T for this warp's 16 rows x BN keys.
      float s[NS][4];
#pragma unroll
      for (int i = 0; i < NS; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
        for (int np = 0; np < NS / 2; ++np) {
          uint32_t bk[4];
          ldmatrix_x4(bk, tK + bt_frag_offset<P>(np * 16, kk, lane));
          mma16816<T>(s[2 * np], frag_q[kk], bk[0], bk[1]);
          mma16816<T>(s[2 * np + 1], frag_q[kk], bk[2], bk[3]);
        }
      }

      // Masks: key tail, key padding, causal diagonal (only tiles that need one pay for it).
      const bool need_mask = n0 + BN > kr.hi || n0 < kr.lo || kpm != nullptr ||
                             (p.causal && n0 + BN - 1 > m0 + diag);
#pragma unroll
      for (int nb = 0; nb < NS; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = s[nb][e] * scale_log2;
          if (need_mask) {
            const int col = n0 + nb * 8 + 2 * t + (e & 1);
            const int row = row_a + (e >> 1) * 8;
            const bool ok = col >= kr.lo && col < kr.hi && (!p.causal || col <= row + diag) && (kpm == nullptr || kpm[col] != 0);
            x = ok ? x : -CUDART_INF_F;
          }
          s[nb][e] = x;
        }
      }

      // Online softmax: rows r = 0 (g) and 1 (g + 8); elements e>>1 == r.
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = row_max[r];
#pragma unroll
        for (int nb = 0; nb < NS; ++nb) mx = fmaxf(mx, fmaxf(s[nb][2 * r], s[nb][2 * r + 1]));
        mx = quad_max(mx);
        const float m_use = mx == -CUDART_INF_F ? 0.f : mx;  // a row with no key yet: avoid inf - inf
        const float alpha = fast_exp2(row_max[r] - m_use);
        row_max[r] = mx;
        float sum = 0.f;
#pragma unroll
        for (int nb = 0; nb < NS; ++nb) {
          s[nb][2 * r] = fast_exp2(s[nb][2 * r] - m_use);
          s[nb][2 * r + 1] = fast_exp2(s[nb][2 * r + 1] - m_use);
          sum += s[nb][2 * r] + s[nb][2 * r + 1];
        }
        row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
        for (int i = 0; i < NO; ++i) {
          acc_o[i][2 * r] *= alpha;
          acc_o[i][2 * r + 1] *= alpha;
        }
      }

      // O += P V. P (16 x BN, C layout) becomes A fragments directly: for keys 16kk..16kk+15,
      // a0/a1 are n-block 2kk's (c0,c1)/(c2,c3) and a2/a3 are n-block 2kk+1's.
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t a[4];
        a[0] = TT::pack(s[2 * kk][0], s[2 * kk][1]);
        a[1] = TT::pack(s[2 * kk][2], s[2 * kk][3]);
        a[2] = TT::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        a[3] = TT::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
        for (int np = 0; np < DK / 16; ++np) {
          uint32_t bv[4];
          ldmatrix_x4_trans(bv, tV + b_frag_offset<P>(kk * 16, np, lane));
          mma16816<T>(acc_o[2 * np], a, bv[0], bv[1]);
          mma16816<T>(acc_o[2 * np + 1], a, bv[2], bv[3]);
        }
      }
    }
  }

  // Epilogue: O / l, lse = (m + log2 l) * ln 2; a row that saw no key gets 0 and lse = -inf.
  T* go = static_cast<T*>(p.out) + b * p.o_stride_b + h * p.o_stride_h;
  float* glse = p.lse + b * p.lse_stride_b + h * p.lse_stride_h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(row_sum[r]);
    const int row = row_a + r * 8;
    const bool empty = !(l > 0.f);
    const float inv = empty ? 0.f : 1.f / l;
    if (row < Sq) {
      T* orow = go + row * p.o_stride_s;
#pragma unroll
      for (int nb = 0; nb < D / 8; ++nb) {  // n-blocks past D (padding) are not stored
        *reinterpret_cast<uint32_t*>(orow + nb * 8 + 2 * t) =
            TT::pack(acc_o[nb][2 * r] * inv, acc_o[nb][2 * r + 1] * inv);
      }
      if (t == 0) glse[row] = empty ? -CUDART_INF_F : (row_max[r] + __log2f(l)) * kLn2;
    }
  }
}

template <typename T, int D>
cudaError_t launch_fwd(const FwdParams& p) {
  constexpr int smem = FwdTile<D>::template smem_bytes<T>();
  auto kernel = attn_fwd_kernel<T, D>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  dim3 grid((p.seqlen_q + FwdTile<D>::BM - 1) / FwdTile<D>::BM, p.heads_q, p.batch);
  kernel<<<grid, kThreads, smem, p.stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_fwd(const FwdParams& p) {
  if (p.seqlen_q == 0 || p.batch == 0 || p.heads_q == 0) return cudaSuccess;
  switch (p.head_dim) {
#define FASTATTN_CASE(d) \
  case d: return launch_fwd<T, d>(p);
    FASTATTN_HEAD_DIMS(FASTATTN_CASE)
#undef FASTATTN_CASE
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastattn
