"""One ring-attention block on the kernel backends ("triton", "cuda"): their launcher functions,
called directly, outside autograd (fastattn.distributed's own autograd.Function differentiates the
whole ring). The forward returns (out, lse) for the block's keys alone; the backward takes the
merged (whole-ring) out and lse, which is what makes the per-block gradients add up.

layout: None, the block keys' padding mask (B, Sk), or for packed documents a tuple
(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k); then q, k, v are (1, T, H, D) views of
the packed (T, H, D) and lse is (1, H, T).
"""

from __future__ import annotations

from fastattn.launchers import cuda_attention, triton_attention
from fastattn.launchers.key_bounds import key_bounds


class KernelBlock:
    def __init__(self, name: str):
        self.name = name
        self._launch = triton_attention if name == "triton" else cuda_attention

    def forward(self, q, k, v, layout, causal, scale):
        if isinstance(layout, tuple):
            out, lse = self._launch.forward_varlen(q[0], k[0], v[0], *layout, causal, scale)
            return out[None], lse[None]
        bounds = None if layout is None else key_bounds(layout)
        # lse as the kernels save it (float64 for fp32 inputs): the ring merges it in float64 for fp32
        return self._launch.forward(q, k, v, layout, bounds, causal, scale)

    def backward(self, dout, dlse, q, k, v, out, lse, layout, causal, scale):
        if isinstance(layout, tuple):
            dq, dk, dv, *_ = self._launch.backward_varlen(dout[0], q[0], k[0], v[0], out[0], lse[0],
                                                          None if dlse is None else dlse[0], *layout, causal, scale)
            return dq[None], dk[None], dv[None]
        bounds = None if layout is None else key_bounds(layout)
        dq, dk, dv, *_ = self._launch.backward(dout, q, k, v, out, lse, dlse, layout, bounds, causal, scale)
        return dq, dk, dv
