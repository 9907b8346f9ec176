"""What both kernel backends derive from a key-padding mask before launching."""

from __future__ import annotations

import torch

# (device, n) -> ((2, n) int32 table [n - j; j + 1] over positions j < n, (2,) int32 [n, 0], (2,) int32 [-1, 1])
_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _position_tables(sk: int, device: torch.device):
    """Constant tables for key_bounds, for any Sk up to a power of two n: built once per (device, n)
    and kept (a few KiB to MiB; a captured CUDA graph may read them), except while a graph captures
    or torch.compile traces, when they are built in place."""
    n = 1 << max(sk - 1, 0).bit_length()
    key = (device, n)
    if key in _tables:
        return _tables[key]
    j = torch.arange(n, dtype=torch.int32, device=device)
    tables = (torch.stack([n - j, j + 1]), torch.tensor([n, 0], dtype=torch.int32, device=device),
              torch.tensor([-1, 1], dtype=torch.int32, device=device))
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if not capturing and not torch.compiler.is_compiling():
        _tables[key] = tables
    return tables


def key_bounds(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """(B, Sk) bool -> (B, 2) int32: [first real key, last real key + 1] per batch element; a row
    with no real key gets an empty range [n, 0] (n >= Sk). Key tiles outside it are skipped by the
    kernels: left and right padding are free; the mask itself handles padding inside the range.
    Three small ops (it runs once per masked forward)."""
    b, sk = key_padding_mask.shape
    if sk == 0:
        return torch.zeros((b, 2), dtype=torch.int32, device=key_padding_mask.device)
    table, offset, sign = _position_tables(sk, key_padding_mask.device)
    # (B, 2, Sk) -> (B, 2): over each row's real keys, max(n - j) = n - first and max(j + 1) = last + 1;
    # 0 for both when the row has none.
    ends = torch.where(key_padding_mask[:, None, :], table[:, :sk], 0).amax(dim=2)
    return torch.addcmul(offset, ends, sign)  # [n - (n - first), 0 + (last + 1)], contiguous
