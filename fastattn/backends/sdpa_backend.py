"""Backend "torch": PyTorch's scaled_dot_product_attention, with fastattn's conventions on top:
bottom-right causal, key-padding masks, rows without keys -> 0 (SDPA gives NaN). No lse.
Score modifiers that an SDPA float mask can express run here (bias, ALiBi materialised, window);
softcap and sinks cannot be expressed and are refused."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from fastattn import reference, semantics
from fastattn.backends.call import AttentionCall, KVCacheCall

# The table's modifiers for "torch" are bias, ALiBi and window (as one SDPA float mask); why not the others:
MODIFIERS_WHY = "softcap and sinks cannot be expressed as an SDPA mask (backend 'triton' or 'reference' runs them)"
# SDPA's CUDA kernels other than flash: while fastattn is torch's flash-attention impl
# (fastattn/integrations/torch_flash.py), SDPA's flash backend is fastattn itself.
TORCH_OWN = (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def flash_is_fastattn() -> bool:
    """Whether torch.nn.attention.activate_flash_attention_impl("fastattn") is in effect."""
    current = getattr(torch.nn.attention, "current_flash_attention_impl", None)
    return current is not None and current() == "fastattn"


def own_kernels(query):
    """A context in which SDPA runs PyTorch's own kernels: for a CUDA query while fastattn is SDPA's
    flash impl, SDPA without its flash backend (so that a call meant for torch never lands back in
    fastattn, which may refuse it: dropout); otherwise (a CPU tensor, or not a tensor) no change.

    Within the caller's choice: of the backends that are on (`sdpa_kernel`,
    `torch.backends.cuda.enable_*_sdp`) only flash goes off, and `sdpa_kernel` puts back the caller's
    exact flags on exit, on an exception too. When none of PyTorch's own kernels is on, a
    RuntimeError naming what is (torch itself raises when every kernel it may use is off: it does not
    fall back to math). A few flag reads, no sync; under torch.compile they are read when the graph is
    traced, as for torch's own `sdpa_kernel` there."""
    if not (getattr(query, "is_cuda", False) is True and flash_is_fastattn()):
        return contextlib.nullcontext()
    # The reader sdpa_kernel saves the flags with (and Dynamo traces): SDPBackend's in torch's order.
    enabled = torch.nn.attention._cur_sdpa_kernel_backends()
    if SDPBackend.FLASH_ATTENTION not in enabled:
        return contextlib.nullcontext()  # the caller already keeps SDPA off fastattn
    if not any(b in TORCH_OWN for b in enabled):
        names = ", ".join(b.name for b in enabled)
        raise RuntimeError(
            f"torch's SDPA allows only [{names}] here (sdpa_kernel / torch.backends.cuda.enable_*_sdp), and its "
            "FLASH_ATTENTION is fastattn itself while activate_flash_attention_impl('fastattn') is in effect; this "
            "call needs PyTorch's own kernels: allow one of CUDNN_ATTENTION, EFFICIENT_ATTENTION or MATH, or "
            "restore_flash_attention_impl()")
    return sdpa_kernel([b for b in enabled if b != SDPBackend.FLASH_ATTENTION])


def unavailable() -> str | None:
    return None


def unsupported(kind: str, call: AttentionCall | KVCacheCall) -> str | None:
    """What the table cannot say: a ring block needs PyTorch's CPU flash op (the only one that
    returns the lse), and its backward takes no lse gradient."""
    if kind == "ring":
        if call.device.type != "cpu":
            return "PyTorch has no public SDPA that returns the log-sum-exp on CUDA (use 'triton' or 'cuda')"
        if call.return_lse:
            return "return_lse=True: the CPU op's backward takes no lse gradient"
    return None


def run(call: AttentionCall):
    with own_kernels(call.q):  # "torch" stays PyTorch's kernels (and never calls back here)
        return _run(call)


