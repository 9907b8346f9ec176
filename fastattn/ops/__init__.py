"""torch.library custom ops (fake implementations + registered autograd) over the launchers."""

from . import triton_attention  # noqa: F401  (registers fastattn::triton_attn_fwd / _bwd)
