"""FlashAttention 2's public functions on fastattn: ``flash_attn_func``, ``flash_attn_varlen_func``,
``flash_attn_with_kvcache`` and the packed forms (``flash_attn_qkvpacked_func``,
``flash_attn_kvpacked_func`` and their varlen twins) with FlashAttention's argument names, defaults,
layouts and return values, so that ``from flash_attn import flash_attn_func`` becomes ``from
fastattn import flash_attn_func``.

What differs (README, "Switch from flash_attn"):
- dropout_p > 0 raises (the kernels have no dropout); deterministic is accepted and has no effect
  (fastattn's backward is always deterministic).
- return_attn_probs returns (out, softmax_lse, None): FlashAttention's third value is a testing-only
  dropout mask that fastattn does not make.
- flash_attn_with_kvcache: rotary embeddings, cache_batch_idx and cache_leftpad raise.
- ``backend=`` (keyword) picks fastattn's backend; "auto" as in ``fastattn.attention``.
- window_size: two ints >= -1 (tuple, list, 1-D integer tensor; FlashAttention reads any negative as
  -1); softcap <= 0 is off, as in FlashAttention (``fastattn.attention`` refuses a negative softcap).
- The lse of a row that sees no key is -inf (FlashAttention 2's non-split kernels write +inf).
- Attention sinks (gpt-oss): ``s_aux`` (vLLM's FlashAttention 3 name) or ``learnable_sink`` (FlashAttention
  4's), (Hq,) logits, as fastattn's ``sinks``; transformers passes them under either name when the
  function's signature has it.
"""

from __future__ import annotations

import operator

import torch

from fastattn import api, cache_layouts
from fastattn.validation import _check_tensor, validate_flag, validate_scale


def _window(window_size, seqlen_k: int | None) -> tuple[int, int] | None:
    """FlashAttention's window_size -> fastattn's window ((-1, -1): none). Two ints >= -1: a tuple, a
    list, or a 1-D integer tensor of two (FlashAttention's own tests pass one; reading a CUDA
    tensor's values syncs, as FlashAttention's binding does). A side >= seqlen_k (the keys' length,
    max_seqlen_k, or the cache's capacity) is unbounded, as FlashAttention reads it: the same for
    the left side, but a right side of Sk or more still hides keys from the first rows when Sq > Sk."""
    given = window_size

    def bad():  # (built when raised: torch.compile cannot repr a symbolic int on every call)
        return ValueError(f"window_size must be (left, right), two ints >= -1 (-1 = unbounded), got {given!r}")
    if isinstance(window_size, torch.Tensor):
        if window_size.shape != (2,) or window_size.dtype.is_floating_point or window_size.dtype.is_complex \
                or window_size.dtype == torch.bool:
            raise bad()
        window_size = window_size.tolist()
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise bad()
    try:  # ints and int-like scalars (numpy ints, 0-d integer tensors); never floats or bools
        window = tuple(operator.index(w) for w in window_size
                       if not (isinstance(w, bool) or isinstance(w, torch.Tensor) and w.dtype == torch.bool))
    except TypeError:
        raise bad() from None
    if len(window) != 2 or min(window) < -1:
        raise bad()
    window = sides_past_keys_unbounded(window, seqlen_k)
    return None if window == (-1, -1) else window


def sides_past_keys_unbounded(window: tuple[int, int], seqlen_k) -> tuple[int, int]:
    """FlashAttention's rule, forward and backward: a window side >= seqlen_k is -1 (unbounded)."""
    return window if seqlen_k is None else tuple(-1 if w >= seqlen_k else w for w in window)


def _int_or_none(n) -> int | None:
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def _keys(k) -> int | None:
    """Sk of a (B, Sk, Hkv, D) k, for _window (None when k is not one: the validator names it)."""
    return k.shape[1] if isinstance(k, torch.Tensor) and k.dim() == 4 else None


def _softcap(softcap) -> float | None:
    """FlashAttention's softcap: anything > 0 turns it on, 0 or negative is off (fastattn.attention
    itself refuses a negative cap)."""
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float (> 0 caps the scores, <= 0 is off), got {type(softcap).__name__}")
    if softcap != softcap:
        raise ValueError("softcap must be a number (> 0 caps the scores, <= 0 is off), got nan")
    return float(softcap) if softcap > 0 else None


def _sinks(s_aux, learnable_sink):
    """The sink logits under either of FlashAttention's names (one of them, not both)."""
    if s_aux is not None and learnable_sink is not None:
        raise ValueError("pass attention sinks as s_aux or as learnable_sink, not both")
    return s_aux if s_aux is not None else learnable_sink


