"""KV caches in torch ops: the layouts ``fastattn.attention_with_kvcache`` takes, the append and
the dense view that the backends without a decode kernel (torch, reference) use, and the tests'
oracle for the Triton kernels.

Two layouts, as in FlashAttention and vLLM:
- contiguous: k_cache (B, S_max, Hkv, D); sequence b's position j is row j of batch entry b.
- paged: k_cache (num_pages, page_size, Hkv, D) and block_table (B, max_pages) int32; sequence
  b's position j is row j % page_size of page block_table[b, j // page_size].
cache_seqlens (B,) int32 counts the tokens a sequence holds before a call appends its new ones.
"""

from __future__ import annotations

import torch

MAX_SPLITS = 128  # split-KV decoding: most programs one sequence's keys are shared by (FlashAttention's cap)


def capacity(k_cache: torch.Tensor, block_table: torch.Tensor | None) -> int:
    """Positions per sequence: S_max, or max_pages * page_size."""
    return k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]


def _unclamped(cache_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) int64 positions of n new tokens, max(cache_seqlens[b], 0) + t, as the kernel forms them."""
    return cache_seqlens.long().clamp(min=0)[:, None] + torch.arange(n, device=cache_seqlens.device)


def positions(cache_seqlens: torch.Tensor, n: int, cap: int) -> torch.Tensor:
    """(B, n) int64 cache positions of n new tokens, clamped into the cache (lengths are not read on
    the host for CUDA tensors: bad ones must not reach outside it)."""
    return _unclamped(cache_seqlens, n).clamp_(max=max(cap - 1, 0))


def append(k_cache, v_cache, k, v, cache_seqlens, block_table=None) -> None:
    """Write the new tokens' keys/values k, v (B, S_new, Hkv, D) at positions cache_seqlens[b] + t,
    in place (torch ops; ``launchers.decode.append`` is the Triton kernel)."""
    b, n = k.shape[:2]
    if n == 0 or b == 0:
        return
    if block_table is None:
        pos = positions(cache_seqlens, n, k_cache.shape[1])  # (B, S_new)
        rows = torch.arange(b, device=k.device)[:, None].expand(b, n)
        k_cache[rows, pos] = k
        v_cache[rows, pos] = v
    else:
        # A position past the cache or on a page index outside the pool (unchecked on CUDA) is
        # skipped, as the kernel does. No host sync: such an entry is sent to the first good entry's
        # slot with that entry's key and value, so every write to one slot agrees (with no good entry
        # at all: to one slot, with what it holds). Indices are (1,)-shaped: a 0-d one reads on the host.
        page_size, n_pages, cap = k_cache.shape[1], k_cache.shape[0], capacity(k_cache, block_table)
        raw = _unclamped(cache_seqlens, n)  # (B, S_new)
        pos = raw.clamp(max=cap - 1)
        pages = block_table.long().gather(1, pos // page_size).flatten()  # (B * S_new,)
        slots = (pos % page_size).flatten()
        good = (pages >= 0) & (pages < n_pages) & (raw < cap).flatten()
        first = good.int().argmax().view(1)  # the first good entry (0 when there is none)
        take = torch.where(good, torch.arange(b * n, device=k.device), first)  # the new row each entry writes
        where = (torch.where(good, pages, pages[first].clamp(0, n_pages - 1)), torch.where(good, slots, slots[first]))
        any_good = good[first].view(1, 1, 1)
        for cache, new in ((k_cache, k), (v_cache, v)):
            rows = new.reshape(b * n, *new.shape[2:])[take]  # (B, S_new, Hkv, D) -> (B * S_new, Hkv, D)
            cache[where] = torch.where(any_good, rows, cache[where])


def dense(cache: torch.Tensor, block_table: torch.Tensor | None) -> torch.Tensor:
    """The cache as (B, capacity, Hkv, D): itself if contiguous, else its pages gathered in order."""
    if block_table is None:
        return cache
    b, max_pages = block_table.shape
    pages = block_table.long().clamp(0, cache.shape[0] - 1)
    return cache[pages].reshape(b, max_pages * cache.shape[1], *cache.shape[2:])  # (B, P, page, H, D) -> (B, S, H, D)


def key_lengths(cache_seqlens: torch.Tensor, n_new: int, cap: int) -> torch.Tensor:
    """(B,) keys each sequence attends to: its cached tokens plus the new ones, within the cache."""
    return (cache_seqlens.long() + n_new).clamp(0, cap)
