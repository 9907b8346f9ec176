"""The key/value cache for token-by-token decoding.

Without a cache, generating token t recomputes keys and values for all t tokens before it, in
every layer: O(t^2) work per sequence. The cache keeps each layer's keys and values; a decoding
step projects only the new tokens and attends over what is stored.

The first call (the prompt, possibly padded) runs ``fastattn.attention`` with its padding mask and
stores each sequence's real tokens at the front of its cache rows, padding dropped; from then on
every step is ``fastattn.attention_with_kvcache``: the new tokens' keys/values are appended at each
sequence's own length (``seqlens``, on the device) and attended over. Every tensor a step touches
has a fixed shape and the lengths never visit the host, so a step can be captured in a CUDA graph.

Layouts (those of attention_with_kvcache): contiguous, each layer (B, max_len, Hkv, D); or paged
(``page_size``), each layer (pages, page_size, Hkv, D) with a block table (B, pages per sequence)
that hands every sequence its pages in a shuffled order, as an allocator serving many requests
would.
"""

from __future__ import annotations

import functools

import torch

import fastattn


class KVCache:
    """Keys and values of every layer, each sequence's cached length, and (for an encoder-decoder)
    each layer's cross-attention keys/values, computed once from the encoder."""

    def __init__(self, n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int, *,
                 device: torch.device | str, page_size: int | None = None, generator: torch.Generator | None = None):
        if page_size is not None and page_size < 1:
            raise ValueError(f"page_size must be >= 1 or None, got {page_size}")
        self.max_len, self.page_size = max_len, page_size
        if page_size is None:
            self.block_table = None
            self.shape = (n_layers, batch, max_len, n_kv_heads, head_dim)
        else:
            per_seq = -(-max_len // page_size)
            # Pages in a shuffled order (a non-contiguous layout), drawn from a generator of the cache's
            # own when none is given: the global RNG would shift what sampling draws after it.
            order = torch.randperm(batch * per_seq, generator=generator or torch.Generator().manual_seed(0))
            self.block_table = order.view(batch, per_seq).to(device=device, dtype=torch.int32)
            self.shape = (n_layers, batch * per_seq, page_size, n_kv_heads, head_dim)
        # Allocated by the first store, in the keys' dtype: under autocast that is bf16/fp16 while
        # the weights stay fp32.
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)  # real tokens cached per sequence
        self.length = 0  # tokens fed so far, padding included (host side: bounds the positions used)
        self.prompt_mask: torch.Tensor | None = None  # the first call's padding mask, while it runs
        self.layers = [LayerCache(self, i) for i in range(n_layers)]

    @classmethod
    def for_config(cls, config, n_layers: int, batch: int, max_len: int, device, **layout) -> KVCache:
        """A cache for n_layers layers of a model built from `config` (a ModelConfig); layout:
        page_size, generator."""
        return cls(n_layers, batch, max_len, config.kv_heads, config.head_dim, device=device, **layout)

    @property
    def prefilled(self) -> bool:
        return self.length > 0

    @property
    def capacity(self) -> int:
        """Positions per sequence: max_len, or whole pages' worth."""
        return self.max_len if self.page_size is None else -(-self.max_len // self.page_size) * self.page_size

    def begin(self, mask: torch.Tensor | None, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Before the layers run on the next tokens (B, n): their positions (B, n), and the key padding
        mask the first call's attention needs (None after it, or if the prompt has no padding).

        mask: (B, n) padding of the first call's tokens (True = real; None = all real). Later
        calls continue every sequence right after its last real token, so their tokens are all real.
        """
        batch, n = tokens.shape
        if batch != self.seqlens.shape[0]:  # (learned positions would broadcast one prompt over the rows)
            raise ValueError(f"cache holds {self.seqlens.shape[0]} sequences but tokens has {batch}: make the cache "
                             "with new_cache(batch=tokens.shape[0], ...)")
        if torch.is_grad_enabled():
            raise ValueError("a KV cache is for inference (its kernels are not differentiable): run cached steps "
                             "under torch.no_grad() or torch.inference_mode(), as generate() does")
        if self.length + n > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} tokens; {self.length + n} were asked for")
        if self.prefilled:
            if mask is not None:
                raise ValueError("after the first call, new tokens continue each sequence: pass no mask")
            return self.seqlens.long()[:, None] + torch.arange(n, device=self.seqlens.device), None
        # A first call that raised part-way must leave nothing behind: its padding mask, and the
        # cross-attention keys/values of the layers it reached (a retry with another memory reused them).
        self.prompt_mask = None
        for layer in self.layers:
            layer.cross_kv = None
        if mask is None or bool(mask.all()):  # one host read, for the prompt only
            return torch.arange(n, device=self.seqlens.device).expand(batch, n), None
        self.prompt_mask = mask
        return (mask.long().cumsum(-1) - 1).clamp(min=0), mask  # positions count real tokens; pads reuse one

    def end(self, n: int) -> None:
        """The layers have stored the n new tokens' keys and values."""
        if self.prefilled:
            self.seqlens += n  # in place, on the device (a CUDA graph replays it)
        elif self.prompt_mask is None:
            self.seqlens.fill_(n)
        else:
            self.seqlens.copy_(self.prompt_mask.sum(-1))
            self.prompt_mask = None
        self.length += n

    def replayed(self, n: int) -> None:
        """A CUDA graph replayed a captured step of n tokens: its device state (lengths, cache
        rows) advanced inside the graph; advance the host-side count too."""
        self.length += n

    def layer_buffers(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None:
            self.keys = like.new_zeros(self.shape)
            self.values = like.new_zeros(self.shape)
        return self.keys[layer], self.values[layer]


class LayerCache:
    """One layer's part of the KVCache: its self-attention keys/values (``attend``) and, in an
    encoder-decoder, its cross-attention keys/values (``cross_kv``, set by the first step)."""

    def __init__(self, cache: KVCache, layer: int):
        self.cache, self.layer = cache, layer
        self.cross_kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
               key_padding_mask: torch.Tensor | None, backend: str, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention of the new tokens q (B, n, Hq, D) over everything cached plus their own
        keys/values k, v (B, n, Hkv, D), which are stored. Returns (B, n, Hq, D). bias: additive
        scores over this call's keys: the prompt's own (first call), else the cache's positions
        (B or 1, H, n, capacity)."""
        c = self.cache
        k_cache, v_cache = c.layer_buffers(self.layer, k)
        backend = _with_decode(backend)
        if c.prefilled:
            return fastattn.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=c.seqlens,
                                                   block_table=c.block_table, causal=causal, bias=bias,
                                                   backend=backend)
        out = fastattn.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, bias=bias, backend=backend)
        if c.prompt_mask is not None:
            # Each sequence's real tokens to the front, in order (a stable sort of "is padding"):
            # the cache holds no padding, so later steps need no mask. (B, n) -> (B, n, Hkv, D) index.
            order = torch.argsort((~c.prompt_mask).to(torch.uint8), dim=1, stable=True)
            index = order[:, :, None, None].expand_as(k)
            k, v = k.gather(1, index), v.gather(1, index)
        fastattn.append_to_kvcache(k_cache, v_cache, k.to(k_cache.dtype), v.to(v_cache.dtype), cache_seqlens=c.seqlens,
                                   block_table=c.block_table, backend="triton" if backend == "triton" else "auto")
        return out


@functools.cache
def _with_decode(backend: str) -> str:
    """The model's backend if it has a decode path, else "auto" (the CUDA C++ kernels have none):
    the cached call, its prefill included, runs on it. Asked of the backend table once per name."""
    status = fastattn.available_backends().get(backend)
    return backend if status is None or "kvcache" in status.kinds else "auto"
