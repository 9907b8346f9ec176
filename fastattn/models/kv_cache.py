"""The key/value cache for token-by-token decoding.

Without a cache, generating token t recomputes keys and values for all t tokens before it, in
every layer: O(t^2) work per sequence. The cache keeps each layer's keys and values; a decoding
step projects only the new token and attends over what is stored (1 query over t keys, which the
bottom-right causal mask of fastattn.attention handles as is).

Buffers hold ``max_len`` tokens; the keys seen by a step are a view of their first ``length``
positions, (B, length, Hkv, D) with a contiguous last dim, so nothing is copied.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer, the padding mask of the cached tokens, and (for an
    encoder-decoder) each layer's cross-attention keys/values, computed once from the encoder."""

    def __init__(self, n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int, *,
                 device: torch.device | str):
        self.shape = (n_layers, batch, max_len, n_kv_heads, head_dim)
        # Allocated by the first append, in the keys' dtype: under autocast that is bf16/fp16 while
        # the weights stay fp32.
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # True = a real token
        self.padded = False  # whether any cached token is padding (else the kernels get no mask)
        self.length = 0  # tokens cached so far
        self.layers = [LayerCache(self, i) for i in range(n_layers)]

    @classmethod
    def for_config(cls, config, n_layers: int, batch: int, max_len: int, device) -> KVCache:
        """A cache for n_layers layers of a model built from `config` (a ModelConfig)."""
        return cls(n_layers, batch, max_len, config.kv_heads, config.head_dim, device=device)

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]

    def extend(self, mask: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Record the padding mask of the next n tokens (None = all real), before the layers run.

        Returns the mask over every token so far (B, length + n) and the key padding mask to give
        the kernels: the same mask, or None while nothing cached is padding.
        """
        end = self.length + n
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} tokens; {end} were asked for")
        self.mask[:, self.length:end] = True if mask is None else mask
        self.padded = self.padded or (mask is not None and not bool(mask.all()))
        full = self.mask[:, :end]
        return full, (full if self.padded else None)

    def advance(self, n: int) -> None:
        """The layers have stored the n new tokens' keys and values."""
        self.length += n


class LayerCache:
    """One layer's part of the KVCache: its self-attention keys/values (``append``) and, in an
    encoder-decoder, its cross-attention keys/values (``cross_kv``, set by the first step)."""

    def __init__(self, cache: KVCache, layer: int):
        self.cache, self.layer = cache, layer
        self.cross_kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values (B, n, Hkv, D) after the cached ones; return all of them
        (B, length + n, Hkv, D) as views of the buffers."""
        c, start = self.cache, self.cache.length
        if c.keys is None:
            c.keys, c.values = k.new_zeros(c.shape), v.new_zeros(c.shape)
        end = start + k.shape[1]
        c.keys[self.layer, :, start:end] = k
        c.values[self.layer, :, start:end] = v
        return c.keys[self.layer, :, :end], c.values[self.layer, :, :end]
