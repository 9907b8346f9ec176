"""Autograd for the fastattn ops: one torch.autograd.Function per layout (padded, packed), each
around a forward/backward op pair, as FlashAttention does.

In eager mode on plain tensors, the Functions call the launcher functions directly: they are the
ops' kernels, so this is the code the op would run, minus two dispatcher round trips (~10 us each
on the host). Under torch.compile, inside a dispatch mode (FakeTensorMode, a flop counter) or on
tensor subclasses, they call the ops, which those systems can see and trace.

Without anything to record (grad mode off, or no input that requires grad: inference, a generate()
prefill; and no functorch transform or forward-mode AD), the eager shortcut skips the autograd
Function too (~18 us of host time per call) and calls the forward launcher alone. Such a call with
few queries over many keys (launchers.decode.few_queries: a generate() step) runs as a decode step,
eagerly or, under torch.compile, through fastattn::triton_attn_few_queries. Calls that record
enter the Functions through their C++ apply where torch's Python wrapper around it has nothing to
do (_apply: ~4.5-7.5 us per call on a 2-core CPU).

Key bounds of a key-padding mask are computed once in the forward and saved for the backward. The
returned lse is differentiable when asked for (return_lse); when it is not returned, or not used,
the backward gets no dlse (no zeros are made for it).

Score modifiers (a ScoreMods, Triton only) travel as extra arguments: bias and sinks are inputs of
the Functions, so they get gradients; the kernels compute dbias only when bias needs one.
"""

from __future__ import annotations

import torch
from torch.autograd import forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode

from fastattn.first_order import first_order
from fastattn.launchers import cuda_attention as cuda_launch
from fastattn.launchers import decode as decode_launch
from fastattn.launchers import triton_attention as triton_launch
from fastattn.launchers.key_bounds import key_bounds, key_bounds_torch
from fastattn.launchers.score_mods import Mods
from fastattn.ops import cuda_attention, triton_attention
from fastattn.ops.few_queries import triton_attn_few_queries

# backend -> (forward, backward) for padded batches: (launcher functions, ops).
_PADDED_LAUNCH = {"triton": (triton_launch.forward, triton_launch.backward),
                  "cuda": (cuda_launch.forward, cuda_launch.backward)}
_PADDED_OPS = {"triton": (triton_attention.triton_attn_fwd, triton_attention.triton_attn_bwd),
               "cuda": (cuda_attention.cuda_attn_fwd, cuda_attention.cuda_attn_bwd)}
_VARLEN_LAUNCH = (triton_launch.forward_varlen, triton_launch.backward_varlen)
_VARLEN_OPS = (triton_attention.triton_attn_varlen_fwd, triton_attention.triton_attn_varlen_bwd)


def padded_attention(q, k, v, key_padding_mask, causal: bool, scale: float, return_lse: bool, backend: str,
                     mods=None):
    """out [, lse] of padded attention through backend "triton" or "cuda", differentiable; mods: a
    fastattn.modifiers.ScoreMods (Triton) or None."""
    if torch.compiler.is_compiling():
        q, k, v = _distinct(q, k, v)
    bias, sinks, alibi = (None, None, None) if mods is None else (mods.bias, mods.sinks, mods.alibi_slopes)
    tensors = (q, k, v, key_padding_mask, bias, sinks, alibi)
    if not _records(q, k, v, bias, sinks) and (torch.compiler.is_compiling() or _unwrapped(tensors)):
        direct = _direct(q, k, v, key_padding_mask, bias)
        if backend == "triton" and decode_launch.few_queries(q, k, v):  # as a decode step (lse: float32)
            few = decode_launch.attend_full if direct else triton_attn_few_queries
            out, lse = few(q, k, v, key_padding_mask, causal, scale, *_launch_mods(mods))
            return (out, lse) if return_lse else out
        if direct:
            out, lse, _ = _padded_forward(q, k, v, key_padding_mask, causal, scale, backend, _launch_mods(mods), True)
            return _returned(out, lse, return_lse)
    if mods is None:
        return _apply(PaddedAttention, tensors, q, k, v, key_padding_mask, causal, scale, return_lse, backend)
    return _apply(PaddedAttention, tensors, q, k, v, key_padding_mask, causal, scale, return_lse, backend, bias, sinks,
                  alibi, *mods.window, mods.softcap)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                     scale: float, return_lse: bool, mods=None):
    """out [, lse] of packed-sequence attention (Triton), differentiable."""
    if torch.compiler.is_compiling():
        q, k, v, cu_seqlens_q, cu_seqlens_k = _distinct(q, k, v, cu_seqlens_q, cu_seqlens_k)
    bias, sinks, alibi = (None, None, None) if mods is None else (mods.bias, mods.sinks, mods.alibi_slopes)
    tensors = (q, k, v, cu_seqlens_q, cu_seqlens_k, bias, sinks, alibi)
    if (not _records(q, k, v, bias, sinks) and _direct(q, k, v, cu_seqlens_q, cu_seqlens_k, bias)
            and _unwrapped(tensors)):
        out, lse = _varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                                   _launch_mods(mods), True)
        return _returned(out, lse, return_lse)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, return_lse)
    if mods is None:
        return _apply(VarlenAttention, tensors, *args)
    return _apply(VarlenAttention, tensors, *args, bias, sinks, alibi, *mods.window, mods.softcap)


