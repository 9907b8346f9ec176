"""What both kernel backends derive from a key-padding mask before launching."""

from __future__ import annotations

import weakref

import torch

_MAX_CACHED = 8
_cache: dict[tuple, tuple[weakref.ref, int, torch.Tensor]] = {}


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


def shared_key_bounds(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """key_bounds(mask), computed once per mask tensor while its values stay the same (its version
    counter): a model's layers all attend with the same mask in a step, and the bounds cost several
    small ops. Computed afresh while torch.compile traces or a CUDA graph captures, so that the
    graph computes them from the mask it replays with."""
    if torch.compiler.is_compiling():
        return key_bounds(key_padding_mask)
    stream = None
    if key_padding_mask.is_cuda:
        if torch.cuda.is_current_stream_capturing():
            return key_bounds(key_padding_mask)
        stream = torch._C._cuda_getCurrentRawStream(key_padding_mask.device.index)  # reused on its stream only
    key = (id(key_padding_mask), stream)
    hit = _cache.get(key)
    if hit is not None and hit[0]() is key_padding_mask and hit[1] == key_padding_mask._version:
        return hit[2]
    bounds = key_bounds(key_padding_mask)
    if len(_cache) >= _MAX_CACHED:
        _cache.clear()
    _cache[key] = (weakref.ref(key_padding_mask), key_padding_mask._version, bounds)
    return bounds
