"""The Triton kernels as ops: fastattn::triton_attn_fwd / _bwd over padded batches (B, S, H, D) with
an optional key-padding mask, and fastattn::triton_attn_varlen_fwd / _bwd over packed sequences
(T, H, D) with cu_seqlens, both with the score modifiers. Each op's kernel is the launcher function itself."""

from __future__ import annotations

from fastattn.launchers import triton_attention as launch
from fastattn.ops.library import (
    TRITON_PADDED_BWD,
    TRITON_PADDED_FWD,
    VARLEN_BWD,
    VARLEN_FWD,
    define,
    padded_fwd_fake,
    triton_padded_bwd_fake,
    triton_varlen_bwd_fake,
    varlen_fwd_fake,
)

triton_attn_fwd = define("triton_attn_fwd", TRITON_PADDED_FWD, launch.forward, padded_fwd_fake)
triton_attn_bwd = define("triton_attn_bwd", TRITON_PADDED_BWD, launch.backward, triton_padded_bwd_fake)
triton_attn_varlen_fwd = define("triton_attn_varlen_fwd", VARLEN_FWD, launch.forward_varlen, varlen_fwd_fake)
triton_attn_varlen_bwd = define("triton_attn_varlen_bwd", VARLEN_BWD, launch.backward_varlen, triton_varlen_bwd_fake)
