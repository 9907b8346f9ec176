"""A BERT-like encoder: bidirectional self-attention over padded batches, with a masked-token head.

Every token attends to every real token of its sequence, before and after it; padding keys are
masked out (key_padding_mask), so a sequence gives the same result alone or padded in a batch.
Trained by hiding some tokens behind a mask id (``mask_tokens``) and predicting them from both sides.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastattn.models.config import ModelConfig
from fastattn.models.layers import Stack, as_padding_mask, init_weights, tied_logits


class Encoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.body = Stack(config, config.n_layers, causal=False)
        # Masked-token head: a transform, then the (tied) token embedding as output projection.
        self.mlm_transform = nn.Linear(config.d_model, config.d_model)
        self.mlm_norm = nn.LayerNorm(config.d_model)
        self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.apply(init_weights)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, S), attention_mask (B, S) True/1 = real token -> hidden states (B, S, d_model).
        Rows of padding positions are computed but meaningless. positions: as ``Decoder.forward``,
        for a sequence sharded across ranks."""
        return self.body(tokens, as_padding_mask(attention_mask, tokens), positions=positions)

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, S, d_model) -> logits (B, S, vocab) for the masked-token objective."""
        h = self.mlm_norm(F.gelu(self.mlm_transform(hidden)))
        return tied_logits(h, self.body.embed, self.mlm_bias)


def mask_tokens(tokens: torch.Tensor, attention_mask: torch.Tensor | None, mask_id: int, prob: float = 0.15, *,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked-token objective's input: each real token is replaced by mask_id with probability
    prob. Returns (inputs (B, S), chosen (B, S) bool): the loss is taken where chosen is True, with
    the original tokens as targets."""
    draw = torch.rand(tokens.shape, generator=generator).to(tokens.device)
    chosen = draw < prob
    if attention_mask is not None:
        chosen &= as_padding_mask(attention_mask, tokens)
    return tokens.masked_fill(chosen, mask_id), chosen
