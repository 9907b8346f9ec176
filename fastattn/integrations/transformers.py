"""Hugging Face transformers on fastattn: ``register()`` adds an attention implementation that
``from_pretrained(..., attn_implementation="fastattn")`` / ``from_config`` use in every layer.

transformers hands each layer (B, H, S, D) tensors and the mask its mask function built; we pass
fastattn (B, S, H, D) views (no copy), K/V with their own Hkv heads (GQA without repeat_kv) and:
- a boolean mask that is exactly key padding (+ causal, + sliding window) -> key_padding_mask, the
  kernels' fast path (found by rebuilding the mask from its own key columns and comparing; a
  (B, 1, 1, Sk) mask, e.g. a generate() step's, is one as it stands: taken by shape, unread);
- any other mask (packed sequences, custom 4-D masks, T5's position_bias) -> an additive bias;
- no mask -> SDPA's meaning of is_causal (top-left; transformers skips the mask only where that
  matches), which we mirror exactly.
Calls fastattn cannot run (dropout in training, output_attentions, an argument it does not know, no
mask for a layer without is_causal in an eager-only model) fall back to torch SDPA (or the model's own
eager function where SDPA cannot do it either) with a one-time warning naming the reason.
``CALLS`` counts both so a caller can check which path ran.
"""

from __future__ import annotations

import functools
import sys
import warnings
import weakref
from collections import Counter

import torch

import fastattn
from fastattn import semantics

try:
    import transformers  # noqa: F401  (only to fail early with the install hint)
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("fastattn.integrations.transformers needs transformers: pip install fastattn[hf]") from exc

__all__ = ["CALLS", "attention_forward", "register", "reset_counts"]

# "fastattn" (every call it ran), "mask: none|key padding|bias" (how the mask went), "fallback: <reason>"
CALLS: Counter = Counter()
_settings = {"backend": "auto"}  # a direct attention_forward call's backend: the last register()'s
_warned: set[str] = set()
# id(mask) -> (weak reference to the mask, its version, causal, window, key_padding or None, layer): the
# layers of a forward share a few mask tensors (Gemma 2: a sliding and a full one), so each is analysed
# once per forward (one host sync). The reference is weak (a held mask outlived its forward: 8 of them
# could hold gigabytes) and a dead one never matches a new tensor given the same id. A mask edited in
# place since (a user's 4-D mask) is read again: its version counter tells. A tensor made under
# torch.inference_mode has none: its analysis is reused only by later layers of the same forward (a
# higher layer_idx), so each forward reads it once. (An edit through .data bumps no version: not seen.)
_mask_cache: dict[int, tuple] = {}


def register(name: str = "fastattn", *, backend: str = "auto") -> str:
    """Register ``name`` as a transformers attention implementation backed by fastattn.

    backend: fastattn's backend for every call ("auto": Triton kernels on CUDA, SDPA on CPU).
    Returns ``name``, for ``attn_implementation=register()``.
    """
    if not isinstance(name, str) or not name or name in ("eager", "sdpa") or name.startswith("flash_attention"):
        raise ValueError(f"name must be a new attention implementation name, got {name!r}")
    if backend != "auto" and backend not in fastattn.available_backends():
        raise ValueError(f"backend must be 'auto' or one of {tuple(fastattn.available_backends())}, got {backend!r}")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    _settings["backend"] = backend
    AttentionInterface.register(name, _with_backend(backend))  # each name keeps its own backend
    # Without a mask function of its own, transformers builds no mask at all for a custom name. SDPA's
    # boolean mask (None where is_causal alone is exact) is what attention_forward reads.
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def _with_backend(backend: str):
    """attention_forward with fastattn's backend pinned: what register() registers under a name (a
    partial: no Python frame of its own per call, ~0.45 us less than a wrapper function)."""
    return functools.partial(attention_forward, backend=backend)


