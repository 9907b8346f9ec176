"""Backend "reference": fastattn.reference, the naive implementation (materialised scores)."""

from __future__ import annotations

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
    return reference.attention(call.q, call.k, call.v, causal=call.causal, scale=call.scale,
                               key_padding_mask=call.key_padding_mask, return_lse=call.return_lse, **mods)
