"""The CUDA C++ kernels (fastattn._C) as ops: fastattn::cuda_attn_fwd / _bwd over padded batches
(B, S, H, D) with an optional key-padding mask; same schemas as the Triton pair.

Registered whether or not fastattn._C is built (fake implementations need no kernel), so that
torch.compile can trace a graph that uses them; running one without the extension raises.
"""

from __future__ import annotations

from fastattn.launchers import cuda_attention as launch
from fastattn.ops.library import PADDED_BWD, PADDED_FWD, bwd_fake, define, padded_fwd_fake

cuda_attn_fwd = define("cuda_attn_fwd", PADDED_FWD, launch.forward, padded_fwd_fake)
cuda_attn_bwd = define("cuda_attn_bwd", PADDED_BWD, launch.backward, bwd_fake)

# What the backend layer knows of the extension (it imports no launcher).
IMPORT_ERROR, HEAD_DIMS, MAX_GRID_YZ, MAX_SEQLEN = launch.IMPORT_ERROR, launch.HEAD_DIMS, launch.MAX_GRID_YZ, \
    launch.MAX_SEQLEN
