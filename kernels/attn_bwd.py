"""FlashAttention-2 backward in Triton, deterministic (no atomics; but see ATOMIC_DQ below).

Three launches (two with ATOMIC_DQ):
1. ``attn_bwd_preprocess_kernel``: delta_i = rowsum(dO_i * O_i) (minus dlse_i when the caller
   back-propagates through the returned lse, since d lse_i / d s_ij = P_ij).
2. ``attn_bwd_dkdv_kernel``: one program per (KV tile, batch, KV head). It streams every query
   tile of every query head in the GQA group and sums dK/dV in registers, so the group reduction
   needs no atomics and two runs give bit-identical gradients. With GQA (a constexpr: a group of
   more than one head) each range of query blocks is one loop over (head, query block), not a loop
   over the heads around a loop over the blocks, which spilled (_dkdv_query_blocks).
3. ``attn_bwd_dq_kernel``: one program per (query tile, batch, query head), streaming K/V tiles.

P is recomputed from the saved lse: P = exp2(s * log2(e) * scale - lse * log2(e)). Rows that saw no
key have lse = -inf; they are given +inf here so that their P is 0 and their gradients vanish.

Score modifiers recompute the same logits as the forward (tiles.modify_scores). dS is the gradient
of the modified logit: the bias gradient itself, which the dQ kernel writes (HAS_DBIAS; every
(query, key) pair is visited there exactly once); through a softcap it is multiplied by
1 - tanh^2 before it reaches dQ and dK. The sinks' gradient needs only lse and delta, so the
launcher computes it from them with torch ops (a reduction over rows, deterministic).

TMA (a config's tma): the tiles a kernel streams come through per-(batch, head) tensor descriptors
(dK/dV under GQA: one per (batch, KV head) over its group's query heads, (heads, rows, D))
(Hopper's tensor memory accelerator; zero-filled past the sequence and the head dim), as the
forward's K/V: Q and dO in dK/dV, K and V in dQ. Fewer registers go to addresses and masks (sm_90,
D=128, causal, as the runtime specialises: dK/dV 32x64 249 -> 211, dQ 64x64 210 -> 185). dK/dV may
take them with a key-padding mask (it streams queries); dQ may not (its keys must read as 0 where
padded).

LPT (a config's lpt): the grid runs the longest tiles of every (batch, head) first
(tiles.program_coords): dQ's last query tiles, dK/dV's first key tiles.

ATOMIC_DQ (a dK/dV config's atomic_dq; not deterministic, so only by request): dK/dV also computes
each block's dQ = sm_scale * dS K and adds it into a float32 buffer with (vectorised, relaxed)
atomics, and the dQ kernel does not run: per pair of tiles 5 matmuls instead of 7 (dQ's own
recomputes S and dP). The launcher converts the buffer to dQ's dtype. Each dQ element is summed in
whatever order the key tiles finish, so its last bits vary from run to run. A bias gradient that the
dQ kernel writes keeps the dQ kernel (no atomic_dq then); one summed in the dbias kernel
(kernels/bias_grad.py, FASTATTN_BIAS_GRAD=kernel) does not need it.
"""

import triton
import triton.language as tl

from .tiles import (
    LOG2E_T,
    alibi_slope2,
    head_mods,
    head_row_tiles,
    key_blocks,
    key_padding,
    load_keys,
    load_tile,
    merged_edges,
    modify_scores,
    padded_key_bounds,
    program_coords,
    query_range,
    relative_position,
    row_tiles,
    scores_tile,
    sequence_info,
    store_tile,
    visible,
    window_query_range,
)


@triton.jit
def _lse_log2(LSE_row, rows, Sq):
    """Saved lse (natural log) -> log2 units as (hi, lo) float32: out-of-range and empty rows -> +inf
    (P = 0). A float64 lse (fp32 inputs) splits into hi + lo, so that exp2((s - hi) - lo) subtracts
    the forward's statistics without rounding them (s - hi is exact where it matters: the largest
    scores of a row); a float32 lse has no lo (lo = hi, unused)."""
    lse = tl.load(LSE_row + rows, mask=rows < Sq, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E_T)
    hi = lse2.to(tl.float32)
    lo = hi
    if LSE_row.dtype.element_ty == tl.float64:
        finite = hi != float("inf")  # +inf rows: lo = 0 (never inf - inf)
        lo = (tl.where(finite, lse2, 0.0) - tl.where(finite, hi, 0.0).to(tl.float64)).to(tl.float32)
    return hi, lo