def _apply(cls, tensors: tuple, *args):
    """cls.apply(*args), through the C++ apply beneath it where torch's Python wrapper has nothing to
    do (~4.5-7.5 us of host time per call on a 2-core CPU): eager, no functorch wrapper among the
    tensors (None where absent). A functorch transform or dual tensors are refused first
    (refuse_transforms). The wrapper's other work, binding defaults for a setup_context, these
    Functions skip: they define none."""
    if torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0:
        refuse_transforms(*tensors)  # raises for a transform; dual tensors too
    if torch.compiler.is_compiling() or not _unwrapped(tensors):
        return cls.apply(*args)
    return _C_APPLY[cls](*args)


def refuse_transforms(*tensors) -> None:
    """Raise, naming the way out, for a call the Triton/CUDA kernels cannot run: inside a torch.func
    transform (vmap, grad, jvp, jacrev, ...), or with forward-mode AD dual tensors among `tensors`
    (None where absent). Their launchers would read a batched tensor's missing storage, or drop the
    tangents. The "reference" backend (plain torch ops) runs both."""
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError("fastattn's Triton and CUDA kernels do not run under torch.func transforms (vmap, grad, "
                           "jvp, jacrev, ...): call fastattn with backend='reference' inside them")
    if forward_ad._current_level >= 0:
        for t in tensors:
            if t is not None and forward_ad.unpack_dual(t).tangent is not None:
                raise NotImplementedError("fastattn's Triton and CUDA kernels have no forward-mode AD (jvp): the "
                                          "inputs are dual tensors; call fastattn with backend='reference' for them")


def _unwrapped(tensors: tuple) -> bool:
    """No tensor is a functorch wrapper. Outside a transform a wrapper is one whose transform has
    exited (a tensor captured inside torch.func.grad): Function.apply unwraps it, and the launchers
    cannot read it (it has no storage)."""
    for t in tensors:
        if t is not None and _is_functorch_wrapper(t):
            return False
    return True


_is_functorch_wrapper = torch._C._functorch.is_functorch_wrapped_tensor


def _mod_args(bias, sinks, alibi, left, right, softcap) -> tuple:
    """The launchers' / ops' trailing modifier arguments; () without modifiers (the CUDA ops take none)."""
    mods = Mods(bias, alibi, sinks, left, right, softcap)
    return () if mods.off() else mods


def _launch_mods(mods) -> tuple:
    """_mod_args of a fastattn.modifiers.ScoreMods (None: no modifiers)."""
    return () if mods is None else _mod_args(mods.bias, mods.sinks, mods.alibi_slopes, *mods.window, mods.softcap)


def _records(q, k, v, bias=None, sinks=None) -> bool:
    """Whether autograd records this call: grad mode on and a differentiable input that requires grad
    (else the Function would only cost host time), or a functorch transform or forward-mode AD (dual
    tensors do not require grad), which must meet the Function (it refuses them by name)."""
    if torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0:
        return True
    if not torch.is_grad_enabled():
        return False
    return (q.requires_grad or k.requires_grad or v.requires_grad or (bias is not None and bias.requires_grad)
            or (sinks is not None and sinks.requires_grad))


def _padded_forward(q, k, v, key_padding_mask, causal, scale, backend, mods: tuple, direct: bool):
    """(out, lse, key bounds of the mask or None) through the launchers (direct) or the ops."""
    bounds = None
    if key_padding_mask is not None:  # a kernel launch, or torch ops that tracing can see
        bounds = (key_bounds if direct else key_bounds_torch)(key_padding_mask)
    fwd = (_PADDED_LAUNCH if direct else _PADDED_OPS)[backend][0]
    out, lse = fwd(q, k, v, key_padding_mask, bounds, causal, scale, *mods)
    return out, lse, bounds


def _varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, mods: tuple,
                    direct: bool):
    """(out, lse) of packed sequences through the launcher (direct) or the op."""
    fwd = (_VARLEN_LAUNCH if direct else _VARLEN_OPS)[0]
    return fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, *mods)


def _returned(out, lse, return_lse: bool):
    # Callers get a float32 lse (fp32 inputs' kernels save a float64 one: launchers' lse_dtype);
    # .float() is the tensor itself when it already is float32.
    return (out, lse.float()) if return_lse else out


