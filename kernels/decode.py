"""Split-KV decoding over a KV cache (contiguous or paged), in Triton.

Decoding runs a few query tokens per sequence against a long cache: the work is reading K and V,
not the dots. So each program serves one (batch, KV head) and every query head of its GQA group at
once (rows = group heads x new tokens, one K/V read for all of them), and when batch x KV heads is
too few programs to fill the GPU, the keys are split across programs too (grid axis 0). Each split
writes its normalised partial output and log-sum-exp; ``decode_combine_kernel`` merges them:
out = sum_s exp(lse_s - lse) * O_s with lse = logsumexp_s(lse_s). With one split the partial is the
final result and the attention kernel writes it directly.

The cache: contiguous (B, S_max, Hkv, D), or paged (num_pages, PAGE_SIZE, Hkv, D) with a block
table (B, max_pages) of page indices, as in FlashAttention and vLLM (PAGE_SIZE = 0 means
contiguous). Sequence b holds min(cache_seqlens[b] + N_NEW, CAPACITY) keys, the last N_NEW of them
this call's new tokens: the attention kernel reads those from k/v and writes them into the cache
(no separate append launch); ``kv_append_kernel`` is the append alone. Lengths and page indices are
read on the device only, so they are clamped to the cache: bad ones give wrong rows, never an
access outside it.

Causal is bottom-right: new token t (of SQ) sees keys j <= t + Sk - SQ.

A key-padding mask (HAS_KPM; fastattn.attention with few queries over dense keys, nothing
appended) narrows each sequence's split range to its [first, last + 1) real keys and treats a padded
key as outside the range: not seen, not read.

The logits, visibility and online softmax are tiles.py's (score_mods, visible, softmax_update,
fold_sink, finalize), as in the prefill forward: the two cannot drift apart.

Score modifiers (fastattn/modifiers.py; constexpr flags, so a plain call compiles without them):
softcap, bias (B or 1, Hq or 1, SQ or 1, CAPACITY or 1), ALiBi and a sliding window act on each
row's scores with the row's head and position (t + Sk - SQ). The window moves the first key of the
split range up to the first key any row sees, so the splits share only the keys in the window.
The sink joins the softmax of split 0 only: its partial lse then counts the sink once, and the
combine's lse-weighted merge gives the exact result.
"""

import triton
import triton.language as tl

from .tiles import (
    LOG2E_T,
    finalize,
    fold_sink,
    key_padding,
    padded_key_bounds,
    score_mods,
    softmax_update,
    visible,
)


