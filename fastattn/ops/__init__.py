"""torch.library custom ops (fake implementations + registered autograd) over the launchers."""

from . import (
    cuda_attention,  # noqa: F401  (registers fastattn::cuda_attn_fwd / _bwd)
    triton_attention,  # noqa: F401  (registers fastattn::triton_attn_fwd / _bwd)
)
