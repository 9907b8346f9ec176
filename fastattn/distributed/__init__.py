"""fastattn.distributed: attention over sequences sharded across processes (context parallelism)
on torch.distributed.

    ring_attention         the attention, its K/V shards passed around the ring of ranks
    ring_attention_varlen  the same over packed documents (FlashAttention's varlen layout)
    shard, unshard         a whole sequence -> this rank's part in the zig-zag layout, and back
    shard_positions        the global positions of this rank's tokens
"""

from fastattn.distributed.layout import shard, shard_positions, unshard, zigzag_positions
from fastattn.distributed.ring import ring_attention, ring_attention_varlen

__all__ = ["ring_attention", "ring_attention_varlen", "shard", "shard_positions", "unshard", "zigzag_positions"]