def reset_counts() -> None:
    """Clear CALLS and the once-per-reason warnings (tests)."""
    CALLS.clear()
    _warned.clear()


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      sliding_window=None, softcap=None, s_aux=None, position_bias=None, backend=None, **kwargs):
    """transformers' attention-function contract: query (B, Hq, Sq, D), key/value (B, Hkv, Sk, D),
    the mask from the registered mask function; returns (out (B, Sq, Hq, D), None). backend:
    fastattn's (None: the last register()'s; a registered name passes its own)."""
    reason = _unsupported(module, dropout, kwargs, is_causal, attention_mask)
    if reason:
        return _fallback(reason, module, query, key, value, attention_mask, dropout, scaling, is_causal,
                         sliding_window, softcap, s_aux, position_bias, **kwargs)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))  # SDPA's default
    sq, sk = query.shape[2], key.shape[2]
    window = None
    if sliding_window is not None:
        # transformers' causal window keeps `sliding_window` keys including the query's own
        # (masking_utils.sliding_window_overlay: kv > q - w); the bidirectional one |q - kv| <= w.
        window = (sliding_window - 1, 0) if causal else (sliding_window, sliding_window)
    key_padding, bias = None, None
    if attention_mask is None:
        if causal and sq == 1:
            causal = False  # SDPA's is_causal with one query: it sees every key
        elif causal and sk > sq:
            key, value = key[:, :, :sq], value[:, :, :sq]  # top-left causal: as SDPA crops (static cache prefill)
            sk = sq
        elif causal and sq > sk:  # top-left: query i sees keys j <= i (fastattn's causal is bottom-right)
            bias = semantics.bool_to_bias(_top_left_causal(sq, sk, query.device), query.dtype)[None, None]
            causal, window = False, None  # SDPA ignores the window without a mask
    elif position_bias is None:
        # A mask the same for every query (one query's: a generate() step) is a key-padding mask as it
        # stands, its padding, window and a static cache's unfilled tail all in it: taken by shape (no
        # analysis, no host sync, traceable), without the flags. Others are analysed.
        if attention_mask.dim() == 4 and attention_mask.shape[2] == 1:  # (a shape test first: cheaper)
            key_padding = semantics.key_padding_from_mask(attention_mask, query.shape[0], sk)
        if key_padding is not None:
            causal, window = False, None
        else:
            key_padding = _key_padding(attention_mask, causal, window, sq, sk, getattr(module, "layer_idx", None))
            if key_padding is not None and key_padding.shape[0] != query.shape[0]:
                key_padding = key_padding.expand(query.shape[0], sk)  # a mask broadcast over the batch
    if attention_mask is not None and key_padding is None:  # not key padding: the mask itself, additively
        bias = attention_mask
        if attention_mask.dtype == torch.bool:
            bias = semantics.bool_to_bias(attention_mask, query.dtype)
        causal, window = False, None
    if position_bias is not None:  # T5-style scores (as sdpa_attention_forward, with the mask's pattern or causal)
        position_bias = position_bias[..., :sk]
        if causal:
            position_bias = position_bias.masked_fill(~_top_left_causal(sq, sk, query.device), float("-inf"))
            causal = False
        bias = position_bias if bias is None else bias + position_bias
    CALLS["fastattn"] += 1
    CALLS["mask: " + ("bias" if bias is not None else "key padding" if key_padding is not None else "none")] += 1
    # (B, H, S, D) -> (B, S, H, D) views, no copy: the kernels read them through their strides (a last
    # dim that is not contiguous is copied by the launchers, inside the autograd Function).
    out = fastattn.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=causal,
                             scale=scaling, key_padding_mask=key_padding, bias=bias, window=window,
                             softcap=softcap or None, sinks=s_aux, backend=backend or _settings["backend"])
    return out, None


def _harmless_kwargs() -> frozenset[str]:
    """What transformers passes an attention function besides the named arguments that leaves the
    attention as the mask and those arguments say: flags, positions and packing the mask already
    holds, the loss's token count (the Trainer's num_items_in_batch), and whatever else its generic
    model kwargs (TransformersKwargs) declare in the installed version."""
    names = {"position_ids", "cache_position", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
             "seq_idx", "num_items_in_batch", "use_cache", "output_attentions", "output_hidden_states",
             "output_router_logits", "return_dict", "encoder_hidden_states", "past_key_value", "past_key_values",
             "layer_idx", "deterministic", "token_type_ids"}
    try:
        from transformers.utils import TransformersKwargs

        names |= set(TransformersKwargs.__annotations__)
    except ImportError:  # pragma: no cover - older transformers
        pass
    return frozenset(names)


_HARMLESS_KWARGS = _harmless_kwargs()


def _unknown_kwargs(kwargs) -> list[str]:
    """Arguments fastattn does not know that carry a value (Inkling 2's per-query `sinks`: ignored, they
    gave silently wrong outputs): the model's eager function runs such calls."""
    return [k for k, v in kwargs.items() if k not in _HARMLESS_KWARGS and v is not None and v is not False]


