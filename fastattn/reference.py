"""Naive attention: materialised scores and explicit masks.

This is the oracle for every test, model check and benchmark gate. It is plain differentiable
torch code in whatever dtype it is given (tests call it on float64 copies), written for clarity,
not speed: memory is O(Sq * Sk).

Layout is FlashAttention's: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), Hq % Hkv == 0.
"""

from __future__ import annotations

import math

import torch

from fastattn.semantics import alibi_bias, as_bias, relative_positions, visible_keys


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    bias: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
):
    """Reference attention. Returns out (B, Sq, Hq, D) [, lse (B, Hq, Sq) in float32 or wider].

    Score modifiers, in the order they apply to a logit s = scale * q.k:
        softcap: s -> softcap * tanh(s / softcap) (Gemma 2); None or 0 = off.
        bias: + bias[b, h, i, j], a float tensor broadcastable to (B, Hq, Sq, Sk) (T5's relative
            position bias, learned masks; -inf, or any value at or below semantics.BIAS_FLOOR such as
            torch.finfo(torch.float32).min, hides a key). Differentiable.
        alibi_slopes: (Hq,) or (B, Hq): - slope * |i + Sk - Sq - j| (ALiBi, as FlashAttention).
        window: (left, right) local attention, see visible_keys.
        sinks: (Hq,) one extra logit per head in every row's softmax that carries no value
            (gpt-oss): it takes probability mass away from the keys. Differentiable.

    A query row that sees no key returns 0 with zero gradients for q, k, v and bias; its lse is
    -inf, or the sink's logit with sinks.
    """
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    group = hq // hkv
    if key_padding_mask is not None:  # padded keys are never read: garbage there (NaN, inf) gives nothing
        padded = ~key_padding_mask[:, :, None, None]  # (B or 1, Sk, 1, 1)
        k, v = k.masked_fill(padded, 0.0), v.masked_fill(padded, 0.0)
    # (B, S, H, D) -> (B, H, S, D); each KV head serves `group` consecutive query heads.
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(group, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(group, dim=1)

    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # (B, Hq, Sq, Sk)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + as_bias(bias, scores.dtype)  # at or below semantics.BIAS_FLOOR: -inf
    if alibi_slopes is not None:
        slopes = alibi_slopes.reshape(-1, hq)  # (B or 1, Hq)
        scores = scores + alibi_bias(slopes, relative_positions(sq, sk, q.device), scores.dtype)
    vis = visible_keys(sq, sk, causal=causal, key_padding_mask=key_padding_mask, device=q.device, window=window)
    scores = scores.masked_fill(~vis, float("-inf"))

    # Softmax written out so that rows with no visible key give exactly 0 (and finite gradients).
    # The row max only stabilises the exponent; the result does not depend on it, so detach it.
    if sk == 0:  # no keys at all: every row is empty
        row_max = scores.new_full((*scores.shape[:-1], 1), float("-inf"))
    else:
        row_max = scores.amax(dim=-1, keepdim=True).detach()
    if sinks is not None:
        sink = sinks.to(scores.dtype).reshape(1, hq, 1, 1)
        row_max = torch.maximum(row_max, sink.detach())
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(scores - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    if sinks is not None:
        denom = denom + torch.exp(sink - row_max)  # a virtual key with no value
    empty = denom == 0
    denom_safe = torch.where(empty, torch.ones_like(denom), denom)
    p = e / denom_safe
    out = torch.matmul(p, vh).transpose(1, 2)  # (B, Hq, Sq, D) -> (B, Sq, Hq, D)
    if not return_lse:
        return out
    lse = (row_max + torch.log(denom_safe)).squeeze(-1)
    lse = torch.where(empty.squeeze(-1), torch.full_like(lse, float("-inf")), lse)
    if lse.dtype in (torch.float16, torch.bfloat16):
        lse = lse.float()
    return out, lse