def _distinct(*xs: torch.Tensor) -> list[torch.Tensor]:
    """Repeated tensors (self-attention's x, x, x; one cu_seqlens for q and k) as views: Dynamo does
    not trace an autograd.Function given the same tensor twice. Gradients still reach the original."""
    out = []
    for x in xs:
        out.append(x.view_as(x) if any(x is y for y in out) else x)
    return out


def _direct(q, k, v, x=None, y=None, z=None) -> bool:
    """Call the launcher itself rather than the op: plain tensors (x, y, z: optional ones), eager, no
    dispatch mode. (Written out: a generator over the tensors costs more than the checks.)"""
    tensor = torch.Tensor
    return (type(q) is tensor and type(k) is tensor and type(v) is tensor
            and (x is None or type(x) is tensor) and (y is None or type(y) is tensor)
            and (z is None or type(z) is tensor)
            and not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None)


class PaddedAttention(torch.autograd.Function):
    """(q, k, v) -> out [, lse] for padded batches, through backend "triton" or "cuda"."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, causal, scale, return_lse, backend, bias=None, sinks=None, alibi=None,
                window_left=-1, window_right=-1, softcap=0.0):
        mods = _mod_args(bias, sinks, alibi, window_left, window_right, softcap)
        out, lse, bounds = _padded_forward(q, k, v, key_padding_mask, causal, scale, backend, mods,
                                           _direct(q, k, v, key_padding_mask, bias))
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, bounds, bias, sinks, alibi)
        ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
        ctx.mods = mods and (window_left, window_right, softcap)
        ctx.set_materialize_grads(False)
        return _returned(out, lse, return_lse)

    @staticmethod
    @first_order  # the kernels' gradients are not differentiable again (fastattn/first_order.py)
    def backward(ctx, dout, dlse=None):
        q, k, v, out, lse, key_padding_mask, bounds, bias, sinks, alibi = ctx.saved_tensors
        if dout is None:  # only lse was used
            dout = torch.zeros_like(out)
        bwd = (_PADDED_LAUNCH if _direct(q, k, v, dout, key_padding_mask, bias) else _PADDED_OPS)[ctx.backend][1]
        if not ctx.mods:
            dq, dk, dv, *_ = bwd(dout, q, k, v, out, lse, dlse, key_padding_mask, bounds, ctx.causal, ctx.scale)
            return dq, dk, dv, None, None, None, None, None
        dq, dk, dv, dbias, dsinks = bwd(dout, q, k, v, out, lse, dlse, key_padding_mask, bounds, ctx.causal, ctx.scale,
                                        bias, alibi, sinks, *ctx.mods, ctx.needs_input_grad[8])
        return dq, dk, dv, None, None, None, None, None, dbias, dsinks, None, None, None, None


class VarlenAttention(torch.autograd.Function):
    """(q, k, v) -> out [, lse] for packed sequences (Triton)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, return_lse,
                bias=None, sinks=None, alibi=None, window_left=-1, window_right=-1, softcap=0.0):
        mods = _mod_args(bias, sinks, alibi, window_left, window_right, softcap)
        out, lse = _varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, mods,
                                   _direct(q, k, v, cu_seqlens_q, cu_seqlens_k, bias))
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, bias, sinks, alibi)
        ctx.max_seqlen_q, ctx.max_seqlen_k, ctx.causal, ctx.scale = max_seqlen_q, max_seqlen_k, causal, scale
        ctx.mods = mods and (window_left, window_right, softcap)
        ctx.set_materialize_grads(False)
        return _returned(out, lse, return_lse)

    @staticmethod
    @first_order
    def backward(ctx, dout, dlse=None):
        q, k, v, out, lse, cu_q, cu_k, bias, sinks, alibi = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        bwd = (_VARLEN_LAUNCH if _direct(q, k, v, dout, cu_q, bias) else _VARLEN_OPS)[1]
        args = (dout, q, k, v, out, lse, dlse, cu_q, cu_k, ctx.max_seqlen_q, ctx.max_seqlen_k, ctx.causal, ctx.scale)
        if not ctx.mods:
            dq, dk, dv, *_ = bwd(*args)
            return dq, dk, dv, None, None, None, None, None, None, None
        dq, dk, dv, dbias, dsinks = bwd(*args, bias, alibi, sinks, *ctx.mods, ctx.needs_input_grad[10])
        return dq, dk, dv, None, None, None, None, None, None, None, dbias, dsinks, None, None, None, None


# The C++ apply of each Function (torch's Function.apply is a Python wrapper around it): _apply.
_C_APPLY = {cls: super(torch.autograd.Function, cls).apply for cls in (PaddedAttention, VarlenAttention)}
