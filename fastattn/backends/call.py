"""AttentionCall, KVCacheCall and AppendCall: one validated, normalised call, as every backend receives
it. Each says its dtype, device and grid extent (batch, heads) for the backend table's checks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastattn import cache_layouts, semantics
from fastattn.modifiers import ScoreMods
from fastattn.shape import AttentionShape


@dataclass(slots=True)
class AttentionCall:
    """FlashAttention layout, scale resolved; packed sequences (attention_varlen) carry cu_seqlens:
    q (Tq, Hq, D), k/v (Tk, Hkv, D)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    shape: AttentionShape
    causal: bool
    scale: float
    key_padding_mask: torch.Tensor | None
    return_lse: bool
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    mods: ScoreMods | None = None  # score modifiers; None (the usual case) when there are none

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def is_cuda(self) -> bool:
        return self.q.is_cuda

    @property
    def grid_extent(self) -> tuple[int, int]:
        return self.shape.batch, self.shape.heads_q

    def sequences(self):
        """Packed call -> one padded (1, S_i, H, D) call per sequence, for the backends without a
        packed layout (torch, reference). Reads cu_seqlens on the host: a sync for CUDA tensors."""
        cu_q, cu_k = self.cu_seqlens_q.tolist(), self.cu_seqlens_k.tolist()
        s = self.shape
        for i in range(len(cu_q) - 1):
            q = self.q[cu_q[i]:cu_q[i + 1]][None]
            k, v = self.k[cu_k[i]:cu_k[i + 1]][None], self.v[cu_k[i]:cu_k[i + 1]][None]
            shape = AttentionShape(1, q.shape[1], k.shape[1], s.heads_q, s.heads_kv, s.head_dim)
            mods = None if self.mods is None else self.mods.sequence(i, q.shape[1], k.shape[1])
            yield AttentionCall(q, k, v, shape, self.causal, self.scale, None, self.return_lse, mods=mods)

    def per_sequence(self, run_one):
        """Run a padded-layout backend on each packed sequence and pack the results back:
        out (Tq, Hq, D) [, lse (Hq, Tq)]."""
        results = [run_one(c) for c in self.sequences()]
        if not results:  # no sequences: no tokens either, and empty outputs that every input gets gradients from
            learned = () if self.mods is None else (self.mods.bias, self.mods.sinks)
            out = self.q * 0 + sum(x.sum() for x in (self.k, self.v, *learned) if x is not None) * 0  # (0, Hq, D)
            return (out, out.float().sum(2).t()) if self.return_lse else out  # lse (0, Hq) -> (Hq, 0)
        if not self.return_lse:
            return torch.cat([o[0] for o in results], dim=0)
        return torch.cat([o[0] for o, _ in results], dim=0), torch.cat([l[0] for _, l in results], dim=1)


