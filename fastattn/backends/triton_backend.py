"""Backend "triton": the Triton kernels (kernels/), through fastattn.ops. Runs on CUDA tensors, and
on CPU tensors through the Triton interpreter when TRITON_INTERPRET=1 was set before triton was
imported (slow; for testing)."""

from __future__ import annotations

import torch

from fastattn.backends.call import AttentionCall, KVCacheCall

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_GRID_YZ = 65535  # heads and batch are CUDA grid axes 1 and 2
SCORE_MODIFIERS = ("bias", "alibi_slopes", "window", "softcap", "sinks")  # the attention() modifiers it runs

# Imported once, eagerly, so that torch.compile never traces an import.
try:
    from fastattn.kernels.configs import interpreter_enabled
    from fastattn.ops import append_kv, kvcache_attention, padded_attention, varlen_attention  # registers the ops

    _IMPORT_ERROR = None
except Exception as e:  # pragma: no cover - depends on the machine
    padded_attention = varlen_attention = kvcache_attention = append_kv = interpreter_enabled = None
    _IMPORT_ERROR = f"triton could not be imported: {type(e).__name__}: {e}"


def interpreter() -> bool:
    """Whether Triton runs kernels through its interpreter (on the CPU)."""
    return _IMPORT_ERROR is None and interpreter_enabled()


def unavailable() -> str | None:
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    if torch.cuda.is_available() or interpreter():
        return None
    return ("no CUDA GPU is visible (set TRITON_INTERPRET=1 before importing triton to run the "
            "Triton kernels on the CPU through the interpreter; slow, meant for testing)")


def unsupported(call: AttentionCall | KVCacheCall) -> str | None:
    if call.q.dtype not in DTYPES:
        return f"dtype {call.q.dtype} is not supported (float16, bfloat16, float32)"
    if call.shape.batch > MAX_GRID_YZ or call.shape.heads_q > MAX_GRID_YZ:
        return f"batch size and head count must be <= {MAX_GRID_YZ} (CUDA grid limit)"
    if not call.q.is_cuda:
        if not interpreter():
            return f"tensors are on {call.q.device}; the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)"
        if call.q.dtype == torch.bfloat16:
            return ("bfloat16 in the Triton interpreter (CPU tensors): its tl.dot multiplies bf16 bit patterns as "
                    "integers (triton-lang/triton#11584), a wrong answer; use float16 or float32 on the CPU, or a GPU")
    return None


unsupported_kvcache = unsupported  # the decode grid's axes 1 and 2 are (KV heads x row tiles) and batch


def unsupported_append(k) -> str | None:
    if k.dtype not in DTYPES:
        return f"dtype {k.dtype} is not supported (float16, bfloat16, float32)"
    if k.shape[0] > MAX_GRID_YZ or k.shape[2] > MAX_GRID_YZ:
        return f"batch size and head count must be <= {MAX_GRID_YZ} (CUDA grid limit)"
    if not k.is_cuda and not interpreter():
        return f"tensors are on {k.device}; the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)"
    return None


def run_kvcache(call: KVCacheCall):
    out, lse = kvcache_attention(call.q, call.k_cache, call.v_cache, call.k, call.v, call.cache_seqlens,
                                 call.block_table, call.causal, call.scale, call.num_splits, call.mods)
    return (out, lse) if call.return_lse else out


def run(call: AttentionCall):
    if call.varlen:
        return varlen_attention(call.q, call.k, call.v, call.cu_seqlens_q, call.cu_seqlens_k, call.max_seqlen_q,
                                call.max_seqlen_k, call.causal, call.scale, call.return_lse, call.mods)
    return padded_attention(call.q, call.k, call.v, call.key_padding_mask, call.causal, call.scale,
                            call.return_lse, "triton", call.mods)
