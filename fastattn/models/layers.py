"""Layers shared by the three models: multi-head attention (self or cross), feed-forward, the
pre-norm transformer block, and token + position embeddings (or T5's relative position bias,
``relative_position.py``).

All attention goes through ``fastattn.attention`` in FlashAttention's (B, S, H, D) layout, so the
heads are split with a view (no transpose, no copy). ``attn_backend`` picks the kernels: "auto",
"triton", "cuda", "torch" (PyTorch SDPA) or "reference" (the naive implementation).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastattn
from fastattn import semantics
from fastattn.distributed import ring_attention
from fastattn.models.relative_position import RelativePositionBias
from fastattn.validation import value_checks


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention with learned projections.

    Self-attention takes its keys and values from the same sequence as its queries; cross-attention
    (``cross=True``) takes them from another sequence, the encoder's output ("memory"). With
    ``n_kv_heads < n_heads`` groups of query heads share one key/value head (GQA; 1 = MQA), which
    shrinks the KV cache by n_heads / n_kv_heads.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, *, causal: bool = False,
                 cross: bool = False, attn_backend: str = "auto"):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        for name, value in (("d_model", d_model), ("n_heads", n_heads), ("n_kv_heads", n_kv_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        if causal and cross:
            raise ValueError("cross-attention is not causal: every target token may see the whole source")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d_model // n_heads
        self.causal, self.cross, self.attn_backend = causal, cross, attn_backend
        self.sharded, self.sequence_group = False, None  # set_context_parallel: the ranks holding the sequence
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim)
        self.kv_proj = nn.Linear(d_model, 2 * n_kv_heads * self.head_dim)  # keys and values in one matmul
        self.out_proj = nn.Linear(n_heads * self.head_dim, d_model)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, d_model) -> keys, values (B, S, Hkv, D): strided views of one projection."""
        b, s, _ = x.shape
        kv = self.kv_proj(x).view(b, s, 2, self.n_kv_heads, self.head_dim)  # (B, S, 2, Hkv, D)
        return kv[:, :, 0], kv[:, :, 1]

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, cache=None, bias: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x (B, S, d_model) -> (B, S, d_model).

        memory: the sequence to attend to for cross-attention (B, S_mem, d_model).
        key_padding_mask: (B, S_keys) bool, True = a real key. With a cache only the first call's
            (the prompt's own padding); the cache holds no padding.
        cache: a ``LayerCache``. Self-attention attends to everything cached so far plus this call's
            keys/values, and stores them; cross-attention projects ``memory`` once and reuses it.
        bias: additive scores broadcastable to (B, H, S, S_keys), e.g. the relative position bias
            (1, H, S, S); with a cache after its first call, over the cache's positions.
        """
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim)  # (B, S, Hq, D)
        if self.sharded:
            out = self._ring(q, x, key_padding_mask, cache, bias)
            return self.out_proj(out.reshape(b, s, self.n_heads * self.head_dim))
        if self.cross:
            if cache is not None and cache.cross_kv is not None:
                k, v = cache.cross_kv
            else:
                if memory is None:
                    raise ValueError("cross-attention needs `memory` (the encoder output) or a cache holding it")
                k, v = self.project_kv(memory)
                if cache is not None:
                    cache.cross_kv = (k, v)
        else:
            k, v = self.project_kv(x)
            if cache is not None:  # attends over the cached keys and its own, and stores its own
                out = cache.attend(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask,
                                   backend=self.attn_backend, bias=bias)
                return self.out_proj(out.reshape(b, s, self.n_heads * self.head_dim))
        out = fastattn.attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask, bias=bias,
                                 backend=self.attn_backend)
        return self.out_proj(out.reshape(b, s, self.n_heads * self.head_dim))  # heads merged: (B, S, d_model)

    def _ring(self, q, x, key_padding_mask, cache, bias):
        """Self-attention over a sequence sharded across ranks (``set_context_parallel``): x is this
        rank's shard in fastattn.distributed's layout."""
        if cache is not None or bias is not None:
            raise ValueError("a context-parallel (sequence-sharded) model runs without a KV cache and without a "
                             "relative position bias")
        k, v = self.project_kv(x)
        return ring_attention(q, k, v, group=self.sequence_group, causal=self.causal,
                              key_padding_mask=key_padding_mask, backend=self.attn_backend)

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor, memory: torch.Tensor | None = None,
                      key_padding_mask: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The attention weights of a call without a cache, averaged over heads: (B, S, S_keys).

        Fused kernels never store them; they are recomputed from the queries, the keys and the
        log-sum-exp the kernel returns: p = exp(q . k * scale + bias - lse).
        """
        if self.sharded:
            raise ValueError("attention probabilities of a sequence-sharded model are not computed (they would "
                             "cover this rank's keys only)")
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim)  # (B, S, Hq, D)
        k, v = self.project_kv(x if memory is None else memory)  # (B, S_keys, Hkv, D)
        status = fastattn.available_backends().get(self.attn_backend)
        backend = self.attn_backend if status is None or status.returns_lse else "reference"  # one that returns it
        _, lse = fastattn.attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask, return_lse=True,
                                    bias=bias, backend=backend)
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=2)  # GQA: each query head's key head
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / self.head_dim ** 0.5  # (B, Hq, S, S_keys)
        if bias is not None:
            scores = scores + bias.float()
        p = torch.exp(scores - lse[..., None])
        visible = semantics.visible_keys(s, k.shape[1], causal=self.causal, key_padding_mask=key_padding_mask,
                                         device=x.device)  # (B or 1, 1, S, S_keys)
        return p.masked_fill(~visible, 0.0).mean(dim=1)


