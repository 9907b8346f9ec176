"""FlashAttention-2 forward in Triton.

One program computes a BLOCK_M tile of queries for one (batch, query head): the Q tile stays in
registers while K/V tiles stream through, with an online softmax in base 2 (the softmax scale is
folded into log2(e) so each score costs one multiply). It writes O and the natural-log
log-sum-exp (B, Hq, Sq) that the backward recomputes P from.

Score modifiers (HAS_BIAS, HAS_ALIBI, SOFTCAP, LOCAL, HAS_SINKS; see tiles.py) are constexpr
flags: a call without them compiles to the plain kernel. A sink joins each row's softmax after
the key loop, as one more (value-less) entry of the running max and sum.

TMA (a config's tma): K/V tiles come through per-(batch, head) tensor descriptors, so on Hopper
the tensor memory accelerator moves them and zero-fills rows past the sequence and columns past
the head dim. The launcher asks for it only where a descriptor is valid (16-byte aligned rows and
bases) and no key-padding mask must hide keys (load_keys' job on the pointer path).

WARP_SPEC (a config's ws, with TMA): the key loop is warp-specialised (Triton splits it into warps
that issue the loads and warps that compute). Triton 3.6 does that on sm_90 only for a kernel shaped
for it (tested by compiling, tools/aot_compile_check.py): Q through a descriptor too (a pointer load
before the loop makes the pass fail), ONE key loop (a second loop after it, or a branch inside it,
makes the pass fail or silently skip the split), and no other loads in the loop (a bias tile's
pointer load trips an assertion: the launcher never asks for ws with a bias). So every key tile takes
the visibility mask (causal diagonal, window edges, the sequence's end); on the tiles that need none
it changes nothing.

LPT (a config's lpt): the grid runs the longest query tiles of every (batch, head) first
(tiles.program_coords): under causal masking the last query tile sees the most keys.
"""

import triton
import triton.language as tl

from .tiles import (
    LOG2E_T,
    finalize,
    fold_sink,
    head_mods,
    key_blocks,
    load_keys,
    load_tile,
    merged_edges,
    program_coords,
    row_tiles,
    scores_tile,
    sequence_info,
    softmax_update,
    store_tile,
)


@triton.jit
def _fwd_key_block(acc, m_i, l_i, start_n, q, k_base, v_base, k_desc, v_desc, KP_row, stride_ks, stride_vs, offs_m,
                   seq, mods, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                   LOCAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, WIDE: tl.constexpr, TMA: tl.constexpr):
    """Fold the key block at start_n into the running (acc, row max m_i, row sum l_i). K/V tiles
    through k_desc/v_desc with TMA, else from k_base/v_base."""
    Sk = seq[3]
    cols = start_n + tl.arange(0, BLOCK_N)
    if TMA:
        k = k_desc.load([start_n, 0])
    else:
        k = load_tile(k_base, cols, stride_ks, Sk, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, CHECK_ROWS=MASKED, WIDE=WIDE)
    s, _ = scores_tile(q, k, offs_m, cols, seq, mods, qk_scale, KP_row, MASKED=MASKED, CAUSAL=CAUSAL,
                       HAS_KPM=HAS_KPM, LOCAL=LOCAL, HAS_BIAS=HAS_BIAS, HAS_ALIBI=HAS_ALIBI, SOFTCAP=SOFTCAP,
                       DOT_PRECISION=DOT_PRECISION, WIDE=WIDE)  # (BLOCK_M, BLOCK_N)
    # A bias of -inf hides keys too: rows may still have m = -inf after an unmasked tile.
    p, alpha, m_i, l_i = softmax_update(s, m_i, l_i, GUARD=MASKED or HAS_BIAS)
    if TMA:
        v = v_desc.load([start_n, 0])
    else:
        v = load_keys(v_base, cols, stride_vs, Sk, KP_row, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, MASKED=MASKED,
                      HAS_KPM=HAS_KPM, WIDE=WIDE)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _fwd_key_blocks(acc, m_i, l_i, q, k_base, v_base, k_desc, v_desc, KP_row, stride_ks, stride_vs, offs_m, lo, hi,
                    seq, mods, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                    LOCAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, WIDE: tl.constexpr, TMA: tl.constexpr,
                    WARP_SPEC: tl.constexpr = False):
    """Fold key blocks [lo, hi) into the running state; WARP_SPEC: the loop warp-specialised (only
    that branch names warp_specialize, which Triton before 3.4 does not know)."""
    if WARP_SPEC:
        for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=True):
            acc, m_i, l_i = _fwd_key_block(acc, m_i, l_i, start_n, q, k_base, v_base, k_desc, v_desc, KP_row,
                                           stride_ks, stride_vs, offs_m, seq, mods, qk_scale, MASKED=MASKED,
                                           CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, LOCAL=LOCAL, HAS_BIAS=HAS_BIAS,
                                           HAS_ALIBI=HAS_ALIBI, SOFTCAP=SOFTCAP, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N,
                                           BLOCK_D=BLOCK_D, DOT_PRECISION=DOT_PRECISION, WIDE=WIDE, TMA=TMA)
    else:
        for start_n in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _fwd_key_block(acc, m_i, l_i, start_n, q, k_base, v_base, k_desc, v_desc, KP_row,
                                           stride_ks, stride_vs, offs_m, seq, mods, qk_scale, MASKED=MASKED,
                                           CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, LOCAL=LOCAL, HAS_BIAS=HAS_BIAS,
                                           HAS_ALIBI=HAS_ALIBI, SOFTCAP=SOFTCAP, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N,
                                           BLOCK_D=BLOCK_D, DOT_PRECISION=DOT_PRECISION, WIDE=WIDE, TMA=TMA)
    return acc, m_i, l_i


