"""fastattn as PyTorch's own flash-attention implementation.

PyTorch (2.10+) lets a library replace the kernels behind its private flash-attention ops:
``torch.nn.attention.register_flash_attention_impl(name, register_fn=...)`` records a provider and
``activate_flash_attention_impl(name)`` runs its register function, which implements the aten ops
on a dispatch key with ``torch.library.Library("aten", "IMPL", key)``. ``import fastattn`` registers
"fastattn" (never activates it: torch asks providers not to; ``FASTATTN_ACTIVATE_SDPA=1`` does).
After ``torch.nn.attention.activate_flash_attention_impl("fastattn")`` unmodified code runs on
fastattn's kernels wherever it reaches those ops:

- ``F.scaled_dot_product_attention`` calls that SDPA's own selection sends to its flash backend
  (``aten::_scaled_dot_product_flash_attention`` and its backward; CUDA),
- ``torch.nn.attention.varlen.varlen_attn`` / ``varlen_attn_out`` (``aten::_flash_attention_forward``,
  ``_flash_attention_forward_no_dropout_inplace``, ``_flash_attention_backward``; CUDA and CPU:
  stock torch has no CPU kernel for them, so the CPU registration only adds one),
- anything else that calls those ops (PyTorch's context parallelism calls the SDPA one per chunk).

Conventions are aten's (FlashAttention 2's): dense (B, S, H, D) or, with cum_seq_q/k, packed
(T, H, D); causal bottom-right; window_size_left/right with -1 unbounded; lse float32 natural log,
(B, H, Sq) dense / (H, Tq) packed, +inf for a row that sees no key (FlashAttention 2's value; its
output row is 0); seqused_k limits each sequence's keys (with block_table: a paged KV cache, vLLM's
layout) through fastattn's decode kernel. Every argument is honoured or refused with a
RuntimeError naming it: dropout_p > 0, return_debug_mask, alibi_slopes when a gradient is wanted
(the backward op has no alibi argument; seen in eager autograd only: under torch.compile or
torch.func.grad the forward runs without grad mode and the gradient ignores alibi_slopes,
seqused_k and block_table, as aten's own backward does), seqused_k with packed keys and no
block_table. num_splits
is FlashAttention's split-KV hint: the decode path uses it; the prefill kernels never split, which
is num_splits=1's batch invariance.

The ops run on CUDA in the Triton kernels (backend "triton", never "auto": SDPA there would be this
impl again) and on CPU through the Triton interpreter when it is on, else fastattn.reference.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch

from fastattn import flash_api, validation
from fastattn.backends import sdpa_backend, triton_backend

NAME = "fastattn"
ACTIVATE_ENV = "FASTATTN_ACTIVATE_SDPA"

# The aten ops implemented, with torch 2.13's schemas. An installed torch whose op has an argument
# not listed here (or another type, or other returns) is refused at activation: the ops are private
# and change between releases. Arguments missing from an older torch are fine (they default here).
SCHEMAS = {
    "_flash_attention_forward": (
        "aten::_flash_attention_forward(Tensor query, Tensor key, Tensor value, Tensor? cum_seq_q, Tensor? cum_seq_k, "
        "SymInt max_q, SymInt max_k, float dropout_p, bool is_causal, bool return_debug_mask, *, float? scale=None, "
        "SymInt? window_size_left=None, SymInt? window_size_right=None, Tensor? seqused_k=None, "
        "Tensor? alibi_slopes=None, Tensor? block_table=None, int? num_splits=None) "
        "-> (Tensor output, Tensor softmax_logsumexp, Tensor rng_state, Tensor unused, Tensor debug_attn_mask)"),
    "_flash_attention_forward_no_dropout_inplace": (
        "aten::_flash_attention_forward_no_dropout_inplace(Tensor(a!) out, Tensor query, Tensor key, Tensor value, "
        "Tensor? cum_seq_q, Tensor? cum_seq_k, SymInt max_q, SymInt max_k, float dropout_p, bool is_causal, "
        "bool return_debug_mask, *, float? scale=None, SymInt? window_size_left=None, "
        "SymInt? window_size_right=None, Tensor? seqused_k=None, Tensor? alibi_slopes=None, "
        "Tensor? block_table=None, int? num_splits=None) -> Tensor softmax_logsumexp"),
    "_flash_attention_backward": (
        "aten::_flash_attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
        "Tensor logsumexp, Tensor cum_seq_q, Tensor cum_seq_k, SymInt max_q, SymInt max_k, float dropout_p, "
        "bool is_causal, Tensor rng_state, Tensor unused, *, float? scale=None, SymInt? window_size_left=None, "
        "SymInt? window_size_right=None) -> (Tensor, Tensor, Tensor)"),
    "_scaled_dot_product_flash_attention": (
        "aten::_scaled_dot_product_flash_attention(Tensor query, Tensor key, Tensor value, float dropout_p=0., "
        "bool is_causal=False, bool return_debug_mask=False, *, float? scale=None) -> (Tensor output, "
        "Tensor logsumexp, Tensor cum_seq_q, Tensor cum_seq_k, SymInt max_q, SymInt max_k, Tensor rng_state, "
        "Tensor unused, Tensor debug_attn_mask)"),
    "_scaled_dot_product_flash_attention_backward": (
        "aten::_scaled_dot_product_flash_attention_backward(Tensor grad_out, Tensor query, Tensor key, "
        "Tensor value, Tensor out, Tensor logsumexp, Tensor cum_seq_q, Tensor cum_seq_k, SymInt max_q, "
        "SymInt max_k, float dropout_p, bool is_causal, Tensor philox_seed, Tensor philox_offset, *, "
        "float? scale=None) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value)"),
}
# Where each op is implemented: SDPA's flash ops only on CUDA (CPU SDPA has its own op); the
# varlen ops on CPU too (no CPU kernel in stock torch: additive).
CPU_OPS = ("_flash_attention_forward", "_flash_attention_forward_no_dropout_inplace", "_flash_attention_backward")


# ---------------------------------------------------------------- registration with torch


def hook_missing() -> str | None:
    """None when this torch can take a flash-attention impl, else why not."""
    if not hasattr(torch.nn.attention, "register_flash_attention_impl"):
        return (f"torch {torch.__version__} has no torch.nn.attention.register_flash_attention_impl "
                "(PyTorch 2.10+ has it)")
    return None


def register() -> bool:
    """Make "fastattn" one of torch's flash-attention impls (without activating it). False where
    torch has no hook. Called by ``import fastattn``."""
    if hook_missing():
        return False
    torch.nn.attention.register_flash_attention_impl(NAME, register_fn=_activate)
    return True


def active() -> bool:
    """Whether fastattn is torch's active flash-attention impl (SDPA's flash backend is fastattn)."""
    return sdpa_backend.flash_is_fastattn()


def schema_mismatch(name: str) -> str | None:
    """None if the installed aten::name has only arguments this module implements (same types)
    and the same returns, else what differs."""
    op = getattr(torch.ops.aten, name, None)
    if op is None:
        return f"aten::{name} does not exist in torch {torch.__version__}"
    installed, known = op.default._schema, torch._C.parse_schema(SCHEMAS[name])
    known_args = {a.name: str(a.type) for a in known.arguments}
    for a in installed.arguments:
        if known_args.get(a.name) != str(a.type):
            return f"aten::{name} has argument '{a.type} {a.name}', which fastattn does not implement"
    if [str(r.type) for r in installed.returns] != [str(r.type) for r in known.returns]:
        return f"aten::{name} returns {installed.returns}, fastattn implements {known.returns}"
    return None


def present_ops() -> tuple[str, ...]:
    """The aten flash-attention ops this torch has, of those fastattn implements."""
    return tuple(name for name in SCHEMAS if hasattr(torch.ops.aten, name))


@dataclass
class _Handle:
    """What activation registered: remove() puts aten's own kernels back."""

    libraries: list

    def remove(self) -> None:
        for lib in self.libraries:
            lib._destroy()
        self.libraries = []


