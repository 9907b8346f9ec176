"""Packed documents across ranks: which rows of each ring step's block belong to which document.

The packed token stream (the documents concatenated, FlashAttention's varlen layout) is sharded
like one long sequence (zig-zag, padded at its end). A token attends only within its document, so
each ring step's block is a varlen call whose sequences are the pieces of the documents that the
block's queries and keys hold: document d contributes its queries among the block's query rows and
its keys among the block's key rows (either may be empty). Rows keep their order in both shards and
documents are contiguous, so the pieces are consecutive: cumulative counts give the block's
cu_seqlens. The padding at the stream's end is one more document, seen only by itself.

Causal blocks (layout.zigzag_block) are either the diagonal, where each document's query and key
pieces are the same positions (causal within each, as one device computes it), or blocks whose keys
all precede their queries (no mask). The plans are computed on the host from the global
cu_seqlens, once per distinct (cu_seqlens, rank, world) and cached.
"""

from __future__ import annotations

import functools

import torch

from fastattn.distributed.blocks import VarlenStep
from fastattn.distributed.layout import padded_length, zigzag_block, zigzag_positions

_CACHED_PLANS = 64


def host_lengths(cu_seqlens: torch.Tensor, name: str) -> tuple[int, ...]:
    """cu_seqlens (B + 1,) int32/int64, on any device, -> a tuple on the host (a device sync for a
    CUDA tensor; pass a CPU tensor to avoid it), checked: starts at 0, non-decreasing."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32,
                                                                                                      torch.int64):
        raise ValueError(f"{name} must be a 1-D int32 or int64 tensor (B + 1 cumulative lengths)")
    cu = tuple(cu_seqlens.tolist())
    if len(cu) < 2 or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"{name} must start at 0 and be non-decreasing with at least 2 entries, got {list(cu)[:8]}")
    return cu


@functools.lru_cache(maxsize=_CACHED_PLANS)
def step_plans(cu_q: tuple[int, ...], cu_k: tuple[int, ...], causal: bool, rank: int, world: int,
               device: torch.device) -> tuple[VarlenStep, ...]:
    """One VarlenStep per ring step: the cu_seqlens of the block rank `rank` computes at step s with
    the K/V of rank (rank - s) mod world, over the block's rows (zigzag_block's slices)."""
    pos_q = zigzag_positions(cu_q[-1], world, rank)
    half = pos_q.shape[0] // 2
    plans = []
    for step in range(world):
        src = (rank - step) % world
        rows, keys, _ = zigzag_block(causal, rank, src, half)
        counts_q = _doc_counts(pos_q[rows], cu_q, world)
        counts_k = _doc_counts(zigzag_positions(cu_k[-1], world, src)[keys], cu_k, world)
        cu = [torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(device=device, dtype=torch.int32)
              for counts in (counts_q, counts_k)]
        plans.append(VarlenStep(cu[0], cu[1], int(counts_q.max()), int(counts_k.max())))
    return tuple(plans)


def _doc_counts(positions: torch.Tensor, cu: tuple[int, ...], world: int) -> torch.Tensor:
    """(B + 1,) tokens of each document (the last: the padding) among `positions` (increasing)."""
    bounds = torch.tensor(cu + (padded_length(cu[-1], world),))
    doc = torch.searchsorted(bounds, positions, right=True) - 1  # position p is in doc d: cu[d] <= p < cu[d+1]
    return torch.bincount(doc, minlength=len(cu))
