"""The gradient of a bias shared by the batch and/or the heads, summed over them in the kernel.

dbias is dS (the gradient of the modified logit, before a softcap's 1 - tanh^2). For a bias with
the full (B, Hq, Sq, Sk) shape the dQ kernel writes it as it goes (kernels/attn_bwd.py, HAS_DBIAS).
A bias that broadcasts over the batch or the heads (a T5/ALiBi-style (1, Hq, Sq, Sk) table, one
(B, 1, Sq, Sk) mask for every head) needs dS summed over them: written per (batch, head) that is
an fp32 (B, Hq, Sq, Sk) buffer (8 GiB at B=2, H=16, S=8k) to zero, fill and reduce afterwards.

Here one program owns one (BLOCK_M, BLOCK_N) tile of one slice of the gradient and loops over the
(batch, head) pairs that share it: it recomputes P and dP for each (two matmuls per pair of tiles:
S = Q K^T and dP = dO V^T) and sums dS in registers, in a fixed order, so the result is
deterministic and written once, in the bias's dtype, with zeros where no query sees the key
(causal, window, padding). No float32 buffer, no reduction pass.

Grid: (query tiles, key tiles, the gradient's slices Bb * Hb); each program sums n_b batch elements
times n_h heads (B or 1, Hq or 1: whichever the bias broadcasts over).
"""

import triton
import triton.language as tl

from .attn_bwd import _lse_log2, ds_tile
from .tiles import head_mods, key_blocks, load_keys, load_tile, sequence_info


# Arguments: pointers, integers, floats, constexprs (as the other kernels').
@triton.jit(do_not_specialize=["Tq", "Tk"])
def attn_bwd_dbias_kernel(
    Q, K, V, DO, LSE, DELTA, KPM, KV_BOUNDS, CU_Q, CU_K, BIAS, ALIBI, DBIAS,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_lb, stride_lh, stride_kpm_b,
    GROUP, Sq, Sk, Tq, Tk,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_ab, left, right,
    stride_dbb, stride_dbh, stride_dbm, n_b, n_h, Hb,
    qk_scale, cap2,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, VARLEN: tl.constexpr,
    LOCAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WIDE: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    start_n = tl.program_id(1) * BLOCK_N
    out = tl.program_id(2).to(tl.int64)  # the gradient's slice (b_out, h_out): b_out * Hb + h_out
    b_out = out // Hb
    h_out = out % Hb
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    n = n_b * n_h
    if not (VARLEN or HAS_KPM):  # every pair sees the same tiles: one test, and a loop without a branch
        # (Triton pipelines its loads)
        lo, full_lo, full_end, hi = key_blocks(start_m, (0, Sq, 0, Sk), KV_BOUNDS, b_out, left, right,
                                               BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, CAUSAL=CAUSAL, HAS_KPM=HAS_KPM,
                                               LOCAL=LOCAL)
        n = tl.where((start_n + BLOCK_N > lo) & (start_n < hi), n, 0)  # some query of the tile sees some key
    for i in range(n):  # the (batch, head) pairs sharing this slice, in order
        b = b_out + i // n_h  # (b_out is 0 where the batch is summed, and i // n_h 0 where it is not)
        h = h_out + i % n_h
        seq = sequence_info(CU_Q, CU_K, b, Sq, Sk, Tq, Tk, VARLEN=VARLEN)
        q_start, sq, k_start, sk = seq
        visit = True
        if VARLEN or HAS_KPM:  # each batch element's own lengths and real keys
            lo, full_lo, full_end, hi = key_blocks(start_m, seq, KV_BOUNDS, b, left, right, BLOCK_M=BLOCK_M,
                                                   BLOCK_N=BLOCK_N, CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, LOCAL=LOCAL)
            visit = (start_n + BLOCK_N > lo) & (start_n < hi)
        if visit:
            q = load_tile(Q + b * stride_qb + h * stride_qh + q_start * stride_qs, offs_m, stride_qs, sq,
                          HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, CHECK_ROWS=True, WIDE=WIDE)
            do = load_tile(DO + b * stride_dob + h * stride_doh + q_start * stride_dos, offs_m, stride_dos, sq,
                           HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, CHECK_ROWS=True, WIDE=WIDE)
            row_base = b * stride_lb + h * stride_lh + q_start
            lse_hi, lse_lo = _lse_log2(LSE + row_base, offs_m, sq)  # rows past the sequence: P = 0
            delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < sq, other=0.0)
            KP_row = KPM + b * stride_kpm_b
            hk = h // GROUP
            # Padded keys read as 0 (dP = dO v must not see their garbage) and get P = 0 (masked).
            k = load_keys(K + b * stride_kb + hk * stride_kh + k_start * stride_ks, offs_n, stride_ks, sk, KP_row,
                          HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, MASKED=True, HAS_KPM=HAS_KPM, WIDE=WIDE)
            v = load_keys(V + b * stride_vb + hk * stride_vh + k_start * stride_vs, offs_n, stride_vs, sk, KP_row,
                          HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, MASKED=True, HAS_KPM=HAS_KPM, WIDE=WIDE)
            mods = head_mods(BIAS, ALIBI, b, h, stride_bb, stride_bh, stride_bm, stride_bn, stride_ab, cap2, left,
                             right, HAS_ALIBI=HAS_ALIBI)
            ds = ds_tile(q, do, k, v, lse_hi, lse_lo, delta, offs_m, offs_n, seq, mods, qk_scale, KP_row, MASKED=True,
                         CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, LOCAL=LOCAL, HAS_BIAS=HAS_BIAS, HAS_ALIBI=HAS_ALIBI,
                         SOFTCAP=SOFTCAP, F64_LSE=LSE.dtype.element_ty == tl.float64, DOT_PRECISION=DOT_PRECISION,
                         WIDE=WIDE)[0]
            acc += ds

    if WIDE:
        offs = offs_m.to(tl.int64)[:, None] * stride_dbm + offs_n[None, :]
    else:
        offs = offs_m[:, None] * stride_dbm + offs_n[None, :]
    tl.store(DBIAS + b_out * stride_dbb + h_out * stride_dbh + offs, acc.to(DBIAS.dtype.element_ty),
             mask=(offs_m[:, None] < Sq) & (offs_n[None, :] < Sk))
