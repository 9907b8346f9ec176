"""One ring step's attention block on one backend: the forward gives (out, lse) for the block's
keys alone; the backward takes the merged (whole-ring) out and lse, which is what makes the
per-block gradients add up to the single-device ones (FlashAttention's backward recomputes
P = exp(s - lse) with the final lse and uses delta = rowsum(dout * out) of the final out).

    "triton", "cuda": the kernels' launchers (forward returns lse; backward takes out, lse, dlse).
    "torch": PyTorch's CPU flash-attention op, which also returns lse (CPU tensors only; PyTorch has
        no public SDPA that returns it), without return_lse's gradient.
    "reference": fastattn.reference, differentiated again in the backward (recompute): the oracle.

Each block gets `layout`: None, its keys' padding mask (B, Sk) or, for packed documents, a
VarlenStep; then q, k, v are (1, T, H, D) views of the packed (T, H, D) and lse is (1, H, T).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastattn import backends, reference
from fastattn.backends import reference_backend
from fastattn.backends.call import AttentionCall
from fastattn.shape import AttentionShape

RING_BACKENDS = ("triton", "cuda", "torch", "reference")
VARLEN_BACKENDS = ("triton", "reference")


class VarlenStep(NamedTuple):
    """One ring step's block over packed documents (varlen.py): the varlen call's arguments."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
AUTO_CUDA = ("triton", "cuda", "reference")
AUTO_CPU = ("torch", "reference")


class KernelBlock:
    """Backend "triton" or "cuda": their launcher functions, called directly (the ring's own
    autograd.Function differentiates the whole ring)."""

    def __init__(self, name: str):
        from fastattn.launchers import cuda_attention, triton_attention
        from fastattn.launchers.masks import key_bounds

        self.name, self._bounds = name, key_bounds
        self._launch = triton_attention if name == "triton" else cuda_attention

    def forward(self, q, k, v, layout, causal, scale):
        if isinstance(layout, VarlenStep):
            out, lse = self._launch.forward_varlen(q[0], k[0], v[0], *layout, causal, scale)
            return out[None], lse[None]
        bounds = None if layout is None else self._bounds(layout)
        return self._launch.forward(q, k, v, layout, bounds, causal, scale)

    def backward(self, dout, dlse, q, k, v, out, lse, layout, causal, scale):
        if isinstance(layout, VarlenStep):
            dq, dk, dv, *_ = self._launch.backward_varlen(dout[0], q[0], k[0], v[0], out[0], lse[0],
                                                          None if dlse is None else dlse[0], *layout, causal, scale)
            return dq[None], dk[None], dv[None]
        bounds = None if layout is None else self._bounds(layout)
        dq, dk, dv, *_ = self._launch.backward(dout, q, k, v, out, lse, dlse, layout, bounds, causal, scale)
        return dq, dk, dv


