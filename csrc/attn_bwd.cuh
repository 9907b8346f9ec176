// fastattn CUDA backend: FlashAttention-2 backward, deterministic (no atomics), three kernels:
//  1. attn_bwd_preprocess_kernel: delta_i = rowsum(dO_i * O_i) - dlse_i (dlse: the lse's cotangent,
//     0 when the caller did not differentiate through lse; d lse_i / d s_ij = P_ij folds it in here).
//  2. attn_bwd_dkdv_kernel: one CTA per BN = 64 keys of one (batch, kv head); each warp owns 16 keys
//     and keeps its dK, dV rows in registers while query tiles of every query head of the GQA group
//     stream through shared memory (double-buffered cp.async): S^T = K Q^T, P^T = exp(S^T - lse),
//     dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q. The group's sum happens
//     inside one CTA, in a fixed order.
//  3. attn_bwd_dq_kernel: one CTA per BM = 64 queries of one (batch, q head), K/V tiles stream:
//     S = Q K^T, dP = dO V^T, dS = P (dP - delta), dQ += dS K. (dQ is recomputed separately rather
//     than accumulated with atomics in kernel 2: deterministic, at the price of a second S and dP.)
// Rows with lse = -inf (no visible key) get P = 0, hence zero gradients. Included by attn_bwd_*.cu.
#pragma once

#include "attn_common.cuh"