@triton.jit
def _tile_offsets(BT_row, start, cols, valid, strides, N_PAGES, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                  WIDE: tl.constexpr):
    """Element offsets of one key tile (cache rows `cols` = start + arange(BLOCK_N) of one sequence)
    in K and in V, as (K base, K rows, V base, V rows): a scalar base plus per-row offsets. A
    contiguous cache's sequence base is applied by the caller. Paged: tiles start at multiples of
    BLOCK_N, so when BLOCK_N divides the page size a tile lies in one page (one block-table read,
    32-bit row offsets, as cheap as contiguous); otherwise each row reads its page. Page indices
    are clamped to the cache. WIDE (paged): the cache reaches 2**31 elements, so page offsets are
    64-bit (per-row 64-bit offsets cost registers: only then). strides: (stride_kp, stride_ks,
    stride_vp, stride_vs, new k's and v's row strides)."""
    stride_kp, stride_ks, stride_vp, stride_vs = strides[0], strides[1], strides[2], strides[3]
    if PAGE_SIZE > 0:
        if PAGE_SIZE % BLOCK_N == 0:
            page = tl.load(BT_row + start // PAGE_SIZE)
            page = tl.minimum(tl.maximum(page, 0), N_PAGES - 1).to(tl.int64)
            within = start % PAGE_SIZE + tl.arange(0, BLOCK_N)
            return page * stride_kp, within * stride_ks, page * stride_vp, within * stride_vs
        else:
            page = tl.load(BT_row + cols // PAGE_SIZE, mask=valid, other=0)
            page = tl.minimum(tl.maximum(page, 0), N_PAGES - 1)
            if WIDE:
                page = page.to(tl.int64)
            within = cols % PAGE_SIZE
            return 0, page * stride_kp + within * stride_ks, 0, page * stride_vp + within * stride_vs
    elif WIDE:
        return 0, cols.to(tl.int64) * stride_ks, 0, cols.to(tl.int64) * stride_vs
    else:
        return 0, cols * stride_ks, 0, cols * stride_vs


@triton.jit
def _kv_tile(cache_ptrs, NEW_base, stride_new, cols, col_ok, cached, offs_d, d_ok, FROM_NEW: tl.constexpr):
    """One (BLOCK_N, BLOCK_D) tile of keys or values: from the cache, or (FROM_NEW) from the new
    tokens' k/v for positions >= cached. Masked entries read as 0."""
    if FROM_NEW:
        is_new = col_ok & (cols >= cached)
        x = tl.load(cache_ptrs, mask=(col_ok & (cols < cached))[:, None] & d_ok[None, :], other=0.0)
        x_new = tl.load(NEW_base + (cols - cached)[:, None] * stride_new + offs_d[None, :],
                        mask=is_new[:, None] & d_ok[None, :], other=0.0)
        return tl.where(is_new[:, None], x_new, x)
    else:
        return tl.load(cache_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _fold_tiles(acc, m_i, l_i, q, k_base, v_base, KN_base, VN_base, BT_row, KP_row, lo, hi, cached, row_ok, diag, mods,
                strides, N_PAGES, qk_scale, FROM_NEW: tl.constexpr, CAUSAL: tl.constexpr, LOCAL: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
                PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, WIDE: tl.constexpr):
    """Fold key tiles [lo, hi) into the running (acc, row max m_i, row sum l_i), with the logits,
    visibility and online softmax of tiles.py (as the prefill forward). FROM_NEW: the tiles reach the
    new tokens (positions >= cached), whose keys/values are read from k/v themselves (this launch is
    what writes them into the cache). KP_row (HAS_KPM): the sequence's key-padding row, by cache
    position: a padded key is treated as one past the range (never read, never seen), so garbage
    there gives nothing. row_ok: the real rows; diag: each row's diagonal() (its own
    position: causally, the last key it sees); mods = (bias_rows, stride_bn, slope2, cap2, left,
    right): each row's bias row pointer and ALiBi slope * log2(e) (a row's head is its own), softcap,
    window; strides: _tile_offsets'."""
    bias_rows, stride_bn, slope2, cap2, left, right = mods
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < hi
        if HAS_KPM:
            col_ok = col_ok & key_padding(KP_row, cols, hi)
        k_off, k_rows, v_off, v_rows = _tile_offsets(BT_row, start, cols, col_ok, strides, N_PAGES,
                                                     PAGE_SIZE=PAGE_SIZE, BLOCK_N=BLOCK_N, WIDE=WIDE)
        k = _kv_tile(k_base + k_off + k_rows[:, None] + offs_d[None, :], KN_base, strides[4], cols, col_ok, cached,
                     offs_d, d_ok, FROM_NEW=FROM_NEW)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_R, BLOCK_N), log2 units
        c = cols[None, :]
        rel = c - diag[:, None]  # relative_position
        s, _ = score_mods(s, None, c, None, None, bias_rows, 0, stride_bn, slope2, cap2, row_ok=row_ok, key_ok=col_ok,
                          rel=rel, SOFTCAP=SOFTCAP, HAS_BIAS=HAS_BIAS, HAS_ALIBI=HAS_ALIBI)
        s = tl.where(visible(rel, left, right, key_ok=col_ok[None, :], CAUSAL=CAUSAL, LOCAL=LOCAL), s, float("-inf"))
        p, alpha, m_i, l_i = softmax_update(s, m_i, l_i, GUARD=True)
        v = _kv_tile(v_base + v_off + v_rows[:, None] + offs_d[None, :], VN_base, strides[5], cols, col_ok, cached,
                     offs_d, d_ok, FROM_NEW=FROM_NEW)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def append_row(K, V, KN_base, VN_base, row, stride_kns, stride_vns, BT_row, b, hk, pos, cache_strides, N_PAGES,
               ok=None, PAGE_SIZE: tl.constexpr = 0, HEAD_DIM: tl.constexpr = 0, BLOCK_D: tl.constexpr = 0):
    """Write one new token's key and value rows (row `row` of KN_base/VN_base: its (D,) rows, row
    strides stride_kns/stride_vns) into KV head hk of
    sequence b's cache at position pos (64-bit: pos * stride may pass 2**31 in a big cache), where
    ok (None: pos is known to lie in the cache). cache_strides = (stride_kp, stride_ks, stride_kh,
    stride_vp, stride_vs, stride_vh). Paged: a page index outside the cache is skipped, not clamped
    (it would overwrite another page)."""
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh = cache_strides
    if PAGE_SIZE > 0:
        if ok is None:
            page = tl.load(BT_row + pos // PAGE_SIZE).to(tl.int64)
            ok = (page >= 0) & (page < N_PAGES)
        else:
            page = tl.load(BT_row + pos // PAGE_SIZE, mask=ok, other=-1).to(tl.int64)
            ok = ok & (page >= 0) & (page < N_PAGES)
        k_dst = K + page * stride_kp + (pos % PAGE_SIZE) * stride_ks
        v_dst = V + page * stride_vp + (pos % PAGE_SIZE) * stride_vs
    else:
        if ok is None:
            ok = pos >= 0
        k_dst = K + b * stride_kp + pos * stride_ks
        v_dst = V + b * stride_vp + pos * stride_vs
    offs_d = tl.arange(0, BLOCK_D)
    mask = offs_d < tl.where(ok, HEAD_DIM, 0)  # (a scalar bool & a vector trips the interpreter)
    tl.store(k_dst + hk * stride_kh + offs_d, tl.load(KN_base + row * stride_kns + offs_d, mask=mask), mask=mask)
    tl.store(v_dst + hk * stride_vh + offs_d, tl.load(VN_base + row * stride_vns + offs_d, mask=mask), mask=mask)


# Arguments: pointers, then integers, then floats, then constexprs (the launch plans rely on it).
@triton.jit
def decode_attn_kernel(
    Q, K, V, K_NEW, V_NEW, SEQLENS, BLOCK_TABLE, O, LSE, BIAS, ALIBI, SINKS, KPM, KV_BOUNDS,
    stride_qb, stride_qs, stride_qh,
    stride_kp, stride_ks, stride_kh,
    stride_vp, stride_vs, stride_vh,
    stride_knb, stride_kns, stride_knh,
    stride_vnb, stride_vns, stride_vnh,
    stride_bt,
    stride_o_split, stride_ob, stride_os, stride_oh,
    stride_l_split, stride_lb, stride_lh,
    GROUP, SQ, N_NEW, CAPACITY, N_PAGES, N_SPLITS, ROW_TILES, stride_kpm_b,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_ab, left, right,
    qk_scale, cap2,
    CAUSAL: tl.constexpr, PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    LOCAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_KPM: tl.constexpr, FULL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WIDE: tl.constexpr,
):
    """Grid (N_SPLITS, Hkv * ROW_TILES, B). K/V strides: (batch, row, head) for a contiguous cache,
    (page, row in page, head) for a paged one. K_NEW/V_NEW (B, N_NEW, Hkv, D): this call's new
    tokens, attended from there and written into the cache at positions cache_seqlens[b] + t by the
    program whose key range holds them (row tile 0): the append costs no launch of its own. O/LSE:
    the output (split stride 0) or the float32 partials (N_SPLITS, B, SQ, Hq, D) / (N_SPLITS, B, Hq, SQ).
    FULL: every sequence fills the cache (SEQLENS is not read: a dense k/v seen as a full cache, no
    lengths tensor to fill). HAS_KPM (no new tokens: N_NEW = 0): KPM (B, CAPACITY) bytes, nonzero =
    a real key, and KV_BOUNDS (B, 2) its rows' [first, last + 1) real keys (launchers/key_bounds.py):
    the splits share the keys in those bounds, padded keys are never read."""
    split = tl.program_id(0)
    hk = tl.program_id(1) // ROW_TILES
    tile = tl.program_id(1) % ROW_TILES
    b = tl.program_id(2).to(tl.int64)

    # Rows: (group head g, new token t), head-major; rows past GROUP * SQ are padding.
    rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < GROUP * SQ
    t = rows % SQ
    h = hk * GROUP + rows // SQ
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    # The heads' offsets as 64-bit scalars (a head-major cache or q viewed as (B, S, H, D), as a
    # transformers cache is, has a head stride of S * D: head x stride may pass 2**31 on a long
    # sequence); within the group, 32-bit (the launchers keep GROUP x q's head stride below 2**31).
    hk64 = hk.to(tl.int64)
    q_head = Q + b * stride_qb + hk64 * GROUP * stride_qh
    q_ptrs = q_head + (t * stride_qs + (rows // SQ) * stride_qh)[:, None] + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    if FULL:
        cached = CAPACITY + 0 * split
    else:
        cached = tl.minimum(tl.maximum(tl.load(SEQLENS + b), 0), CAPACITY)
    seq_len = tl.minimum(cached + N_NEW, CAPACITY)
    # This split's keys: an equal share of this sequence's (from the window's first key), in whole
    # BLOCK_N tiles (so short sequences in a cache sized for long ones still spread over the splits).
    first = seq_len * 0
    if LOCAL:
        first = (tl.maximum(seq_len - SQ - left, 0) // BLOCK_N) * BLOCK_N
    end = seq_len
    if HAS_KPM:  # only the real keys' tiles (none: an empty range)
        kv_lo, kv_hi = padded_key_bounds(KV_BOUNDS, b, seq_len, HAS_KPM=True)
        first = tl.maximum(first, (kv_lo // BLOCK_N) * BLOCK_N)
        end = tl.maximum(tl.minimum(end, kv_hi), first)
    chunk = tl.cdiv(tl.cdiv(end - first, N_SPLITS), BLOCK_N) * BLOCK_N
    lo = first + split * chunk
    hi = tl.minimum(lo + chunk, end)
    # Tiles before `mid` hold cached keys only; from `mid` on they may reach the new ones.
    mid = tl.minimum(tl.maximum((cached // BLOCK_N) * BLOCK_N, lo), tl.maximum(hi, lo))

    BT_row = BLOCK_TABLE + b * stride_bt
    KP_row = KPM + b * stride_kpm_b
    if PAGE_SIZE > 0:
        k_base = K + hk64 * stride_kh
        v_base = V + hk64 * stride_vh
    else:
        k_base = K + b * stride_kp + hk64 * stride_kh
        v_base = V + b * stride_vp + hk64 * stride_vh
    KN_base = K_NEW + b * stride_knb + hk64 * stride_knh
    VN_base = V_NEW + b * stride_vnb + hk64 * stride_vnh
    strides = (stride_kp, stride_ks, stride_vp, stride_vs, stride_kns, stride_vns)
    # Each row's tiles.diagonal(t, SQ, seq_len) (its own position: causally, the last key it sees),
    # written as (t + seq_len) - SQ: the association ptxas has always seen (fewer spills, measured).
    diag = t + seq_len - SQ
    # Per row: its bias row and its ALiBi slope.
    bias_rows = BIAS + b * stride_bb + h.to(tl.int64) * stride_bh + t * stride_bm
    slope2 = tl.zeros([BLOCK_R], dtype=tl.float32)
    if HAS_ALIBI:
        slope2 = tl.load(ALIBI + b * stride_ab + h, mask=row_ok, other=0.0) * LOG2E_T
    mods = (bias_rows, stride_bn, slope2, cap2, left, right)

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    acc, m_i, l_i = _fold_tiles(acc, m_i, l_i, q, k_base, v_base, KN_base, VN_base, BT_row, KP_row, lo, mid, cached,
                                row_ok, diag, mods, strides, N_PAGES, qk_scale, FROM_NEW=False,
                                CAUSAL=CAUSAL, LOCAL=LOCAL, HAS_BIAS=HAS_BIAS, HAS_ALIBI=HAS_ALIBI, SOFTCAP=SOFTCAP,
                                HAS_KPM=HAS_KPM, PAGE_SIZE=PAGE_SIZE, HEAD_DIM=HEAD_DIM, DOT_PRECISION=DOT_PRECISION,
                                BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, WIDE=WIDE)
    acc, m_i, l_i = _fold_tiles(acc, m_i, l_i, q, k_base, v_base, KN_base, VN_base, BT_row, KP_row, mid, hi, cached,
                                row_ok, diag, mods, strides, N_PAGES, qk_scale, FROM_NEW=True,
                                CAUSAL=CAUSAL, LOCAL=LOCAL, HAS_BIAS=HAS_BIAS, HAS_ALIBI=HAS_ALIBI, SOFTCAP=SOFTCAP,
                                HAS_KPM=HAS_KPM, PAGE_SIZE=PAGE_SIZE, HEAD_DIM=HEAD_DIM, DOT_PRECISION=DOT_PRECISION,
                                BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, WIDE=WIDE)
    if HAS_SINKS:  # split 0 only: the combine then counts each sink once
        sink2 = tl.load(SINKS + h, mask=row_ok, other=float("-inf")).to(tl.float32) * LOG2E_T
        acc, m_i, l_i = fold_sink(acc, m_i, l_i, tl.where(split == 0, sink2, float("-inf")))
    if tile == 0:
        # New tokens before the window's first key (more new tokens than the window spans) are
        # still written, by split 0.
        store_lo = tl.where(split == 0, 0, lo)
        cache_strides = (stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh)
        for position in range(tl.maximum(store_lo, cached), hi):
            pos = b * 0 + position  # 64-bit (b is): pos * stride may pass 2**31 in a big cache
            append_row(K, V, KN_base, VN_base, pos - cached, stride_kns, stride_vns, BT_row, b, hk64, pos,
                       cache_strides, N_PAGES, PAGE_SIZE=PAGE_SIZE, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)

    # A row that saw no key (an empty split, or none visible) has l = 0, acc = 0: out 0, lse -inf.
    out, lse = finalize(acc, m_i, l_i)
    split_off = split.to(tl.int64)
    o_ptrs = O + split_off * stride_o_split + b * stride_ob + (t * stride_os + h * stride_oh)[:, None] + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + split_off * stride_l_split + b * stride_lb + h * stride_lh + t, lse, mask=row_ok)


@triton.jit
def decode_combine_kernel(
    O_PART, LSE_PART, O, LSE,
    stride_p_split, stride_pb, stride_ps, stride_ph,
    stride_lp_split, stride_lpb, stride_lph,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    N_SPLITS,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (Hq, SQ, B): merge one (batch, token, head)'s N_SPLITS partial outputs by their lse.
    Splits that saw no key (lse -inf) weigh 0; if none saw one, out = 0 and lse = -inf."""
    h = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    splits = tl.arange(0, BLOCK_S)
    s_ok = splits < N_SPLITS
    lse_base = LSE_PART + b * stride_lpb + h * stride_lph + t
    lse_s = tl.load(lse_base + splits * stride_lp_split, mask=s_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp(lse_s - m), 0)
    total_safe = tl.where(total == 0.0, 1.0, total)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    # One split's row at a time: a (splits, D) tile would not fit in registers for 128 splits.
    part = O_PART + b * stride_pb + t * stride_ps + h * stride_ph + offs_d
    out = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(0, N_SPLITS):
        w = tl.exp(tl.load(lse_base + s * stride_lp_split) - m) / total_safe
        out += w * tl.load(part + s * stride_p_split, mask=d_ok, other=0.0)
    tl.store(O + b * stride_ob + t * stride_os + h * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=d_ok)
    tl.store(LSE + b * stride_lb + h * stride_lh + t, tl.where(total == 0.0, float("-inf"), m + tl.log(total_safe)))


@triton.jit
def kv_append_kernel(
    K_NEW, V_NEW, K_CACHE, V_CACHE, SEQLENS, BLOCK_TABLE,
    stride_knb, stride_kns, stride_knh,
    stride_vnb, stride_vns, stride_vnh,
    stride_kp, stride_ks, stride_kh,
    stride_vp, stride_vs, stride_vh,
    stride_bt,
    CAPACITY, N_PAGES,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
):
    """Grid (S_new, Hkv, B): write new token t's key and value row of head hk of sequence b at cache
    position cache_seqlens[b] + t. A position outside the cache (or, paged, on a page index outside
    it) is not written."""
    t = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    pos = tl.maximum(tl.load(SEQLENS + b), 0).to(tl.int64) + t  # 64-bit before the add: no wrap near 2**31
    append_row(K_CACHE, V_CACHE, K_NEW + b * stride_knb + hk * stride_knh, V_NEW + b * stride_vnb + hk * stride_vnh, t,
               stride_kns, stride_vns, BLOCK_TABLE + b * stride_bt, b, hk, pos,
               (stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh), N_PAGES, ok=pos < CAPACITY,
               PAGE_SIZE=PAGE_SIZE, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
