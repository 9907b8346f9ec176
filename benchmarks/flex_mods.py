"""FlexAttention given fastattn's score modifiers: the second baseline of benchmarks/score_mods.py.

Each modifier means what fastattn.reference says it means:
- softcap, bias and ALiBi go into one score_mod, in the reference's order: softcap on the scaled
  score, then the bias, then ALiBi's -slope * |i + Sk - Sq - j|;
- causal and the sliding window form a mask_mod. Its block mask (built once, untimed) lets
  FlexAttention skip the key tiles no query sees, as fastattn's kernels do;
- sinks rescale the output with the row's log-sum-exp: out * sigmoid(lse - sink). The sink's
  share of the softmax carries no value, so the rest of the row shrinks by exactly that factor.
  This is how FlexAttention users add gpt-oss sinks; its gradient flows through the lse.

On a GPU the call is torch.compile'd with fullgraph=True: a graph break would run FlexAttention
eagerly (slow, materialising), so it raises instead and the row is reported as skipped. Without a
GPU it runs eagerly. FlexAttention has no CPU backward, so CPU backward rows are skipped with
torch's reason.
"""

from __future__ import annotations

import functools

import torch

from benchmarks.cases import Case
from benchmarks.providers import raise_recompile_limits
from fastattn.semantics import in_window


def mask_mod(case: Case, window: tuple[int, int] | None):
    """fastattn's visibility (bottom-right causal, the window as semantics.in_window reads it) as a
    mask_mod; None when every key is visible."""
    if not case.causal and window is None:
        return None
    offset = case.seqlen_k - case.seqlen_q

    def visible(b, h, q_idx, kv_idx):
        rel = kv_idx - (q_idx + offset)  # as semantics.relative_positions: 0 on the causal diagonal
        ok = in_window(rel, window) if window is not None else rel == rel
        return ok & (rel <= 0) if case.causal else ok
    return visible


def _score_mod(offset: int, softcap, bias, alibi_slopes):
    """One score_mod for the modifiers that are set (None: plain scores). bias (B or 1, Hq or 1,
    Sq, Sk) and alibi_slopes (B, Hq) or (1, Hq), as `prepare` leaves them."""
    if not softcap and bias is None and alibi_slopes is None:
        return None

    def score_mod(score, b, h, q_idx, kv_idx):
        if softcap:
            score = softcap * torch.tanh(score / softcap)
        if bias is not None:
            score = score + bias[b if bias.shape[0] > 1 else 0, h if bias.shape[1] > 1 else 0, q_idx, kv_idx]
        if alibi_slopes is not None:
            slope = alibi_slopes[b if alibi_slopes.shape[0] > 1 else 0, h]
            score = score - slope * torch.abs(q_idx + offset - kv_idx)
        return score
    return score_mod


def _flex_mods(q, k, v, block_mask, offset: int, softcap=None, bias=None, alibi_slopes=None, sinks=None):
    """q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D) -> (B, Hq, Sq, D)."""
    from torch.nn.attention.flex_attention import flex_attention

    score_mod = _score_mod(offset, softcap, bias, alibi_slopes)
    gqa = q.shape[1] != k.shape[1]
    if sinks is None:
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa)
    from torch.nn.attention.flex_attention import AuxRequest

    out, aux = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa,
                              return_aux=AuxRequest(lse=True))
    keep = torch.sigmoid(aux.lse - sinks.float().view(1, -1, 1))  # (B, Hq, Sq): 1 - the sink's share
    return (out.float() * keep[..., None]).to(out.dtype)


@functools.cache
def _compiled():
    raise_recompile_limits()
    # Static shapes: each case compiles as a user's fixed-shape model would (automatic dynamic shapes
    # would make the second sequence length, or the window, a symbolic size).
    return torch.compile(_flex_mods, fullgraph=True, dynamic=False)


def prepare(case: Case, mods: dict) -> dict:
    """The keyword arguments `call` gets for fastattn's `mods`: causal and the window become the
    block mask, built here once; the other modifiers pass through."""
    from torch.nn.attention.flex_attention import create_block_mask

    own = {k: v for k, v in mods.items() if k != "window"}
    bias, slopes = mods.get("bias"), mods.get("alibi_slopes")
    if bias is not None and (bias.dim() != 4 or tuple(bias.shape[2:]) != (case.seqlen_q, case.seqlen_k)):
        raise ValueError(f"bias: this FlexAttention score_mod takes (B or 1, Hq or 1, Sq, Sk), got {tuple(bias.shape)}")
    if slopes is not None:
        own["alibi_slopes"] = slopes.reshape(-1, case.heads_q)  # (Hq,) or (B, Hq) -> (1 or B, Hq)
    visible = mask_mod(case, mods.get("window"))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where score_mods.py runs
    own["block_mask"] = None if visible is None else create_block_mask(visible, None, None, case.seqlen_q,
                                                                       case.seqlen_k, device=device)
    return own


def call(q, k, v, *, block_mask, **mods):
    """FlashAttention's layout in and out, as every provider: q (B, Sq, Hq, D) -> (B, Sq, Hq, D)."""
    fn = _compiled() if q.is_cuda else _flex_mods
    offset = k.shape[1] - q.shape[1]
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask, offset, **mods)
    return out.transpose(1, 2)