class TorchBlock:
    """PyTorch's CPU flash attention (aten::_scaled_dot_product_flash_attention_for_cpu and its
    backward) in its (B, H, S, D) layout. Its causal mask is top-left, which the ring only uses on
    square diagonal blocks, where both alignments agree. A row with no visible key returns lse 0
    there; it is set to -inf here so that the merge gives it no weight."""

    name = "torch"

    @staticmethod
    def _heads_first(q, k, v):
        group = q.shape[2] // k.shape[2]
        # (B, S, H, D) -> (B, H, S, D); GQA: each KV head repeated for its group of query heads.
        return (q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(group, dim=1),
                v.transpose(1, 2).repeat_interleave(group, dim=1))

    @staticmethod
    def _mask(mask, dtype):
        if mask is None:
            return None
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
        return additive[:, None, None, :]  # (B, 1, 1, Sk)

    def forward(self, q, k, v, mask, causal, scale):
        qt, kt, vt = self._heads_first(q, k, v)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qt, kt, vt, 0.0, causal, attn_mask=self._mask(mask, q.dtype), scale=scale)
        if mask is not None:
            # Rows with no real key: none at all, or (causal, square) none at or before the diagonal.
            empty = (mask.cumsum(-1) == 0) if causal else ~mask.any(-1, keepdim=True)  # (B, Sq or 1)
            lse = lse.masked_fill(empty[:, None, :], float("-inf"))
            out = out.masked_fill(empty[:, None, :, None], 0.0)
        return out.transpose(1, 2), lse  # (B, H, S, D) -> (B, S, H, D)

    def backward(self, dout, dlse, q, k, v, out, lse, mask, causal, scale):
        if dlse is not None:
            raise RuntimeError("ring_attention with backend='torch' cannot differentiate lse")
        qt, kt, vt = self._heads_first(q, k, v)
        # A row that sees no key anywhere (lse -inf): +inf makes its P = exp(s - lse) zero, not NaN.
        lse = torch.where(lse == float("-inf"), float("inf"), lse)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.transpose(1, 2), qt, kt, vt, out.transpose(1, 2), lse, 0.0, causal,
            attn_mask=self._mask(mask, q.dtype), scale=scale)
        b, hkv, sk, d = k.shape[0], k.shape[2], k.shape[1], k.shape[3]
        # (B, Hq, Sk, D) -> (B, Hkv, group, Sk, D), summed over each KV head's group, -> (B, Sk, Hkv, D)
        dk, dv = (g.reshape(b, hkv, -1, sk, d).sum(2).transpose(1, 2) for g in (dk, dv))
        return dq.transpose(1, 2), dk, dv


class ReferenceBlock:
    """fastattn.reference. The backward recomputes the block with autograd and feeds it the
    cotangents that the merge passes to it: with w = exp(lse_block - lse), d out_block = w * dout
    and d lse_block = w * (rowsum(dout * (out_block - out)) + dlse)."""

    name = "reference"

    @staticmethod
    def _attention(q, k, v, layout, causal, scale):
        if not isinstance(layout, VarlenStep):
            return reference.attention(q, k, v, causal=causal, scale=scale, key_padding_mask=layout, return_lse=True)
        shape = AttentionShape(layout.cu_seqlens_q.shape[0] - 1, layout.max_seqlen_q, layout.max_seqlen_k,
                               q.shape[2], k.shape[2], q.shape[3])
        call = AttentionCall(q[0], k[0], v[0], shape, causal, scale, None, True, *layout)
        out, lse = reference_backend.run(call)  # each document piece on its own, packed back
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


def choose(backend: str, q, k, v, shape, causal: bool, scale: float, key_padding_mask, return_lse: bool,
           varlen: bool = False):
    """The block implementation for `backend` ("auto": the first of AUTO_CUDA / AUTO_CPU that can
    run the call); ValueError saying why a named backend cannot."""
    call = AttentionCall(q, k, v, shape, causal, scale, key_padding_mask, return_lse)

    def why(name):
        if varlen and name not in VARLEN_BACKENDS:
            return f"packed documents run on {VARLEN_BACKENDS} only"
        if name != "torch":
            return backends.why_not(name, call)
        if q.device.type != "cpu":
            return "PyTorch has no public SDPA that returns the log-sum-exp on CUDA (use 'triton' or 'cuda')"
        if return_lse:
            return "return_lse=True: the CPU op's backward takes no lse gradient"
        return None

    if backend == "auto":
        for name in AUTO_CUDA if q.is_cuda else AUTO_CPU:
            if why(name) is None:
                return _make(name)
        raise AssertionError("the reference supports every valid call")  # pragma: no cover
    if backend not in RING_BACKENDS:
        raise ValueError(f"backend must be one of {RING_BACKENDS + ('auto',)}, got {backend!r}")
    reason = why(backend)
    if reason:
        raise ValueError(f"backend={backend!r} cannot run this ring attention: {reason}")
    return _make(backend)


def _make(name: str):
    if name in ("triton", "cuda"):
        return KernelBlock(name)
    return TorchBlock() if name == "torch" else ReferenceBlock()