def _check_args(dropout_p, softmax_scale, flag_name: str, flag) -> float | None:
    """FlashAttention's arguments checked under its own names (fastattn.api checks them again as
    scale / return_lse, names the caller never wrote); returns softmax_scale as a float (a 0-d
    tensor's value read once: the second check sees the float)."""
    if dropout_p:
        raise ValueError(f"dropout_p={dropout_p}: fastattn's kernels have no dropout (pass dropout_p=0.0, as for "
                         "inference or a model trained without attention dropout)")
    validate_flag(flag_name, flag)
    return None if softmax_scale is None else validate_scale(softmax_scale, 1, name="softmax_scale")


def _out_like_flash(result, q: torch.Tensor, with_lse: bool):
    """FlashAttention allocates out with empty_like(q): q's strides when q is dense, else contiguous.
    The torch and reference backends return a transpose of their (B, H, S, D) result, which code
    written for FlashAttention breaks with out.view(B, S, -1): copy those (never the Triton output)."""
    out = result[0] if with_lse else result
    if out.stride() != q.stride() and not out.is_contiguous():
        out = out.contiguous()
        return (out, *result[1:]) if with_lse else out
    return result


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, s_aux=None,
                    learnable_sink=None, backend="auto"):
    """FlashAttention's flash_attn_func: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, Hq, D),
    or (out, softmax_lse (B, Hq, Sq) float32, None) with return_attn_probs. Causal is bottom-right
    aligned; window_size (left, right), -1 = unbounded; softcap 0 = off; alibi_slopes (Hq,) or
    (B, Hq) float32; s_aux / learnable_sink (Hq,) sink logits. Differentiable in q, k, v (and the sinks)."""
    softmax_scale = _check_args(dropout_p, softmax_scale, "return_attn_probs", return_attn_probs)
    result = api.attention(q, k, v, causal=causal, scale=softmax_scale, return_lse=return_attn_probs,
                           alibi_slopes=alibi_slopes, window=_window(window_size, _keys(k)),
                           softcap=_softcap(softcap), sinks=_sinks(s_aux, learnable_sink), backend=backend)
    result = _out_like_flash(result, q, return_attn_probs)
    return (*result, None) if return_attn_probs else result


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, s_aux=None,
                           learnable_sink=None, backend="auto"):
    """FlashAttention's flash_attn_varlen_func: packed q (Tq, Hq, D), k/v (Tk, Hkv, D) with int32
    cu_seqlens -> out (Tq, Hq, D), or (out, softmax_lse (Hq, Tq) float32, None). A paged KV
    (block_table) is not supported here: use flash_attn_with_kvcache."""
    softmax_scale = _check_args(dropout_p, softmax_scale, "return_attn_probs", return_attn_probs)
    if block_table is not None:
        raise ValueError("block_table (a paged KV cache) is not supported by flash_attn_varlen_func in fastattn; "
                         "flash_attn_with_kvcache takes one")
    result = api.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                                  scale=softmax_scale, return_lse=return_attn_probs, alibi_slopes=alibi_slopes,
                                  window=_window(window_size, _int_or_none(max_seqlen_k)), softcap=_softcap(softcap),
                                  sinks=_sinks(s_aux, learnable_sink), backend=backend)
    result = _out_like_flash(result, q, return_attn_probs)
    return (*result, None) if return_attn_probs else result


