"""Triton attention kernels (installed as ``fastattn.kernels``).

Kernels only: no autograd, no allocation, no validation. ``fastattn.launchers`` allocates outputs,
picks block sizes (``configs``) and launches them; ``fastattn.ops`` wraps the launchers as
torch.library custom ops.

- ``attn_fwd``: FlashAttention-2 forward (writes O and the log-sum-exp).
- ``attn_bwd``: backward (delta preprocess, dK/dV, dQ), deterministic: no atomics.
- ``tiles``: jit helpers shared by both (masked tile loads/stores, causal block ranges).
"""
