"""The decoding kernels as ops: fastattn::triton_kvcache_attention (split-KV attention over the
cache, writing the call's new keys/values into it in place) and fastattn::triton_kvcache_append
(the write alone). Not differentiable: decoding is inference (the API refuses inputs that need grad).

In eager mode on plain tensors ``kvcache_attention`` calls the launchers directly, as the autograd
Functions do (fastattn.ops.autograd); under torch.compile or a dispatch mode it calls the ops."""

from __future__ import annotations

import torch

from fastattn.launchers import decode as launch
from fastattn.launchers.score_mods import Mods
from fastattn.ops.autograd import _direct, refuse_transforms
from fastattn.ops.library import MODS, define

APPEND = ("(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, Tensor? block_table) "
          "-> ()")
ATTEND = ("(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, Tensor cache_seqlens, "
          f"Tensor? block_table, bool causal, float scale, SymInt num_splits, {MODS}) -> (Tensor, Tensor)")


def _append_fake(k, v, k_cache, v_cache, cache_seqlens, block_table):
    return None


def _attend_fake(q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal, scale, num_splits, *mods):
    b, sq, hq, d = q.shape
    return q.new_empty((b, sq, hq, d)), q.new_empty((b, hq, sq), dtype=torch.float32)


triton_kvcache_append = define("triton_kvcache_append", APPEND, launch.append, _append_fake)
triton_kvcache_attention = define("triton_kvcache_attention", ATTEND, launch.attend, _attend_fake)


def append_kv(k, v, k_cache, v_cache, cache_seqlens, block_table) -> None:
    """Write k, v (B, S_new, Hkv, D) at cache_seqlens[b] + t (Triton), in place."""
    refuse_transforms(k, v, k_cache, v_cache)
    fn = launch.append if _direct(k, v, k_cache, v_cache, cache_seqlens) else triton_kvcache_append
    fn(k, v, k_cache, v_cache, cache_seqlens, block_table)


def kvcache_attention(q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal: bool, scale: float,
                      num_splits: int, mods=None):
    """Attend over the cache and k/v (if given), writing k/v into the cache in the same launch:
    (out (B, Sq, Hq, D), lse (B, Hq, Sq) float32). mods: a fastattn.modifiers.ScoreMods or None."""
    bias = None if mods is None else mods.bias
    refuse_transforms(q, k_cache, v_cache, k, v, *(() if mods is None else (bias, mods.sinks, mods.alibi_slopes)))
    fn = launch.attend if _direct(q, k_cache, v_cache, k, cache_seqlens, bias) else triton_kvcache_attention
    if mods is None:
        return fn(q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal, scale, num_splits)
    return fn(q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal, scale, num_splits, *Mods.of(mods))