def _unpack(packed, name: str, parts: int, varlen: bool, q=None) -> tuple[torch.Tensor, ...]:
    """A packed tensor (B, S, parts, H, D), or (T, parts, H, D) when varlen -> its parts as views (no
    copy; gradients flow back into the packed tensor, as FlashAttention's dqkv / dkv). q: the query
    beside a packed kv, whose dtype kv must share."""
    heads = "H" if parts == 3 else "Hkv"
    what = f"(T, {parts}, {heads}, D)" if varlen else f"(B, S, {parts}, {heads}, D)"
    if isinstance(packed, torch.Tensor) and (packed.dim() != (4 if varlen else 5) or packed.shape[-3] != parts):
        raise ValueError(f"{name} must have shape {what}, got {tuple(packed.shape)}")
    _check_tensor(name, packed, 4 if varlen else 5, what)  # type and dtype, named as passed (not q, k, v)
    if isinstance(q, torch.Tensor) and q.dtype != packed.dtype:
        raise TypeError(f"{name} has dtype {packed.dtype} but q has {q.dtype}; q and {name} must share a dtype")
    return packed.unbind(-3)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                              s_aux=None, learnable_sink=None, backend="auto"):
    """FlashAttention's flash_attn_qkvpacked_func: qkv (B, S, 3, H, D) -> as flash_attn_func."""
    q, k, v = _unpack(qkv, "qkv", 3, varlen=False)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, s_aux=s_aux, learnable_sink=learnable_sink,
                           backend=backend)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                             s_aux=None, learnable_sink=None, backend="auto"):
    """FlashAttention's flash_attn_kvpacked_func: q (B, Sq, Hq, D), kv (B, Sk, 2, Hkv, D) -> as
    flash_attn_func."""
    k, v = _unpack(kv, "kv", 2, varlen=False, q=q)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, s_aux=s_aux, learnable_sink=learnable_sink,
                           backend=backend)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, s_aux=None, learnable_sink=None, backend="auto"):
    """FlashAttention's flash_attn_varlen_qkvpacked_func: packed qkv (T, 3, H, D), one cu_seqlens for
    queries and keys -> as flash_attn_varlen_func."""
    q, k, v = _unpack(qkv, "qkv", 3, varlen=True)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                                  s_aux=s_aux, learnable_sink=learnable_sink, backend=backend)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, s_aux=None,
                                    learnable_sink=None, backend="auto"):
    """FlashAttention's flash_attn_varlen_kvpacked_func: q (Tq, Hq, D), kv (Tk, 2, Hkv, D) -> as
    flash_attn_varlen_func."""
    k, v = _unpack(kv, "kv", 2, varlen=True, q=q)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, s_aux=s_aux, learnable_sink=learnable_sink, backend=backend)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False,
                            *, s_aux=None, learnable_sink=None, backend="auto"):
    """FlashAttention's flash_attn_with_kvcache: q (B, Sq, Hq, D) over a contiguous (B, S_max, Hkv, D)
    or paged (num_pages, page_size, Hkv, D) cache with block_table, after writing k/v (B, S_new,
    Hkv, D) in place at cache_seqlens[b] (an int, or (B,) int32; not advanced here). cache_seqlens
    None: every sequence fills the cache (no k/v then). Returns out, or (out, softmax_lse
    (B, Hq, Sq)) with return_softmax_lse. Inference only."""
    softmax_scale = _check_args(0.0, softmax_scale, "return_softmax_lse", return_softmax_lse)
    for name, value in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin), ("cache_batch_idx", cache_batch_idx),
                        ("cache_leftpad", cache_leftpad)):
        if value is not None:
            raise ValueError(f"{name} is not supported by fastattn's flash_attn_with_kvcache (apply rotary "
                             "embeddings before the call; index the cache yourself)")
    if isinstance(cache_seqlens, bool):
        raise TypeError("cache_seqlens must be an int, a (B,) int32 tensor or None, got bool")
    if cache_seqlens is None or isinstance(cache_seqlens, int):
        if cache_seqlens is None and k is not None:
            raise ValueError("cache_seqlens is needed when new keys/values k, v are written into the cache")
        # What is read here (q's batch, the capacity) is checked here; attention_with_kvcache checks the rest.
        _check_tensor("q", q, 4, "(B, Sq, Hq, D)")
        _check_tensor("k_cache", k_cache, 4, "(B, S_max, Hkv, D) or (num_pages, page_size, Hkv, D)")
        if block_table is not None and not (isinstance(block_table, torch.Tensor) and block_table.dim() == 2):
            raise ValueError(f"block_table must be a (B, max_pages) int32 tensor or None, got "
                             f"{getattr(block_table, 'shape', type(block_table).__name__)}")
        if cache_seqlens is not None and not 0 <= cache_seqlens < 2**31:
            raise ValueError(f"cache_seqlens must be in [0, 2**31), got {cache_seqlens}")
        full = cache_layouts.capacity(k_cache, block_table)
        cache_seqlens = torch.full((q.shape[0],), full if cache_seqlens is None else cache_seqlens, dtype=torch.int32,
                                   device=q.device)
    readable = _keys(k_cache) is not None and (block_table is None or isinstance(block_table, torch.Tensor)
                                                and block_table.dim() == 2)
    window = _window(window_size, cache_layouts.capacity(k_cache, block_table) if readable else None)
    result = api.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens,
                                        block_table=block_table, causal=causal, scale=softmax_scale,
                                        return_lse=return_softmax_lse, num_splits=num_splits,
                                        alibi_slopes=alibi_slopes, window=window,
                                        softcap=_softcap(softcap), sinks=_sinks(s_aux, learnable_sink),
                                        backend=backend)
    return _out_like_flash(result, q, return_softmax_lse)