namespace fastattn {

// ---------------------------------------------------------------- 1. delta
template <typename T>
__global__ void __launch_bounds__(kThreads) attn_bwd_preprocess_kernel(const BwdParams p) {
  using TT = TypeTraits<T>;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row = blockIdx.x * (kThreads / 32) + warp, h = blockIdx.y, b = blockIdx.z;
  if (row >= p.seqlen_q) return;
  const T* o = static_cast<const T*>(p.out) + b * p.o_stride_b + h * p.o_stride_h + row * p.o_stride_s;
  const T* d = static_cast<const T*>(p.dout) + b * p.do_stride_b + h * p.do_stride_h + row * p.do_stride_s;
  float sum = 0.f;
  for (int c = lane * 2; c < p.head_dim; c += 64) {  // head_dim is a multiple of 8
    const float2 x = TT::unpack(*reinterpret_cast<const uint32_t*>(o + c));
    const float2 y = TT::unpack(*reinterpret_cast<const uint32_t*>(d + c));
    sum += x.x * y.x + x.y * y.y;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) {
    const int64_t idx = b * p.lse_stride_b + h * p.lse_stride_h + row;
    p.delta[idx] = sum - (p.dlse != nullptr ? p.dlse[idx] : 0.f);
  }
}

// lse as the kernels use it: log2 domain, and +inf for a row with no visible key (so P = 0 there).
__device__ __forceinline__ float lse_log2(float lse) { return lse == -CUDART_INF_F ? CUDART_INF_F : lse * kLog2e; }

// ---------------------------------------------------------------- 2. dK, dV
template <int D>
struct DkdvTile {
  static constexpr int BN = 64;                 // keys per CTA (16 per warp)
  static constexpr int BM = D <= 64 ? 64 : 32;  // queries per step (registers: dK + dV rows stay live)
  static constexpr int P = HeadDim<D>::P;
  template <typename T>
  static constexpr int smem_bytes() {
    return (2 * BN * P + 4 * BM * P) * static_cast<int>(sizeof(T)) + 4 * BM * static_cast<int>(sizeof(float));
  }
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_bwd_dkdv_kernel(const BwdParams p) {
  constexpr int BN = DkdvTile<D>::BN, BM = DkdvTile<D>::BM;
  constexpr int P = HeadDim<D>::P, DK = HeadDim<D>::DK;
  constexpr int KD = DK / 16, NQ = BM / 8, NO = DK / 8;
  using TT = TypeTraits<T>;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BN * P;
  T* sQ = sV + BN * P;       // 2 buffers of BM x P
  T* sdO = sQ + 2 * BM * P;  // 2 buffers of BM x P
  float* sLse = reinterpret_cast<float*>(sdO + 2 * BM * P);  // 2 x BM
  float* sDelta = sLse + 2 * BM;                             // 2 x BM

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * BN, hk = blockIdx.y, b = blockIdx.z;
  const int group = p.heads_q / p.heads_kv;
  const int Sq = p.seqlen_q, Sk = p.seqlen_k, diag = Sk - Sq;

  const KeyRange kr = key_range(p.kv_bounds, b, Sk);
  const uint8_t* kpm = p.kpm != nullptr ? p.kpm + b * p.kpm_stride_b : nullptr;
  // This thread's two key rows (g, g + 8 of the warp's 16) and whether each is a real key.
  int key[2];
  bool key_ok[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    key[r] = n0 + warp * 16 + g + 8 * r;
    key_ok[r] = key[r] >= kr.lo && key[r] < kr.hi && (kpm == nullptr || kpm[key[r]] != 0);
  }

  // Query tiles that can see a key of this block: causal -> from query n0 - diag on.
  const int m_lo = p.causal ? max(0, n0 - diag) : 0;
  const int qt_lo = m_lo / BM, qt_hi = (Sq + BM - 1) / BM;
  const bool any_key = n0 < kr.hi && n0 + BN > kr.lo;
  const int n_qt = (any_key && m_lo < Sq) ? qt_hi - qt_lo : 0;
  const int n_iter = n_qt * group;

  float acc_dk[NO][4], acc_dv[NO][4];
#pragma unroll
  for (int i = 0; i < NO; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dk[i][e] = acc_dv[i][e] = 0.f;
  }

  const T* gk = static_cast<const T*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h + n0 * p.k_stride_s;
  const T* gv = static_cast<const T*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h + n0 * p.v_stride_s;

  // Step `it` = (query head hk * group + it / n_qt, query tile qt_lo + it % n_qt) into buffer `buf`.
  auto issue = [&](int it, int buf) {
    const int hq = hk * group + it / n_qt;
    const int m0 = (qt_lo + it % n_qt) * BM;
    const T* gq = static_cast<const T*>(p.q) + b * p.q_stride_b + hq * p.q_stride_h + m0 * p.q_stride_s;
    const T* gdo = static_cast<const T*>(p.dout) + b * p.do_stride_b + hq * p.do_stride_h + m0 * p.do_stride_s;
    load_tile<T, BM, D>(sQ + buf * BM * P, gq, p.q_stride_s, Sq - m0, tid);
    load_tile<T, BM, D>(sdO + buf * BM * P, gdo, p.do_stride_s, Sq - m0, tid);
    if (tid < BM) {
      const int64_t idx = b * p.lse_stride_b + hq * p.lse_stride_h + m0 + tid;
      const bool ok = m0 + tid < Sq;
      cp_async4(sLse + buf * BM + tid, ok ? p.lse + idx : p.lse, ok);
      cp_async4(sDelta + buf * BM + tid, ok ? p.delta + idx : p.delta, ok);
    }
    cp_async_commit();
  };

  if (n_iter > 0) {
    const float scale_log2 = p.scale * kLog2e;
    load_tile<T, BN, D>(sK, gk, p.k_stride_s, Sk - n0, tid, kpm ? kpm + n0 : nullptr);  // padded keys: zeros
    load_tile<T, BN, D>(sV, gv, p.v_stride_s, Sk - n0, tid, kpm ? kpm + n0 : nullptr);
    issue(0, 0);  // one commit group: K, V and the first query step

    for (int it = 0; it < n_iter; ++it) {
      const int buf = it & 1;
      cp_async_wait_all();
      __syncthreads();
      if (it + 1 < n_iter) issue(it + 1, buf ^ 1);
      const int m0 = (qt_lo + it % n_qt) * BM;
      const T* tQ = sQ + buf * BM * P;
      const T* tdO = sdO + buf * BM * P;
      const float* tLse = sLse + buf * BM;
      const float* tDelta = sDelta + buf * BM;

      // S^T = K Q^T: this warp's 16 keys x BM queries.
      float st[NQ][4];
#pragma unroll
      for (int i = 0; i < NQ; ++i) st[i][0] = st[i][1] = st[i][2] = st[i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) {
        uint32_t ak[4];
        ldmatrix_x4(ak, sK + a_frag_offset<P>(warp * 16, kk, lane));
#pragma unroll
        for (int mp = 0; mp < NQ / 2; ++mp) {
          uint32_t bq[4];
          ldmatrix_x4(bq, tQ + bt_frag_offset<P>(mp * 16, kk, lane));
          mma16816<T>(st[2 * mp], ak, bq[0], bq[1]);
          mma16816<T>(st[2 * mp + 1], ak, bq[2], bq[3]);
        }
      }
      // P^T = exp2(S^T * scale * log2 e - lse * log2 e), 0 where masked.
#pragma unroll
      for (int nb = 0; nb < NQ; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = nb * 8 + 2 * t + (e & 1);
          const int q = m0 + qi;
          const int r = e >> 1;
          const bool ok = key_ok[r] && q < Sq && (!p.causal || key[r] <= q + diag);
          st[nb][e] = ok ? fast_exp2(st[nb][e] * scale_log2 - lse_log2(tLse[qi])) : 0.f;
        }
      }
      // dV += P^T dO (A = P^T from the accumulators, B = dO rows via ldmatrix.trans).
#pragma unroll
      for (int kq = 0; kq < BM / 16; ++kq) {
        uint32_t a[4];
        a[0] = TT::pack(st[2 * kq][0], st[2 * kq][1]);
        a[1] = TT::pack(st[2 * kq][2], st[2 * kq][3]);
        a[2] = TT::pack(st[2 * kq + 1][0], st[2 * kq + 1][1]);
        a[3] = TT::pack(st[2 * kq + 1][2], st[2 * kq + 1][3]);
#pragma unroll
        for (int np = 0; np < DK / 16; ++np) {
          uint32_t bd[4];
          ldmatrix_x4_trans(bd, tdO + b_frag_offset<P>(kq * 16, np, lane));
          mma16816<T>(acc_dv[2 * np], a, bd[0], bd[1]);
          mma16816<T>(acc_dv[2 * np + 1], a, bd[2], bd[3]);
        }
      }
      // dP^T = V dO^T.
      float dpt[NQ][4];
#pragma unroll
      for (int i = 0; i < NQ; ++i) dpt[i][0] = dpt[i][1] = dpt[i][2] = dpt[i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) {
        uint32_t av[4];
        ldmatrix_x4(av, sV + a_frag_offset<P>(warp * 16, kk, lane));
#pragma unroll
        for (int mp = 0; mp < NQ / 2; ++mp) {
          uint32_t bd[4];
          ldmatrix_x4(bd, tdO + bt_frag_offset<P>(mp * 16, kk, lane));
          mma16816<T>(dpt[2 * mp], av, bd[0], bd[1]);
          mma16816<T>(dpt[2 * mp + 1], av, bd[2], bd[3]);
        }
      }
      // dS^T = P^T (dP^T - delta), then dK += dS^T Q.
#pragma unroll
      for (int nb = 0; nb < NQ; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dpt[nb][e] = st[nb][e] * (dpt[nb][e] - tDelta[nb * 8 + 2 * t + (e & 1)]);
      }
#pragma unroll
      for (int kq = 0; kq < BM / 16; ++kq) {
        uint32_t a[4];
        a[0] = TT::pack(dpt[2 * kq][0], dpt[2 * kq][1]);
        a[1] = TT::pack(dpt[2 * kq][2], dpt[2 * kq][3]);
        a[2] = TT::pack(dpt[2 * kq + 1][0], dpt[2 * kq + 1][1]);
        a[3] = TT::pack(dpt[2 * kq + 1][2], dpt[2 * kq + 1][3]);
#pragma unroll
        for (int np = 0; np < DK / 16; ++np) {
          uint32_t bq[4];
          ldmatrix_x4_trans(bq, tQ + b_frag_offset<P>(kq * 16, np, lane));
          mma16816<T>(acc_dk[2 * np], a, bq[0], bq[1]);
          mma16816<T>(acc_dk[2 * np + 1], a, bq[2], bq[3]);
        }
      }
    }
  }

