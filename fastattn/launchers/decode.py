"""Launch the decoding kernels (kernels/decode.py -> here -> fastattn.ops): split-KV attention over a
contiguous or paged cache (which also appends the call's new tokens), and the KV-cache append alone.

As for the other launchers: inputs are used with their strides (no copy when the last dim is
contiguous), outputs and scratch come from torch's allocator, plans are looked up by exact integers
and pointer alignment, nothing reads a tensor's values on the host, so a warmed-up decode step is
CUDA-graph capturable. The split count depends only on shapes and the GPU (not on the cached
lengths, which live on the device): each split takes an equal share of its sequence's keys.

Each kernel's flat runtime argument order is written once, in its builder (``_append_args``,
``_decode_args``, ``_combine_args``); the capacity of a cache is ``cache_layouts.capacity``.
"""

from __future__ import annotations

import functools
import math

import torch

from fastattn import cache_layouts
from fastattn.kernels import configs
from fastattn.kernels.decode import decode_attn_kernel, decode_combine_kernel, kv_append_kernel
from fastattn.launchers import plans
from fastattn.launchers.device import on_device
from fastattn.launchers.key_bounds import key_bounds
from fastattn.launchers.score_mods import Mods, launch_args

LOG2E = math.log2(math.e)
NOMINAL_BLOCK_N = 64  # key tile the split heuristic counts in (the split count must not depend on the config)

_plans = plans.signature_cache()
_class_plans = plans.signature_cache()  # attend's plans by plans.class_key, after _plans misses
_sm_counts: dict[int, int] = {}


