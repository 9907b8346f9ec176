"""The one input validator for the public API: clear errors that name the argument."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_HEAD_DIM = 256
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AttentionShape:
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_q: int
    heads_kv: int
    head_dim: int


def _check_tensor(name: str, x, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims {layout}, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {x.dtype}")


def validate_qkv(q, k, v, *, layout: str = "(B, S, H, D)") -> AttentionShape:
    """Check q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) and return their sizes."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x, 4, layout)
    for name, x in (("k", k), ("v", v)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; all inputs must share a device")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}; q, k and v must share a dtype")
    b, sq, hq, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[0] != b:
        raise ValueError(f"k has batch size {k.shape[0]} but q has {b}")
    if k.shape[3] != d:
        raise ValueError(f"k has head dim {k.shape[3]} but q has {d}; they must match")
    sk, hkv = k.shape[1], k.shape[2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"the number of query heads ({hq}) must be a multiple of the number of key/value heads ({hkv})"
        )
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim (last dim of q) must be between 1 and {MAX_HEAD_DIM}, got {d}")
    return AttentionShape(b, sq, sk, hq, hkv, d)


def validate_scale(scale, head_dim: int) -> float:
    """None -> 1/sqrt(D); otherwise a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def validate_key_padding_mask(mask, shape: AttentionShape, device: torch.device) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor (True = real token), got {mask.dtype}")
    if tuple(mask.shape) != (shape.batch, shape.seqlen_k):
        raise ValueError(
            f"key_padding_mask must have shape (B, Sk) = {(shape.batch, shape.seqlen_k)}, got {tuple(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"key_padding_mask is on {mask.device} but q is on {device}")


def validate_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value
