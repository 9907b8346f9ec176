"""The one FLOP formula, shared by the tests' helpers, the self-check and the benchmarks."""

from __future__ import annotations

MODES = ("fwd", "bwd", "fwd_bwd")


def mean_visible_keys(seqlen_q: int, seqlen_k: int, causal: bool, window: tuple[int, int] | None = None) -> float:
    """Mean number of keys a query sees. Positions are bottom-right aligned: query i sits at key
    position i + Sk - Sq. Causal: query i sees j <= i + Sk - Sq. window (left, right) (a sliding
    window, -1 = unbounded on that side): query i sees i + Sk - Sq - left <= j <= i + Sk - Sq + right,
    combined with causal (as fastattn.semantics.visible_keys)."""
    if seqlen_q == 0:
        return 0.0
    left, right = (-1, -1) if window is None else window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if left < 0 and right < 0:
        return float(seqlen_k)
    offset = seqlen_k - seqlen_q
    total = 0
    for i in range(seqlen_q):  # keys lo..hi (inclusive), clipped to 0..Sk-1
        pos = i + offset
        lo = max(pos - left, 0) if left >= 0 else 0
        hi = min(pos + right, seqlen_k - 1) if right >= 0 else seqlen_k - 1
        total += max(hi - lo + 1, 0)
    return total / seqlen_q


def attention_flops(batch: int, heads_q: int, seqlen_q: int, seqlen_k: int, head_dim: int, *,
                    causal: bool, mode: str = "fwd", window: tuple[int, int] | None = None) -> float:
    """Forward: 4 * B * Hq * Sq * Sk_avg * D (two matmuls, 2 flops per multiply-add), Sk_avg the
    mean number of keys a query sees (causal and the sliding window count; mean_visible_keys).
    Backward counts 2.5x forward (five matmuls to the forward's two); fwd_bwd is 3.5x."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    keys = mean_visible_keys(seqlen_q, seqlen_k, causal, window)
    fwd = 4.0 * batch * heads_q * seqlen_q * keys * head_dim
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]
