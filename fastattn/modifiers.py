"""Score modifiers: what a call changes in the logits before the softmax (docs/design.md, "Score
modifiers"). One validated record, ``ScoreMods``, travels with a call to the backends; a call
without modifiers carries None, so the plain path pays one ``is None`` test.

Order on a logit s = scale * q.k (as FlashAttention and Gemma 2):
    softcap * tanh(s / softcap)  ->  + bias[b, h, i, j]  ->  - slope[b, h] * |i + Sk - Sq - j|
    ->  window / causal / key-padding masks  ->  softmax with an optional sink logit per head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastattn import semantics


@dataclass(slots=True)
class ScoreMods:
    """bias: 4-D (B or 1, Hq or 1, Sq or 1, Sk or 1), the caller's tensor viewed with leading unit
    dims (no copy; differentiable). alibi_slopes: float32 (B or 1, Hq). window: (left, right) with
    -1 = unbounded, right already <= 0 when causal; (-1, -1) = none. softcap: 0.0 = none.
    sinks: (Hq,) (differentiable)."""

    bias: torch.Tensor | None = None
    alibi_slopes: torch.Tensor | None = None
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    sinks: torch.Tensor | None = None

    @property
    def local(self) -> bool:
        return self.window != (-1, -1)

    def names(self) -> list[str]:
        """The modifiers in use, as the API's argument names (for error messages)."""
        used = [("bias", self.bias is not None), ("alibi_slopes", self.alibi_slopes is not None),
                ("window", self.local), ("softcap", self.softcap != 0.0), ("sinks", self.sinks is not None)]
        return [name for name, on in used if on]

    def reference_kwargs(self) -> dict:
        """The same modifiers as keyword arguments of fastattn.reference.attention."""
        return dict(bias=self.bias, alibi_slopes=self.alibi_slopes, window=self.window if self.local else None,
                    softcap=self.softcap or None, sinks=self.sinks)

    def sequence(self, i: int, sq: int, sk: int) -> ScoreMods:
        """The modifiers of packed sequence i (sq queries, sk keys): the bias's and slopes' batch
        row i (when they have one), the bias cut to the sequence's own positions."""
        bias, slopes = self.bias, self.alibi_slopes
        if bias is not None:
            bias = bias[i:i + 1] if bias.shape[0] > 1 else bias
            bias = bias[:, :, :sq if bias.shape[2] > 1 else 1, :sk if bias.shape[3] > 1 else 1]
        if slopes is not None and slopes.shape[0] > 1:
            slopes = slopes[i:i + 1]
        return ScoreMods(bias, slopes, self.window, self.softcap, self.sinks)

    def additive_mask(self, sq: int, sk: int, dtype: torch.dtype) -> torch.Tensor | None:
        """bias + ALiBi as one float tensor broadcastable to (B, Hq, Sq, Sk) (ALiBi materialised):
        what an SDPA float attn_mask can carry. None when neither is set."""
        if self.bias is None and self.alibi_slopes is None:
            return None
        rel = semantics.relative_positions(sq, sk, (self.bias if self.bias is not None else self.alibi_slopes).device)
        return semantics.modifier_bias(self.bias, self.alibi_slopes, None, rel, dtype)
