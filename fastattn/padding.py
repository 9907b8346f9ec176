"""Between padded (B, S, ...) and packed (T, ...) forms, for attention_varlen.

    packed, indices, cu_seqlens, max_seqlen = unpad_input(hidden, attention_mask)
    out = fastattn.attention_varlen(q_packed, k_packed, v_packed, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    hidden = pad_input(out, indices, batch, seqlen)

Both directions are differentiable (index_select / index_put), so a model can run its attention on
packed tokens and the rest on padded ones.
"""

from __future__ import annotations

import torch


def unpad_input(x: torch.Tensor, attention_mask: torch.Tensor):
    """x (B, S, ...) and attention_mask (B, S) bool or 0/1 integers (True/1 = real token) ->
    (packed (T, ...), indices (T,) int64 into the flattened B * S rows, cu_seqlens (B + 1,) int32,
    max_seqlen int). Real tokens need not be contiguous: each sequence is its real tokens in order."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.is_floating_point():
        raise TypeError("attention_mask must be a bool or integer tensor (nonzero = real token)")
    attention_mask = attention_mask.bool()  # Hugging Face masks are int64 1/0
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"attention_mask must have shape (B, S) = {tuple(x.shape[:2])}, "
                         f"got {tuple(attention_mask.shape)}")
    lengths = attention_mask.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    max_seqlen = int(lengths.max().item()) if lengths.numel() else 0
    packed = x.reshape(-1, *x.shape[2:]).index_select(0, indices)  # (B * S, ...) -> (T, ...)
    return packed, indices, cu_seqlens, max_seqlen


def pad_input(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of unpad_input: packed (T, ...) -> (B, S, ...), zeros at padding positions."""
    out = packed.new_zeros((batch * seqlen, *packed.shape[1:]))
    out = out.index_put((indices,), packed)
    return out.reshape(batch, seqlen, *packed.shape[1:])
