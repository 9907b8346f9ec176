"""The cost of padding: one batch three ways through fastattn-triton.

"dense" (every token real), "masked" (key_padding_mask with each sequence's first fill * S keys
real: padded key tiles are skipped, every query still runs) and "varlen" (only the real tokens,
packed; attention cost ~ fill**2). One row per variant and mode with its time and ratio to dense.
"""

from __future__ import annotations

import torch

import fastattn
from benchmarks.common import time_ms
from benchmarks.measure import mode_callable
from fastattn import testing


def padding_cost(batch=8, seqlen=2048, heads=16, head_dim=128, dtype="bfloat16", fill=0.5, *, timer=None,
                 device="cuda", modes=("fwd", "bwd")) -> list[dict]:
    """timer(fn, grad_to_none=...) -> ms; default: benchmarks.common.time_ms on `device`."""
    timer = timer or (lambda fn, grad_to_none=None: time_ms(fn, device=device, grad_to_none=grad_to_none))
    real = int(seqlen * fill)
    q, k, v = testing.random_qkv(batch, seqlen, seqlen, heads, heads, head_dim, dtype=getattr(torch, dtype),
                                 device=device)
    mask = torch.zeros(batch, seqlen, dtype=torch.bool, device=device)
    mask[:, :real] = True
    packed = [fastattn.unpad_input(x, mask) for x in (q, k, v)]  # (B, S, H, D) -> (T, H, D)
    _, _, cu, max_len = packed[0]
    variants = {
        "dense": ((q, k, v), lambda a, b, c: fastattn.attention(a, b, c, backend="triton")),
        "masked": ((q, k, v), lambda a, b, c: fastattn.attention(a, b, c, key_padding_mask=mask, backend="triton")),
        "varlen": (tuple(p[0] for p in packed),
                   lambda a, b, c: fastattn.attention_varlen(a, b, c, cu, cu, max_len, max_len, backend="triton")),
    }
    rows = []
    for name, (inputs, fn) in variants.items():
        for mode in modes:
            call, grad_to_none = mode_callable(fn, *inputs, mode)
            rows.append({"variant": name, "mode": mode, "ms": timer(call, grad_to_none=grad_to_none), "batch": batch,
                         "seqlen": seqlen, "fill": fill, "heads": heads, "head_dim": head_dim, "dtype": dtype})
    for r in rows:
        dense = next(d for d in rows if d["variant"] == "dense" and d["mode"] == r["mode"])
        r["ratio_to_dense"] = r["ms"] / dense["ms"]
    return rows