  T* gdk = static_cast<T*>(p.dk) + b * p.dk_stride_b + hk * p.dk_stride_h;
  T* gdv = static_cast<T*>(p.dv) + b * p.dv_stride_b + hk * p.dv_stride_h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (key[r] >= Sk) continue;
    T* dkrow = gdk + key[r] * p.dk_stride_s;
    T* dvrow = gdv + key[r] * p.dv_stride_s;
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb) {  // n-blocks past D (padding) are not stored
      *reinterpret_cast<uint32_t*>(dkrow + nb * 8 + 2 * t) =
          TT::pack(acc_dk[nb][2 * r] * p.scale, acc_dk[nb][2 * r + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dvrow + nb * 8 + 2 * t) = TT::pack(acc_dv[nb][2 * r], acc_dv[nb][2 * r + 1]);
    }
  }
}

// ---------------------------------------------------------------- 3. dQ
template <int D>
struct DqTile {
  static constexpr int BM = 64, BN = 64, P = HeadDim<D>::P;
  template <typename T>
  static constexpr int smem_bytes() { return (2 * BM * P + 4 * BN * P) * static_cast<int>(sizeof(T)); }
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_kernel(const BwdParams p) {
  constexpr int BM = DqTile<D>::BM, BN = DqTile<D>::BN;
  constexpr int P = HeadDim<D>::P, DK = HeadDim<D>::DK;
  constexpr int KD = DK / 16, NS = BN / 8, NO = DK / 8;
  using TT = TypeTraits<T>;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + BM * P;
  T* sK = sdO + BM * P;      // 2 buffers of BN x P
  T* sV = sK + 2 * BN * P;   // 2 buffers of BN x P

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.heads_q / p.heads_kv);
  const int Sq = p.seqlen_q, Sk = p.seqlen_k, diag = Sk - Sq;