def _activate() -> _Handle:
    """torch's register_fn: implement the aten ops on CUDA (and the varlen ones on CPU). An op this
    torch does not have is left out (torch 2.11 has no _flash_attention_forward_no_dropout_inplace:
    nothing can call it); one whose schema differs from what fastattn implements refuses activation."""
    present = present_ops()
    for name in present:
        problem = schema_mismatch(name)
        if problem:
            raise RuntimeError(f"fastattn cannot replace PyTorch's flash attention: {problem}")
    impls = {"_flash_attention_forward": flash_forward,
             "_flash_attention_forward_no_dropout_inplace": flash_forward_inplace,
             "_flash_attention_backward": flash_backward,
             "_scaled_dot_product_flash_attention": sdpa_flash_forward,
             "_scaled_dot_product_flash_attention_backward": sdpa_flash_backward}
    libraries = []
    for key, names in (("CUDA", present), ("CPU", CPU_OPS)):
        lib = torch.library.Library("aten", "IMPL", key)
        for name in names:
            if name in present:
                lib.impl(name, impls[name], key)
        libraries.append(lib)
    return _Handle(libraries)


def activate_if_asked() -> None:
    """``FASTATTN_ACTIVATE_SDPA=1``: activate at import (the user's opt-in)."""
    if os.environ.get(ACTIVATE_ENV, "0") == "1" and not hook_missing():
        torch.nn.attention.activate_flash_attention_impl(NAME)