@dataclass(slots=True)
class KVCacheCall:
    """One validated call of attention_with_kvcache: q (B, Sq, Hq, D) over a contiguous
    (B, S_max, Hkv, D) or paged (num_pages, page_size, Hkv, D) cache with block_table, after
    appending k/v (B, n_new, Hkv, D) if given. shape.seqlen_k is the cache's capacity per sequence."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k: torch.Tensor | None
    v: torch.Tensor | None
    cache_seqlens: torch.Tensor
    block_table: torch.Tensor | None
    shape: AttentionShape
    n_new: int
    causal: bool
    scale: float
    return_lse: bool
    num_splits: int
    mods: ScoreMods | None = None

    dtype = AttentionCall.dtype
    device = AttentionCall.device
    is_cuda = AttentionCall.is_cuda
    grid_extent = AttentionCall.grid_extent

    def over_dense_cache(self, run_one):
        """The call through a padded-layout backend (torch, reference): append k/v with torch ops,
        then attend over the cache as dense keys (B, capacity, Hkv, D) with the keys each query sees
        as a key-padding mask, in one call for all queries or, causal with several new tokens, one
        per token. Score modifiers that depend on positions (ALiBi, window) become a bias over the
        cache's positions. Returns out [, lse]."""
        s = self.shape
        if self.k is not None:
            cache_layouts.append(self.k_cache, self.v_cache, self.k, self.v, self.cache_seqlens, self.block_table)
        k, v = cache_layouts.dense(self.k_cache, self.block_table), cache_layouts.dense(self.v_cache, self.block_table)
        lengths = cache_layouts.key_lengths(self.cache_seqlens, self.n_new, s.seqlen_k)  # (B,)
        mods = None if self.mods is None else self._dense_mods(lengths)
        used = s.seqlen_k
        if not self.q.is_cuda and lengths.numel():
            # CPU: the lengths are on the host already: attend over the positions in use only (the
            # rows past them are masked and zeroed by the backends: no work for an empty cache tail).
            used = int(lengths.max())
            k, v = k[:, :used], v[:, :used]
            if mods is not None:
                mods = ScoreMods(mods.bias[..., :used], softcap=mods.softcap, sinks=mods.sinks)
        pos = torch.arange(used, device=self.q.device)
        # (first query, end, keys hidden from it at the end): bottom-right causal hides the last
        # Sq - 1 - t keys from new token t.
        if self.causal and s.seqlen_q > 1:
            groups = [(t, t + 1, s.seqlen_q - 1 - t) for t in range(s.seqlen_q)]
        else:
            groups = [(0, s.seqlen_q, 0)]
        results = []
        for start, end, hidden in groups:
            mask = pos[None, :] < (lengths - hidden)[:, None]  # (B, capacity), True = a key it sees
            shape = AttentionShape(s.batch, end - start, used, s.heads_q, s.heads_kv, s.head_dim)
            part = None if mods is None else ScoreMods(mods.bias[:, :, start:end], softcap=mods.softcap,
                                                       sinks=mods.sinks)
            results.append(run_one(AttentionCall(self.q[:, start:end], k, v, shape, False, self.scale, mask,
                                                 self.return_lse, mods=part)))
        if len(results) == 1:
            return results[0]
        if not self.return_lse:
            return torch.cat(results, dim=1)
        return torch.cat([o for o, _ in results], dim=1), torch.cat([l for _, l in results], dim=2)

    def _dense_mods(self, lengths: torch.Tensor) -> ScoreMods:
        """The modifiers over the dense cache: bias (B or 1, Hq or 1, Sq, capacity) holding the call's
        bias, ALiBi and the window (-inf outside it) by each query's own position lengths[b] - Sq + t;
        softcap and sinks as they are."""
        s, m = self.shape, self.mods
        t = torch.arange(s.seqlen_q, device=self.q.device)
        query_pos = lengths[:, None] - s.seqlen_q + t  # (B, Sq)
        rel = torch.arange(s.seqlen_k, device=self.q.device) - query_pos[:, :, None]  # (B, Sq, capacity)
        bias = semantics.modifier_bias(m.bias, m.alibi_slopes, m.window if m.local else None, rel, torch.float32)
        if bias is None:
            bias = torch.zeros((), device=self.q.device)
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).expand(-1, -1, s.seqlen_q, -1)
        return ScoreMods(bias, softcap=m.softcap, sinks=m.sinks)


@dataclass(slots=True)
class AppendCall:
    """One validated call of append_to_kvcache: k, v (B, n_new, Hkv, D) written into the cache (the
    layouts of KVCacheCall) at positions cache_seqlens[b] + t."""

    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cache_seqlens: torch.Tensor
    block_table: torch.Tensor | None

    mods = None  # an append has no score modifiers and returns nothing
    return_lse = False
    dtype = property(lambda self: self.k.dtype)
    device = property(lambda self: self.k.device)
    is_cuda = property(lambda self: self.k.is_cuda)
    grid_extent = property(lambda self: (self.k.shape[0], self.k.shape[2]))  # (batch, KV heads)