def _run(call: AttentionCall):
    if call.varlen:
        return call.per_sequence(_run)
    b, sq, sk = call.shape.batch, call.shape.seqlen_q, call.shape.seqlen_k
    q, k, v = call.q, call.k, call.v
    skipped = 0
    if call.causal and sq > sk:
        # Bottom-right causal: the first Sq - Sk queries see no key and return 0 (SDPA would give NaN).
        skipped, q = sq - sk, q[:, sq - sk:]
    if sk == 0 or q.shape[1] == 0:
        # Empty: zeros that stay attached to the autograd graph (bias and sinks included).
        mods = {} if call.mods is None else call.mods.reference_kwargs()
        return reference.attention(call.q, call.k, call.v, causal=call.causal, scale=call.scale,
                                   key_padding_mask=call.key_padding_mask, **mods)
    # (B, S, H, D) -> (B, H, S, D), SDPA's layout.
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    # A branch, not the comparison itself: under dynamic shapes that is a symbolic bool, which SDPA refuses.
    gqa = True if call.shape.heads_q != call.shape.heads_kv else False  # noqa: SIM210
    if call.key_padding_mask is not None or call.mods is not None:
        out = _with_mask(qt, kt, vt, call, gqa, skipped)
    elif call.causal and (q.shape[1] != sk or _is_causal_breaks(call.scale)):
        # Under torch.compile a plain bool mask: Dynamo cannot build CausalBias, a tensor subclass, in a graph.
        mask = (_plain_causal(q.shape[1], sk, q.device) if torch.compiler.is_compiling()
                or _is_causal_breaks(call.scale) else causal_lower_right(q.shape[1], sk))
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=call.scale, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=call.causal, scale=call.scale, enable_gqa=gqa)
    if call.key_padding_mask is None and call.mods is None:  # every row sees a key here
        out = _keep_nan(out, qt)
    out = out.transpose(1, 2)  # back to (B, S, H, D)
    if skipped:
        out = torch.cat([out.new_zeros(b, skipped, *out.shape[2:]), out], dim=1)
    return out


def _is_causal_breaks(scale: float) -> bool:
    """PyTorch's CPU SDPA applies is_causal as -inf before scaling: a negative scale turns it into +inf
    (NaN outputs, or wrong rows) and 0 into NaN. Such calls pass the causal mask explicitly."""
    return not scale > 0


