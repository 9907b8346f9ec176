"""The sizes of one attention call: the record the validator returns, the backends check and the
benchmark cases extend."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionShape:
    """q (batch, seqlen_q, heads_q, head_dim), k/v (batch, seqlen_k, heads_kv, head_dim). For packed
    sequences, batch is the number of sequences and the lengths are the longest ones."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_q: int
    heads_kv: int
    head_dim: int