def sm_count(device: int) -> int:
    """Streaming multiprocessors of CUDA device `device` (asked once); 1 for the interpreter (CPU),
    where splitting gains nothing."""
    if device < 0:
        return 1
    if device not in _sm_counts:
        _sm_counts[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sm_counts[device]


@functools.lru_cache(maxsize=4096)  # asked on every call with the same few shapes
def num_splits_heuristic(programs: int, sms: int, key_tiles: int, max_splits: int = cache_layouts.MAX_SPLITS) -> int:
    """How many programs share one sequence's keys, FlashAttention's rule: none while the
    (batch, KV head, row tile) programs fill >= 80% of the SMs; else the smallest split count whose
    wave efficiency (waves / ceil(waves)) reaches 85% of the best one, at most max_splits, the SM
    count and the key tiles. Counts that leave the tiles per split unchanged from one fewer split
    are not considered (same work per program, more to combine)."""
    if programs >= 0.8 * sms:
        return 1
    limit = min(max_splits, sms, key_tiles)
    if limit <= 1:
        return 1
    efficiency = []
    for n in range(1, limit + 1):
        waves = programs * n / sms
        efficiency.append(waves / math.ceil(waves))
    best = max(efficiency)
    for n in range(1, limit + 1):
        useful = n == 1 or -(-key_tiles // n) != -(-key_tiles // (n - 1))
        if useful and efficiency[n - 1] >= 0.85 * best:
            return n
    return 1


def row_tile(rows: int, head_dim: int) -> int:
    """Query rows (GQA group x new tokens) per program: a power of two >= 16 (tl.dot's minimum), at
    most 64 (32 for head dims over 128: the accumulator lives in registers)."""
    return min(max(16, 1 << (rows - 1).bit_length()), 64 if head_dim <= 128 else 32)


def grid_rows(heads_q: int, heads_kv: int, seqlen_q: int, head_dim: int) -> tuple[int, int]:
    """(row tile, the decode grid's axis 1 = KV heads x query row tiles): axis 1 is limited to 65535."""
    group = heads_q // heads_kv
    block_r = row_tile(group * seqlen_q, head_dim)
    return block_r, heads_kv * -(-group * seqlen_q // block_r)


def _table_args(k_cache, block_table):
    """(block table or a placeholder, its row stride, page size (0: contiguous), pages)."""
    if block_table is None:
        return k_cache, 0, 0, 1  # placeholder pointer: never read without PAGE_SIZE
    bt = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
    return bt, bt.stride(0), k_cache.shape[1], k_cache.shape[0]


def _append_args(k, v, k_cache, v_cache, seqlens, table, cap):
    """kv_append_kernel's runtime arguments in its order; table: _table_args'."""
    bt, stride_bt, _, n_pages = table
    return (k, v, k_cache, v_cache, seqlens, bt, *k.stride()[:3], *v.stride()[:3], *k_cache.stride()[:3],
            *v_cache.stride()[:3], stride_bt, cap, n_pages)


def _decode_args(q, k_cache, v_cache, k, v, seqlens, bt, o, lse, mod_ptrs, kpm, bounds, ints, mod_ints, qk_scale,
                 cap2):
    """decode_attn_kernel's runtime arguments in its order; ints: the integers up to stride_kpm_b
    (_decode_ints), mod_ptrs/mod_ints: score_mods.kernel_args', kpm/bounds: the key-padding mask
    (uint8) and its key bounds, or placeholders."""
    return (q, k_cache, v_cache, k, v, seqlens, bt, o, lse, *mod_ptrs, kpm, bounds, *ints, *mod_ints, qk_scale, cap2)


def _decode_ints(q, k_cache, v_cache, new_strides, stride_bt, o_strides, l_strides, sizes, stride_kpm_b):
    """decode_attn_kernel's integers before the modifiers': strides of q, the caches, the new k/v,
    the block table, the output and lse (with their split strides), sizes (GROUP, SQ, N_NEW,
    CAPACITY, N_PAGES, N_SPLITS, ROW_TILES), then the key-padding mask's batch stride. Part of the
    plan key."""
    return (*q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], *new_strides, stride_bt, *o_strides,
            *l_strides, *sizes, stride_kpm_b)


def _combine_args(o, l_, out, lse, splits):
    """decode_combine_kernel's runtime arguments in its order."""
    return (o, l_, out, lse, *o.stride()[:4], *l_.stride()[:3], *out.stride()[:3], *lse.stride()[:2], splits)


# Attention of at most this many queries per sequence over dense keys, needing no gradient, runs as a
# decode step over a full cache (attend_full): a transformers generate() step (one query over the
# grown cache; with a key-padding mask, a left-padded batch), a decoder's cross-attention,
# speculative verification. The prefill kernel gives such a call one program per (batch, query
# head) streaming every key, and reads each KV head once per query head of its group; the decode
# kernel reads it once per group and splits long key ranges across programs when (batch, KV head)
# pairs cannot fill the GPU. Only over at least FEW_QUERIES_MIN_BYTES of keys and values: below, the
# decode path's extra launch (the combine of split ranges: ~7-11 us of host time, measured on an
# H200 host) can cost more than the prefill kernel's device time (a few microseconds); above, that
# device time grows with the group size times the bytes, spread over at most B x Hq programs. (A
# threshold from that reasoning, not yet from a GPU timing of both paths.)
FEW_QUERIES = 16
FEW_QUERIES_MIN_BYTES = 8 << 20


def few_queries(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether attention of q (B, Sq, Hq, D) over k/v (B, Sk, Hkv, D) runs as attend_full: at most
    FEW_QUERIES queries, at least FEW_QUERIES_MIN_BYTES of keys and values (so at least one key), both
    with a unit-stride head dim (a cache's layout)."""
    return (q.shape[1] <= FEW_QUERIES and 2 * k.numel() * k.element_size() >= max(FEW_QUERIES_MIN_BYTES, 1)
            and k.stride(-1) == 1 and v.stride(-1) == 1)


def attend_full(q, k, v, key_padding_mask, causal: bool, scale: float, bias=None, alibi_slopes=None, sinks=None,
                window_left: int = -1, window_right: int = -1, softcap: float = 0.0):
    """Attention of q (B, Sq, Hq, D) over dense k/v (B, Sk, Hkv, D) with an optional (B, Sk) bool
    key-padding mask (True = real key), as `attend` over a cache that every sequence fills (lengths
    Sk), nothing appended: the same results as the prefill launcher's forward (bottom-right causal
    by Sk, modifiers by key position), out (B, Sq, Hq, D) and lse (B, Hq, Sq) float32. (No lengths:
    the kernel's FULL, not a filled tensor, says every sequence has Sk keys: one launch fewer.)"""
    return attend(q, k, v, None, None, None, None, causal, scale, 0, bias, alibi_slopes, sinks, window_left,
                  window_right, softcap, key_padding_mask)


def append(k, v, k_cache, v_cache, cache_seqlens, block_table) -> None:
    """Write k, v (B, S_new, Hkv, D) into the cache at positions cache_seqlens[b] + t, in place;
    positions outside the cache are skipped (cache_layouts.append is the torch version)."""
    b, n, hkv, d = k.shape
    if b == 0 or n == 0 or hkv == 0:
        return
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    seqlens = cache_seqlens.contiguous()
    table = _table_args(k_cache, block_table)
    bt, page_size = table[0], table[2]
    cap = cache_layouts.capacity(k_cache, block_table)
    args = _append_args(k, v, k_cache, v_cache, seqlens, table, cap)
    grid = (n, hkv, b)
    device = k.get_device()
    key = ("append", k.dtype, device, page_size, d, args[6:], plans.aligned((k, v, k_cache, v_cache, seqlens, bt)))
    found = _plans.get(key)
    if found is not None:
        plans.launch(device, ((found[0], grid, args),))
        return

    def verify() -> bool:  # what the direct launch wrote (run once per plan)
        return appended(k, v, k_cache, v_cache, seqlens, block_table)

    consts = dict(HEAD_DIM=d, BLOCK_D=max(16, 1 << (d - 1).bit_length()), PAGE_SIZE=page_size)
    with on_device(device):
        plan = plans.build("kv_append", kv_append_kernel, [configs.PREPROCESS], lambda c: grid, args, consts,
                           seq_len=cap, outputs=(), device=k.device, verify=verify)
    plans.remember(_plans, key, (plan,))


def appended(k, v, k_cache, v_cache, cache_seqlens, block_table) -> bool:
    """Whether the cache holds k, v (B, S_new, Hkv, D) at every position the append kernel writes:
    cache_seqlens[b] + t inside the cache and on one of its pages (the kernel skips the others, so
    they say nothing about the launch). False when no position is written (nothing to check). Reads
    the device (a sync): for the one-time check of a direct launch only."""
    b, n = k.shape[:2]
    cap = cache_layouts.capacity(k_cache, block_table)
    if cap == 0:
        return False
    pos = cache_seqlens.long()[:, None] + torch.arange(n, device=k.device)  # (B, S_new), unclamped
    inside = (pos >= 0) & (pos < cap)
    pos = pos.clamp(0, cap - 1)
    if block_table is not None:
        page = block_table.long().gather(1, pos // k_cache.shape[1])
        inside &= (page >= 0) & (page < k_cache.shape[0])
    rows = torch.arange(b, device=k.device)[:, None].expand(b, n)
    kc, vc = cache_layouts.dense(k_cache, block_table), cache_layouts.dense(v_cache, block_table)
    return bool(inside.any()) and torch.equal(kc[rows, pos][inside], k[inside]) \
        and torch.equal(vc[rows, pos][inside], v[inside])


def attend(q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal: bool, scale: float, num_splits: int = 0,
           bias=None, alibi_slopes=None, sinks=None, window_left: int = -1, window_right: int = -1,
           softcap: float = 0.0, key_padding_mask=None):
    """Attention of q (B, Sq, Hq, D) over each sequence's cached keys followed by the new tokens'
    k, v (B, S_new, Hkv, D) or None, which are written into the cache at cache_seqlens[b] + t by the
    same launch: out (B, Sq, Hq, D) in q's dtype, lse (B, Hq, Sq) float32. Lengths are clamped to
    the cache's capacity; cache_seqlens None: every sequence fills the cache (no new tokens).
    num_splits: 0 chooses (num_splits_heuristic), n forces n (at most cache_layouts.MAX_SPLITS).
    Score modifiers as the prefill launcher's; bias is broadcastable to (B, Hq, Sq, capacity) and
    indexed by cache position. key_padding_mask (B, capacity) bool, True =
    a real key, by cache position (not with new tokens k, v): padded keys are not seen, nor read."""
    if q.stride(-1) != 1 or q.stride(2) * (q.shape[2] // k_cache.shape[2]) >= 2**31:
        q = q.contiguous()  # (the kernel offsets a GQA group's heads in 32 bits; q is a few rows)
    b, sq, hq, d = q.shape
    hkv = k_cache.shape[2]
    out = q.new_empty((b, sq, hq, d))
    lse = q.new_empty((b, hq, sq), dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    n_new = 0
    if k is None:
        k = v = q  # placeholders: never read with N_NEW = 0
        new_strides = (0,) * 6
    else:
        k = k if k.stride(-1) == 1 else k.contiguous()
        v = v if v.stride(-1) == 1 else v.contiguous()
        new_strides, n_new = (*k.stride()[:3], *v.stride()[:3]), k.shape[1]
    if cache_seqlens is None and n_new:
        raise ValueError("cache_seqlens: None (a full cache) leaves no room for new tokens (k, v)")
    seqlens = q if cache_seqlens is None else cache_seqlens.contiguous()  # (placeholder: never read with FULL)
    kpm, bounds, stride_kpm_b = q, q, 0  # placeholders: never read without HAS_KPM
    if key_padding_mask is not None:
        if n_new or key_padding_mask.shape != (b, cache_layouts.capacity(k_cache, block_table)):
            raise ValueError(f"key_padding_mask must be (B, capacity) = ({b}, "
                             f"{cache_layouts.capacity(k_cache, block_table)}) and come without new tokens (k, v), "
                             f"got {tuple(key_padding_mask.shape)}{' and new tokens' if n_new else ''}")
        kpm = key_padding_mask if key_padding_mask.stride(-1) == 1 else key_padding_mask.contiguous()
        kpm, bounds, stride_kpm_b = kpm.view(torch.uint8), key_bounds(kpm), kpm.stride(0)
    bt, stride_bt, page_size, n_pages = _table_args(k_cache, block_table)
    cap = cache_layouts.capacity(k_cache, block_table)
    group = hq // hkv
    block_r, rows = grid_rows(hq, hkv, sq, d)
    row_tiles = rows // hkv
    device = q.get_device()
    splits = num_splits or num_splits_heuristic(b * hkv * row_tiles, sm_count(device), -(-cap // NOMINAL_BLOCK_N))
    splits = min(splits, cache_layouts.MAX_SPLITS)
    if splits == 1:
        o, l_, o_strides, l_strides = out, lse, (0, *out.stride()[:3]), (0, *lse.stride()[:2])
    else:
        o = q.new_empty((splits, b, sq, hq, d), dtype=torch.float32)
        l_ = q.new_empty((splits, b, hq, sq), dtype=torch.float32)
        o_strides, l_strides = o.stride()[:4], l_.stride()[:3]
    ints = _decode_ints(q, k_cache, v_cache, new_strides, stride_bt, o_strides, l_strides,
                        (group, sq, n_new, cap, n_pages, splits, row_tiles), stride_kpm_b)
    mod_ptrs, mod_ints, cap2, flags, mod_key = launch_args(
        q, b, hq, sq, cap, Mods(bias, alibi_slopes, sinks, window_left, window_right, softcap))
    if mod_key is not None:
        mod_key = (mod_key, plans.aligned(mod_ptrs))
    args = _decode_args(q, k_cache, v_cache, k, v, seqlens, bt, o, l_, mod_ptrs, kpm, bounds, ints, mod_ints,
                        scale * LOG2E, cap2)
    grid = (splits, hkv * row_tiles, b)
    combine = _combine_args(o, l_, out, lse, splits) if splits > 1 else None
    key = ("decode", q.dtype, device, causal, page_size, d, b, hq, ints,
           plans.aligned((q, k_cache, v_cache, k, v, seqlens, bt, kpm, bounds)), mod_key,
           key_padding_mask is not None, cache_seqlens is None)  # (placeholders' strides and alignment are a
    # real tensor's too: a batch-broadcast mask's stride is 0)
    found = _plans.get(key)
    if found is not None:
        _launch(device, found, grid, args, (hq, sq, b), combine)
        return out, lse
    block_d = max(16, 1 << (d - 1).bit_length())
    fp32 = q.dtype == torch.float32
    # 64-bit row offsets only where 32 bits could wrap: a contiguous cache's rows within one
    # sequence, a paged cache's whole extent (rows are page offsets there).
    if page_size == 0:
        wide = (cap + 256) * max(k_cache.stride(1), v_cache.stride(1)) >= 2**31
    else:
        wide = (n_pages + 1) * max(k_cache.stride(0), v_cache.stride(0)) >= 2**31
    consts = dict(CAUSAL=causal, PAGE_SIZE=page_size, HEAD_DIM=d, DOT_PRECISION="ieee" if fp32 else "tf32",
                  BLOCK_R=block_r, BLOCK_D=block_d, WIDE=wide or (mod_key is not None and mod_key[0][2]),
                  HAS_KPM=key_padding_mask is not None, FULL=cache_seqlens is None, **flags)
    # A cache that grew (a transformers DynamicCache, attend_full) or another length of the same
    # class: the plans of a known specialisation, no build. (splits: the combine's constexpr)
    ckey = plans.class_key("decode", args, device, tuple(consts.items()), splits, configs.seq_bucket(cap),
                           plans.specialization(combine) if combine is not None else None)
    found = _class_plans.get(ckey)
    if found is not None:
        _launch(device, found, grid, args, (hq, sq, b), combine)
        plans.remember(_plans, key, found)
        return out, lse
    with on_device(device):
        # The launch also writes the new rows into the cache: the same values every time, so the
        # tuning runs and the direct-launch check may repeat it.
        attn_plan = plans.build("decode", decode_attn_kernel, configs.candidates("decode", block_d, fp32),
                                lambda c: grid, args, consts, seq_len=cap, outputs=(7, 8), device=q.device)
        combine_plan = None
        if combine is not None:
            cconsts = dict(HEAD_DIM=d, BLOCK_S=1 << (splits - 1).bit_length(), BLOCK_D=block_d)
            combine_plan = plans.build("decode_combine", decode_combine_kernel, [configs.PREPROCESS],
                                       lambda c: (hq, sq, b), combine, cconsts, seq_len=cap, outputs=(2, 3),
                                       device=q.device)
    plans.remember(_plans, key, (attn_plan, combine_plan))
    plans.remember(_class_plans, ckey, (attn_plan, combine_plan))
    return out, lse


def _launch(device, found, grid, args, combine_grid, combine) -> None:
    """The decode step's launches from its (attention, combine or None) plans."""
    attn_plan, combine_plan = found
    launches = [(attn_plan, grid, args)]
    if combine_plan is not None:
        launches.append((combine_plan, combine_grid, combine))
    plans.launch(device, launches)
