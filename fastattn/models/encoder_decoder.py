"""The original Transformer's shape: an encoder reads the source, a decoder writes the target.

- Encoder: bidirectional self-attention over the (padded) source.
- Decoder: causal self-attention over the target written so far, then cross-attention from each
  target position to every real source token (the source's padding mask is the cross-attention's
  key padding mask: Sq = target length, Sk = source length, not equal in general).

Generation encodes the source once; each decoder layer projects the encoder output to
cross-attention keys/values once and caches them, and caches its own self-attention keys/values
as the target grows.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fastattn.models.config import ModelConfig
from fastattn.models.generation import check_room, empty_continuation, generate
from fastattn.models.kv_cache import KVCache
from fastattn.models.layers import Stack, as_padding_mask, check_tokens, init_weights, tied_logits


class EncoderDecoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = Stack(config, config.n_layers, causal=False)
        self.decoder = Stack(config, config.decoder_layers, causal=True, cross_attention=True)
        self.lm_bias = nn.Parameter(torch.zeros(config.vocab_size))  # output weights tied to the embedding
        self.apply(init_weights)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """src (B, S_src) -> memory (B, S_src, d_model)."""
        return self.encoder(src, as_padding_mask(src_mask, src, "src_mask"))

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor | None = None,
               tgt_mask: torch.Tensor | None = None, *, cache: KVCache | None = None) -> torch.Tensor:
        """tgt (B, S_tgt) and the encoder's memory -> next-token logits (B, S_tgt, vocab)."""
        h = self.decoder(tgt, as_padding_mask(tgt_mask, tgt, "tgt_mask"), cache=cache, memory=memory,
                         memory_mask=as_padding_mask(src_mask, memory, "src_mask"))
        return tied_logits(h, self.decoder.embed, self.lm_bias)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor | None = None,
                tgt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: logits (B, S_tgt, vocab) predicting tgt[:, i + 1] from tgt[:, :i + 1]."""
        return self.decode(tgt, self.encode(src, src_mask), src_mask, tgt_mask)

    @torch.no_grad()
    def generate(self, src: torch.Tensor, src_mask: torch.Tensor | None = None, max_new_tokens: int = 32, *,
                 bos_id: int, use_cache: bool = True, page_size: int | None = None, cuda_graph: bool = False,
                 **sampling) -> torch.Tensor:
        """Translate: the target starts with bos_id; returns the new tokens (B, n).

        With use_cache the decoder runs on one new token per step (self-attention K/V cached, the
        cross-attention K/V computed from the encoder output once; page_size and cuda_graph as in
        ``Decoder.generate``); without, it recomputes the whole target every step. sampling:
        temperature, top_k, eos_id, pad_id (default config.pad_id), generator.
        """
        check_tokens(src, self.config.vocab_size, "src")
        b = src.shape[0]
        empty = empty_continuation(max_new_tokens, b, src.device)
        if empty is not None:
            return empty
        check_room(max_new_tokens, self.config.max_len, f"bos + {max_new_tokens} new tokens")
        sampling.setdefault("pad_id", self.config.pad_id)
        memory = self.encode(src, src_mask)  # once, for every step
        cache = KVCache.for_config(self.config, self.config.decoder_layers, b, max_new_tokens, memory.device,
                                   page_size=page_size) if use_cache else None
        bos = torch.full((b, 1), bos_id, dtype=torch.long, device=src.device)
        return generate(lambda t, m, c: self.decode(t, memory, src_mask, m, cache=c), bos, None, max_new_tokens,
                        cache=cache, cuda_graph=cuda_graph, **sampling)

    @torch.no_grad()
    def cross_attention_map(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor | None = None,
                            layer: int = -1) -> torch.Tensor:
        """How much each target position attends to each source token in one decoder layer's
        cross-attention, averaged over heads: (B, S_tgt, S_src), rows summing to 1 over real tokens.

        Recomputed from the layer's own queries and keys and the log-sum-exp the kernel returns:
        p = exp(q . k * scale - lse).
        """
        attn = self.decoder.blocks[layer].cross_attn
        captured = {}
        hook = attn.register_forward_pre_hook(
            lambda mod, args, kwargs: captured.update(x=args[0], memory=args[1]), with_kwargs=True)
        try:
            self(src, tgt, src_mask)
        finally:
            hook.remove()
        return attn.probabilities(captured["x"], captured["memory"], as_padding_mask(src_mask, src, "src_mask"))