def _plain_causal(sq: int, sk: int, device) -> torch.Tensor:
    """Bottom-right causal, j <= i + Sk - Sq, as a plain bool mask (Sq, Sk)."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(sk - sq)


def _with_mask(qt, kt, vt, call: AttentionCall, gqa: bool, skipped: int) -> torch.Tensor:
    """SDPA with key_padding_mask, the bottom-right causal mask and the window as a boolean attn_mask,
    or, with a bias or ALiBi, a float one: (B, H, Sq, D) -> (B, H, Sq, D). SDPA returns NaN for a
    query that sees no key, and NaN gradients through it; such rows get every key un-masked (finite
    values) and are then zeroed, so they return 0 with zero gradients, as the kernels do. `skipped`:
    the leading queries (of a causal Sq > Sk call) already cut off, which the bias still counts."""
    sq, sk = qt.shape[2] + skipped, kt.shape[2]
    mods = call.mods
    window = mods.window if mods is not None and mods.local else None
    visible = semantics.visible_keys(sq, sk, causal=call.causal, key_padding_mask=call.key_padding_mask,
                                     device=qt.device, window=window)[:, :, skipped:]  # (B, 1, Sq, Sk)
    # In float32 at least: a 16-bit mask would turn a bias below its range into -inf (hiding keys the
    # kernels see) and round semantics.BIAS_FLOOR; then held within the inputs' range for SDPA.
    wide = torch.promote_types(qt.dtype, torch.float32)
    additive = None if mods is None else mods.additive_mask(sq, sk, wide)
    if additive is not None:
        additive = additive[:, :, skipped:] if additive.shape[2] > 1 else additive
        visible = visible & ~semantics.below_floor(additive)  # a bias of -inf (or at the floor) hides a key too
        if wide != qt.dtype:
            additive = additive.clamp(torch.finfo(qt.dtype).min, torch.finfo(qt.dtype).max).to(qt.dtype)
    kt, vt = _zero_padded_keys(kt, vt, call.key_padding_mask)
    empty = semantics.keyless_rows(visible)  # (B, 1 or H, Sq or 1, 1)
    mask = visible | empty
    if additive is not None:
        mask = additive.masked_fill(~mask, float("-inf")).masked_fill(empty, 0.0)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=call.scale, enable_gqa=gqa)
    return _keep_nan(out, qt).masked_fill(empty, 0.0)


def _zero_padded_keys(kt, vt, key_padding_mask):
    """(B, H, Sk, D) keys and values with the padded ones zeroed: never read, as the kernels never
    load them (a -inf mask alone lets their NaN/inf through: x - inf, 0 * inf)."""
    if key_padding_mask is None:
        return kt, vt
    padded = ~key_padding_mask[:, None, :, None]  # (B, 1, Sk, 1)
    return kt.masked_fill(padded, 0.0), vt.masked_fill(padded, 0.0)


def _keep_nan(out: torch.Tensor, qt: torch.Tensor) -> torch.Tensor:
    """PyTorch's CPU SDPA returns 0 for a query row holding a NaN (its row max is NaN, taken for a row
    without keys); every other path, and the reference, gives NaN there. CPU only: on CUDA the
    "torch" backend is the SDPA users would otherwise call, kept free of extra passes (whether CUDA
    SDPA swallows such rows too is for tests/test_bad_inputs.py to show on a GPU). (B, H, Sq, D)."""
    if qt.is_cuda:
        return out
    return out.masked_fill(qt.isnan().any(dim=-1, keepdim=True), float("nan"))


class TorchBlock:
    """PyTorch's CPU flash attention (aten::_scaled_dot_product_flash_attention_for_cpu and its
    backward) in its (B, H, S, D) layout. Its causal mask is top-left, which the ring only uses on
    square diagonal blocks, where both alignments agree. A row with no visible key returns lse 0
    there; it is set to -inf here so that the merge gives it no weight."""

    name = "torch"

    @staticmethod
    def _heads_first(q, k, v, mask):
        """(B, S, H, D) -> (B, H, S, D), padded keys zeroed; GQA: each KV head repeated for its group."""
        group = q.shape[2] // k.shape[2]
        kt, vt = _zero_padded_keys(k.transpose(1, 2), v.transpose(1, 2), mask)
        return q.transpose(1, 2), kt.repeat_interleave(group, dim=1), vt.repeat_interleave(group, dim=1)

    @staticmethod
    def _causal_and_mask(q, k, mask, causal, scale):
        """The op's (is_causal, attn_mask): padded keys as a bias (B, 1, 1, Sk); where is_causal breaks
        (_is_causal_breaks) the causal mask too, (1, 1, S, S) (diagonal blocks: square)."""
        bias = None if mask is None else semantics.bool_to_bias(mask, q.dtype)[:, None, None, :]
        if not causal or not _is_causal_breaks(scale):
            return causal, bias
        tril = semantics.bool_to_bias(_plain_causal(q.shape[1], k.shape[1], q.device), q.dtype)[None, None]
        return False, tril if bias is None else bias + tril


    def forward(self, q, k, v, mask, causal, scale):
        if q.shape[2] == 0:  # no query heads: nothing to attend (the CPU op divides by the head count)
            lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
            return q.new_empty(q.shape), q.new_empty((q.shape[0], 0, q.shape[1]), dtype=lse_dtype)
        qt, kt, vt = self._heads_first(q, k, v, mask)
        is_causal, attn_mask = self._causal_and_mask(q, k, mask, causal, scale)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qt, kt, vt, 0.0, is_causal, attn_mask=attn_mask, scale=scale)
        # A query row holding a NaN: NaN out and lse (the CPU op returns 0), as on every other path.
        nan = qt.isnan().any(-1)  # (B, H, S)
        out, lse = out.masked_fill(nan[..., None], float("nan")), lse.masked_fill(nan, float("nan"))
        if mask is not None:
            # Rows with no real key: none at all, or (causal, square) none at or before the diagonal.
            empty = (mask.cumsum(-1) == 0) if causal else ~mask.any(-1, keepdim=True)  # (B, Sq or 1)
            lse = lse.masked_fill(empty[:, None, :], float("-inf"))
            out = out.masked_fill(empty[:, None, :, None], 0.0)
        return out.transpose(1, 2), lse  # (B, H, S, D) -> (B, S, H, D)

    def backward(self, dout, dlse, q, k, v, out, lse, mask, causal, scale):
        if dlse is not None:
            raise RuntimeError("ring_attention with backend='torch' cannot differentiate lse")
        if q.shape[2] == 0:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        qt, kt, vt = self._heads_first(q, k, v, mask)
        # A row that sees no key anywhere (lse -inf): +inf makes its P = exp(s - lse) zero, not NaN.
        # The op takes the lse its forward gives: float32 (the ring merges fp32 inputs' in float64).
        lse = torch.where(lse == float("-inf"), float("inf"), lse).to(torch.float64 if q.dtype == torch.float64
                                                                      else torch.float32)
        is_causal, attn_mask = self._causal_and_mask(q, k, mask, causal, scale)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.transpose(1, 2), qt, kt, vt, out.transpose(1, 2), lse, 0.0, is_causal,
            attn_mask=attn_mask, scale=scale)
        b, hkv, sk, d = k.shape[0], k.shape[2], k.shape[1], k.shape[3]
        group = q.shape[2] // hkv
        # (B, Hq, Sk, D) -> (B, Hkv, group, Sk, D), summed over each KV head's group, -> (B, Sk, Hkv, D)
        dk, dv = (g.reshape(b, hkv, group, sk, d).sum(2).transpose(1, 2) for g in (dk, dv))
        return dq.transpose(1, 2), dk, dv


def ring_block():
    return TorchBlock()
