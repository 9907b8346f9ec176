"""The one FLOP formula, shared by the tests' helpers, the self-check and the benchmarks."""

from __future__ import annotations

MODES = ("fwd", "bwd", "fwd_bwd")


def mean_visible_keys(seqlen_q: int, seqlen_k: int, causal: bool) -> float:
    """Mean number of keys a query sees (bottom-right causal: query i sees j <= i + Sk - Sq)."""
    if seqlen_q == 0:
        return 0.0
    if not causal:
        return float(seqlen_k)
    offset = seqlen_k - seqlen_q
    total = sum(min(max(i + offset + 1, 0), seqlen_k) for i in range(seqlen_q))
    return total / seqlen_q


def attention_flops(batch: int, heads_q: int, seqlen_q: int, seqlen_k: int, head_dim: int, *,
                    causal: bool, mode: str = "fwd") -> float:
    """Forward: 4 * B * Hq * Sq * Sk_avg * D (two matmuls, 2 flops per multiply-add).
    Backward counts 2.5x forward (five matmuls to the forward's two); fwd_bwd is 3.5x."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    fwd = 4.0 * batch * heads_q * seqlen_q * mean_visible_keys(seqlen_q, seqlen_k, causal) * head_dim
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]