class FeedForward(nn.Module):
    """Position-wise MLP: d_model -> d_ff -> d_model with a GELU."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """One transformer layer: self-attention, then (decoder of an encoder-decoder only)
    cross-attention to the encoder output, then the feed-forward network.

    Pre-norm residuals (x + f(norm(x)), as GPT-2 and most models since): the original
    Transformer normalised after the residual, which trains less reliably without warm-up.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None, d_ff: int, *, causal: bool,
                 cross_attention: bool = False, attn_backend: str = "auto"):
        super().__init__()
        self.norm_self = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, n_heads, n_kv_heads, causal=causal, attn_backend=attn_backend)
        if cross_attention:
            self.norm_cross = nn.LayerNorm(d_model)
            self.cross_attn = MultiHeadAttention(d_model, n_heads, n_kv_heads, cross=True, attn_backend=attn_backend)
        else:
            self.cross_attn = None
        self.norm_ff = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, d_ff)

    def forward(self, x, *, key_padding_mask=None, memory=None, memory_padding_mask=None, cache=None, bias=None):
        """bias: the self-attention's (relative position bias); cross-attention takes none."""
        x = x + self.self_attn(self.norm_self(x), key_padding_mask=key_padding_mask, cache=cache, bias=bias)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), memory, key_padding_mask=memory_padding_mask, cache=cache)
        return x + self.ff(self.norm_ff(x))


