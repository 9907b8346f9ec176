"""Backend "torch": PyTorch's scaled_dot_product_attention, with fastattn's conventions on top:
bottom-right causal, key-padding masks, rows without keys -> 0 (SDPA gives NaN). No lse."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from fastattn import reference
from fastattn.backends.call import AttentionCall, KVCacheCall


def unavailable() -> str | None:
    return None


def unsupported(call: AttentionCall | KVCacheCall) -> str | None:
    if call.return_lse:
        return "return_lse=True: PyTorch SDPA does not return the log-sum-exp"
    return None



def run(call: AttentionCall):
    if call.varlen:
        return call.per_sequence(run)
    b, sq, sk = call.shape.batch, call.shape.seqlen_q, call.shape.seqlen_k
    q, k, v = call.q, call.k, call.v
    skipped = 0
    if call.causal and sq > sk:
        # Bottom-right causal: the first Sq - Sk queries see no key and return 0 (SDPA would give NaN).
        skipped, q = sq - sk, q[:, sq - sk:]
    if sk == 0 or q.shape[1] == 0:
        # Empty: zeros that stay attached to the autograd graph.
        return reference.attention(call.q, call.k, call.v, causal=call.causal, scale=call.scale,
                                   key_padding_mask=call.key_padding_mask)
    # (B, S, H, D) -> (B, H, S, D), SDPA's layout.
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = call.shape.heads_q != call.shape.heads_kv
    if call.key_padding_mask is not None:
        out = _with_padding(qt, kt, vt, call, gqa)
    elif call.causal and q.shape[1] != sk:
        mask = causal_lower_right(q.shape[1], sk)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=call.scale, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=call.causal, scale=call.scale, enable_gqa=gqa)
    out = out.transpose(1, 2)  # back to (B, S, H, D)
    if skipped:
        out = torch.cat([out.new_zeros(b, skipped, *out.shape[2:]), out], dim=1)
    return out


def _with_padding(qt, kt, vt, call: AttentionCall, gqa: bool) -> torch.Tensor:
    """SDPA with key_padding_mask as a boolean attn_mask (and the bottom-right causal mask):
    (B, H, Sq, D) -> (B, H, Sq, D). SDPA returns NaN for a query that sees no key, and NaN
    gradients through it; such rows get every key un-masked (finite values) and are then zeroed,
    so they return 0 with zero gradients, as the kernels do."""
    visible = reference.visible_keys(qt.shape[2], kt.shape[2], causal=call.causal,
                                     key_padding_mask=call.key_padding_mask, device=qt.device)  # (B, 1, Sq, Sk)
    empty = ~visible.any(dim=-1, keepdim=True)  # (B, 1, Sq or 1, 1)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=visible | empty, scale=call.scale, enable_gqa=gqa)
    return out.masked_fill(empty, 0.0)