def _unsupported(module, dropout, kwargs, is_causal, attention_mask) -> str | None:
    if dropout and dropout > 0:
        return "attention dropout > 0 (training): fastattn has no dropout"
    if kwargs.get("output_attentions"):
        return "output_attentions=True: fastattn does not form the attention matrix"
    if not kwargs.keys() <= _HARMLESS_KWARGS:  # (one set test for the usual call)
        unknown = _unknown_kwargs(kwargs)
        if unknown:
            return f"{type(module).__name__} passes {', '.join(unknown)}, which fastattn does not run"
    if attention_mask is None and _causal_unknown(module, is_causal):
        return (f"{type(module).__name__} does not say whether it is causal (no is_causal) and its model "
                "does not support SDPA")
    return None


def _causal_unknown(module, is_causal) -> bool:
    """No is_causal, passed or on the layer, in a model transformers runs with eager attention only
    (Splinter, ALIGN's and CLAP's text encoders: bidirectional): SDPA's default (causal) would be a
    guess. Without a mask such calls run eager."""
    return is_causal is None and not hasattr(module, "is_causal") and _eager_only(type(module))


@functools.cache
def _eager_only(module_type: type) -> bool:
    """Whether an attention module comes from a transformers modeling file whose models do not support
    transformers' SDPA path (they run eager attention only)."""
    from transformers import PreTrainedModel

    models = [c for c in vars(sys.modules[module_type.__module__]).values()
              if isinstance(c, type) and issubclass(c, PreTrainedModel)]
    return bool(models) and not any(getattr(c, "_supports_sdpa", False) for c in models)


def _top_left_causal(sq: int, sk: int, device) -> torch.Tensor:
    """SDPA's is_causal as a bool mask (Sq, Sk): query i sees keys j <= i (one query sees every key)."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(sk - 1 if sq == 1 else 0)


def _key_padding(mask, causal, window, sq, sk, layer=None):
    """(B, Sk) key-padding mask if the boolean `mask` (B, 1|H, Sq, Sk) is exactly key padding plus
    fastattn's bottom-right causal/window pattern, else None (then the mask runs as a bias, so a
    mask this test misjudges costs speed, never correctness). One host sync per distinct mask and
    version (inference tensors: per forward, by the calling layer's index; see _mask_cache). Under
    torch.compile None: the test reads the mask's values (a graph break in every layer). The bias
    gives the same results (as transformers' SDPA path: padded keys' values must be finite), without
    the kernels' skipping of causal or windowed tiles."""
    if torch.compiler.is_compiling():
        return None
    version = None if mask.is_inference() else mask._version
    cached = _mask_cache.get(id(mask))
    if cached is not None and cached[0]() is mask and cached[1:4] == (version, causal, window):
        if version is not None:
            return cached[4]
        if layer is not None and cached[5] is not None and layer > cached[5]:  # (inference: the layer read last)
            _mask_cache[id(mask)] = (*cached[:5], layer)
            return cached[4]
    result = None
    if mask.dim() == 4 and mask.shape[-2:] == (sq, sk):
        result = semantics.key_padding_of_pattern(mask, causal, window)
    if len(_mask_cache) >= 8:  # masks of earlier forwards
        _mask_cache.clear()
    _mask_cache[id(mask)] = (weakref.ref(mask), version, causal, window, result, layer)
    return result


def _fallback(reason, module, query, key, value, attention_mask, dropout, scaling, is_causal, sliding_window,
              softcap, s_aux, position_bias, **kwargs):
    """torch SDPA (transformers' own sdpa function), or the model's eager function where SDPA cannot
    run the call (attention weights, softcap, sinks)."""
    CALLS[f"fallback: {reason}"] += 1
    needs_eager = bool(kwargs.get("output_attentions") or softcap or s_aux is not None or _unknown_kwargs(kwargs)
                       or _causal_unknown(module, is_causal))
    if reason not in _warned and not torch.compiler.is_compiling():  # (dynamo cannot trace warnings.warn)
        _warned.add(reason)
        warnings.warn(f"fastattn: {reason}; running {'eager' if needs_eager else 'torch SDPA'} attention instead",
                      stacklevel=3)
    if not needs_eager:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, position_bias=position_bias, **kwargs)
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(f"fastattn: {reason}, and {type(module).__name__} has no eager attention function")
    if attention_mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", False)):
        attention_mask = _top_left_causal(query.shape[2], key.shape[2], query.device)[None, None]  # as SDPA
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.where(attention_mask, 0.0, torch.finfo(query.dtype).min).to(query.dtype)
    extra = {k: v for k, v in (("sliding_window", sliding_window), ("softcap", softcap), ("s_aux", s_aux),
                               ("position_bias", position_bias)) if v is not None}
    return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **extra, **kwargs)