# ---------------------------------------------------------------- the ops


def _backend(x: torch.Tensor) -> str:
    """The Triton kernels on CUDA (or the interpreter on CPU), else the reference. Never "auto" or
    "torch": SDPA's flash backend may be this impl itself."""
    # (bf16 on the CPU: the interpreter's dot is wrong for it, so the reference.)
    return "triton" if x.is_cuda or (triton_backend.interpreter() and x.dtype != torch.bfloat16) else "reference"


def _refused(what: str, why: str) -> RuntimeError:
    return RuntimeError(f"fastattn's flash-attention impl (torch.nn.attention, \"{NAME}\"): {what}: {why}")


def _window(left, right, seqlen_k=None) -> tuple[int, int]:
    """aten's window sizes (None or -1: unbounded) -> FlashAttention's window_size. seqlen_k: a side
    >= it is unbounded, as aten's kernels read it in the backward as in the forward (flash_api does
    the same for the forward: with Sq > 2 Sk the right side would otherwise hide keys from the first rows)."""
    window = (-1 if left is None else int(left), -1 if right is None else int(right))
    return flash_api.sides_past_keys_unbounded(window, seqlen_k)


def _aux(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rng_state (2,) uint64, unused () uint64, debug mask (0,): what aten returns without dropout."""
    return (torch.zeros(2, dtype=torch.uint64, device=q.device), torch.zeros((), dtype=torch.uint64, device=q.device),
            torch.empty(0, dtype=q.dtype, device=q.device))


def _check_common(dropout_p, return_debug_mask=False) -> None:
    if dropout_p:
        raise _refused(f"dropout_p={dropout_p}", "fastattn's kernels have no dropout (torch's FA3/FA4 impls refuse it "
                       "too); use dropout_p=0 or restore_flash_attention_impl()")
    if return_debug_mask:
        raise _refused("return_debug_mask=True", "fastattn makes no debug attention mask")


def _forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, scale,
             window_size_left, window_size_right, seqused_k, alibi_slopes, block_table, num_splits, out=None):
    """out, lse of one forward op, in aten's conventions (module docstring)."""
    _check_common(dropout_p, return_debug_mask)
    # aten::_flash_attention_backward takes none of these: its gradient would ignore them.
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        if alibi_slopes is not None:
            raise _refused("alibi_slopes with inputs that require grad", "aten::_flash_attention_backward has no "
                           "alibi_slopes argument, so the gradient would ignore them (inference only)")
        if seqused_k is not None or block_table is not None:
            raise _refused("seqused_k / block_table with inputs that require grad", "aten::_flash_attention_backward "
                           "has neither, so the gradient would see every key (inference only)")
    window = _window(window_size_left, window_size_right)
    q, k, v = query.detach(), key.detach(), value.detach()  # below autograd: aten differentiates this op
    backend = _backend(q)
    try:
        with torch.no_grad():
            if seqused_k is not None or block_table is not None:
                o, lse = _cached_keys(q, k, v, cum_seq_q, max_q, is_causal, scale, window, seqused_k, alibi_slopes,
                                      block_table, num_splits, backend)
            elif cum_seq_q is None:
                o, lse, _ = flash_api.flash_attn_func(q, k, v, 0.0, scale, is_causal, window, 0.0, alibi_slopes,
                                                      return_attn_probs=True, backend=backend)
            else:
                if cum_seq_k is None:
                    raise _refused("cum_seq_k=None with cum_seq_q", "packed keys need their cumulative lengths")
                o, lse, _ = flash_api.flash_attn_varlen_func(q, k, v, cum_seq_q, cum_seq_k, max_q, max_k, 0.0, scale,
                                                             is_causal, window, 0.0, alibi_slopes,
                                                             return_attn_probs=True, backend=backend)
    except (ValueError, TypeError) as e:
        raise _refused("bad arguments", str(e)) from e
    lse = lse.nan_to_num_(nan=math.nan, posinf=math.inf, neginf=math.inf)  # FA2's lse of a keyless row: one pass
    if out is not None:
        out.copy_(o)
        o = out
    return _strided_like(o, query), lse


def _strided_like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """x laid out as torch.empty_like(ref): aten's flash ops (FlashAttention 2's) allocate their
    outputs and gradients so, their fake kernels say so, and torch.compile asserts it at run time.
    The kernels write contiguous (B, S, H, D); a query made by transposing (B, H, S, D), as SDPA's
    is, costs one copy."""
    if x.stride() == ref.stride() or not ref.numel():
        return x
    y = torch.empty_like(ref)
    if y.stride() == x.stride():  # ref not dense (expanded, overlapping): empty_like is contiguous too
        return x
    return y.copy_(x)


def _cached_keys(q, k, v, cum_seq_q, max_q, causal, scale, window, seqused_k, alibi_slopes, block_table, num_splits,
                 backend):
    """seqused_k (and block_table: a paged cache) through fastattn's decode path: dense q (B, Sq, H, D),
    or packed q with one query per sequence (max_q == 1 and Tq == B)."""
    if seqused_k is None:
        raise _refused("block_table without seqused_k", "a paged KV cache needs each sequence's length")
    packed = cum_seq_q is not None
    if packed:
        if not (max_q == 1 and q.shape[0] == seqused_k.shape[0]):
            raise NotImplementedError(
                f"fastattn's flash-attention impl: seqused_k{' + block_table' if block_table is not None else ''} "
                f"with packed queries runs one query per sequence (max_q == 1, {seqused_k.shape[0]} queries), got "
                f"max_q={max_q} and {q.shape[0]} queries; a paged varlen prefill kernel does not exist yet")
        if block_table is None:
            raise NotImplementedError("fastattn's flash-attention impl: seqused_k with packed keys and no "
                                      "block_table is not supported (pass a block_table, or dense keys)")
        q = q[:, None]  # (B, H, D) -> (B, 1, H, D)
    o, lse = flash_api.flash_attn_with_kvcache(q, k, v, cache_seqlens=seqused_k, block_table=block_table,
                                               softmax_scale=scale, causal=causal, window_size=window,
                                               alibi_slopes=alibi_slopes, num_splits=num_splits or 0,
                                               return_softmax_lse=True, backend=backend)
    if packed:
        return o[:, 0], lse[:, :, 0].t().contiguous()  # (B, 1, H, D) -> (B, H, D); lse (B, H, 1) -> (H, B)
    return o, lse


def _backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
              scale, window_size_left, window_size_right):
    """dq, dk, dv from the forward's out and lse (the kernels' backward: P recomputed from lse)."""
    _check_common(dropout_p)
    window = _window(window_size_left, window_size_right, key.shape[1] if cum_seq_q is None else max_k)
    if _backend(query) == "reference":
        grads = _recomputed_grads(grad_out, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, is_causal, scale,
                                  window)
        return tuple(_strided_like(g, x) for g, x in zip(grads, (query, key, value)))
    lse = logsumexp.nan_to_num(nan=math.nan, posinf=-math.inf, neginf=-math.inf)  # back to fastattn's -inf
    try:
        if cum_seq_q is None:
            shape = validation.validate_qkv(query, key, value)
        else:
            shape = validation.validate_varlen(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k)
        scale = validation.validate_scale(scale, shape.head_dim)
        mods = validation.validate_mods(None, None, None if window == (-1, -1) else window, None, None, shape, query,
                                        is_causal)
    except (ValueError, TypeError) as e:
        raise _refused("bad arguments", str(e)) from e
    left, right = (-1, -1) if mods is None else mods.window
    from fastattn.ops import triton_attention as triton_ops  # the kernels' backward ops (imports Triton)

    if cum_seq_q is None:
        dq, dk, dv, _, _ = triton_ops.triton_attn_bwd(grad_out, query, key, value, out, lse, None, None, None,
                                                      is_causal, scale, window_left=left, window_right=right)
    else:
        dq, dk, dv, _, _ = triton_ops.triton_attn_varlen_bwd(grad_out, query, key, value, out, lse, None, cum_seq_q,
                                                             cum_seq_k, max_q, max_k, is_causal, scale,
                                                             window_left=left, window_right=right)
    return _strided_like(dq, query), _strided_like(dk, key), _strided_like(dv, value)