  const T* gq = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h + m0 * p.q_stride_s;
  const T* gdo = static_cast<const T*>(p.dout) + b * p.do_stride_b + h * p.do_stride_h + m0 * p.do_stride_s;
  const T* gk = static_cast<const T*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h;
  const T* gv = static_cast<const T*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h;
  const uint8_t* kpm = p.kpm != nullptr ? p.kpm + b * p.kpm_stride_b : nullptr;

  KeyRange kr = key_range(p.kv_bounds, b, Sk);
  if (p.causal) kr.hi = min(kr.hi, m0 + BM + diag);
  const int tile_lo = kr.lo / BN;
  const int tile_hi = kr.hi > kr.lo ? (kr.hi + BN - 1) / BN : tile_lo;

  const int row_a = m0 + warp * 16 + g;
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row_a + 8 * r;
    const int64_t idx = b * p.lse_stride_b + h * p.lse_stride_h + row;
    lse2[r] = row < Sq ? lse_log2(p.lse[idx]) : CUDART_INF_F;
    delta[r] = row < Sq ? p.delta[idx] : 0.f;
  }

  float acc_dq[NO][4];
#pragma unroll
  for (int i = 0; i < NO; ++i) acc_dq[i][0] = acc_dq[i][1] = acc_dq[i][2] = acc_dq[i][3] = 0.f;

  if (tile_lo < tile_hi) {
    const float scale_log2 = p.scale * kLog2e;
    load_tile<T, BM, D>(sQ, gq, p.q_stride_s, Sq - m0, tid);
    load_tile<T, BM, D>(sdO, gdo, p.do_stride_s, Sq - m0, tid);
    load_tile<T, BN, D>(sK, gk + tile_lo * BN * p.k_stride_s, p.k_stride_s, Sk - tile_lo * BN, tid,
                        kpm ? kpm + tile_lo * BN : nullptr);
    load_tile<T, BN, D>(sV, gv + tile_lo * BN * p.v_stride_s, p.v_stride_s, Sk - tile_lo * BN, tid,
                        kpm ? kpm + tile_lo * BN : nullptr);
    cp_async_commit();

    for (int j = tile_lo; j < tile_hi; ++j) {
      const int buf = (j - tile_lo) & 1;
      cp_async_wait_all();
      __syncthreads();
      if (j + 1 < tile_hi) {
        const int n1 = (j + 1) * BN;
        load_tile<T, BN, D>(sK + (buf ^ 1) * BN * P, gk + n1 * p.k_stride_s, p.k_stride_s, Sk - n1, tid,
                            kpm ? kpm + n1 : nullptr);
        load_tile<T, BN, D>(sV + (buf ^ 1) * BN * P, gv + n1 * p.v_stride_s, p.v_stride_s, Sk - n1, tid,
                            kpm ? kpm + n1 : nullptr);
        cp_async_commit();
      }
      const T* tK = sK + buf * BN * P;
      const T* tV = sV + buf * BN * P;
      const int n0 = j * BN;

      // S = Q K^T and dP = dO V^T for this warp's 16 rows x BN keys.
      float s[NS][4], dp[NS][4];
#pragma unroll
      for (int i = 0; i < NS; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
      }
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) {
        uint32_t aq[4], ad[4];
        ldmatrix_x4(aq, sQ + a_frag_offset<P>(warp * 16, kk, lane));
        ldmatrix_x4(ad, sdO + a_frag_offset<P>(warp * 16, kk, lane));
#pragma unroll
        for (int np = 0; np < NS / 2; ++np) {
          uint32_t bk[4], bv[4];
          ldmatrix_x4(bk, tK + bt_frag_offset<P>(np * 16, kk, lane));
          ldmatrix_x4(bv, tV + bt_frag_offset<P>(np * 16, kk, lane));
          mma16816<T>(s[2 * np], aq, bk[0], bk[1]);
          mma16816<T>(s[2 * np + 1], aq, bk[2], bk[3]);
          mma16816<T>(dp[2 * np], ad, bv[0], bv[1]);
          mma16816<T>(dp[2 * np + 1], ad, bv[2], bv[3]);
        }
      }
      // dS = P (dP - delta), P = exp2(S * scale * log2 e - lse * log2 e), 0 where masked.
      const bool need_mask = n0 + BN > kr.hi || n0 < kr.lo || kpm != nullptr ||
                             (p.causal && n0 + BN - 1 > m0 + diag);
#pragma unroll
      for (int nb = 0; nb < NS; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          float pr = fast_exp2(s[nb][e] * scale_log2 - lse2[r]);
          if (need_mask) {
            const int col = n0 + nb * 8 + 2 * t + (e & 1);
            const bool ok = col >= kr.lo && col < kr.hi && (!p.causal || col <= row_a + 8 * r + diag) && (kpm == nullptr || kpm[col] != 0);
            pr = ok ? pr : 0.f;
          }
          dp[nb][e] = pr * (dp[nb][e] - delta[r]);
        }
      }
      // dQ += dS K (A = dS from the accumulators, B = K rows via ldmatrix.trans).
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t a[4];
        a[0] = TT::pack(dp[2 * kk][0], dp[2 * kk][1]);
        a[1] = TT::pack(dp[2 * kk][2], dp[2 * kk][3]);
        a[2] = TT::pack(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
        a[3] = TT::pack(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
#pragma unroll
        for (int np = 0; np < DK / 16; ++np) {
          uint32_t bk[4];
          ldmatrix_x4_trans(bk, tK + b_frag_offset<P>(kk * 16, np, lane));
          mma16816<T>(acc_dq[2 * np], a, bk[0], bk[1]);
          mma16816<T>(acc_dq[2 * np + 1], a, bk[2], bk[3]);
        }
      }
    }
  }

  T* gdq = static_cast<T*>(p.dq) + b * p.dq_stride_b + h * p.dq_stride_h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row_a + 8 * r;
    if (row >= Sq) continue;
    T* dqrow = gdq + row * p.dq_stride_s;
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb) {  // n-blocks past D (padding) are not stored
      *reinterpret_cast<uint32_t*>(dqrow + nb * 8 + 2 * t) =
          TT::pack(acc_dq[nb][2 * r] * p.scale, acc_dq[nb][2 * r + 1] * p.scale);
    }
  }
}

