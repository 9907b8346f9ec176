"""Backend "reference": fastattn.reference, the naive implementation (materialised scores), in
float32 at least (fp16/bf16 inputs are upcast; the output is cast back). Tests call
fastattn.reference itself in each dtype: the tolerance rule's same-precision baseline."""

from __future__ import annotations

import torch

from fastattn import reference
from fastattn.backends.call import AttentionCall, KVCacheCall

SCORE_MODIFIERS = ("bias", "alibi_slopes", "window", "softcap", "sinks")  # the attention() modifiers it runs


def unavailable() -> str | None:
    return None


def unsupported(call: AttentionCall | KVCacheCall) -> str | None:
    return None


def run(call: AttentionCall):
    if call.varlen:
        return call.per_sequence(run)
    mods = {} if call.mods is None else call.mods.reference_kwargs()
    q, k, v = call.q, call.k, call.v
    half = q.dtype in (torch.float16, torch.bfloat16)
    if half:  # scores and softmax statistics in float32, as every kernel keeps them (the lse is float32)
        q, k, v = q.float(), k.float(), v.float()
    result = reference.attention(q, k, v, causal=call.causal, scale=call.scale,
                                 key_padding_mask=call.key_padding_mask, return_lse=call.return_lse, **mods)
    if not half:
        return result
    if call.return_lse:
        return result[0].to(call.q.dtype), result[1]
    return result.to(call.q.dtype)
