"""Public functions: validate, normalise, pick a backend, call it."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, CausalVariant

from fastattn import backends, cache_layouts, semantics
from fastattn.backends import AppendCall, AttentionCall, KVCacheCall, sdpa_backend
from fastattn.validation import (
    MAX_HEAD_DIM,
    check_broadcastable,
    no_mods,
    validate_cache,
    validate_flag,
    validate_key_padding_mask,
    validate_kvcache,
    validate_mods,
    validate_qkv,
    validate_scale,
    validate_varlen,
    value_checks,
)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    bias: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    backend: str = "auto",
):
    """Fused scaled-dot-product attention in FlashAttention's layout.

    Args:
        q: (B, Sq, Hq, D). k, v: (B, Sk, Hkv, D) with Hq % Hkv == 0 (GQA/MQA). Any strides whose
            last dim is contiguous are used without a copy.
        causal: bottom-right aligned mask: query i sees keys j <= i + Sk - Sq.
        scale: softmax scale, default 1/sqrt(D).
        key_padding_mask: (B, Sk) bool, True = real key (HF ``attention_mask`` sense). Tiles of keys
            that are all padding are skipped by the kernels.
        return_lse: also return the log-sum-exp (B, Hq, Sq) in float32 (differentiable).
        bias: additive float scores broadcastable to (B, Hq, Sq, Sk) (stride-0 broadcast dims, no
            copy; -inf hides a key), differentiable: T5 relative position bias, learned masks.
        alibi_slopes: float32 (Hq,) or (B, Hq): adds -slope * |i + Sk - Sq - j|, computed in the kernel.
        window: (left, right) sliding window: query i sees keys i + Sk - Sq - left ..
            i + Sk - Sq + right (-1 = unbounded). With causal, right is 0. Key tiles outside the
            window are skipped, so the cost grows with the window, not the sequence.
        softcap: logits -> softcap * tanh(logits / softcap) before bias and masks (Gemma 2).
        sinks: (Hq,) a learnable sink logit per head (gpt-oss): an extra softmax entry with no value.
        backend: "auto", "triton", "cuda", "torch", or "reference"; see ``available_backends()``.
            Modifiers run on "triton" and "reference"; "torch" runs bias, ALiBi and window as an SDPA
            float mask; "cuda" runs none (docs/design.md, "Score modifiers").

    Returns out (B, Sq, Hq, D) [, lse]. A query that sees no key gets 0 (lse = -inf, or the sink's
    logit with sinks) and zero gradients.
    """
    plain = no_mods(bias, alibi_slopes, window, softcap, sinks)
    signature = None
    if plain and not torch.compiler.is_compiling():  # (traced calls: the checks below, no cache to guard on)
        try:  # (everything validate_qkv reads of q, k, v, and what choose() reads of such a call)
            signature = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
                         q.layout, k.layout, v.layout, return_lse, backend)
            known = _PLAIN_CALLS.get(signature)
        except (AttributeError, TypeError, RuntimeError):  # not tensors (nested ones too), unhashable arguments
            signature = known = None
        if known is not None:  # q, k, v passed validate_qkv with these attributes, and choose() took `name`
            shape, name = known
            causal = validate_flag("causal", causal)
            return_lse = validate_flag("return_lse", return_lse)
            scale = validate_scale(scale, shape.head_dim)
            validate_key_padding_mask(key_padding_mask, shape, q)
            call = AttentionCall(q, k, v, shape, causal, scale, key_padding_mask, return_lse)
            return backends.run(name, "attention", call)
    shape = validate_qkv(q, k, v)
    causal = validate_flag("causal", causal)
    return_lse = validate_flag("return_lse", return_lse)
    scale = validate_scale(scale, shape.head_dim)
    validate_key_padding_mask(key_padding_mask, shape, q)
    mods = None
    if not plain:
        mods = validate_mods(bias, alibi_slopes, window, softcap, sinks, shape, q, causal)
    call = AttentionCall(q, k, v, shape, causal, scale, key_padding_mask, return_lse, mods=mods)
    name = backends.choose("attention", call, backend)
    if signature is not None:
        _remember(_PLAIN_CALLS, signature, (shape, name))
    return backends.run(name, "attention", call)


# attention() without score modifiers, by what decides its validation of q, k, v and its backend (q,
# k and v's sizes, dtypes, devices and layouts, return_lse, the backend asked for) -> (AttentionShape,
# the backend backends.choose took). A call that validate_qkv or choose() refuses is never stored
# (each such call raises again, with the same message); the flags, scale and key-padding mask are
# checked on every call. What else choose() reads is constant for the process (backend availability,
# the Triton interpreter). Keys hold sizes, dtypes, devices and layouts, never a tensor. Not used
# while torch.compile traces. (docs/design.md, "Hot path")
_PLAIN_CALLS: dict[tuple, tuple] = {}
_MAX_PLAIN_CALLS = 256


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    bias: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    backend: str = "auto",
):
    """Attention over packed variable-length sequences (FlashAttention's varlen convention).

    Args:
        q: (Tq, Hq, D), the B query sequences concatenated; k, v: (Tk, Hkv, D).
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,), cumulative lengths starting at 0: sequence i is
            rows cu[i]:cu[i + 1]. ``fastattn.unpad_input`` builds them from a padding mask.
        max_seqlen_q, max_seqlen_k: the longest sequence lengths (sizes the kernel grid).
        causal: bottom-right aligned within each sequence.
        bias, alibi_slopes, window, softcap, sinks: as ``attention``, per sequence: bias is
            broadcastable to (B, Hq, max_seqlen_q, max_seqlen_k) and indexed by positions within
            each sequence; alibi_slopes (B, Hq) has a row per sequence.

    Returns out (Tq, Hq, D) [, lse (Hq, Tq) float32].
    """
    plain = no_mods(bias, alibi_slopes, window, softcap, sinks)
    signature = known = None
    if plain and not torch.compiler.is_compiling():  # (every layer of a packed step repeats the call)
        signature, known = _remembered_varlen_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                   return_lse, backend)
    if known is not None:  # these attributes passed validate_varlen, and choose() took `name`
        shape, name = known
    else:
        shape = validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    causal = validate_flag("causal", causal)
    return_lse = validate_flag("return_lse", return_lse)
    scale = validate_scale(scale, shape.head_dim)
    mods = None if plain else validate_mods(bias, alibi_slopes, window, softcap, sinks, shape, q, causal)
    call = AttentionCall(q, k, v, shape, causal, scale, None, return_lse, cu_seqlens_q, cu_seqlens_k,
                         shape.seqlen_q, shape.seqlen_k, mods)  # (max_seqlen as Python ints)
    if known is None:
        name = backends.choose("varlen", call, backend)
        if signature is not None:
            _remember(_PLAIN_VARLEN_CALLS, signature, (shape, name))
    return backends.run(name, "varlen", call)


def attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    *,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    return_lse: bool = False,
    num_splits: int = 0,
    bias: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    backend: str = "auto",
):
    """Decoding: a few new query tokens per sequence against a KV cache (FlashAttention's
    flash_attn_with_kvcache). Inference only: inputs that require grad are refused.

    Args:
        q: (B, Sq, Hq, D), the new tokens' queries (Sq = 1 for plain decoding; more for
            speculative decoding or a chunk of a prompt).
        k_cache, v_cache: the cache, contiguous (B, S_max, Hkv, D) or paged (num_pages, page_size,
            Hkv, D) with block_table; Hq % Hkv == 0 (GQA/MQA). Written in place when k/v are given.
        k, v: (B, S_new, Hkv, D) or None: the new tokens' keys/values, written into the cache at
            positions cache_seqlens[b] .. cache_seqlens[b] + S_new - 1 before attending.
        cache_seqlens: (B,) int32, the tokens each sequence holds before this call. Not updated
            here (the caller advances it, e.g. ``cache_seqlens += S_new``).
        block_table: (B, max_pages) int32 page indices into a paged cache (vLLM's layout).
        causal: bottom-right aligned: new token t sees the cache up to position
            cache_seqlens[b] + S_new - Sq + t (with S_new = Sq: itself and everything before it).
        num_splits: 0 = choose (split the keys across programs when batch x KV heads cannot fill
            the GPU); n >= 1 forces n (at most 128).
        bias, alibi_slopes, window, softcap, sinks: as ``attention``, by cache position: new token
            t of sequence b sits at position cache_seqlens[b] + S_new - Sq + t; bias is
            broadcastable to (B, Hq, Sq, capacity) and indexed by cache position. The window also
            narrows the keys the kernel reads.
        backend: "auto", "triton" (the split-KV decode kernel), "torch" (SDPA over the cache with a
            padding mask) or "reference".

    Returns out (B, Sq, Hq, D) [, lse (B, Hq, Sq) float32]. Nothing reads the lengths on the host
    for CUDA tensors (no sync; a step can be captured in a CUDA graph), so their values are checked
    only for CPU tensors or with FASTATTN_CHECK_VALUES=1; otherwise they are clamped to the cache.
    """
    plain = no_mods(bias, alibi_slopes, window, softcap, sinks)
    signature = known = None
    if plain and not torch.compiler.is_compiling():  # (a decode step is host-bound: see _PLAIN_KVCACHE_CALLS)
        signature, known = _remembered_kvcache_call(q, k_cache, v_cache, k, v, cache_seqlens, block_table,
                                                    return_lse, backend)
    if known is not None:  # these attributes passed validate_kvcache, and choose() took `name`
        (shape, n_new), name = known
    else:
        shape, n_new = validate_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table)
    causal = validate_flag("causal", causal)
    return_lse = validate_flag("return_lse", return_lse)
    scale = validate_scale(scale, shape.head_dim)
    most = cache_layouts.MAX_SPLITS
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 0 <= num_splits <= most:
        raise ValueError(f"num_splits must be an int in [0, {most}] (0 = choose), got {num_splits!r}")
    mods = None
    if not plain:
        mods = validate_mods(bias, alibi_slopes, window, softcap, sinks, shape, q, causal)
        _refuse_grad(bias=bias, sinks=sinks)
    _refuse_grad(q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache)
    call = KVCacheCall(q, k_cache, v_cache, k, v, cache_seqlens, block_table, shape, n_new, causal, scale,
                       return_lse, num_splits, mods)
    if known is None:
        name = backends.choose("kvcache", call, backend)
        if signature is not None:
            _remember(_PLAIN_KVCACHE_CALLS, signature, ((shape, n_new), name))
    return backends.run(name, "kvcache", call)


# attention_with_kvcache() without score modifiers, by everything validate_kvcache reads of its
# tensors while their values go unchecked (sizes, dtypes, devices and layouts, the caches' strides)
# and what choose() reads (those, return_lse, the backend asked for) -> ((AttentionShape, S_new),
# the backend choose() took); as _PLAIN_CALLS. Only calls whose values are not checked on the host
# are stored or looked up (CUDA tensors without FASTATTN_CHECK_VALUES=1: value_checks); the flags,
# scale, num_splits and the grad refusal are checked on every call. (docs/design.md, "Hot path")
_PLAIN_KVCACHE_CALLS: dict[tuple, tuple] = {}


# attention_varlen() without score modifiers, by everything validate_varlen reads while the
# cu_seqlens values go unchecked (q, k, v's and the cu_seqlens' sizes, dtypes, devices and layouts,
# the max_seqlen ints) and what choose() reads (those, return_lse, the backend asked for) ->
# (AttentionShape, the backend choose() took); as _PLAIN_KVCACHE_CALLS: only calls whose values are
# not checked on the host (CUDA tensors without FASTATTN_CHECK_VALUES=1). A packed training batch
# differs from the last in its lengths, so it is validated at its first layer and found at the rest.
_PLAIN_VARLEN_CALLS: dict[tuple, tuple] = {}


def _remembered_varlen_call(q, k, v, cu_q, cu_k, max_q, max_k, return_lse, backend):
    """(the call's key in _PLAIN_VARLEN_CALLS, what is stored there or None), as _remembered_kvcache_call."""
    try:
        if value_checks(q.device):
            return None, None
        signature = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, q.layout,
                     k.layout, v.layout, cu_q.shape, cu_k.shape, cu_q.dtype, cu_k.dtype, cu_q.device, cu_k.device,
                     cu_q.layout, cu_k.layout, type(max_q), max_q, type(max_k), max_k, return_lse, backend)
        return signature, _PLAIN_VARLEN_CALLS.get(signature)
    except (AttributeError, TypeError, RuntimeError):  # not tensors (nested ones too), unhashable arguments
        return None, None


def _remembered_kvcache_call(q, k_cache, v_cache, k, v, cache_seqlens, block_table, return_lse, backend):
    """(the call's key in _PLAIN_KVCACHE_CALLS, what is stored there or None); (None, None) where
    nothing is remembered: values checked on the host, arguments that are not tensors or do not hash."""
    try:
        if value_checks(q.device):
            return None, None
        signature = (q.shape, k_cache.shape, v_cache.shape, q.dtype, k_cache.dtype, v_cache.dtype, q.device,
                     k_cache.device, v_cache.device, q.layout, k_cache.layout, v_cache.layout, k_cache.stride(),
                     v_cache.stride(), cache_seqlens.dtype, cache_seqlens.shape, cache_seqlens.device,
                     cache_seqlens.layout, None if k is None else (k.shape, k.dtype, k.device, k.layout),
                     None if v is None else (v.shape, v.dtype, v.device, v.layout),
                     None if block_table is None else (block_table.dtype, block_table.shape, block_table.device,
                                                       block_table.layout),
                     return_lse, backend)
        return signature, _PLAIN_KVCACHE_CALLS.get(signature)
    except (AttributeError, TypeError, RuntimeError):  # not tensors (nested ones too), unhashable arguments
        return None, None


def _remember(cache: dict, signature: tuple, decision) -> None:
    """Store a validated call's decision; a long run through many shapes starts the cache again."""
    if len(cache) >= _MAX_PLAIN_CALLS:
        cache.clear()
    cache[signature] = decision


def append_to_kvcache(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    """Write keys/values k, v (B, S_new, Hkv, D) into a KV cache (the layouts of
    ``attention_with_kvcache``) at positions cache_seqlens[b] + t, in place, without attending: e.g.
    a prompt's keys after its prefill ran ``attention``. cache_seqlens is not updated."""
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"k must be a torch.Tensor, got {type(k).__name__}")
    validate_cache(k_cache, v_cache, k, v, cache_seqlens, block_table, like=k, what="k")
    _refuse_grad(k=k, v=v, k_cache=k_cache, v_cache=v_cache)
    call = AppendCall(k, v, k_cache, v_cache, cache_seqlens, block_table)
    backends.run(backends.choose("append", call, backend), "append", call)


def _refuse_grad(**xs) -> None:
    """The KV-cache functions write the cache in place and have no backward: an input that requires
    grad is refused (by name) while autograd records, on every backend."""
    if not torch.is_grad_enabled():
        return
    named = [name for name, x in xs.items() if x is not None and x.requires_grad]
    if named:
        raise ValueError(f"{', '.join(named)} {'requires' if len(named) == 1 else 'require'} grad, but the KV-cache "
                         "functions are inference-only (not differentiable): call them under torch.no_grad() / "
                         "torch.inference_mode(), or use fastattn.attention for training")


_warned: set[str] = set()


def _fallback_to_torch(reason: str, backend: str, query, key, value, attn_mask, dropout_p, is_causal, scale,
                       enable_gqa):
    """torch's SDPA for a call fastattn does not run, for backend "auto" (one warning per reason) or
    "torch"; a backend named explicitly is an error that says why."""
    if backend not in ("auto", "torch"):
        raise ValueError(f"scaled_dot_product_attention(backend={backend!r}): {reason}; backend='auto' falls back to "
                         "torch's SDPA for such calls")
    if reason not in _warned and not torch.compiler.is_compiling():  # (dynamo cannot trace warnings.warn)
        _warned.add(reason)
        warnings.warn(f"fastattn.scaled_dot_product_attention: {reason}; falling back to "
                      "torch.nn.functional.scaled_dot_product_attention", stacklevel=3)
    with sdpa_backend.own_kernels(query):  # never fastattn again, as torch's flash impl
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


def _broadcast_like_sdpa(query, key, value, enable_gqa: bool):
    """torch's SDPA broadcasts a batch dim of 1 across query, key and value, and a heads dim of 1 when
    enable_gqa is off: the same here, as stride-0 views (no copy; autograd sums the gradients back).
    Sizes that do not broadcast are left for the validator to name."""
    qs, ks, vs = query.shape, key.shape, value.shape
    if qs[0] == ks[0] == vs[0] and (enable_gqa or qs[1] == ks[1] == vs[1]):  # (every call but a broadcast one)
        return query, key, value
    dims = (0,) if enable_gqa else (0, 1)
    # The size that is not 1 (0 included, as torch broadcasts 1 to 0); several: left to the validator.
    full = [min({qs[d], ks[d], vs[d]} - {1}, default=1) for d in dims]

    def grow(x):  # (B or 1, H or 1, S, D) -> (B, H, S, D)
        shape = list(x.shape)
        for d, n in zip(dims, full):
            shape[d] = n if shape[d] == 1 else shape[d]
        return x.expand(shape)
    return grow(query), grow(key), grow(value)


def _read_causal_bias(mask: CausalBias, seqlen_q: int, seqlen_k: int, is_causal) -> tuple[bool, bool]:
    """torch.nn.attention.bias.causal_upper_left / causal_lower_right as (is_causal, bottom_right): a
    tensor subclass whose data is not a mask (torch's SDPA dispatches on its variant, as here)."""
    if is_causal:
        raise ValueError("attn_mask is a CausalBias: it cannot be combined with is_causal=True (as in torch)")
    if (mask.seq_len_q, mask.seq_len_kv) != (seqlen_q, seqlen_k):
        raise ValueError(f"attn_mask is a CausalBias for (Sq, Sk) = ({mask.seq_len_q}, {mask.seq_len_kv}) but "
                         f"query and key have ({seqlen_q}, {seqlen_k})")
    if mask.variant == CausalVariant.LOWER_RIGHT:
        return True, True
    if mask.variant == CausalVariant.UPPER_LEFT:
        return True, False
    raise ValueError(f"attn_mask is a CausalBias of unknown variant {mask.variant!r}")


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``: (B, H, S, D) layout and
    top-left causal, as torch does.

    Runs in fastattn when attn_mask is None, a float mask broadcastable to (B, H, Sq, Sk) (the
    kernels' additive bias, differentiable), a bool key-padding mask broadcastable to
    (B, 1, 1, Sk) (True = attend) or torch's ``causal_upper_left`` / ``causal_lower_right``
    (torch.nn.attention.bias: causal attention, aligned as named). With backend "auto" (or
    "torch"), any other bool mask, dropout_p > 0, inputs that are not 4-D, a value head dim
    different from the query's, a head dim outside 1..256, no heads, or (enable_gqa) key and value
    head counts that differ fall back to torch's SDPA with a one-time warning that says why; a
    backend named explicitly runs any bool mask as a bias of 0 / -inf and refuses the others with a
    ValueError. A batch dim of 1 (and a heads dim of 1 without enable_gqa) broadcasts across query,
    key and value, as in torch. One difference: a query that sees no key returns 0 here, where torch
    returns NaN.
    """
    backends.check_name("attention", backend)  # a misspelt name first, whatever else the call holds
    if dropout_p != 0.0:
        return _fallback_to_torch("dropout_p > 0 is not supported", backend, query, key, value, attn_mask, dropout_p,
                                  is_causal, scale, enable_gqa)
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not query.dim() == key.dim() == value.dim() == 4:
        return _fallback_to_torch("only 4-D (B, H, S, D) inputs run in the kernels", backend, query, key, value,
                                  attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if value.shape[-1] != query.shape[-1]:
        return _fallback_to_torch("a value head dim different from the query's is not supported", backend, query, key,
                                  value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if not 1 <= query.shape[-1] <= MAX_HEAD_DIM:
        return _fallback_to_torch(f"head dims outside 1..{MAX_HEAD_DIM} are not supported", backend, query, key,
                                  value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if 0 in (query.shape[1], key.shape[1], value.shape[1]):  # (torch: an empty output, or its error)
        return _fallback_to_torch("inputs without heads are not supported", backend, query, key, value, attn_mask,
                                  dropout_p, is_causal, scale, enable_gqa)
    query, key, value = _broadcast_like_sdpa(query, key, value, enable_gqa)
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(f"query has {query.shape[1]} heads but key has {key.shape[1]}: pass enable_gqa=True "
                         "for grouped-query attention")
    if enable_gqa and key.shape[1] != value.shape[1]:  # (torch repeats each for the query heads)
        return _fallback_to_torch("key and value with different head counts are not supported", backend, query, key,
                                  value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    bottom_right = False  # is_causal in fastattn's own convention (a CausalBias's lower-right variant)
    if isinstance(attn_mask, CausalBias):
        is_causal, bottom_right = _read_causal_bias(attn_mask, query.shape[2], key.shape[2], is_causal)
        attn_mask = None
    kpm = bias = None
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dim() == 0:
            raise ValueError("attn_mask must have at least one dim (broadcastable to (B, H, Sq, Sk)), got a 0-d "
                             "tensor")
        if is_causal:
            raise ValueError("attn_mask and is_causal cannot both be set (as in torch)")
        if attn_mask.device != query.device:  # named here: past this point it is fastattn's bias or mask
            raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
        if attn_mask.is_floating_point() and attn_mask.dim() <= 4:
            check_broadcastable("attn_mask", attn_mask, (query.shape[0], query.shape[1], query.shape[2], key.shape[2]))
            bias = attn_mask  # SDPA's (B, H, Sq, Sk) float mask is fastattn's additive bias, same layout
        else:
            kpm = semantics.key_padding_from_mask(attn_mask, query.shape[0], key.shape[2])
            if kpm is None and backend in ("auto", "torch"):
                return _fallback_to_torch("only float masks and bool key-padding masks (broadcastable to "
                                          "(B, 1, 1, Sk)) run in the kernels", backend, query, key, value,
                                          attn_mask, dropout_p, is_causal, scale, enable_gqa)
            if kpm is None:  # a backend named explicitly: any bool mask, as a bias of 0 / -inf
                check_broadcastable("attn_mask", attn_mask,
                                    (query.shape[0], query.shape[1], query.shape[2], key.shape[2]))
                if attn_mask.dtype != torch.bool:
                    raise TypeError(f"attn_mask must be a bool or float tensor, got {attn_mask.dtype}")
                if "bias" not in backends.TABLE[backend].modifiers:
                    raise ValueError(f"scaled_dot_product_attention(backend={backend!r}): a bool attn_mask that is "
                                     "not a key-padding mask (B, 1, 1, Sk) runs as a 0 / -inf bias, which this "
                                     "backend does not take; backend='auto' falls back to torch's SDPA for it")
                bias = semantics.bool_to_bias(attn_mask, query.dtype)
    # (B, H, S, D) -> FlashAttention's (B, S, H, D) views, no copy.
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if not is_causal or bottom_right or q.shape[1] == k.shape[1]:  # (square causal: both alignments agree)
        out = attention(q, k, v, causal=is_causal, scale=scale, key_padding_mask=kpm, bias=bias, backend=backend)
        return out.transpose(1, 2)  # (B, S, H, D) -> (B, H, S, D)
    parts = []  # (is_causal excludes attn_mask: no mask or bias to slice here)
    for rows, keys, causal in semantics.top_left_causal(q.shape[1], k.shape[1]):  # SDPA's causal is top-left
        parts.append(attention(q[:, rows], k[:, :keys], v[:, :keys], causal=causal, scale=scale,
                               key_padding_mask=None if kpm is None else kpm[:, :keys], bias=bias, backend=backend))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return out.transpose(1, 2)  # (B, S, H, D) -> (B, H, S, D)


def available_backends() -> dict[str, backends.BackendStatus]:
    """Which backends are usable on this machine, and why the others are not."""
    return backends.available_backends()
