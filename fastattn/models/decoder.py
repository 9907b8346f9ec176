"""A GPT-like decoder: causal self-attention, next-token prediction, generation with a KV cache.

Causal masking is the only thing that makes this a decoder rather than an encoder: token i attends
to tokens 0..i, so the model can be trained on every position of a sequence at once (predict token
i + 1 from tokens 0..i) and later generate one token at a time.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fastattn.models.config import ModelConfig
from fastattn.models.generation import check_room, decode_loop
from fastattn.models.kv_cache import KVCache
from fastattn.models.layers import Stack, as_padding_mask, init_weights


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.body = Stack(config, config.n_layers, causal=True)
        # The output projection shares the token embedding's weights (GPT-2's weight tying).
        self.lm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.apply(init_weights)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                cache: KVCache | None = None) -> torch.Tensor:
        """tokens (B, S) -> next-token logits (B, S, vocab).

        attention_mask: (B, S), True/1 = a real token. Left padding (batched prompts) and right
        padding (training batches) both work: positions count real tokens only.
        cache: continue after the cached tokens (see ``generate``).
        """
        h = self.body(tokens, as_padding_mask(attention_mask, tokens), cache=cache)  # (B, S, d_model)
        return h @ self.body.embed.tokens.weight.T + self.lm_bias

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        c, p = self.config, self.lm_bias
        return KVCache(c.n_layers, batch, max_len, c.kv_heads, c.head_dim, dtype=p.dtype, device=p.device)

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                 *, use_cache: bool = True, **sampling) -> torch.Tensor:
        """Continue each prompt by up to max_new_tokens tokens; returns the new tokens (B, n).

        tokens (B, S) are prompts left-padded to a common length (``generation.pad_left``) with
        attention_mask marking the real tokens. With use_cache each step runs the model on the one
        new token against the cached keys/values; without, it recomputes the whole sequence (the
        slow way, kept to check the cache against). sampling: temperature, top_k, eos_id, pad_id,
        generator (see ``generation.decode_loop``).
        """
        b, s = tokens.shape
        check_room(s + max_new_tokens, self.config.max_len, f"a prompt of {s} tokens + {max_new_tokens} new ones")
        mask = as_padding_mask(attention_mask, tokens)
        if use_cache:
            cache = self.new_cache(b, s + max_new_tokens)
            first = self(tokens, mask, cache=cache)[:, -1]
            return decode_loop(first, lambda t: self(t, cache=cache)[:, -1], max_new_tokens, **sampling)

        seq = {"tokens": tokens, "mask": torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask}

        def recompute(t: torch.Tensor) -> torch.Tensor:
            seq["tokens"] = torch.cat([seq["tokens"], t], dim=1)
            seq["mask"] = torch.cat([seq["mask"], torch.ones_like(t, dtype=torch.bool)], dim=1)
            return self(seq["tokens"], seq["mask"])[:, -1]

        return decode_loop(self(tokens, mask)[:, -1], recompute, max_new_tokens, **sampling)
