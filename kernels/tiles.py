"""Jit helpers shared by the forward, backward and decoding kernels: the one definition of a logit
(``score_mods``), of which keys a query sees (``visible``), of the online softmax
(``softmax_update``, ``fold_sink``, ``finalize``), plus tile loads/stores and block ranges.

Conventions: a tile is BLOCK rows of a (S, D) slice whose rows are `stride` elements apart and
whose last dimension is contiguous. Row offsets are 32-bit unless WIDE: the launcher sets WIDE when
some tensor's (S * row stride) reaches 2**31 elements within one (batch, head) slice (long contexts,
big KV caches), and pays for 64-bit offset vectors only then (they cost registers and spills). Head dims that are not a power of two are padded to BLOCK_D
and masked; rows past the sequence end are masked (loaded as 0, never stored).

Causal attention is bottom-right aligned: query i sees key j iff j <= i + (Sk - Sq).

Score modifiers (fastattn/modifiers.py) apply to the scores in log2 units: the softcap, bias and
ALiBi terms arrive pre-multiplied by log2(e) where they are scalars. A sliding window (LOCAL)
passes `left`/`right` as ints (the launcher replaces an unbounded side by Sq + Sk); with causal,
right <= 0, so the window alone decides visibility.

Grouped values (tuples, built in the kernels as FlashAttention's SeqlenInfo/BlockInfo):
    seq  = (q_start, Sq, k_start, Sk)  (sequence_info)
    mods = (BIAS_bh, stride_bm, stride_bn, slope2, cap2, left, right)  (the prefill kernels' modifiers
           for one (batch, query head): bias slice, ALiBi slope * log2(e), softcap * log2(e), window)
Every constexpr is passed by keyword.
"""

import triton
import triton.language as tl

