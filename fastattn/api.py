"""Public functions: validate, normalise, pick a backend, call it."""

from __future__ import annotations

import torch

from fastattn import backends
from fastattn.validation import validate_flag, validate_key_padding_mask, validate_qkv, validate_scale


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Fused scaled-dot-product attention in FlashAttention's layout.

    Args:
        q: (B, Sq, Hq, D). k, v: (B, Sk, Hkv, D) with Hq % Hkv == 0 (GQA/MQA). Any strides whose
            last dim is contiguous are used without a copy.
        causal: bottom-right aligned mask: query i sees keys j <= i + Sk - Sq.
        scale: softmax scale, default 1/sqrt(D).
        key_padding_mask: (B, Sk) bool, True = real token (reference backend only for now).
        return_lse: also return the log-sum-exp (B, Hq, Sq) in float32 (differentiable).
        backend: "auto", "triton", "torch", or "reference"; see ``available_backends()``.

    Returns out (B, Sq, Hq, D) [, lse]. A query that sees no key gets 0 (lse = -inf) and zero
    gradients.
    """
    shape = validate_qkv(q, k, v)
    causal = validate_flag("causal", causal)
    return_lse = validate_flag("return_lse", return_lse)
    scale = validate_scale(scale, shape.head_dim)
    validate_key_padding_mask(key_padding_mask, shape, q.device)
    call = backends.AttentionCall(q, k, v, shape, causal, scale, key_padding_mask, return_lse)
    return backends.run(backends.choose(backend, call), call)


def available_backends() -> dict[str, backends.BackendStatus]:
    """Which backends are usable on this machine, and why the others are not."""
    return backends.available_backends()