// ---------------------------------------------------------------- launch
template <typename Kernel>
cudaError_t set_smem(Kernel kernel, int bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <typename T, int D>
cudaError_t launch_bwd(const BwdParams& p) {
  {
    dim3 grid((p.seqlen_q + 3) / 4, p.heads_q, p.batch);
    attn_bwd_preprocess_kernel<T><<<grid, kThreads, 0, p.stream>>>(p);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  {
    constexpr int smem = DkdvTile<D>::template smem_bytes<T>();
    cudaError_t err = set_smem(attn_bwd_dkdv_kernel<T, D>, smem);
    if (err != cudaSuccess) return err;
    dim3 grid((p.seqlen_k + DkdvTile<D>::BN - 1) / DkdvTile<D>::BN, p.heads_kv, p.batch);
    attn_bwd_dkdv_kernel<T, D><<<grid, kThreads, smem, p.stream>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  {
    constexpr int smem = DqTile<D>::template smem_bytes<T>();
    cudaError_t err = set_smem(attn_bwd_dq_kernel<T, D>, smem);
    if (err != cudaSuccess) return err;
    dim3 grid((p.seqlen_q + DqTile<D>::BM - 1) / DqTile<D>::BM, p.heads_q, p.batch);
    attn_bwd_dq_kernel<T, D><<<grid, kThreads, smem, p.stream>>>(p);
    return cudaGetLastError();
  }
}

// The launcher handles Sq == 0 or Sk == 0 (zero gradients) without calling this.
template <typename T>
cudaError_t dispatch_bwd(const BwdParams& p) {
  if (p.seqlen_q == 0 || p.seqlen_k == 0 || p.batch == 0 || p.heads_q == 0) return cudaSuccess;
  switch (p.head_dim) {
#define FASTATTN_CASE(d) \
  case d: return launch_bwd<T, d>(p);
    FASTATTN_HEAD_DIMS(FASTATTN_CASE)
#undef FASTATTN_CASE
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastattn
