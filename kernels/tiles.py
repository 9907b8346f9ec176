"""Jit helpers shared by the forward and backward kernels.

Conventions: a tile is BLOCK rows of a (S, D) slice whose rows are `stride` elements apart and
whose last dimension is contiguous. Row offsets are 32-bit unless WIDE: the launcher sets WIDE when
some tensor's (S * row stride) reaches 2**31 elements within one (batch, head) slice (long contexts,
big KV caches), and pays for 64-bit offset vectors only then (they cost registers and spills). Head dims that are not a power of two are padded to BLOCK_D
and masked; rows past the sequence end are masked (loaded as 0, never stored).

Causal attention is bottom-right aligned: query i sees key j iff j <= i + (Sk - Sq).
"""

import triton
import triton.language as tl


@triton.jit
def load_tile(ptr, rows, stride, n_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              CHECK_ROWS: tl.constexpr, WIDE: tl.constexpr):
    """Load a (len(rows), BLOCK_D) tile; masked entries read as 0."""
    offs_d = tl.arange(0, BLOCK_D)
    if WIDE:
        ptrs = ptr + rows.to(tl.int64)[:, None] * stride + offs_d[None, :]
    else:
        ptrs = ptr + rows[:, None] * stride + offs_d[None, :]
    if CHECK_ROWS:
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
def scores_tile(q, k, cols, rows, Sq, Sk, qk_scale, KP_row, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_KPM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Scaled scores q k^T in log2 units, (len(rows), len(cols)). On masked (diagonal/tail/padded)
    blocks, keys past Sk, (causal) after query i's last visible key, or (HAS_KPM) marked as padding
    in the key-padding row KP_row are -inf."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        visible = cols[None, :] < Sk
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + (Sk - Sq))
        if HAS_KPM:
            visible = visible & (tl.load(KP_row + cols, mask=cols < Sk, other=0) != 0)[None, :]
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def _packed_range(CU, b, max_len, total):
    """Rows [start, start + n) of packed sequence b, clamped to [0, total) and n <= max_len: the
    cumulative lengths are not read on the host (no sync), so bad ones must not reach past the tensor."""
    start = tl.minimum(tl.maximum(tl.load(CU + b), 0), total)
    end = tl.minimum(tl.maximum(tl.load(CU + b + 1), start), total)
    return start.to(tl.int64), tl.minimum(end - start, max_len).to(tl.int32)


@triton.jit
def sequence_bounds(CU_Q, CU_K, b, Sq, Sk, Tq, Tk, VARLEN: tl.constexpr):
    """(q_start, Sq, k_start, Sk) of batch element b. Packed (varlen) sequences read them from the
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
def key_blocks(start_m, Sq, Sk, KV_BOUNDS, b, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr):
    """(lo, full_end, hi) for a query block: [lo, full_end) needs no mask, [full_end, hi) does.
    With a key-padding mask every visited block is masked, and blocks outside the batch element's
    [first real key, last real key] are skipped. A query block past the sequence (varlen) visits none."""
    full_end, hi = key_range(start_m, Sq, Sk, BLOCK_M, BLOCK_N, CAUSAL)
    hi = tl.where(start_m < Sq, hi, 0)
    kv_lo, kv_hi = padded_key_bounds(KV_BOUNDS, b, Sk, HAS_KPM)
    if HAS_KPM:
        hi = tl.minimum(hi, kv_hi)
        lo = tl.minimum((kv_lo // BLOCK_N) * BLOCK_N, hi)
        full_end = lo
    else:
        full_end = tl.minimum(full_end, hi)
        lo = full_end * 0
    return lo, full_end, hi


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
def program_coords():
    """(tile index, batch, head) of this program, for grid = (tiles, heads, batch). Batch and head
    get their own grid axes (limit 65535 each) instead of one flattened B * H axis that would
    exceed it; both are 64-bit so that batch and head offsets never wrap."""
    return tl.program_id(0), tl.program_id(2).to(tl.int64), tl.program_id(1).to(tl.int64)