@triton.jit
def _probs(s, hi, lo, TRANSPOSED: tl.constexpr, F64_LSE: tl.constexpr):
    """P = exp2(s - lse2) from _lse_log2's per-row (hi, lo); s is (rows, keys), or (keys, rows) when
    TRANSPOSED; lo only with a float64 lse."""
    if TRANSPOSED:
        hi = hi[None, :]
        lo = lo[None, :]
    else:
        hi = hi[:, None]
        lo = lo[:, None]
    if F64_LSE:
        p = tl.exp2((s - hi) - lo)
    else:
        p = tl.exp2(s - hi)
    return p


@triton.jit
def attn_bwd_preprocess_kernel(
    O, DO, DLSE, DELTA,
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    stride_lb, stride_lh, Sq,
    HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    WIDE: tl.constexpr,
):
    """Row-wise, so packed (varlen) inputs run as one long sequence: DELTA has LSE's layout."""
    pid_m, b, h = program_coords()
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o = load_tile(O + b * stride_ob + h * stride_oh, rows, stride_os, Sq, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D,
                  CHECK_ROWS=True, WIDE=WIDE)
    do = load_tile(DO + b * stride_dob + h * stride_doh, rows, stride_dos, Sq, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D,
                   CHECK_ROWS=True, WIDE=WIDE)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row_off = b * stride_lb + h * stride_lh + rows
    if HAS_DLSE:
        delta -= tl.load(DLSE + row_off, mask=rows < Sq, other=0.0)
    tl.store(DELTA + row_off, delta, mask=rows < Sq)


