"""Backend "triton": the Triton kernels (kernels/), through fastattn.ops. Runs on CUDA tensors, and
on CPU tensors through the Triton interpreter when TRITON_INTERPRET=1 was set before triton was
imported (slow; for testing)."""

from __future__ import annotations

import torch

from fastattn.backends.call import AppendCall, AttentionCall, KVCacheCall

# Imported once, eagerly, so that torch.compile never traces an import.
try:
    # MAX_GRID_YZ: heads and batch are CUDA grid axes 1 and 2 (decode: KV heads x row tiles, and batch;
    # unsupported() checks the row tiles)
    from fastattn.ops import (
        MAX_GRID_YZ,
        decode_grid_rows,
        interpreter_enabled,
        kvcache_attention,
        padded_attention,
        varlen_attention,
    )
    from fastattn.ops import append_kv as append_op  # registers the ops
    from fastattn.ops.ring_blocks import KernelBlock

    _IMPORT_ERROR = None
except Exception as e:  # pragma: no cover - depends on the machine
    padded_attention = varlen_attention = kvcache_attention = append_op = interpreter_enabled = KernelBlock = None
    decode_grid_rows = None
    MAX_GRID_YZ = 65535
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


def unsupported(kind: str, call: AttentionCall | KVCacheCall | AppendCall) -> str | None:
    """What the table cannot say (dtypes and the grid limit are the table's): the device, bf16 in
    the interpreter (every kind but the append, which has no dot), and the decode grid's axis 1 (KV
    heads x query row tiles: a long chunk of queries over the cache)."""
    if not call.is_cuda:
        if not interpreter():
            return f"tensors are on {call.device}; the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)"
        if call.dtype == torch.bfloat16 and kind != "append":
            return ("bfloat16 in the Triton interpreter (CPU tensors): its tl.dot multiplies bf16 bit patterns as "
                    "integers (triton-lang/triton#11584), a wrong answer; use float16 or float32 on the CPU, or a GPU")
    if kind == "kvcache":
        s = call.shape
        block_r, rows = decode_grid_rows(s.heads_q, s.heads_kv, s.seqlen_q, s.head_dim)
        if rows > MAX_GRID_YZ:
            most = MAX_GRID_YZ // s.heads_kv * block_r // (s.heads_q // s.heads_kv)
            return (f"KV heads x query row tiles ({rows}) must be <= {MAX_GRID_YZ} (CUDA grid limit): "
                    f"pass at most {most} queries per call")
    return None


def append_kv(call: AppendCall) -> None:
    append_op(call.k, call.v, call.k_cache, call.v_cache, call.cache_seqlens, call.block_table)


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


def ring_block():
    return KernelBlock("triton")