LOG2E_T = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def row_tiles(base, n_rows, stride, BLOCK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """One (batch, head)'s (n_rows, HEAD_DIM) rows as a tensor descriptor (Hopper's tensor memory
    accelerator), read BLOCK_ROWS x BLOCK_D at a time; rows past n_rows and columns past HEAD_DIM
    read as 0, as load_tile's. A descriptor needs a row: an empty sequence gets one it never loads."""
    return tl.make_tensor_descriptor(base, shape=[tl.maximum(n_rows, 1), HEAD_DIM], strides=[stride, 1],
                                     block_shape=[BLOCK_ROWS, BLOCK_D])


@triton.jit
def head_row_tiles(base, n_heads, head_stride, n_rows, stride, BLOCK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """row_tiles for n_heads consecutive heads (head_stride apart) of one batch element: a (n_heads,
    n_rows, HEAD_DIM) descriptor, read one head's BLOCK_ROWS x BLOCK_D at a time (load([head, row,
    0]) gives (1, BLOCK_ROWS, BLOCK_D))."""
    return tl.make_tensor_descriptor(base, shape=[n_heads, tl.maximum(n_rows, 1), HEAD_DIM],
                                     strides=[head_stride, stride, 1], block_shape=[1, BLOCK_ROWS, BLOCK_D])


@triton.jit
def load_tile(ptr, rows, stride, n_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              CHECK_ROWS: tl.constexpr, WIDE: tl.constexpr, keep=None):
    """Load a (len(rows), BLOCK_D) tile; masked entries read as 0. keep: which rows to read (a
    (len(rows),) bool, rows < n_rows included); the others read as 0 without being loaded."""
    offs_d = tl.arange(0, BLOCK_D)
    if WIDE:
        ptrs = ptr + rows.to(tl.int64)[:, None] * stride + offs_d[None, :]
    else:
        ptrs = ptr + rows[:, None] * stride + offs_d[None, :]
    if keep is not None:
        mask = keep[:, None]
        if HEAD_DIM != BLOCK_D:
            mask = mask & (offs_d[None, :] < HEAD_DIM)
        x = tl.load(ptrs, mask=mask, other=0.0)
    elif CHECK_ROWS:
        mask = rows[:, None] < n_rows
        if HEAD_DIM != BLOCK_D:
            mask = mask & (offs_d[None, :] < HEAD_DIM)
        x = tl.load(ptrs, mask=mask, other=0.0)
    elif HEAD_DIM != BLOCK_D:
        x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def load_keys(ptr, cols, stride, Sk, KP_row, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
              HAS_KPM: tl.constexpr, WIDE: tl.constexpr):
    """A K or V tile (len(cols), BLOCK_D). On masked tiles with a key-padding mask, the keys marked as
    padding are not loaded and read as 0: garbage there (NaN, inf) never reaches an output through
    its zero probability (0 * NaN is NaN), for the cost of a predicate on the load."""
    if MASKED and HAS_KPM:
        keep = (cols < Sk) & (tl.load(KP_row + cols, mask=cols < Sk, other=0) != 0)
        return load_tile(ptr, cols, stride, Sk, keep=keep, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, CHECK_ROWS=True,
                         WIDE=WIDE)
    return load_tile(ptr, cols, stride, Sk, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, CHECK_ROWS=MASKED, WIDE=WIDE)


@triton.jit
def store_tile(ptr, x, rows, stride, n_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               WIDE: tl.constexpr):
    """Store a (len(rows), BLOCK_D) tile, skipping padded rows and head-dim columns."""
    offs_d = tl.arange(0, BLOCK_D)
    if WIDE:
        ptrs = ptr + rows.to(tl.int64)[:, None] * stride + offs_d[None, :]
    else:
        ptrs = ptr + rows[:, None] * stride + offs_d[None, :]
    mask = rows[:, None] < n_rows
    if HEAD_DIM != BLOCK_D:
        mask = mask & (offs_d[None, :] < HEAD_DIM)
    tl.store(ptrs, x, mask=mask)


@triton.jit
def _tanh(x, APPROX: tl.constexpr = False):
    """tanh within a few ulp, relative: from exp2 (the interpreter has no libdevice tanh; two MUFU ops,
    the exp2 and the division's reciprocal), and below |x| = 1/4, where 1 - exp(-2|x|) would cancel
    (an absolute error of ~1e-7 that softcap * tanh turns into an error growing with the cap), its
    odd series to x**9 (truncation < 1e-8 relative). APPROX: the hardware's tanh.approx.f32 (sm_75+;
    not in the interpreter), one MUFU op, relative error about 2**-11."""
    if APPROX:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    a = tl.abs(x)
    e = tl.exp2(a * (-2.0 * LOG2E_T))
    t = (1.0 - e) / (1.0 + e)
    x2 = x * x
    series = x + x * (x2 * (-1.0 / 3 + x2 * (2.0 / 15 + x2 * (-17.0 / 315 + x2 * (62.0 / 2835)))))
    return tl.where(a < 0.25, series, tl.where(x < 0, -t, t))


@triton.jit
def _log2_bias(b):
    """A bias (float32, natural units) in log2 units. At or below fastattn.semantics.BIAS_FLOOR (e.g.
    torch.finfo(float32).min, transformers' mask value) the product overflows to -inf, which hides
    the key: that floor is defined as this product's overflow point, so every backend agrees at no
    cost here."""
    return b * LOG2E_T


@triton.jit
def diagonal(r, Sq, Sk):
    """Query r's position among the keys (bottom-right aligned): the last key causal attention lets it see."""
    return r + (Sk - Sq)


@triton.jit
def relative_position(r, c, Sq, Sk):
    """Key c's position relative to query r's diagonal(): <= 0 where causal attention sees it. r, c
    broadcast to the score tile. (Decode computes diagonal() once per row, outside its key loop.)"""
    return c - diagonal(r, Sq, Sk)


@triton.jit
def score_mods(s, r, c, Sq, Sk, bias, stride_bm, stride_bn, slope2, cap2, row_ok=None, key_ok=None, rel=None,
               SOFTCAP: tl.constexpr = False, HAS_BIAS: tl.constexpr = False, HAS_ALIBI: tl.constexpr = False,
               WIDE: tl.constexpr = False):
    """The one definition of a modified logit (log2 units), in the order of fastattn/modifiers.py:
    softcap, then bias, then ALiBi. Returns (s, dcap): dcap = d softcap / d logit = 1 - tanh^2 with
    SOFTCAP (the backward needs it), else s (unused). SOFTCAP True: tanh from exp2; 2: tanh.approx.f32
    (see _tanh). Everything is computed here, after the softcap, in the order the kernels have always
    used (ptxas spills more otherwise).

    Queries r, keys c: index tensors broadcasting to s ((rows, 1) x (1, cols), or transposed), of a
    sequence of Sq queries and Sk keys. Two forms of the per-row values:
    - one head (prefill, row_ok None): bias is the (batch, head)'s (Sq, Sk) slice, read at
      r * stride_bm + c * stride_bn where r < Sq and c < Sk (64-bit offsets with WIDE); slope2 a scalar;
    - rows of their own heads (decode, row_ok given): bias holds each row's bias row pointer and
      slope2 each row's slope ((rows,) vectors, as row_ok), keys c are (1, cols); the bias is read at
      c * stride_bn where row_ok and key_ok (the keys in range, a (cols,) vector).
    rel: relative_position(r, c, Sq, Sk) when the caller has it (else computed here).
    slope2 = ALiBi slope * log2(e); cap2 = softcap * log2(e)."""
    dcap = s
    if SOFTCAP:
        t = _tanh(s * (1.0 / cap2), APPROX=SOFTCAP == 2)  # a per-tile reciprocal: a division per score is a MUFU op
        s = cap2 * t
        dcap = 1.0 - t * t
    if HAS_BIAS:
        if row_ok is None:
            if WIDE:
                offs = r.to(tl.int64) * stride_bm + c.to(tl.int64) * stride_bn
            else:
                offs = r * stride_bm + c * stride_bn
            s += _log2_bias(tl.load(bias + offs, mask=(r < Sq) & (c < Sk), other=0.0).to(tl.float32))
        else:
            if WIDE:
                c_off = c.to(tl.int64) * stride_bn
            else:
                c_off = c * stride_bn
            s += _log2_bias(tl.load(bias[:, None] + c_off, mask=key_ok[None, :] & row_ok[:, None],
                                    other=0.0).to(tl.float32))
    if HAS_ALIBI:
        if rel is None:
            rel = relative_position(r, c, Sq, Sk)
        if row_ok is None:
            s -= slope2 * tl.abs(rel).to(tl.float32)
        else:
            s -= slope2[:, None] * tl.abs(rel).to(tl.float32)
    return s, dcap


@triton.jit
def modify_scores(s, r, c, Sq, Sk, mods, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
                  WIDE: tl.constexpr):
    """score_mods for the prefill kernels: one (batch, head)'s modifiers `mods` (see the module
    doc), queries r and keys c (index tensors broadcasting to s: (rows, 1) x (1, cols), or
    transposed)."""
    return score_mods(s, r, c, Sq, Sk, mods[0], mods[1], mods[2], mods[3], mods[4], SOFTCAP=SOFTCAP,
                      HAS_BIAS=HAS_BIAS, HAS_ALIBI=HAS_ALIBI, WIDE=WIDE)


@triton.jit
def visible(rel, left, right, key_ok=None, kp=None, CAUSAL: tl.constexpr = False, LOCAL: tl.constexpr = False,
            HAS_KPM: tl.constexpr = False):
    """Whether each query sees each key: key_ok (a bool tile: the key is inside the sequence, or a
    split's range; None: not checked), by relative position rel (CAUSAL: rel <= 0; LOCAL:
    -left <= rel <= right, which decides alone, see the module doc) and (HAS_KPM) not padding: kp.
    key_ok and kp broadcast to rel. Nothing to check: all True."""
    if key_ok is not None:
        vis = key_ok
        if LOCAL:
            vis = vis & (rel >= -left) & (rel <= right)
        elif CAUSAL:
            vis = vis & (rel <= 0)
    elif LOCAL:
        vis = (rel >= -left) & (rel <= right)
    elif CAUSAL:
        vis = rel <= 0
    else:
        vis = rel == rel
    if HAS_KPM:
        vis = vis & kp
    return vis


@triton.jit
def key_padding(KP_row, cols, Sk):
    """Which keys `cols` are real (not padding) in the key-padding row KP_row (bytes, nonzero = real)."""
    return tl.load(KP_row + cols, mask=cols < Sk, other=0) != 0


@triton.jit
def scores_tile(q, k, rows, cols, seq, mods, qk_scale, KP_row, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_KPM: tl.constexpr, LOCAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
                SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE: tl.constexpr):
    """Scaled scores q k^T in log2 units with the score modifiers, (len(rows), len(cols)), and
    score_mods' dcap. On masked (diagonal/window edge/tail/padded) blocks, keys that are not
    visible() (past Sk, outside query i's causal/window range, or (HAS_KPM) marked as padding in the
    key-padding row KP_row) are -inf."""
    Sq = seq[1]
    Sk = seq[3]
    r = rows[:, None]
    c = cols[None, :]
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    s, dcap = modify_scores(s, r, c, Sq, Sk, mods, SOFTCAP=SOFTCAP, HAS_BIAS=HAS_BIAS, HAS_ALIBI=HAS_ALIBI, WIDE=WIDE)
    if MASKED:
        vis = visible(relative_position(r, c, Sq, Sk), mods[5], mods[6], key_ok=c < Sk, CAUSAL=CAUSAL, LOCAL=LOCAL)
        if HAS_KPM:  # (visible()'s kp, loaded after the position test as it always was: fewer registers)
            vis = vis & key_padding(KP_row, cols, Sk)[None, :]
        s = tl.where(vis, s, float("-inf"))
    return s, dcap


@triton.jit
def softmax_update(s, m_i, l_i, GUARD: tl.constexpr):
    """One step of the online softmax (base 2) over a score tile s: (p, alpha, m_new, l_new), after
    which the caller scales its accumulator by alpha and adds p @ v. GUARD: some row may have seen no
    visible key yet (masked tiles, a bias of -inf) and so keep m = -inf; it is shifted by 0 instead,
    so that exp2(-inf - (-inf)) never produces NaN."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_shift = m_new
    if GUARD:
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(s - m_shift[:, None])
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_new


@triton.jit
def fold_sink(acc, m_i, l_i, sink2):
    """A sink (logit sink2, log2 units; a scalar or per row) joins the softmax as one more entry with
    no value: (acc, m, l) after it. m is finite from here (0 on a row without keys whose sink is -inf)."""
    m_f = tl.maximum(m_i, sink2)
    m_f = tl.where(m_f == float("-inf"), 0.0, m_f)
    alpha = tl.exp2(m_i - m_f)
    l_i = l_i * alpha + tl.exp2(sink2 - m_f)
    return acc * alpha[:, None], m_f, l_i


@triton.jit
def finalize(acc, m_i, l_i, F64_LSE: tl.constexpr = False):
    """(out, lse natural log) of the online softmax: rows that saw no key (l = 0, acc = 0) get out 0
    (divided by 1) and lse -inf. F64_LSE (fp32 inputs): lse in float64, so that the backward gets the
    forward's log2 statistics back exactly (an fp32 natural-log lse rounds them: docs/design.md,
    "Precision of the backward")."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if F64_LSE:
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i.to(tl.float64) + tl.log2(l_safe.to(tl.float64))) * LN2)
    else:
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    return out, lse


