"""What an attention call means, in plain torch ops: the one home of fastattn's conventions and of
their translations from other libraries' conventions (docs/design.md, "Semantics").

fastattn's own conventions, which every backend and kernel implements:
- positions: key j relative to query i is j - (i + Sk - Sq), the two sequences aligned at their
  ends (0 on the causal diagonal);
- causal is bottom-right aligned (query i sees keys j <= i + Sk - Sq), a window (left, right) keeps
  -left <= relative position <= right (-1 = unbounded), a key-padding mask (B, Sk) is True for a
  real key;
- a query row that sees no key returns 0 with lse -inf (the key-less-row rule), never NaN;
- two softmax states over disjoint keys merge by their log-sum-exps (merge_state).

The translators (the SDPA drop-in, the "torch" backend, the transformers integration, the ring's
torch block, the models' probabilities, the KV-cache fallback) call these instead of re-deriving
them. The kernels implement the same rules in kernels/tiles.py.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def relative_positions(sq: int, sk: int, device=None) -> torch.Tensor:
    """(Sq, Sk) int64: j - (i + Sk - Sq), key j's position relative to query i with the two sequences
    aligned at their ends (0 on the causal diagonal, negative for earlier keys)."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return j - (i + (sk - sq))


def in_window(rel: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Whether each relative position lies in the window (left, right); -1 = unbounded side."""
    left, right = window
    inside = torch.ones_like(rel, dtype=torch.bool)
    if left >= 0:
        inside = inside & (rel >= -left)
    if right >= 0:
        inside = inside & (rel <= right)
    return inside


def visible_keys(
    sq: int,
    sk: int,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    window: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Boolean (B or 1, 1, Sq, Sk) mask: True where query i may attend to key j.

    Causal is bottom-right aligned: query i sees keys j <= i + Sk - Sq.
    key_padding_mask (B, Sk): True marks a real key.
    window (left, right): query i sees only keys i + Sk - Sq - left <= j <= i + Sk - Sq + right
    (-1 = unbounded on that side); combined with causal, right is at most 0.
    """
    rel = relative_positions(sq, sk, device)
    vis = rel <= 0 if causal else torch.ones(sq, sk, dtype=torch.bool, device=device)
    if window is not None:
        vis = vis & in_window(rel, window)
    vis = vis[None, None]  # (1, 1, Sq, Sk)
    if key_padding_mask is not None:
        vis = vis & key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    return vis


def keyless_rows(visible: torch.Tensor) -> torch.Tensor:
    """The rows of a (..., Sq, Sk) visibility mask that see no key, as (..., Sq, 1): they return 0
    (lse -inf) and get zero gradients."""
    return ~visible.any(dim=-1, keepdim=True)


# A bias at or below BIAS_FLOOR hides its key, as -inf does: torch.finfo(float32).min and
# finfo(bfloat16).min, transformers' mask values, are such (a row of them returns 0, not SDPA's mean
# of V). The kernels add bias * log2(e) in float32 (kernels/tiles.py: _log2_bias), which overflows to
# -inf exactly from this float32 value (about -2.3586576e38) down; the other backends follow.
BIAS_FLOOR = float.fromhex("-0x1.62e43p+127")


def below_floor(bias: torch.Tensor) -> torch.Tensor:
    """Where a bias hides its key by its value (-inf, or at or below BIAS_FLOOR), judged on the float32
    value the kernels read (the floor rounded to bfloat16 would move; a float64 value rounds onto it
    as in the kernels). NaN is not hidden: it reaches the output."""
    return (bias if bias.dtype == torch.float32 else bias.float()) <= BIAS_FLOOR


def as_bias(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bias in dtype, with its values at or below BIAS_FLOOR as -inf (differentiable elsewhere)."""
    return bias.to(dtype).masked_fill(below_floor(bias), NEG_INF)


def bool_to_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = attend) as an additive float one: 0 where True, -inf where False."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, NEG_INF)


def alibi_bias(slopes: torch.Tensor, rel: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ALiBi's additive term -slope * |rel|: slopes (B or 1, Hq), rel (Sq, Sk) or (B, Sq, Sk) ->
    (B or 1, Hq, Sq, Sk)."""
    rel = rel if rel.dim() == 3 else rel[None]
    return -slopes.to(dtype)[:, :, None, None] * rel[:, None].abs().to(dtype)


def modifier_bias(bias: torch.Tensor | None, alibi_slopes: torch.Tensor | None, window: tuple[int, int] | None,
                  rel: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """bias + ALiBi (+ -inf outside the window) as one float tensor broadcastable to (B, Hq, Sq, Sk),
    for a path that takes the modifiers as a dense additive mask (SDPA's float attn_mask, a KV cache
    run as dense keys). rel: relative positions (Sq, Sk), or per batch element (B, Sq, Sk). None
    when nothing is set."""
    out = None if bias is None else bias.to(dtype)  # (the floor is the consumer's: below_floor, as_bias)
    if alibi_slopes is not None:
        term = alibi_bias(alibi_slopes, rel, dtype)
        out = term if out is None else out + term
    if window is not None:
        outside = ~in_window(rel if rel.dim() == 3 else rel[None], window)[:, None]  # (B or 1, 1, Sq, Sk)
        term = bool_to_bias(~outside, dtype)
        out = term if out is None else out + term
    return out


def key_padding_from_mask(mask: torch.Tensor, batch: int, seqlen_k: int) -> torch.Tensor | None:
    """A bool mask broadcastable to (B, 1, 1, Sk) (SDPA's attn_mask sense, True = attend) as a (B, Sk)
    key-padding mask; None for any other mask. Decided by shape alone (no sync)."""
    if mask.dtype != torch.bool or mask.dim() > 4:
        return None
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if m.shape[1] != 1 or m.shape[2] != 1 or m.shape[0] not in (1, batch) or m.shape[3] not in (1, seqlen_k):
        return None
    return m[:, 0, 0, :].expand(batch, seqlen_k)


def key_padding_of_pattern(mask: torch.Tensor, causal: bool, window: tuple[int, int] | None) -> torch.Tensor | None:
    """A (B, 1|H, Sq, Sk) bool mask that is exactly key padding plus fastattn's bottom-right causal
    and window pattern, as the (B, Sk) key-padding mask; None if it is anything else. Reads the mask's
    values: one host sync."""
    if mask.dtype != torch.bool or mask.dim() != 4:
        return None
    sq, sk = mask.shape[-2:]
    key_padding = mask.any(dim=2).all(dim=1)  # (B, Sk): a key some query sees
    pattern = visible_keys(sq, sk, causal=causal, device=mask.device, window=window)
    if torch.equal(mask, (key_padding[:, None, None, :] & pattern).expand_as(mask)):
        return key_padding
    return None


def top_left_causal(sq: int, sk: int) -> list[tuple[slice, int, bool]]:
    """Top-left causal attention (query i sees keys j <= i: torch SDPA's is_causal) as calls in
    fastattn's bottom-right convention: [(query rows, keys to keep (a prefix), causal)]. Sq < Sk:
    keys from Sq on are never seen; Sq > Sk: the first Sk queries are square-causal and the rest see
    every key."""
    if sq == sk:
        return [(slice(0, sq), sk, True)]
    if sq < sk:
        return [(slice(0, sq), sq, True)]
    return [(slice(0, sk), sk, True), (slice(sk, sq), sk, False)]


def merge_state(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """In place: (out, lse) <- the softmax over the union of the keys behind (out, lse) and behind
    (block_out, block_lse): out = sum_s exp(lse_s - lse) out_s. out (B, S, H, D), lse (B, H, S), in
    the accumulation dtype. Rows that have seen no key yet (lse -inf) take no weight instead of NaN."""
    new = torch.logaddexp(lse, block_lse.to(lse.dtype))
    finite = torch.where(new == NEG_INF, 0.0, new)
    w_old = torch.exp(lse - finite).transpose(1, 2)[..., None]  # (B, H, S) -> (B, S, H, 1)
    w_new = torch.exp(block_lse.to(lse.dtype) - finite).transpose(1, 2)[..., None]
    out.mul_(w_old).addcmul_(block_out, w_new)  # two passes over out; block_out read once, in its dtype
    lse.copy_(new)