@contextlib.contextmanager
def _autograd_dispatch():
    """Autograd inside an aten kernel: the dispatcher runs kernels with the autograd keys excluded,
    so a recompute would record nothing; this puts them back for the block."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
                torch._C.DispatchKey.ADInplaceOrView):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def _recomputed_grads(grad_out, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, is_causal, scale, window):
    """The reference backend's gradients (no kernel on this device): the forward again, differentiated."""
    q, k, v = (x.detach().requires_grad_(True) for x in (query, key, value))
    with _autograd_dispatch():
        if cum_seq_q is None:
            o = flash_api.flash_attn_func(q, k, v, 0.0, scale, is_causal, window, backend="reference")
        else:
            o = flash_api.flash_attn_varlen_func(q, k, v, cum_seq_q, cum_seq_k, max_q, max_k, 0.0, scale, is_causal,
                                                 window, backend="reference")
        return torch.autograd.grad(o, (q, k, v), grad_out)


def flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, *,
                  scale=None, window_size_left=None, window_size_right=None, seqused_k=None, alibi_slopes=None,
                  block_table=None, num_splits=None):
    """aten::_flash_attention_forward -> (out, lse, rng_state, unused, debug_attn_mask)."""
    out, lse = _forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                        return_debug_mask, scale, window_size_left, window_size_right, seqused_k, alibi_slopes,
                        block_table, num_splits)
    return (out, lse, *_aux(query))


