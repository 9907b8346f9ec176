"""What both kernel backends derive from a key-padding mask before launching."""

from __future__ import annotations

import torch


def key_bounds(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """(B, Sk) bool -> (B, 2) int32: [first real key, last real key + 1] per batch element ([Sk, 0],
    an empty range, if it has none). Key tiles outside it are skipped by the kernels: left and right
    padding are free; the mask itself handles padding inside the range."""
    b, sk = key_padding_mask.shape
    if sk == 0:
        return torch.zeros((b, 2), dtype=torch.int32, device=key_padding_mask.device)
    pos = torch.arange(sk, dtype=torch.int32, device=key_padding_mask.device)
    first = torch.where(key_padding_mask, pos, sk).amin(dim=1)
    last = torch.where(key_padding_mask, pos + 1, 0).amax(dim=1)
    return torch.stack([first, last], dim=1).to(torch.int32)  # contiguous: the kernels read it with unit strides