@triton.jit
def _packed_range(CU, b, max_len, total):
    """Rows [start, start + n) of packed sequence b, clamped to [0, total) and n <= max_len: the
    cumulative lengths are not read on the host (no sync), so bad ones must not reach past the tensor."""
    start = tl.minimum(tl.maximum(tl.load(CU + b), 0), total)
    end = tl.minimum(tl.maximum(tl.load(CU + b + 1), start), total)
    return start.to(tl.int64), tl.minimum(end - start, max_len).to(tl.int32)


@triton.jit
def sequence_info(CU_Q, CU_K, b, Sq, Sk, Tq, Tk, VARLEN: tl.constexpr):
    """seq = (q_start, Sq, k_start, Sk) of batch element b. Packed (varlen) sequences read them from the
    cumulative lengths (Sq/Sk are then the max lengths, Tq/Tk the totals); padded batches start at
    row 0 with the common lengths."""
    if VARLEN:
        q_start, Sq = _packed_range(CU_Q, b, Sq, Tq)
        k_start, Sk = _packed_range(CU_K, b, Sk, Tk)
    else:
        q_start = b * 0
        k_start = b * 0
    return q_start, Sq, k_start, Sk


@triton.jit
def padded_key_bounds(KV_BOUNDS, b, Sk, HAS_KPM: tl.constexpr):
    """[first, last + 1) of batch element b's real keys (key-padding mask); keys outside it are all
    padding, so whole tiles there are skipped. Without a mask: [0, Sk)."""
    if HAS_KPM:
        lo = tl.load(KV_BOUNDS + 2 * b)
        hi = tl.load(KV_BOUNDS + 2 * b + 1)
    else:
        lo = Sk * 0
        hi = Sk
    return lo, hi


