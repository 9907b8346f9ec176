"""The CUDA C++ kernels (fastattn._C) as custom ops: fastattn::cuda_attn_fwd / _bwd, padded batches
(B, S, H, D) with an optional key-padding mask. Same contract as fastattn::triton_attn_fwd / _bwd.

Registered whether or not fastattn._C is built (fake implementations need no kernel), so that
torch.compile can trace a graph that uses them; calling one without the extension raises.
"""

from __future__ import annotations

from fastattn.launchers import cuda_attention as launch
from fastattn.ops.padded import define_padded_ops

cuda_attn_fwd, cuda_attn_bwd = define_padded_ops("cuda", launch)
