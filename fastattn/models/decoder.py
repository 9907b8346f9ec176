"""A GPT-like decoder: causal self-attention, next-token prediction, generation with a KV cache.

Causal masking is the only thing that makes this a decoder rather than an encoder: token i attends
to tokens 0..i, so the model can be trained on every position of a sequence at once (predict token
i + 1 from tokens 0..i) and later generate one token at a time.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fastattn.models.config import ModelConfig
from fastattn.models.generation import check_room, empty_continuation, generate
from fastattn.models.kv_cache import KVCache
from fastattn.models.layers import Stack, as_padding_mask, check_tokens, init_weights, tied_logits


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.body = Stack(config, config.n_layers, causal=True)
        # The output projection shares the token embedding's weights (GPT-2's weight tying).
        self.lm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.apply(init_weights)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                cache: KVCache | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, S) -> next-token logits (B, S, vocab).

        attention_mask: (B, S), True/1 = a real token. Left padding (batched prompts) and right
        padding (training batches) both work: positions count real tokens only.
        cache: continue after the cached tokens (see ``generate``).
        positions: the tokens' positions in the whole sequence when it is sharded across ranks
            (``set_context_parallel``; README "Long sequences across GPUs").
        """
        h = self.body(tokens, as_padding_mask(attention_mask, tokens), cache=cache, positions=positions)  # (B, S, d)
        return tied_logits(h, self.body.embed, self.lm_bias)

    def new_cache(self, batch: int, max_len: int, *, page_size: int | None = None) -> KVCache:
        """A KV cache for `batch` sequences of up to max_len tokens (paged with page_size)."""
        check_room(max_len, self.config.max_len, "a KV cache")
        return KVCache.for_config(self.config, self.config.n_layers, batch, max_len, self.lm_bias.device,
                                  page_size=page_size)

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                 *, use_cache: bool = True, page_size: int | None = None, cuda_graph: bool = False,
                 **sampling) -> torch.Tensor:
        """Continue each prompt by up to max_new_tokens tokens; returns the new tokens (B, n).

        tokens (B, S): prompts padded to a common length (``generation.pad_left``), attention_mask
        marking their real tokens. With use_cache each step runs the model on the one new token
        against the cached keys/values (fastattn.attention_with_kvcache; a paged cache with
        page_size; cuda_graph=True replays one captured step per token on CUDA); without, it
        recomputes the whole sequence (the slow way, kept to check the cache against). sampling:
        temperature, top_k, eos_id, pad_id (default config.pad_id), generator (see
        ``generation.decode_loop``).
        """
        check_tokens(tokens, self.config.vocab_size)
        b, s = tokens.shape
        empty = empty_continuation(max_new_tokens, b, tokens.device)
        if empty is not None:
            return empty
        needed = s + max_new_tokens - 1  # the last new token is never fed back
        check_room(needed, self.config.max_len, f"a prompt of {s} tokens + {max_new_tokens} new ones")
        sampling.setdefault("pad_id", self.config.pad_id)
        cache = self.new_cache(b, needed, page_size=page_size) if use_cache else None
        return generate(lambda t, m, c: self(t, m, cache=c), tokens, as_padding_mask(attention_mask, tokens),
                        max_new_tokens, cache=cache, cuda_graph=cuda_graph, **sampling)
