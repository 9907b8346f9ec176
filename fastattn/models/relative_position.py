"""T5's relative position bias: instead of adding position embeddings to the tokens, every
self-attention score gets a learned per-head bias that depends only on how far the key is from
the query, grouped into buckets.

Near distances each get their own bucket; farther ones share buckets that widen geometrically
(log-spaced) up to max_distance, beyond which all distances share the last bucket: the model can
tell 3 from 4 tokens apart, but not 100 from 101. An encoder is bidirectional (half the buckets for
keys before the query, half for keys after); a causal decoder spends all of them on keys at or
before the query.

One table per stack, shared by its layers: the bias is computed once per forward, as a
(1, H, S, S) tensor, and passed to every self-attention layer as ``fastattn.attention(bias=...)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def relative_position_bucket(relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """relative_position (int tensor, key position - query position) -> bucket ids in [0, num_buckets).

    bidirectional: keys before the query (and the query itself) use buckets [0, num_buckets // 2),
    keys after it the upper half. Otherwise keys after the query (hidden by a causal mask anyway)
    share bucket 0 with distance 0. Within a direction, with n buckets, distances d < n // 2 get
    bucket d; larger ones get n // 2 + floor((n - n // 2) * log(d / (n // 2)) / log(max_distance / (n // 2))),
    capped at the last bucket.
    """
    n = num_buckets
    if bidirectional:
        n //= 2
        offset = (relative_position > 0).long() * n  # keys after the query: the upper half
        distance = relative_position.abs()
    else:
        offset = 0
        distance = (-relative_position).clamp(min=0)
    exact = n // 2
    if exact < 1 or max_distance <= exact:
        raise ValueError(f"need num_buckets >= {4 if bidirectional else 2} and max_distance > {exact} "
                         f"(got num_buckets={num_buckets}, max_distance={max_distance})")
    # log2 in float32: exact at powers of two, so a distance on a bucket boundary lands on it.
    ratio = torch.log2(distance.clamp(min=exact).float() / exact) / math.log2(max_distance / exact)
    far = (exact + (ratio * (n - exact)).floor().long()).clamp(max=n - 1)
    return offset + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """A learned table (num_buckets, n_heads) -> the additive attention bias (1, H, S, S) of a
    sequence of S tokens attending to itself."""

    def __init__(self, n_heads: int, *, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128):
        super().__init__()
        self.bidirectional, self.num_buckets, self.max_distance = bidirectional, num_buckets, max_distance
        self.embed = nn.Embedding(num_buckets, n_heads)
        relative_position_bucket(torch.zeros(1, dtype=torch.long), bidirectional=bidirectional,
                                 num_buckets=num_buckets, max_distance=max_distance)  # bad sizes fail here

    def forward(self, seqlen: int, query_positions: torch.Tensor | None = None) -> torch.Tensor:
        """-> bias (1, H, S, S): bias[0, h, i, j] = table[bucket(j - i), h].

        Distances count columns, so padding must sit at one end of each sequence (left or right,
        as everywhere in fastattn.models): then every pair of real tokens keeps its distance.

        With query_positions (B, n) (a cached decode step: the new tokens' positions in the cache,
        on the device), the keys are the cache's seqlen positions: bias (B, H, n, seqlen)."""
        pos = torch.arange(seqlen, device=self.embed.weight.device)
        rel = pos[None, :] - (pos[:, None] if query_positions is None else query_positions[:, :, None])
        bucket = relative_position_bucket(rel, bidirectional=self.bidirectional, num_buckets=self.num_buckets,
                                          max_distance=self.max_distance)  # (S, S) or (B, n, seqlen)
        # Gathered from the transposed table: (H, ..., S) comes out with the keys contiguous, so the
        # kernels read each query's biases along the keys with stride 1.
        bias = self.embed.weight.t()[:, bucket]
        return bias[None] if query_positions is None else bias.transpose(0, 1)  # (1 or B, H, n, S)
