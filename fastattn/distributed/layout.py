"""Where each rank's tokens sit: the zig-zag (head-tail) layout, and helpers that shard a sequence
into it and gather it back.

With causal attention, a contiguous split gives the last rank the most work: its queries see every
key. The zig-zag layout cuts the sequence, padded at its end to a multiple of 2 x world_size, into
2 x world_size equal chunks; rank r holds chunks r and 2 x world_size - 1 - r (one from the head,
one from the tail), so every rank has the same number of (query, key) pairs under the causal mask.
Non-causal attention does not care about the order; it uses the same layout, so one set of helpers
serves both.

Padding sits at the end of the sequence. Under the causal mask no real query sees it; without the
mask, pass ``key_padding_mask=shard(mask)`` (padding becomes False) so that real queries skip it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_info(group=None) -> tuple[int, int]:
    """(rank, world size) of this process in `group` (None: the default group)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group() "
                           "first (torchrun sets the environment it reads)")
    return dist.get_rank(group), dist.get_world_size(group)


def padded_length(seqlen: int, world_size: int) -> int:
    """seqlen rounded up to a multiple of 2 x world_size (the zig-zag layout's chunks are equal)."""
    chunks = 2 * world_size
    return -(-seqlen // chunks) * chunks


def zigzag_positions(seqlen: int, world_size: int, rank: int, device=None) -> torch.Tensor:
    """(padded_length / world_size,) int64: the global positions rank `rank` holds, in order; those
    >= seqlen are padding."""
    if not isinstance(seqlen, int) or isinstance(seqlen, bool) or seqlen < 0:
        raise ValueError(f"seqlen must be an int >= 0, got {seqlen!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    chunk = padded_length(seqlen, world_size) // (2 * world_size)
    head = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    tail_start = (2 * world_size - 1 - rank) * chunk
    return torch.cat([head, torch.arange(tail_start, tail_start + chunk, device=device)])


def shard_positions(seqlen: int, *, group=None, device=None) -> torch.Tensor:
    """The global positions (S_local,) int64 of this rank's tokens in a sequence of `seqlen` tokens
    (padding: positions >= seqlen), e.g. for position embeddings or to select labels."""
    rank, world = group_info(group)
    return zigzag_positions(seqlen, world, rank, device)


def zigzag_block(causal: bool, rank: int, src: int, half: int) -> tuple[slice, slice, bool]:
    """(query rows, key rows, causal) of the block that rank `rank` computes with rank `src`'s K/V,
    each holding 2 x `half` tokens in the zig-zag layout (ring.py's module docstring). Without
    causal, the whole shards, unmasked."""
    everything = slice(None)
    if not causal:
        return everything, everything, False
    if src == rank:
        return everything, everything, True
    if src < rank:
        return everything, slice(0, half), False
    return slice(half, None), everything, False


def shard(x: torch.Tensor, *, dim: int = 1, group=None) -> torch.Tensor:
    """This rank's part of `x` along `dim` in the zig-zag layout, padded at the sequence's end with
    zeros (False for a bool mask). x is the whole sequence, the same on every rank.

    Differentiable: the gradient is all-gathered, so x.grad is the whole sequence's gradient on
    every rank (the convention for a replicated input, as Megatron's scatter to sequence parallel)."""
    return _Shard.apply(x, dim, group)


def unshard(x: torch.Tensor, seqlen: int, *, dim: int = 1, group=None) -> torch.Tensor:
    """The inverse of ``shard``: every rank's part gathered (all_gather) into the whole sequence of
    `seqlen` tokens along `dim`, padding dropped. The result is the same on every rank.

    Differentiable: each rank keeps its own part of the gradient (the convention for a replicated
    output: every rank computes the same loss from it)."""
    return _Unshard.apply(x, seqlen, dim, group)


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    rank, world = group_info(group)
    seqlen = x.shape[dim]
    pad = padded_length(seqlen, world) - seqlen
    if pad:
        x = torch.cat([x, x.new_zeros(x.shape[:dim] + (pad,) + x.shape[dim + 1:])], dim=dim)
    return x.index_select(dim, zigzag_positions(seqlen, world, rank, x.device))


def _gather(x: torch.Tensor, seqlen: int, dim: int, group) -> torch.Tensor:
    rank, world = group_info(group)
    if x.shape[dim] * world != padded_length(seqlen, world):
        raise ValueError(f"a shard of {seqlen} tokens over {world} ranks has {padded_length(seqlen, world) // world} "
                         f"along dim {dim}, got {x.shape[dim]}")
    parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    # parts in rank order hold positions cat(zigzag_positions(r)); argsort puts them back in order.
    order = torch.cat([zigzag_positions(seqlen, world, r, x.device) for r in range(world)]).argsort()
    return torch.cat(parts, dim=dim).index_select(dim, order[:seqlen])


class _Shard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group, ctx.seqlen = dim % x.dim(), group, x.shape[dim]
        return _split(x, ctx.dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.seqlen, ctx.dim, ctx.group), None, None


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seqlen, dim, group):
        ctx.dim, ctx.group = dim % x.dim(), group
        return _gather(x, seqlen, ctx.dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.dim, ctx.group), None, None, None
