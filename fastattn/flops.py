"""The one FLOP formula, shared by the tests' helpers, the self-check and the benchmarks."""

from __future__ import annotations

MODES = ("fwd", "bwd", "fwd_bwd")


def mean_visible_keys(seqlen_q: int, seqlen_k: int, causal: bool, window: tuple[int, int] | None = None,
                      real_keys: int | None = None) -> float:
    """Mean number of keys a query sees. Positions are bottom-right aligned: query i sits at key
    position i + Sk - Sq. Causal: query i sees j <= i + Sk - Sq. window (left, right) (a sliding
    window, -1 = unbounded on that side): query i sees i + Sk - Sq - left <= j <= i + Sk - Sq + right,
    combined with causal (as fastattn.semantics.visible_keys). real_keys: only keys j < real_keys
    are real (a key-padding mask padding the end); the alignment still counts all Sk."""
    if seqlen_q == 0:
        return 0.0
    last = seqlen_k - 1 if real_keys is None else max(0, min(real_keys, seqlen_k)) - 1
    left, right = (-1, -1) if window is None else window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if left < 0 and right < 0:
        return float(last + 1)
    offset = seqlen_k - seqlen_q
    total = 0
    for i in range(seqlen_q):  # keys lo..hi (inclusive), clipped to 0..last
        pos = i + offset
        lo = max(pos - left, 0) if left >= 0 else 0
        hi = min(pos + right, last) if right >= 0 else last
        total += max(hi - lo + 1, 0)
    return total / seqlen_q


def attention_flops(batch: int, heads_q: int, seqlen_q: int, seqlen_k: int, head_dim: int, *,
                    causal: bool, mode: str = "fwd", window: tuple[int, int] | None = None,
                    real_keys: int | None = None) -> float:
    """Forward: 4 * B * Hq * Sq * Sk_avg * D (two matmuls, 2 flops per multiply-add), Sk_avg the
    mean number of keys a query sees (causal, the sliding window and padded keys count;
    mean_visible_keys). Backward counts 2.5x forward (five matmuls to the forward's two); fwd_bwd
    is 3.5x."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    keys = mean_visible_keys(seqlen_q, seqlen_k, causal, window, real_keys)
    fwd = 4.0 * batch * heads_q * seqlen_q * keys * head_dim
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]
