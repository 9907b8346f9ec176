"""The Triton kernels as custom ops:
- fastattn::triton_attn_fwd / _bwd: padded batches (B, S, H, D), optional key-padding mask;
- fastattn::triton_attn_varlen_fwd / _bwd: packed sequences (T, H, D) with cu_seqlens.

Custom ops (not a bare autograd.Function) so that torch.compile(fullgraph=True) traces through
them via the fake implementations, and torch.library.opcheck can check them.
"""

from __future__ import annotations

import torch

from fastattn.launchers import triton_attention as launch

# ---------------------------------------------------------------- padded (B, S, H, D)


@torch.library.custom_op("fastattn::triton_attn_fwd", mutates_args=())
def triton_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None, causal: bool,
    scale: float, return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Sq, Hq, D), lse (B, Hq, Sq) float32. return_lse only tells autograd whether the
    caller may back-propagate through lse."""
    return launch.forward(q, k, v, causal, scale, key_padding_mask=key_padding_mask)


@triton_attn_fwd.register_fake
def _(q, k, v, key_padding_mask, causal, scale, return_lse):
    b, sq, hq, d = q.shape
    return q.new_empty((b, sq, hq, d)), q.new_empty((b, hq, sq), dtype=torch.float32)


@torch.library.custom_op("fastattn::triton_attn_bwd", mutates_args=())
def triton_attn_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    dlse: torch.Tensor | None, key_padding_mask: torch.Tensor | None, causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch.backward(dout, q, k, v, out, lse, dlse, causal, scale, key_padding_mask=key_padding_mask)


@triton_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, key_padding_mask, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, scale, return_lse = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.causal, ctx.scale, ctx.return_lse = causal, scale, return_lse


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = triton_attn_bwd(
        dout, q, k, v, out, lse, dlse if ctx.return_lse else None, key_padding_mask, ctx.causal, ctx.scale
    )
    return dq, dk, dv, None, None, None, None


triton_attn_fwd.register_autograd(_backward, setup_context=_setup_context)

# ---------------------------------------------------------------- packed (T, H, D) + cu_seqlens


@torch.library.custom_op("fastattn::triton_attn_varlen_fwd", mutates_args=())
def triton_attn_varlen_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float, return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (Tq, Hq, D), lse (Hq, Tq) float32."""
    return launch.forward(q, k, v, causal, scale, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                          max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)


@triton_attn_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, return_lse):
    tq, hq, d = q.shape
    return q.new_empty((tq, hq, d)), q.new_empty((hq, tq), dtype=torch.float32)


@torch.library.custom_op("fastattn::triton_attn_varlen_bwd", mutates_args=())
def triton_attn_varlen_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    dlse: torch.Tensor | None, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
    max_seqlen_k: int, causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch.backward(dout, q, k, v, out, lse, dlse, causal, scale, cu_seqlens_q=cu_seqlens_q,
                           cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)


@triton_attn_varlen_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, return_lse = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.max_q, ctx.max_k, ctx.causal, ctx.scale, ctx.return_lse = max_q, max_k, causal, scale, return_lse


def _varlen_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = triton_attn_varlen_bwd(
        dout, q, k, v, out, lse, dlse if ctx.return_lse else None, cu_q, cu_k, ctx.max_q, ctx.max_k, ctx.causal,
        ctx.scale,
    )
    return dq, dk, dv, None, None, None, None, None, None, None


triton_attn_varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)
