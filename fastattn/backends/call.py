"""AttentionCall: one validated, normalised call, as every backend receives it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    def sequences(self):
        """Packed call -> one padded (1, S_i, H, D) call per sequence, for the backends without a
        packed layout (torch, reference). Reads cu_seqlens on the host: a sync for CUDA tensors."""
        cu_q, cu_k = self.cu_seqlens_q.tolist(), self.cu_seqlens_k.tolist()
        s = self.shape
        for i in range(len(cu_q) - 1):
            q = self.q[cu_q[i]:cu_q[i + 1]][None]
            k, v = self.k[cu_k[i]:cu_k[i + 1]][None], self.v[cu_k[i]:cu_k[i + 1]][None]
            shape = AttentionShape(1, q.shape[1], k.shape[1], s.heads_q, s.heads_kv, s.head_dim)
            yield AttentionCall(q, k, v, shape, self.causal, self.scale, None, self.return_lse)

    def per_sequence(self, run_one):
        """Run a padded-layout backend on each packed sequence and pack the results back:
        out (Tq, Hq, D) [, lse (Hq, Tq)]."""
        results = [run_one(c) for c in self.sequences()]
        q = self.q
        if not self.return_lse:
            return torch.cat([o[0] for o in results], dim=0) if results else q.new_zeros(q.shape)
        if not results:
            return q.new_zeros(q.shape), q.new_empty((q.shape[1], 0), dtype=torch.float32)
        return torch.cat([o[0] for o, _ in results], dim=0), torch.cat([l[0] for _, l in results], dim=1)