# Arguments: pointers, then integers, then floats, then constexprs (the launch plans rely on it).
# Tq/Tk (packed totals) only clamp varlen bounds: not specialised, so they add no compiled variants.
@triton.jit(do_not_specialize=["Tq", "Tk"])
def attn_fwd_kernel(
    Q, K, V, O, LSE, KPM, KV_BOUNDS, CU_Q, CU_K, BIAS, ALIBI, SINKS,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh, stride_kpm_b,
    GROUP, Sq, Sk, Tq, Tk,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_ab, left, right,
    qk_scale, cap2,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, VARLEN: tl.constexpr,
    LOCAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WIDE: tl.constexpr, TMA: tl.constexpr,
    WARP_SPEC: tl.constexpr, LPT: tl.constexpr,
):
    pid_m, b, h = program_coords(tl.cdiv(Sq, BLOCK_M), LPT=LPT)  # (Sq: the longest sequence's)
    hk = h // GROUP  # the KV head shared by this query head's group
    seq = sequence_info(CU_Q, CU_K, b, Sq, Sk, Tq, Tk, VARLEN=VARLEN)
    q_start, Sq, k_start, Sk = seq
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)

    q_base = Q + b * stride_qb + h * stride_qh + q_start * stride_qs
    if WARP_SPEC:  # an empty sequence (whose base may lie past the tensor) asks for a box wholly out of
        # bounds: no memory is read
        q = row_tiles(q_base, Sq, stride_qs, BLOCK_ROWS=BLOCK_M, HEAD_DIM=HEAD_DIM,
                      BLOCK_D=BLOCK_D).load([tl.where(Sq > 0, start_m, BLOCK_M), 0])
    else:
        q = load_tile(q_base, offs_m, stride_qs, Sq, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, CHECK_ROWS=True, WIDE=WIDE)
    k_base = K + b * stride_kb + hk * stride_kh + k_start * stride_ks
    v_base = V + b * stride_vb + hk * stride_vh + k_start * stride_vs
    k_desc, v_desc = None, None
    if TMA:  # this (batch, KV head)'s keys and values
        k_desc = row_tiles(k_base, Sk, stride_ks, BLOCK_ROWS=BLOCK_N, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
        v_desc = row_tiles(v_base, Sk, stride_vs, BLOCK_ROWS=BLOCK_N, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    KP_row = KPM + b * stride_kpm_b
    mods = head_mods(BIAS, ALIBI, b, h, stride_bb, stride_bh, stride_bm, stride_bn, stride_ab, cap2, left, right,
                     HAS_ALIBI=HAS_ALIBI)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, full_lo, full_end, hi = key_blocks(start_m, seq, KV_BOUNDS, b, left, right, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                           CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, LOCAL=LOCAL)
    if WARP_SPEC:  # one loop, every tile masked (see the module's docstring)
        acc, m_i, l_i = _fwd_key_blocks(acc, m_i, l_i, q, k_base, v_base, k_desc, v_desc, KP_row, stride_ks,
                                        stride_vs, offs_m, lo, hi, seq, mods, qk_scale, MASKED=True, CAUSAL=CAUSAL,
                                        HAS_KPM=HAS_KPM, LOCAL=LOCAL, HAS_BIAS=HAS_BIAS, HAS_ALIBI=HAS_ALIBI,
                                        SOFTCAP=SOFTCAP, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
                                        DOT_PRECISION=DOT_PRECISION, WIDE=WIDE, TMA=TMA, WARP_SPEC=True)
    else:
        if LOCAL:  # the window's left edge (with the right one where they meet)
            full_lo, full_end = merged_edges(full_lo, full_end, hi)
            acc, m_i, l_i = _fwd_key_blocks(acc, m_i, l_i, q, k_base, v_base, k_desc, v_desc, KP_row, stride_ks,
                                            stride_vs, offs_m, lo, full_lo, seq, mods, qk_scale, MASKED=True,
                                            CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, LOCAL=LOCAL, HAS_BIAS=HAS_BIAS,
                                            HAS_ALIBI=HAS_ALIBI, SOFTCAP=SOFTCAP, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N,
                                            BLOCK_D=BLOCK_D, DOT_PRECISION=DOT_PRECISION, WIDE=WIDE, TMA=TMA)
        acc, m_i, l_i = _fwd_key_blocks(acc, m_i, l_i, q, k_base, v_base, k_desc, v_desc, KP_row, stride_ks, stride_vs,
                                        offs_m, full_lo, full_end, seq, mods, qk_scale, MASKED=False, CAUSAL=CAUSAL,
                                        HAS_KPM=HAS_KPM, LOCAL=LOCAL, HAS_BIAS=HAS_BIAS, HAS_ALIBI=HAS_ALIBI,
                                        SOFTCAP=SOFTCAP, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
                                        DOT_PRECISION=DOT_PRECISION, WIDE=WIDE, TMA=TMA)
        acc, m_i, l_i = _fwd_key_blocks(acc, m_i, l_i, q, k_base, v_base, k_desc, v_desc, KP_row, stride_ks, stride_vs,
                                        offs_m, full_end, hi, seq, mods, qk_scale, MASKED=True, CAUSAL=CAUSAL,
                                        HAS_KPM=HAS_KPM, LOCAL=LOCAL, HAS_BIAS=HAS_BIAS, HAS_ALIBI=HAS_ALIBI,
                                        SOFTCAP=SOFTCAP, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
                                        DOT_PRECISION=DOT_PRECISION, WIDE=WIDE, TMA=TMA)
    if HAS_SINKS:  # the sink: one more softmax entry (logit SINKS[h]) with no value
        acc, m_i, l_i = fold_sink(acc, m_i, l_i, tl.load(SINKS + h).to(tl.float32) * LOG2E_T)

    out, lse = finalize(acc, m_i, l_i, F64_LSE=LSE.dtype.element_ty == tl.float64)
    store_tile(O + b * stride_ob + h * stride_oh + q_start * stride_os, out.to(O.dtype.element_ty), offs_m,
               stride_os, Sq, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, WIDE=WIDE)
    tl.store(LSE + b * stride_lb + h * stride_lh + q_start + offs_m, lse, mask=offs_m < Sq)