@triton.jit
def key_range(start_m, Sq, Sk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key blocks a query block [start_m, start_m + BLOCK_M) must visit.

    Returns (full_end, hi): blocks in [0, full_end) are visible to every query row of the block and
    lie inside the sequence, so they need no mask; [full_end, hi) are the diagonal/tail blocks that
    pay for the mask. Keys at or past hi are invisible to the whole block (skipped, not masked).
    """
    even_end = (Sk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        diag = Sk - Sq
        # The block's first row sees keys [0, start_m + diag]; its last sees [0, start_m + BLOCK_M - 1 + diag].
        full_end = tl.minimum((tl.maximum(start_m + diag + 1, 0) // BLOCK_N) * BLOCK_N, even_end)
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + diag, 0), Sk)
    else:
        full_end = even_end
        hi = Sk
    return full_end, hi


@triton.jit
def window_key_range(start_m, Sq, Sk, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """key_range under a sliding window: (lo, full_lo, full_hi, hi). Row i sees keys
    [i + diag - left, i + diag + right]; blocks in [full_lo, full_hi) are inside every row's window
    and the sequence (no mask), [lo, full_lo) and [full_hi, hi) are the window's edges (masked);
    the rest is skipped, so the cost follows the window's width."""
    diag = Sk - Sq
    last = start_m + BLOCK_M - 1  # the block's last row
    lo = (tl.maximum(start_m + diag - left, 0) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(tl.maximum(last + diag + right + 1, 0), Sk)
    lo = tl.minimum(lo, hi)
    full_lo = tl.minimum(tl.cdiv(tl.maximum(last + diag - left, 0), BLOCK_N) * BLOCK_N, hi)
    full_lo = tl.maximum(full_lo, lo)
    full_hi = (tl.maximum(start_m + diag + right + 1, 0) // BLOCK_N) * BLOCK_N
    full_hi = tl.minimum(full_hi, (Sk // BLOCK_N) * BLOCK_N)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def head_mods(BIAS, ALIBI, b, h, stride_bb, stride_bh, stride_bm, stride_bn, stride_ab, cap2, left, right,
              HAS_ALIBI: tl.constexpr):
    """The prefill kernels' mods tuple for (batch element b, query head h): its bias slice, its ALiBi
    slope * log2(e) (0.0 without ALiBi), the softcap and the window."""
    return (BIAS + b * stride_bb + h * stride_bh, stride_bm, stride_bn,
            alibi_slope2(ALIBI + b * stride_ab, h, HAS_ALIBI=HAS_ALIBI), cap2, left, right)


@triton.jit
def alibi_slope2(ALIBI_b, h, HAS_ALIBI: tl.constexpr):
    """Head h's ALiBi slope * log2(e) from the batch element's slopes ALIBI_b (0.0 without ALiBi)."""
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(ALIBI_b + h) * LOG2E_T
    return slope2


@triton.jit
def merged_edges(full_lo, full_end, hi):
    """A window's ranges (masked [lo, full_lo), unmasked [full_lo, full_end), masked [full_end, hi))
    with the two masked edges run as one loop over [lo, hi) where nothing lies between them (a window
    narrower than about a tile pair): one pipeline fill and drain instead of two, the same tiles
    computed. Returns (full_lo, full_end) to loop with."""
    meet = full_lo >= full_end
    return tl.where(meet, hi, full_lo), tl.where(meet, hi, full_end)


@triton.jit
def key_blocks(start_m, seq, KV_BOUNDS, b, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, LOCAL: tl.constexpr):
    """The block ranges (lo, full_lo, full_end, hi) of a query block of sequence `seq`:
    [full_lo, full_end) needs no mask, [lo, full_lo) (a window's left edge; empty without LOCAL) and
    [full_end, hi) do. With a key-padding mask every
    visited block is masked, and blocks outside the batch element's [first real key, last real key]
    are skipped. A query block past the sequence (varlen) visits none."""
    Sq = seq[1]
    Sk = seq[3]
    if LOCAL:
        lo, full_lo, full_end, hi = window_key_range(start_m, Sq, Sk, left, right, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    else:
        full_end, hi = key_range(start_m, Sq, Sk, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, CAUSAL=CAUSAL)
        lo = full_end * 0
        full_lo = lo
    hi = tl.where(start_m < Sq, hi, 0)
    kv_lo, kv_hi = padded_key_bounds(KV_BOUNDS, b, Sk, HAS_KPM=HAS_KPM)
    if HAS_KPM:
        hi = tl.minimum(hi, kv_hi)
        lo = tl.minimum(tl.maximum(lo, (kv_lo // BLOCK_N) * BLOCK_N), hi)
        full_lo = lo
        full_end = lo
    else:
        lo = tl.minimum(lo, hi)
        full_lo = tl.minimum(full_lo, hi)
        full_end = tl.minimum(full_end, hi)
    return lo, full_lo, full_end, hi


@triton.jit
def query_range(start_n, Sq, Sk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Query blocks a key block [start_n, start_n + BLOCK_N) must visit (the backward's dK/dV).

    Returns (lo, full_start, hi): [lo, full_start) are the diagonal blocks that need the causal mask,
    [full_start, hi) see every key of the block. Queries before lo see none of it (skipped).
    Rows past Sq are handled by the caller's row masks, not here.
    """
    hi = tl.cdiv(Sq, BLOCK_M) * BLOCK_M
    if CAUSAL:
        diag = Sk - Sq
        # Query i sees key j iff i >= j - diag.
        lo = (tl.maximum(start_n - diag, 0) // BLOCK_M) * BLOCK_M
        full_start = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M
        full_start = tl.minimum(tl.maximum(full_start, lo), hi)
        lo = tl.minimum(lo, hi)
    else:
        lo = 0
        full_start = 0
    return lo, full_start, hi


@triton.jit
def window_query_range(start_n, Sq, Sk, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """query_range under a sliding window: (lo, full_lo, full_hi, hi). Query i sees key j iff
    j - diag - right <= i <= j - diag + left; blocks in [full_lo, full_hi) see every key of the key
    block, [lo, full_lo) and [full_hi, hi) are masked edges, the rest is skipped."""
    diag = Sk - Sq
    last = start_n + BLOCK_N - 1  # the block's last key
    end = tl.cdiv(Sq, BLOCK_M) * BLOCK_M
    lo = (tl.maximum(start_n - diag - right, 0) // BLOCK_M) * BLOCK_M
    hi = tl.minimum(tl.cdiv(tl.maximum(last - diag + left + 1, 0), BLOCK_M) * BLOCK_M, end)
    lo = tl.minimum(lo, hi)
    full_lo = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(last - diag - right, 0), BLOCK_M) * BLOCK_M, lo), hi)
    full_hi = (tl.maximum(start_n - diag + left + 1, 0) // BLOCK_M) * BLOCK_M
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def program_coords(n_tiles=0, LPT: tl.constexpr = False, LAST_LONGEST: tl.constexpr = True):
    """(tile index, batch, head) of this program, for grid = (tiles, heads, batch). Batch and head
    get their own grid axes (limit 65535 each) instead of one flattened B * H axis that would
    exceed it; both are 64-bit so that batch and head offsets never wrap.
    LPT (a config's lpt): grid = (heads, batch, tiles), the longest tiles first. A GPU starts
    programs in grid order, axis 0 fastest, and under causal masking a tile's work grows with its
    distance from the short end: so every (batch, head)'s longest tile starts first, then every
    second-longest, ..., and the shortest fill the tail (greedy longest-processing-time scheduling),
    instead of each (batch, head)'s longest tile starting at its turn. LAST_LONGEST: query tiles (the
    last sees the most keys), counted down from n_tiles - 1 (the count the grid was sized by); else
    key tiles (dK/dV: tile 0 sees the most queries), in order. The tile axis then has the 65535
    limit (the launcher checks it)."""
    if LPT:
        tile = tl.program_id(2)
        if LAST_LONGEST:
            tile = n_tiles - 1 - tile
        b = tl.program_id(1)
        h = tl.program_id(0)
    else:
        tile = tl.program_id(0)
        b = tl.program_id(2)
        h = tl.program_id(1)
    return tile, b.to(tl.int64), h.to(tl.int64)
