"""Backend "torch": PyTorch's scaled_dot_product_attention, with fastattn's conventions on top:
bottom-right causal, key-padding masks, rows without keys -> 0 (SDPA gives NaN). No lse.
Score modifiers that an SDPA float mask can express run here (bias, ALiBi materialised, window);
softcap and sinks cannot be expressed and are refused."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from fastattn import reference
from fastattn.backends.call import AttentionCall, KVCacheCall

SCORE_MODIFIERS = ("bias", "alibi_slopes", "window")  # as one SDPA float mask
# SDPA's kernels other than flash: while fastattn is torch's flash-attention impl
# (fastattn/integrations/torch_flash.py), SDPA's flash backend is fastattn itself.
TORCH_OWN = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def flash_is_fastattn() -> bool:
    """Whether torch.nn.attention.activate_flash_attention_impl("fastattn") is in effect."""
    current = getattr(torch.nn.attention, "current_flash_attention_impl", None)
    return current is not None and current() == "fastattn"


def unavailable() -> str | None:
    return None


def unsupported(call: AttentionCall | KVCacheCall) -> str | None:
    if call.return_lse:
        return "return_lse=True: PyTorch SDPA does not return the log-sum-exp"
    mods = call.mods
    if mods is not None and (mods.softcap or mods.sinks is not None):
        return "softcap and sinks cannot be expressed as an SDPA mask (backend 'triton' or 'reference' runs them)"
    return None


def run(call: AttentionCall):
    if call.q.is_cuda and flash_is_fastattn():  # "torch" stays PyTorch's kernels (and never calls back here)
        with sdpa_kernel(TORCH_OWN):
            return _run(call)
    return _run(call)


def _run(call: AttentionCall):
    if call.varlen:
        return call.per_sequence(_run)
    b, sq, sk = call.shape.batch, call.shape.seqlen_q, call.shape.seqlen_k
    q, k, v = call.q, call.k, call.v
    skipped = 0
    if call.causal and sq > sk:
        # Bottom-right causal: the first Sq - Sk queries see no key and return 0 (SDPA would give NaN).
        skipped, q = sq - sk, q[:, sq - sk:]
    if sk == 0 or q.shape[1] == 0:
        # Empty: zeros that stay attached to the autograd graph (bias and sinks included).
        mods = {} if call.mods is None else call.mods.reference_kwargs()
        return reference.attention(call.q, call.k, call.v, causal=call.causal, scale=call.scale,
                                   key_padding_mask=call.key_padding_mask, **mods)
    # (B, S, H, D) -> (B, H, S, D), SDPA's layout.
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = call.shape.heads_q != call.shape.heads_kv
    if call.key_padding_mask is not None or call.mods is not None:
        out = _with_mask(qt, kt, vt, call, gqa, skipped)
    elif call.causal and q.shape[1] != sk:
        mask = causal_lower_right(q.shape[1], sk)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=call.scale, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=call.causal, scale=call.scale, enable_gqa=gqa)
    if call.key_padding_mask is None and call.mods is None:  # every row sees a key here
        out = _keep_nan(out, qt)
    out = out.transpose(1, 2)  # back to (B, S, H, D)
    if skipped:
        out = torch.cat([out.new_zeros(b, skipped, *out.shape[2:]), out], dim=1)
    return out


def _with_mask(qt, kt, vt, call: AttentionCall, gqa: bool, skipped: int) -> torch.Tensor:
    """SDPA with key_padding_mask, the bottom-right causal mask and the window as a boolean attn_mask,
    or, with a bias or ALiBi, a float one: (B, H, Sq, D) -> (B, H, Sq, D). SDPA returns NaN for a
    query that sees no key, and NaN gradients through it; such rows get every key un-masked (finite
    values) and are then zeroed, so they return 0 with zero gradients, as the kernels do. `skipped`:
    the leading queries (of a causal Sq > Sk call) already cut off, which the bias still counts."""
    sq, sk = qt.shape[2] + skipped, kt.shape[2]
    mods = call.mods
    window = mods.window if mods is not None and mods.local else None
    visible = reference.visible_keys(sq, sk, causal=call.causal, key_padding_mask=call.key_padding_mask,
                                     device=qt.device, window=window)[:, :, skipped:]  # (B, 1, Sq, Sk)
    additive = None if mods is None else mods.additive_mask(sq, sk, qt.dtype)
    if additive is not None:
        additive = additive[:, :, skipped:] if additive.shape[2] > 1 else additive
        visible = visible & (additive != float("-inf"))  # a bias of -inf hides a key too
    if call.key_padding_mask is not None:  # padded keys are never read (SDPA would mix their NaN into rows)
        padded = ~call.key_padding_mask[:, None, :, None]  # (B, 1, Sk, 1)
        kt, vt = kt.masked_fill(padded, 0.0), vt.masked_fill(padded, 0.0)
    empty = ~visible.any(dim=-1, keepdim=True)  # (B, 1 or H, Sq or 1, 1)
    mask = visible | empty
    if additive is not None:
        mask = additive.masked_fill(~mask, float("-inf")).masked_fill(empty, 0.0)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=call.scale, enable_gqa=gqa)
    return _keep_nan(out, qt).masked_fill(empty, 0.0)


def _keep_nan(out: torch.Tensor, qt: torch.Tensor) -> torch.Tensor:
    """PyTorch's CPU SDPA returns 0 for a query row holding a NaN (its row max is NaN, taken for a row
    without keys); every other path, and the reference, gives NaN there. CPU only: on CUDA the
    "torch" backend is the SDPA users would otherwise call, kept free of extra passes (whether CUDA
    SDPA swallows such rows too is for tests/test_bad_inputs.py to show on a GPU). (B, H, Sq, D)."""
    if qt.is_cuda:
        return out
    return out.masked_fill(qt.isnan().any(dim=-1, keepdim=True), float("nan"))