class Embeddings(nn.Module):
    """Token embedding plus a learned absolute position embedding (none with learned_positions=False:
    a model with relative position bias adds positions in the attention instead).

    Positions count real tokens only, so a left-padded prompt numbers its first real token 0,
    exactly as it would alone: padding never shifts what the model sees.
    """

    def __init__(self, vocab_size: int, d_model: int, max_len: int, *, learned_positions: bool = True):
        super().__init__()
        self.max_len = max_len
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(max_len, d_model) if learned_positions else None

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens (B, S), their positions (B, S) (``positions_of`` or the KV cache's) -> (B, S, d_model)."""
        x = self.tokens(tokens)
        return x if self.positions is None else x + self.positions(positions)

    def positions_of(self, mask: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
        """Positions (B, S) of a whole sequence with padding mask (B, S) (None: no padding)."""
        s = tokens.shape[1]
        if s > self.max_len:
            raise ValueError(f"sequence length {s} exceeds the model's max_len {self.max_len}")
        if mask is None:
            return torch.arange(s, device=tokens.device).expand(tokens.shape[0], s)
        return (mask.long().cumsum(-1) - 1).clamp(min=0)  # pads reuse a neighbour's


class Stack(nn.Module):
    """Embeddings, a stack of blocks and a final norm: the body of every model here.

    causal=False is an encoder (each token sees the whole sequence but no padding); causal=True a
    decoder (each token sees itself and the tokens before it); cross_attention=True adds attention to
    an encoder's output in every block (the decoder of an encoder-decoder).

    config.positions == "relative" (T5): no position embedding; one relative position bias table for
    the whole stack (bidirectional buckets in an encoder, causal ones in a decoder), turned into a
    (1, H, S, S) bias once per forward and shared by every block's self-attention; a cached step
    gets it over the cache's positions from the new tokens' positions (on the device, so a CUDA
    graph can replay it).
    """

    def __init__(self, config, n_layers: int, *, causal: bool, cross_attention: bool = False):
        super().__init__()
        c = config
        relative = c.positions == "relative"
        self.embed = Embeddings(c.vocab_size, c.d_model, c.max_len, learned_positions=not relative)
        self.relative_bias = RelativePositionBias(c.n_heads, bidirectional=not causal, num_buckets=c.num_buckets,
                                                  max_distance=c.max_distance) if relative else None
        self.blocks = nn.ModuleList(
            Block(c.d_model, c.n_heads, c.kv_heads, c.ff_dim, causal=causal, cross_attention=cross_attention,
                  attn_backend=c.attn_backend)
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(c.d_model)
        self.causal = causal
        self.sharded = False  # set_context_parallel: tokens are a shard, positions come from the caller

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None, *, cache=None,
                memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, S) -> hidden states (B, S, d_model).

        mask: (B, S) bool, True = a real token (None: all real). With a cache, tokens are the next
        S tokens after the cached ones (a mask only on the first call: later tokens continue each
        sequence). memory, memory_mask: the encoder output (B, S_src, d_model) and its padding
        mask, for cross-attention.
        positions: (S,) or (B, S), the tokens' positions in the whole sequence: required, and only
        taken, when the sequence is sharded (``set_context_parallel``; ``shard_positions``).
        """
        check_tokens(tokens, self.embed.tokens.num_embeddings)
        step = cache is not None and cache.prefilled  # a decode step over the cache
        if self.sharded or positions is not None:
            if positions is None or not self.sharded:
                raise ValueError("positions go with a sequence-sharded model (set_context_parallel), which needs "
                                 "them: pass fastattn.distributed.shard_positions(seqlen)")
            if positions.shape[-1] != tokens.shape[1]:
                raise ValueError(f"positions must have shape (S,) or (B, S) with S = {tokens.shape[1]}, got "
                                 f"{tuple(positions.shape)}")
            if cache is not None:
                raise ValueError("a sequence-sharded model runs without a KV cache (generation is not sharded)")
            if not self.causal and mask is None:
                raise ValueError("a sequence-sharded encoder needs attention_mask=shard(mask) (True = real token; "
                                 "shard(torch.ones(B, S, dtype=torch.bool)) without padding): the padding shard() "
                                 "adds when 2 x world size does not divide S must be masked")
            # Checked where reading them costs no device sync (shard_positions gives CPU tensors).
            if positions.device.type == "cpu" and positions.numel() and int(positions.max()) >= self.embed.max_len:
                raise ValueError(f"positions must be < max_len ({self.embed.max_len}); clamp the padding positions "
                                 "of shard_positions(S): .clamp(max=S - 1)")
            positions, key_padding_mask = positions.to(tokens.device).expand(tokens.shape), mask
        elif cache is None:
            positions, key_padding_mask = self.embed.positions_of(mask, tokens), mask
        else:
            positions, key_padding_mask = cache.begin(mask, tokens)
        bias = None  # computed once and shared by every layer
        if self.relative_bias is not None:
            bias = (self.relative_bias(cache.capacity, positions) if step  # (B, H, S, capacity)
                    else self.relative_bias(tokens.shape[1]))  # (1, H, S, S)
        x = self.embed(tokens, positions)
        for i, block in enumerate(self.blocks):
            x = block(x, key_padding_mask=key_padding_mask, memory=memory, memory_padding_mask=memory_mask,
                      cache=None if cache is None else cache.layers[i], bias=bias)
        if cache is not None:
            cache.end(tokens.shape[1])
        return self.norm(x)


def check_tokens(tokens, vocab_size: int, name: str = "tokens") -> None:
    """tokens: (B, S) integer ids in [0, vocab_size). The range is read where that costs no device
    sync (CPU tensors, or FASTATTN_CHECK_VALUES=1); on a GPU an id out of range is a device assert."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point() \
            or tokens.is_complex() or tokens.dtype == torch.bool:
        got = (f"shape {tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, torch.Tensor)
               else type(tokens).__name__)
        raise ValueError(f"{name} must be a (B, S) integer tensor of token ids, got {got}")
    if tokens.numel() and value_checks(tokens.device):
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{name} must be token ids in [0, vocab_size={vocab_size}), got values in [{low}, {high}]")


def tied_logits(h: torch.Tensor, embed: Embeddings, bias: torch.Tensor) -> torch.Tensor:
    """Output projection sharing the token embedding's weights (weight tying, as GPT-2 and BERT):
    hidden (B, S, d_model) -> logits (B, S, vocab)."""
    return F.linear(h, embed.tokens.weight, bias)


def init_weights(module: nn.Module) -> None:
    """GPT-2's initialisation (N(0, 0.02), zero biases): PyTorch's N(0, 1) embeddings would give huge
    logits through the tied output projection. Use as model.apply(init_weights)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def set_attn_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switch every attention layer of `model` to `backend` (weights untouched); returns model."""
    for m in model.modules():
        if isinstance(m, MultiHeadAttention):
            m.attn_backend = backend
    return model


def set_context_parallel(model: nn.Module, group=None, enabled: bool = True) -> nn.Module:
    """Shard `model`'s sequences across the ranks of a torch.distributed `group` (None: the default
    group): every attention layer runs ``fastattn.distributed.ring_attention``. The model then takes
    this rank's tokens in the zig-zag layout (``fastattn.distributed.shard``) with their global
    ``positions`` (``shard_positions``); enabled=False switches back. Returns model."""
    if enabled and any(isinstance(m, MultiHeadAttention) and m.cross for m in model.modules()):
        raise ValueError("set_context_parallel shards self-attention models (Decoder, Encoder); an encoder-decoder's "
                         "cross-attention is not sharded here (fastattn.distributed.ring_attention runs it directly)")
    for m in model.modules():
        if isinstance(m, MultiHeadAttention):
            m.sharded, m.sequence_group = enabled, group
        if isinstance(m, Stack):
            m.sharded = enabled
    return model


def as_padding_mask(attention_mask: torch.Tensor | None, like: torch.Tensor, name: str = "attention_mask"):
    """HF-style mask of bool or 0/1 ints, True/1 = a real token, shaped like the first two dims of
    `like` (tokens (B, S) or hidden states (B, S, d)) -> bool on like's device, or None if absent."""
    if attention_mask is None:
        return None
    if attention_mask.shape != like.shape[:2]:
        raise ValueError(f"{name} must have shape {tuple(like.shape[:2])}, got {tuple(attention_mask.shape)}")
    return attention_mask.to(device=like.device, dtype=torch.bool)
