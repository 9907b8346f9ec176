"""The CUDA C++ kernels (fastattn._C) as custom ops: fastattn::cuda_attn_fwd / _bwd, padded batches
(B, S, H, D) with an optional key-padding mask. Same contract as fastattn::triton_attn_fwd / _bwd.

Registered whether or not fastattn._C is built (fake implementations need no kernel), so that
torch.compile can trace a graph that uses them; calling one without the extension raises.
"""

from __future__ import annotations

import torch

from fastattn.launchers import cuda_attention as launch


@torch.library.custom_op("fastattn::cuda_attn_fwd", mutates_args=())
def cuda_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None, causal: bool,
    scale: float, return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Sq, Hq, D), lse (B, Hq, Sq) float32. return_lse only tells autograd whether the
    caller may back-propagate through lse."""
    return launch.forward(q, k, v, causal, scale, key_padding_mask=key_padding_mask)


@cuda_attn_fwd.register_fake
def _(q, k, v, key_padding_mask, causal, scale, return_lse):
    b, sq, hq, d = q.shape
    return q.new_empty((b, sq, hq, d)), q.new_empty((b, hq, sq), dtype=torch.float32)


@torch.library.custom_op("fastattn::cuda_attn_bwd", mutates_args=())
def cuda_attn_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    dlse: torch.Tensor | None, key_padding_mask: torch.Tensor | None, causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch.backward(dout, q, k, v, out, lse, dlse, causal, scale, key_padding_mask=key_padding_mask)


@cuda_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, key_padding_mask, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, scale, return_lse = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.causal, ctx.scale, ctx.return_lse = causal, scale, return_lse


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = cuda_attn_bwd(
        dout, q, k, v, out, lse, dlse if ctx.return_lse else None, key_padding_mask, ctx.causal, ctx.scale
    )
    return dq, dk, dv, None, None, None, None


cuda_attn_fwd.register_autograd(_backward, setup_context=_setup_context)
