"""torch.library ops over the launchers (fastattn::triton_attn_fwd, ...; fake implementations for
torch.compile) and the autograd Functions that differentiate them (fastattn.ops.autograd)."""

from fastattn.kernels.configs import interpreter_enabled  # for the backends, which import no kernel
from fastattn.launchers.decode import grid_rows as decode_grid_rows  # the decode grid's axis 1, for the backend
from fastattn.launchers.triton_attention import MAX_GRID_YZ  # for the backends' grid limit
from fastattn.ops.autograd import padded_attention, varlen_attention
from fastattn.ops.decode import append_kv, kvcache_attention

__all__ = ["MAX_GRID_YZ", "append_kv", "decode_grid_rows", "interpreter_enabled", "kvcache_attention",
           "padded_attention", "varlen_attention"]
