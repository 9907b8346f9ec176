"""The Triton kernels as custom ops:
- fastattn::triton_attn_fwd / _bwd: padded batches (B, S, H, D), optional key-padding mask;
- fastattn::triton_attn_varlen_fwd / _bwd: packed sequences (T, H, D) with cu_seqlens.

The padded pair is defined by fastattn.ops.padded (shared with the CUDA backend).
"""

from __future__ import annotations

import torch

from fastattn.launchers import triton_attention as launch
from fastattn.ops.padded import define_padded_ops

# ---------------------------------------------------------------- padded (B, S, H, D)
triton_attn_fwd, triton_attn_bwd = define_padded_ops("triton", launch)

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
