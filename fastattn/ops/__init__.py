"""torch.library ops over the launchers (fastattn::triton_attn_fwd, ...; fake implementations for
torch.compile) and the autograd Functions that differentiate them (fastattn.ops.autograd)."""

from fastattn.ops.autograd import padded_attention, varlen_attention

__all__ = ["padded_attention", "varlen_attention"]
