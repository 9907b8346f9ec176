"""Triton attention kernels (installed as ``fastattn.kernels``).

Kernels only: no autograd, no allocation, no validation. ``fastattn.launchers`` allocates outputs,
picks block sizes (``configs``) and launches them; ``fastattn.ops`` wraps the launchers as
torch.library custom ops.

- ``attn_fwd``: FlashAttention-2 forward (writes O and the log-sum-exp).
- ``attn_bwd``: backward (delta preprocess, dK/dV, dQ), deterministic: no atomics.
- ``decode``: split-KV decoding over a KV cache (contiguous or paged), its combine, the KV append.
- ``tiles``: jit helpers shared by all of them: the one definition of a logit (score modifiers),
  of visibility and of the online softmax (update, sink, finalize), tile loads/stores, block ranges.
"""
