"""Backend "reference": fastattn.reference, the naive implementation (materialised scores), in
float32 at least (fp16/bf16 inputs are upcast; the output is cast back). Tests call
fastattn.reference itself in each dtype: the tolerance rule's same-precision baseline."""

from __future__ import annotations

import torch

from fastattn import reference
from fastattn.backends.call import AttentionCall, KVCacheCall
from fastattn.shape import AttentionShape


def unavailable() -> str | None:
    return None


def unsupported(kind: str, call: AttentionCall | KVCacheCall) -> str | None:
    return None


def run(call: AttentionCall):
    if call.varlen:
        return call.per_sequence(run)
    mods = {} if call.mods is None else call.mods.reference_kwargs()
    q, k, v = call.q, call.k, call.v
    half = q.dtype in (torch.float16, torch.bfloat16)
    if half:  # scores and softmax statistics in float32, as every kernel keeps them (the lse is float32)
        q, k, v = q.float(), k.float(), v.float()
    result = reference.attention(q, k, v, causal=call.causal, scale=call.scale,
                                 key_padding_mask=call.key_padding_mask, return_lse=call.return_lse, **mods)
    if not half:
        return result
    if call.return_lse:
        return result[0].to(call.q.dtype), result[1]
    return result.to(call.q.dtype)


class ReferenceBlock:
    """fastattn.reference. The backward recomputes the block with autograd and feeds it the
    cotangents that the merge passes to it: with w = exp(lse_block - lse), d out_block = w * dout
    and d lse_block = w * (rowsum(dout * (out_block - out)) + dlse)."""

    name = "reference"

    @staticmethod
    def _attention(q, k, v, layout, causal, scale):
        """Through run(), as the backend's calls: fp16/bf16 computed in float32 (half scores overflow)."""
        if not isinstance(layout, tuple):  # a key padding mask (or None) over (B, S, H, D) blocks
            shape = AttentionShape(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3])
            return run(AttentionCall(q, k, v, shape, causal, scale, layout, True))
        # Packed documents: layout = (cu_seqlens_q, cu_seqlens_k, max_q, max_k), blocks (1, T, H, D).
        cu_q, _, max_q, max_k = layout
        shape = AttentionShape(cu_q.shape[0] - 1, max_q, max_k, q.shape[2], k.shape[2], q.shape[3])
        call = AttentionCall(q[0], k[0], v[0], shape, causal, scale, None, True, *layout)
        out, lse = run(call)  # each document piece on its own, packed back
        return out[None], lse[None]

    def forward(self, q, k, v, layout, causal, scale):
        with torch.no_grad():
            return self._attention(q, k, v, layout, causal, scale)

    def backward(self, dout, dlse, q, k, v, out, lse, layout, causal, scale):
        with torch.enable_grad():
            xs = [x.detach().requires_grad_() for x in (q, k, v)]
            o, l = self._attention(*xs, layout, causal, scale)
            acc = lse.dtype
            w = torch.where(l == float("-inf"), 0.0, torch.exp(l.to(acc) - lse))  # (B, H, S)
            g_lse = (dout.to(acc) * (o.detach().to(acc) - out.to(acc))).sum(-1).transpose(1, 2)  # (B, H, S)
            if dlse is not None:
                g_lse = g_lse + dlse.to(acc)
            g_out = dout.to(acc) * w.transpose(1, 2)[..., None]
            return torch.autograd.grad((o, l), xs, (g_out.to(o.dtype), (w * g_lse).to(l.dtype)))


def ring_block():
    return ReferenceBlock()