def flash_forward_inplace(out, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                          return_debug_mask, *, scale=None, window_size_left=None, window_size_right=None,
                          seqused_k=None, alibi_slopes=None, block_table=None, num_splits=None):
    """aten::_flash_attention_forward_no_dropout_inplace: writes out (a copy of the kernel's output) -> lse."""
    return _forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask,
                    scale, window_size_left, window_size_right, seqused_k, alibi_slopes, block_table, num_splits,
                    out=out)[1]


def flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                   is_causal, rng_state, unused, *, scale=None, window_size_left=None, window_size_right=None):
    """aten::_flash_attention_backward -> (dq, dk, dv)."""
    return _backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                     is_causal, scale, window_size_left, window_size_right)


def _heads_second(*xs):
    return tuple(x.transpose(1, 2) for x in xs)  # (B, H, S, D) <-> (B, S, H, D): views, no copies


def sdpa_flash_forward(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
    """aten::_scaled_dot_product_flash_attention on (B, H, S, D) -> (out (B, H, Sq, D), lse (B, H, Sq),
    None, None, Sq, Sk, rng_state, unused, debug_attn_mask). Causal is FlashAttention 2's
    (bottom-right, as aten's own kernel; SDPA sends causal calls here only when Sq == Sk)."""
    q, k, v = _heads_second(query, key, value)
    out, lse = _forward(q, k, v, None, None, q.shape[1], k.shape[1], dropout_p, is_causal, return_debug_mask, scale,
                        None, None, None, None, None, None)
    return (out.transpose(1, 2), lse, None, None, query.shape[2], key.shape[2], *_aux(query))


def sdpa_flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                        is_causal, philox_seed, philox_offset, *, scale=None):
    """aten::_scaled_dot_product_flash_attention_backward on (B, H, S, D) -> (dq, dk, dv)."""
    dq, dk, dv = _backward(*_heads_second(grad_out, query, key, value, out), logsumexp, None, None, max_q, max_k,
                           dropout_p, is_causal, scale, None, None)
    return _heads_second(dq, dk, dv)
