"""The custom-op pair for padded batches, defined once for every kernel backend:
fastattn::<name>_attn_fwd / _bwd over a launcher module with ``forward`` and ``backward``.

q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), an optional (B, Sk) key-padding mask. Custom ops (not a bare
autograd.Function) so that torch.compile(fullgraph=True) traces through them via the fake
implementations, and torch.library.opcheck can check them.
"""

from __future__ import annotations

import torch


def define_padded_ops(name: str, launch):
    """Register fastattn::{name}_attn_fwd and _bwd (with fakes and autograd); returns (fwd, bwd)."""

    def fwd(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None, causal: bool,
        scale: float, return_lse: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # out (B, Sq, Hq, D), lse (B, Hq, Sq) float32. return_lse only tells autograd whether the
        # caller may back-propagate through lse.
        return launch.forward(q, k, v, causal, scale, key_padding_mask=key_padding_mask)

    def bwd(
        dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
        dlse: torch.Tensor | None, key_padding_mask: torch.Tensor | None, causal: bool, scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return launch.backward(dout, q, k, v, out, lse, dlse, causal, scale, key_padding_mask=key_padding_mask)

    fwd_op = torch.library.custom_op(f"fastattn::{name}_attn_fwd", fwd, mutates_args=())
    bwd_op = torch.library.custom_op(f"fastattn::{name}_attn_bwd", bwd, mutates_args=())

    @fwd_op.register_fake
    def _(q, k, v, key_padding_mask, causal, scale, return_lse):
        b, sq, hq, d = q.shape
        return q.new_empty((b, sq, hq, d)), q.new_empty((b, hq, sq), dtype=torch.float32)

    @bwd_op.register_fake
    def _(dout, q, k, v, out, lse, dlse, key_padding_mask, causal, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def setup_context(ctx, inputs, output):
        q, k, v, key_padding_mask, causal, scale, return_lse = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
        ctx.causal, ctx.scale, ctx.return_lse = causal, scale, return_lse

    def backward(ctx, dout, dlse):
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        dq, dk, dv = bwd_op(
            dout, q, k, v, out, lse, dlse if ctx.return_lse else None, key_padding_mask, ctx.causal, ctx.scale
        )
        return dq, dk, dv, None, None, None, None

    fwd_op.register_autograd(backward, setup_context=setup_context)
    return fwd_op, bwd_op
