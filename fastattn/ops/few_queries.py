"""fastattn::triton_attn_few_queries: attention of a few queries per sequence over dense keys run as
a decode step (launchers.decode.attend_full), as an op. fastattn.ops.autograd calls the launcher
itself in eager mode, and this op under torch.compile or a dispatch mode (a compiled generate() step:
a static cache's one query). Only calls with nothing to record take it, so it has no backward; it
writes nothing in place (no new tokens are appended)."""

from __future__ import annotations

import torch

from fastattn.launchers import decode as launch
from fastattn.ops.library import MODS, define

FEW_QUERIES = ("(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, bool causal, float scale, "
               f"{MODS}) -> (Tensor, Tensor)")


def _fake(q, k, v, key_padding_mask, causal, scale, *mods):
    b, sq, hq, d = q.shape
    return q.new_empty((b, sq, hq, d)), q.new_empty((b, hq, sq), dtype=torch.float32)


triton_attn_few_queries = define("triton_attn_few_queries", FEW_QUERIES, launch.attend_full, _fake)
