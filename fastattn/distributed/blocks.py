"""One ring step's attention block, on the backend that backends.choose() picks for the ring: the
forward gives (out, lse) for the block's keys alone; the backward takes the merged (whole-ring) out
and lse, which is what makes the per-block gradients add up to the single-device ones
(FlashAttention's backward recomputes P = exp(s - lse) with the final lse and uses
delta = rowsum(dout * out) of the final out). The blocks themselves live with their backends:

    "triton", "cuda": the kernels' launchers (fastattn.ops.ring_blocks; forward returns lse;
        backward takes out, lse, dlse).
    "torch": PyTorch's CPU flash-attention op, which also returns lse (CPU tensors only; PyTorch has
        no public SDPA that returns it), without return_lse's gradient.
    "reference": fastattn.reference, differentiated again in the backward (recompute): the oracle.

Each block gets `layout`: None, its keys' padding mask (B, Sk) or, for packed documents, a
VarlenStep; then q, k, v are (1, T, H, D) views of the packed (T, H, D) and lse is (1, H, T).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastattn import backends
from fastattn.backends import AttentionCall


class VarlenStep(NamedTuple):
    """One ring step's block over packed documents (varlen.py): the varlen call's arguments."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


def choose(backend: str, q, k, v, shape, causal: bool, scale: float, key_padding_mask, return_lse: bool,
           varlen: bool = False):
    """The block implementation of `backend` (the backends' one choice, kind "ring" or "ring-varlen");
    ValueError saying why a named backend cannot."""
    call = AttentionCall(q, k, v, shape, causal, scale, key_padding_mask, return_lse)
    return backends.ring_block(backends.choose("ring-varlen" if varlen else "ring", call, backend))
