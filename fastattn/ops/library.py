"""The fastattn:: op namespace: schemas and fake (meta) implementations shared by every kernel
backend, and ``define``, which registers one op.

The ops are plain torch.library ops: a schema, a kernel (the launcher function itself) and a fake
implementation, so torch.compile traces them and torch.library.opcheck checks them. Gradients come
from fastattn.ops.autograd, one autograd.Function per layout around a forward/backward op pair.
Measured on a 2-core CPU: a call through torch.library.custom_op costs ~21 us more than calling its
function, a plain op defined here ~5 us (docs/design.md, "Ops and autograd").
"""

from __future__ import annotations

import torch

from fastattn.launchers.triton_attention import lse_dtype

_lib = torch.library.Library("fastattn", "FRAGMENT")

# Padded batches: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D); out (B, Sq, Hq, D), lse (B, Hq, Sq) float32
# (float64 for fp32 inputs: launchers.triton_attention.lse_dtype; the CUDA kernels take no fp32).
PADDED_FWD = ("(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? kv_bounds, bool causal, "
              "float scale) -> (Tensor, Tensor)")
PADDED_BWD = ("(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, "
              "Tensor? key_padding_mask, Tensor? kv_bounds, bool causal, float scale) -> (Tensor, Tensor, Tensor)")
# The Triton ops add the score modifiers (fastattn/modifiers.py) and their backward also returns
# dbias and dsinks (None unless asked for / given).
MODS = ("Tensor? bias=None, Tensor? alibi_slopes=None, Tensor? sinks=None, int window_left=-1, "
        "int window_right=-1, float softcap=0.0")
TRITON_PADDED_FWD = PADDED_FWD.replace(") ->", f", {MODS}) ->")
TRITON_PADDED_BWD = (PADDED_BWD.replace(") ->", f", {MODS}, bool bias_grad=False) ->")
                     .replace("(Tensor, Tensor, Tensor)", "(Tensor, Tensor, Tensor, Tensor?, Tensor?)"))
# Packed sequences: q (Tq, Hq, D), k/v (Tk, Hkv, D); out (Tq, Hq, D), lse (Hq, Tq) float32. Triton
# only, so with the score modifiers (and dbias, dsinks) as the Triton padded pair.
VARLEN_FWD = ("(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, "
              f"SymInt max_seqlen_k, bool causal, float scale, {MODS}) -> (Tensor, Tensor)")
VARLEN_BWD = ("(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, Tensor cu_seqlens_q, "
              "Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, bool causal, float scale, "
              f"{MODS}, bool bias_grad=False) -> (Tensor, Tensor, Tensor, Tensor?, Tensor?)")


def padded_fwd_fake(q, k, v, key_padding_mask, kv_bounds, causal, scale, *mods):
    b, sq, hq, d = q.shape
    return q.new_empty((b, sq, hq, d)), q.new_empty((b, hq, sq), dtype=lse_dtype(q.dtype))


def varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, *mods):
    tq, hq, d = q.shape
    return q.new_empty((tq, hq, d)), q.new_empty((hq, tq), dtype=lse_dtype(q.dtype))


def bwd_fake(dout, q, k, v, *rest):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _mod_grads_fake(bias, sinks, bias_grad):
    return (bias.new_empty(bias.shape) if bias is not None and bias_grad else None,
            sinks.new_empty(sinks.shape) if sinks is not None else None)


def triton_padded_bwd_fake(dout, q, k, v, out, lse, dlse, key_padding_mask, kv_bounds, causal, scale, bias=None,
                           alibi_slopes=None, sinks=None, window_left=-1, window_right=-1, softcap=0.0,
                           bias_grad=False):
    """bwd_fake plus dbias (bias's shape, with bias_grad) and dsinks (with sinks)."""
    return (*bwd_fake(dout, q, k, v), *_mod_grads_fake(bias, sinks, bias_grad))


def triton_varlen_bwd_fake(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           causal, scale, bias=None, alibi_slopes=None, sinks=None, window_left=-1, window_right=-1,
                           softcap=0.0, bias_grad=False):
    return (*bwd_fake(dout, q, k, v), *_mod_grads_fake(bias, sinks, bias_grad))


def define(name: str, schema: str, kernel, fake):
    """Register fastattn::name (its kernel serves every device: the Triton interpreter runs on the
    CPU) and return the op overload to call. The op itself is not differentiable (autograd falls
    through it): fastattn.ops.autograd differentiates the forward/backward pair."""
    _lib.define(name + schema)
    _lib.impl(name, kernel, "CompositeExplicitAutograd")
    _lib.impl(name, torch.library.fallthrough_kernel, "Autograd")
    torch.library.register_fake(f"fastattn::{name}", fake, lib=_lib)
    return getattr(torch.ops.fastattn, name).default