@triton.jit
def _query_rows(base, desc, g, start_m, rows, stride, Sq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_D: tl.constexpr, WIDE: tl.constexpr, TMA: tl.constexpr, GQA: tl.constexpr):
    """dK/dV's (BLOCK_M, BLOCK_D) tile of one query head's Q or dO at rows = start_m + arange: from
    base by pointers, or with TMA from desc (with GQA the group's (heads, rows, D) descriptor, at head
    g). Rows past Sq and columns past HEAD_DIM read as 0."""
    if TMA and GQA:
        x = desc.load([g, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
    elif TMA:
        x = desc.load([start_m, 0])
    else:
        x = load_tile(base, rows, stride, Sq, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, CHECK_ROWS=True, WIDE=WIDE)
    return x


@triton.jit
def _dkdv_block(dk, dv, k, v, kp, start_m, g, q_base, do_base, dq_base, q_desc, do_desc, LSE_row, DELTA_row,
                stride_qs, stride_dos, stride_dqs, offs_n, seq, mods, qk_scale, sm_scale, MASKED: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, LOCAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE: tl.constexpr, TMA: tl.constexpr,
                GQA: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """Accumulate query block start_m of one query head into dk, dv (fp32): its Q/dO rows from
    q_base/do_base, or with TMA from q_desc/do_desc (with GQA the group's (heads, rows, D)
    descriptors, at head g). ATOMIC_DQ: also add the block's dQ = sm_scale * dS K into the float32
    rows at dq_base (row stride stride_dqs) with atomics."""
    Sq = seq[1]
    Sk = seq[3]
    rows = start_m + tl.arange(0, BLOCK_M)
    q = _query_rows(q_base, q_desc, g, start_m, rows, stride_qs, Sq, HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M,
                    BLOCK_D=BLOCK_D, WIDE=WIDE, TMA=TMA, GQA=GQA)
    lse_hi, lse_lo = _lse_log2(LSE_row, rows, Sq)
    # Work transposed, (BLOCK_N, BLOCK_M), so dK/dV come out without transposing P. (fp32: a GPU's
    # "ieee" dot is an ordered FMA chain per element, so s rounds exactly as in the forward that made
    # lse; docs/design.md, "Precision of the backward".)
    r = rows[None, :]
    c = offs_n[:, None]
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
    s_t, dcap_t = modify_scores(s_t, r, c, Sq, Sk, mods, SOFTCAP=SOFTCAP, HAS_BIAS=HAS_BIAS, HAS_ALIBI=HAS_ALIBI,
                                WIDE=WIDE)
    p_t = _probs(s_t, lse_hi, lse_lo, TRANSPOSED=True, F64_LSE=LSE_row.dtype.element_ty == tl.float64)
    if MASKED:  # causal diagonal / window edge (and padded keys: no probability)
        vis = visible(relative_position(r, c, Sq, Sk), mods[5], mods[6], kp=kp[:, None], CAUSAL=CAUSAL,
                      LOCAL=LOCAL, HAS_KPM=HAS_KPM or ATOMIC_DQ)
        p_t = tl.where(vis, p_t, 0.0)
    elif HAS_KPM or ATOMIC_DQ:  # padded keys, and keys past Sk (their dS reaches dQ with ATOMIC_DQ), get none
        p_t = tl.where(kp[:, None], p_t, 0.0)
    do = _query_rows(do_base, do_desc, g, start_m, rows, stride_dos, Sq, HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M,
                     BLOCK_D=BLOCK_D, WIDE=WIDE, TMA=TMA, GQA=GQA)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    delta = tl.load(DELTA_row + rows, mask=rows < Sq, other=0.0)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    if SOFTCAP:
        ds_t = ds_t * dcap_t
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    if ATOMIC_DQ:  # (rows past Sq and columns past HEAD_DIM are not added)
        dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=DOT_PRECISION) * sm_scale  # (BLOCK_M, BLOCK_D)
        offs_d = tl.arange(0, BLOCK_D)
        if WIDE:
            ptrs = dq_base + rows.to(tl.int64)[:, None] * stride_dqs + offs_d[None, :]
        else:
            ptrs = dq_base + rows[:, None] * stride_dqs + offs_d[None, :]
        mask = rows[:, None] < Sq
        if HEAD_DIM != BLOCK_D:
            mask = mask & (offs_d[None, :] < HEAD_DIM)
        tl.atomic_add(ptrs, dq, mask=mask, sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_query_blocks(dk, dv, k, v, kp, q_base, do_base, dq_base, q_desc, do_desc, LSE_row, DELTA_row, group,
                       strides, offs_n, lo, hi, seq, mods, scales, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                       HAS_KPM: tl.constexpr, LOCAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
                       SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, WIDE: tl.constexpr, TMA: tl.constexpr, GQA: tl.constexpr,
                       ATOMIC_DQ: tl.constexpr):
    """Accumulate query blocks [lo, hi) into dk, dv (fp32) (and with ATOMIC_DQ their dQ into dq_base's
    rows): of the one query head whose rows, lse and delta rows and modifiers these are (q_base,
    do_base, dq_base, LSE_row, DELTA_row, mods); with GQA of every
    query head of the group, these being its first head's, in ONE loop over (head, query block)
    (a loop over the heads around the query loop spills: sm_90, D=128, a group of 4, 936 B at
    64x64 w4 s3, 188 B flat; benchmarks/results/2026-12-05-cpu-lpt/README.md).
    group = (GROUP, stride_qh, stride_doh, stride_lh, stride_bh, ALIBI_b, first head, stride_dqh) steps
    to the others. strides = (stride_qs, stride_dos, stride_dqs); scales = (qk_scale, sm_scale)."""
    if GQA:
        n = tl.cdiv(hi - lo, BLOCK_M)  # query blocks per head
        for i in range(group[0] * n):
            g = i // n
            gw = g.to(tl.int64)  # head offsets in 64 bits: a head stride times the group may pass 2**31
            mods_g = (mods[0] + gw * group[4], mods[1], mods[2],
                      alibi_slope2(group[5], group[6] + g, HAS_ALIBI=HAS_ALIBI),
                      mods[4], mods[5], mods[6])
            dk, dv = _dkdv_block(dk, dv, k, v, kp, lo + (i - g * n) * BLOCK_M, g, q_base + gw * group[1],
                                 do_base + gw * group[2], dq_base + gw * group[7], q_desc, do_desc,
                                 LSE_row + gw * group[3], DELTA_row + gw * group[3], strides[0], strides[1],
                                 strides[2], offs_n, seq, mods_g, scales[0], scales[1], MASKED=MASKED, CAUSAL=CAUSAL,
                                 HAS_KPM=HAS_KPM, LOCAL=LOCAL, HAS_BIAS=HAS_BIAS, HAS_ALIBI=HAS_ALIBI,
                                 SOFTCAP=SOFTCAP, HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
                                 DOT_PRECISION=DOT_PRECISION, WIDE=WIDE, TMA=TMA, GQA=GQA, ATOMIC_DQ=ATOMIC_DQ)
    else:
        for start_m in range(lo, hi, BLOCK_M):
            dk, dv = _dkdv_block(dk, dv, k, v, kp, start_m, 0, q_base, do_base, dq_base, q_desc, do_desc, LSE_row,
                                 DELTA_row, strides[0], strides[1], strides[2], offs_n, seq, mods, scales[0],
                                 scales[1], MASKED=MASKED, CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, LOCAL=LOCAL,
                                 HAS_BIAS=HAS_BIAS, HAS_ALIBI=HAS_ALIBI, SOFTCAP=SOFTCAP, HEAD_DIM=HEAD_DIM,
                                 BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, DOT_PRECISION=DOT_PRECISION, WIDE=WIDE, TMA=TMA,
                                 GQA=GQA, ATOMIC_DQ=ATOMIC_DQ)
    return dk, dv


@triton.jit(do_not_specialize=["Tq", "Tk"])
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_SUM, KPM, KV_BOUNDS, CU_Q, CU_K, BIAS, ALIBI,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh, stride_kpm_b,
    GROUP, Sq, Sk, Tq, Tk,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_ab, left, right,
    sm_scale, qk_scale, cap2,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, VARLEN: tl.constexpr,
    LOCAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WIDE: tl.constexpr, TMA: tl.constexpr,
    LPT: tl.constexpr, GQA: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):
    pid_n, b, hk = program_coords(LPT=LPT, LAST_LONGEST=False)
    seq = sequence_info(CU_Q, CU_K, b, Sq, Sk, Tq, Tk, VARLEN=VARLEN)
    q_start, Sq, k_start, Sk = seq
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)

    kp = offs_n < Sk  # the keys this program reads: in the sequence and, with a mask, not padding
    if HAS_KPM:
        kp = kp & key_padding(KPM + b * stride_kpm_b, offs_n, Sk)
    # Padded keys read as 0 (not loaded): their garbage stays out of dK = dS q and dP = dO v.
    k = load_tile(K + b * stride_kb + hk * stride_kh + k_start * stride_ks, offs_n, stride_ks, Sk, keep=kp,
                  HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, CHECK_ROWS=True, WIDE=WIDE)
    v = load_tile(V + b * stride_vb + hk * stride_vh + k_start * stride_vs, offs_n, stride_vs, Sk, keep=kp,
                  HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, CHECK_ROWS=True, WIDE=WIDE)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    if LOCAL:
        lo, full_start, full_end, hi = window_query_range(start_n, Sq, Sk, left, right, BLOCK_M=BLOCK_M,
                                                          BLOCK_N=BLOCK_N)
    else:
        lo, full_start, hi = query_range(start_n, Sq, Sk, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, CAUSAL=CAUSAL)
        full_end = hi
    # A key tile past the sequence (varlen), or made only of padding, gets zero gradients.
    kv_lo, kv_hi = padded_key_bounds(KV_BOUNDS, b, Sk, HAS_KPM=HAS_KPM)
    skip = (start_n >= Sk) | (start_n + BLOCK_N <= kv_lo) | (start_n >= kv_hi)
    if HAS_KPM:
        skip = skip | (tl.max(kp.to(tl.int32), 0) == 0)  # an all-padding tile inside the real range too
    hi = tl.where(skip, 0, hi)
    lo = tl.minimum(lo, hi)
    full_start = tl.minimum(full_start, hi)
    full_end = tl.minimum(full_end, hi)
    if LOCAL:  # the window's near and far edges as one loop where they meet
        full_start, full_end = merged_edges(full_start, full_end, hi)
    # The GQA group's query heads (GROUP of them from h0; one without GQA), summed in registers.
    h0 = hk * GROUP
    q_base = Q + b * stride_qb + h0 * stride_qh + q_start * stride_qs
    do_base = DO + b * stride_dob + h0 * stride_doh + q_start * stride_dos
    row_base = b * stride_lb + h0 * stride_lh + q_start
    dq_base = DQ_SUM + b * stride_dqb + h0 * stride_dqh + q_start * stride_dqs  # used only with ATOMIC_DQ
    q_desc, do_desc = None, None
    if TMA and GQA:  # the group's queries and their output gradients, (GROUP, Sq, HEAD_DIM) each
        q_desc = head_row_tiles(q_base, GROUP, stride_qh, Sq, stride_qs, BLOCK_ROWS=BLOCK_M, HEAD_DIM=HEAD_DIM,
                                BLOCK_D=BLOCK_D)
        do_desc = head_row_tiles(do_base, GROUP, stride_doh, Sq, stride_dos, BLOCK_ROWS=BLOCK_M, HEAD_DIM=HEAD_DIM,
                                 BLOCK_D=BLOCK_D)
    elif TMA:  # the query head's queries and output gradients
        q_desc = row_tiles(q_base, Sq, stride_qs, BLOCK_ROWS=BLOCK_M, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
        do_desc = row_tiles(do_base, Sq, stride_dos, BLOCK_ROWS=BLOCK_M, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    mods = head_mods(BIAS, ALIBI, b, h0, stride_bb, stride_bh, stride_bm, stride_bn, stride_ab, cap2, left, right,
                     HAS_ALIBI=HAS_ALIBI)
    group = (GROUP, stride_qh, stride_doh, stride_lh, stride_bh, ALIBI + b * stride_ab, h0, stride_dqh)
    strides = (stride_qs, stride_dos, stride_dqs)
    scales = (qk_scale, sm_scale)
    # (query blocks, masked?): the causal diagonal or the window's near edge, the unmasked middle, the
    # window's far edge
    dk, dv = _dkdv_query_blocks(dk, dv, k, v, kp, q_base, do_base, dq_base, q_desc, do_desc, LSE + row_base,
                                DELTA + row_base, group, strides, offs_n, lo, full_start, seq, mods, scales,
                                MASKED=True, CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, LOCAL=LOCAL, HAS_BIAS=HAS_BIAS,
                                HAS_ALIBI=HAS_ALIBI, SOFTCAP=SOFTCAP, HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M,
                                BLOCK_D=BLOCK_D, DOT_PRECISION=DOT_PRECISION, WIDE=WIDE, TMA=TMA, GQA=GQA,
                                ATOMIC_DQ=ATOMIC_DQ)
    dk, dv = _dkdv_query_blocks(dk, dv, k, v, kp, q_base, do_base, dq_base, q_desc, do_desc, LSE + row_base,
                                DELTA + row_base, group, strides, offs_n, full_start, full_end, seq, mods, scales,
                                MASKED=False, CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, LOCAL=LOCAL, HAS_BIAS=HAS_BIAS,
                                HAS_ALIBI=HAS_ALIBI, SOFTCAP=SOFTCAP, HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M,
                                BLOCK_D=BLOCK_D, DOT_PRECISION=DOT_PRECISION, WIDE=WIDE, TMA=TMA, GQA=GQA,
                                ATOMIC_DQ=ATOMIC_DQ)
    if LOCAL:
        dk, dv = _dkdv_query_blocks(dk, dv, k, v, kp, q_base, do_base, dq_base, q_desc, do_desc, LSE + row_base,
                                    DELTA + row_base, group, strides, offs_n, full_end, hi, seq, mods,
                                    scales, MASKED=True, CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, LOCAL=LOCAL,
                                    HAS_BIAS=HAS_BIAS, HAS_ALIBI=HAS_ALIBI, SOFTCAP=SOFTCAP, HEAD_DIM=HEAD_DIM,
                                    BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, DOT_PRECISION=DOT_PRECISION, WIDE=WIDE, TMA=TMA,
                                    GQA=GQA, ATOMIC_DQ=ATOMIC_DQ)

    store_tile(DK + b * stride_dkb + hk * stride_dkh + k_start * stride_dks, (dk * sm_scale).to(DK.dtype.element_ty),
               offs_n, stride_dks, Sk, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, WIDE=WIDE)
    store_tile(DV + b * stride_dvb + hk * stride_dvh + k_start * stride_dvs, dv.to(DV.dtype.element_ty), offs_n,
               stride_dvs, Sk, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, WIDE=WIDE)


@triton.jit
def ds_tile(q, do, k, v, lse_hi, lse_lo, delta, rows, cols, seq, mods, qk_scale, KP_row, MASKED: tl.constexpr,
            CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, LOCAL: tl.constexpr, HAS_BIAS: tl.constexpr,
            HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, F64_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
            WIDE: tl.constexpr):
    """dS = P * (dP - delta) of a (rows, cols) tile, P recomputed from the saved lse (as (hi, lo):
    _lse_log2) and dP = dO V^T: the gradient of the modified logits, which is the bias's own; and
    the softcap's dcap (dQ and dK take dS * dcap). Masked keys get P = exp2(-inf) = 0. The dQ and
    dbias kernels' step (dK/dV works transposed)."""
    s, dcap = scores_tile(q, k, rows, cols, seq, mods, qk_scale, KP_row, MASKED=MASKED, CAUSAL=CAUSAL,
                          HAS_KPM=HAS_KPM, LOCAL=LOCAL, HAS_BIAS=HAS_BIAS, HAS_ALIBI=HAS_ALIBI, SOFTCAP=SOFTCAP,
                          DOT_PRECISION=DOT_PRECISION, WIDE=WIDE)
    p = _probs(s, lse_hi, lse_lo, TRANSPOSED=False, F64_LSE=F64_LSE)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    return p * (dp - delta[:, None]), dcap


@triton.jit
def _dq_key_blocks(dq, q, do, lse_hi, lse_lo, delta, k_base, v_base, k_desc, v_desc, KP_row, DBIAS_bh, stride_ks,
                   stride_vs, stride_dbm, offs_m, lo, hi, seq, mods, qk_scale, MASKED: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, LOCAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                   HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, HAS_DBIAS: tl.constexpr, F64_LSE: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   WIDE: tl.constexpr, TMA: tl.constexpr):
    """Accumulate dQ (unscaled) over key blocks [lo, hi); with HAS_DBIAS also store dS, the bias
    gradient, into the (Sq, Sk) slice DBIAS_bh (row stride stride_dbm). K/V tiles through
    k_desc/v_desc with TMA, else from k_base/v_base."""
    Sq = seq[1]
    Sk = seq[3]
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        # Padded keys read as 0: dS = 0 * (dO . v) and dQ += dS k must not see their garbage.
        if TMA:  # (no key padding then) zero-filled past the sequence and the head dim
            k = k_desc.load([start_n, 0])
            v = v_desc.load([start_n, 0])
        else:
            k = load_keys(k_base, cols, stride_ks, Sk, KP_row, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, MASKED=MASKED,
                          HAS_KPM=HAS_KPM, WIDE=WIDE)
            v = load_keys(v_base, cols, stride_vs, Sk, KP_row, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, MASKED=MASKED,
                          HAS_KPM=HAS_KPM, WIDE=WIDE)
        ds, dcap = ds_tile(q, do, k, v, lse_hi, lse_lo, delta, offs_m, cols, seq, mods, qk_scale, KP_row,
                           MASKED=MASKED, CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, LOCAL=LOCAL, HAS_BIAS=HAS_BIAS,
                           HAS_ALIBI=HAS_ALIBI, SOFTCAP=SOFTCAP, F64_LSE=F64_LSE, DOT_PRECISION=DOT_PRECISION,
                           WIDE=WIDE)
        if HAS_DBIAS:
            if WIDE:
                offs = offs_m.to(tl.int64)[:, None] * stride_dbm + cols[None, :]
            else:
                offs = offs_m[:, None] * stride_dbm + cols[None, :]
            tl.store(DBIAS_bh + offs, ds.to(DBIAS_bh.dtype.element_ty),
                     mask=(offs_m[:, None] < Sq) & (cols[None, :] < Sk))
        if SOFTCAP:
            ds = ds * dcap
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["Tq", "Tk"])
def attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KPM, KV_BOUNDS, CU_Q, CU_K, BIAS, ALIBI, DBIAS,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh, stride_kpm_b,
    GROUP, Sq, Sk, Tq, Tk,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_ab, left, right,
    stride_dbb, stride_dbh, stride_dbm,
    sm_scale, qk_scale, cap2,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, VARLEN: tl.constexpr,
    LOCAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_DBIAS: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WIDE: tl.constexpr, TMA: tl.constexpr,
    LPT: tl.constexpr,
):
    pid_m, b, h = program_coords(tl.cdiv(Sq, BLOCK_M), LPT=LPT)  # (Sq: the longest sequence's)
    hk = h // GROUP
    seq = sequence_info(CU_Q, CU_K, b, Sq, Sk, Tq, Tk, VARLEN=VARLEN)
    q_start, Sq, k_start, Sk = seq
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)

    q = load_tile(Q + b * stride_qb + h * stride_qh + q_start * stride_qs, offs_m, stride_qs, Sq, HEAD_DIM=HEAD_DIM,
                  BLOCK_D=BLOCK_D, CHECK_ROWS=True, WIDE=WIDE)
    do = load_tile(DO + b * stride_dob + h * stride_doh + q_start * stride_dos, offs_m, stride_dos, Sq,
                   HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, CHECK_ROWS=True, WIDE=WIDE)
    row_base = b * stride_lb + h * stride_lh + q_start
    lse_hi, lse_lo = _lse_log2(LSE + row_base, offs_m, Sq)
    F64_LSE = LSE.dtype.element_ty == tl.float64  # fp32 inputs (launchers: lse_dtype)
    delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < Sq, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh + k_start * stride_ks
    v_base = V + b * stride_vb + hk * stride_vh + k_start * stride_vs
    k_desc, v_desc = None, None
    if TMA:  # as the forward's
        k_desc = row_tiles(k_base, Sk, stride_ks, BLOCK_ROWS=BLOCK_N, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
        v_desc = row_tiles(v_base, Sk, stride_vs, BLOCK_ROWS=BLOCK_N, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    KP_row = KPM + b * stride_kpm_b
    DBIAS_bh = DBIAS + b * stride_dbb + h * stride_dbh
    mods = head_mods(BIAS, ALIBI, b, h, stride_bb, stride_bh, stride_bm, stride_bn, stride_ab, cap2, left, right,
                     HAS_ALIBI=HAS_ALIBI)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_end, hi = key_blocks(start_m, seq, KV_BOUNDS, b, left, right, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                           CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, LOCAL=LOCAL)
    # (key blocks, masked?): the window's left edge (with the right one where they meet), the unmasked
    # middle, the diagonal and the tail
    if LOCAL:
        full_lo, full_end = merged_edges(full_lo, full_end, hi)
        dq = _dq_key_blocks(dq, q, do, lse_hi, lse_lo, delta, k_base, v_base, k_desc, v_desc, KP_row, DBIAS_bh,
                            stride_ks, stride_vs, stride_dbm, offs_m, lo, full_lo, seq, mods, qk_scale, MASKED=True,
                            CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, LOCAL=LOCAL, HAS_BIAS=HAS_BIAS, HAS_ALIBI=HAS_ALIBI,
                            SOFTCAP=SOFTCAP, HAS_DBIAS=HAS_DBIAS, F64_LSE=F64_LSE, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N,
                            BLOCK_D=BLOCK_D, DOT_PRECISION=DOT_PRECISION, WIDE=WIDE, TMA=TMA)
    dq = _dq_key_blocks(dq, q, do, lse_hi, lse_lo, delta, k_base, v_base, k_desc, v_desc, KP_row, DBIAS_bh,
                        stride_ks, stride_vs, stride_dbm, offs_m, full_lo, full_end, seq, mods, qk_scale,
                        MASKED=False, CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, LOCAL=LOCAL, HAS_BIAS=HAS_BIAS,
                        HAS_ALIBI=HAS_ALIBI, SOFTCAP=SOFTCAP, HAS_DBIAS=HAS_DBIAS, F64_LSE=F64_LSE, HEAD_DIM=HEAD_DIM,
                        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, DOT_PRECISION=DOT_PRECISION, WIDE=WIDE, TMA=TMA)
    dq = _dq_key_blocks(dq, q, do, lse_hi, lse_lo, delta, k_base, v_base, k_desc, v_desc, KP_row, DBIAS_bh,
                        stride_ks, stride_vs, stride_dbm, offs_m, full_end, hi, seq, mods, qk_scale, MASKED=True,
                        CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, LOCAL=LOCAL, HAS_BIAS=HAS_BIAS, HAS_ALIBI=HAS_ALIBI,
                        SOFTCAP=SOFTCAP, HAS_DBIAS=HAS_DBIAS, F64_LSE=F64_LSE, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N,
                        BLOCK_D=BLOCK_D, DOT_PRECISION=DOT_PRECISION, WIDE=WIDE, TMA=TMA)
    store_tile(DQ + b * stride_dqb + h * stride_dqh + q_start * stride_dqs, (dq * sm_scale).to(DQ.dtype.element_ty),
               offs_m, stride_dqs, Sq, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, WIDE=WIDE)
