"""The one input validator for the public API: clear errors that name the argument."""

from __future__ import annotations

import math
import numbers
import os

import torch

from fastattn import cache_layouts
from fastattn.modifiers import ScoreMods
from fastattn.shape import AttentionShape

MAX_HEAD_DIM = 256
MAX_SOFTCAP = 1e30  # softcap * log2(e) must stay finite in float32 inside the kernels
MIN_SOFTCAP = 1e-30  # and so must its reciprocal (below ~1e-38 it overflows: 0 * inf = NaN at a zero logit)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, x, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_nested:
        raise TypeError(f"{name} must be a dense (strided) tensor, got a nested tensor (pack its sequences and use "
                        "attention_varlen)")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims {layout}, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {x.dtype}")


def validate_qkv(q, k, v, *, layout: str = "(B, S, H, D)") -> AttentionShape:
    """Check q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) and return their sizes.

    A valid call passes one combined test (a few attribute reads: this runs on every call); anything
    else goes through the checks below, which raise the error that names the argument."""
    try:
        ok = _qkv_ok(q, k, v, 4) and q.shape[0] == k.shape[0]
    except (AttributeError, TypeError, RuntimeError):  # (a strided nested tensor has no sizes)
        ok = False
    if ok:
        qs, ks = q.shape, k.shape
        return AttentionShape(qs[0], qs[1], ks[1], qs[2], ks[2], qs[3])
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x, 4, layout)
    for name, x in (("k", k), ("v", v)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; all inputs must share a device")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}; q, k and v must share a dtype")
    b, sq, hq, d = q.shape
    _check_same_shape(k, v)
    if k.shape[0] != b:
        raise ValueError(f"k has batch size {k.shape[0]} but q has {b}")
    if k.shape[3] != d:
        raise ValueError(f"k has head dim {k.shape[3]} but q has {d}; they must match")
    sk, hkv = k.shape[1], k.shape[2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"the number of query heads ({hq}) must be a multiple of the number of key/value heads ({hkv})"
        )
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim (last dim of q) must be between 1 and {MAX_HEAD_DIM}, got {d}")
    return AttentionShape(b, sq, sk, hq, hkv, d)


def _qkv_ok(q, k, v, ndim: int) -> bool:
    """The fast paths' one combined test of q (..., Hq, D), k/v (..., Hkv, D) with `ndim` dims: equal k/v
    shapes and head dims, Hq a multiple of Hkv > 0, a supported head dim, one float dtype, strided,
    one device. (Raises AttributeError/TypeError on a non-tensor: the caller's cue for the full checks.)"""
    qs, ks, dt = q.shape, k.shape, q.dtype
    return (len(qs) == ndim and len(ks) == ndim and ks == v.shape and qs[-1] == ks[-1] and ks[-2] > 0
            and qs[-2] % ks[-2] == 0 and 1 <= qs[-1] <= MAX_HEAD_DIM and dt in FLOAT_DTYPES and k.dtype == dt
            and v.dtype == dt and q.layout == k.layout == v.layout == torch.strided
            and q.device == k.device == v.device)


# The largest |scale| whose float32 product with log2(e) (the kernels' exp2 scale) is finite.
MAX_SCALE = float(torch.finfo(torch.float32).max) / math.log2(math.e) * (1 - 2**-20)


def validate_scale(scale, head_dim: int, name: str = "scale") -> float:
    """None -> 1/sqrt(D); otherwise a finite real number: a Python or NumPy int or float, or a 0-d
    real tensor as torch's SDPA takes them (a CUDA tensor's value is read: a sync). name: the
    argument as the caller wrote it."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if type(scale) is not float:  # (the usual case needs no ABC check)
        if isinstance(scale, torch.Tensor) and scale.dim() == 0 and not scale.is_complex() \
                and scale.dtype != torch.bool:
            scale = scale.item()
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"{name} must be a float or None, got {type(scale).__name__}")
    # Comparisons only (NaN fails them too): torch.compile traces them on a symbolic float, not math.isfinite.
    if not -MAX_SCALE <= scale <= MAX_SCALE:
        if scale != scale or scale in (math.inf, -math.inf):  # (an int past a float's range: the message below)
            raise ValueError(f"{name} must be finite, got {scale}")
        raise ValueError(f"{name} must be finite in float32 once times log2(e) (|scale| <= {MAX_SCALE:.4g}): the "
                         f"kernels scale scores in float32; got {scale}")
    return float(scale)


def validate_key_padding_mask(mask, shape: AttentionShape, q: torch.Tensor) -> None:
    if mask is None:
        return
    device = q.device
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor (True = real token), got {mask.dtype}")
    if tuple(mask.shape) != (shape.batch, shape.seqlen_k):
        raise ValueError(
            f"key_padding_mask must have shape (B, Sk) = {(shape.batch, shape.seqlen_k)}, got {tuple(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"key_padding_mask is on {mask.device} but q is on {device}")


def check_broadcastable(name: str, t: torch.Tensor, full: tuple[int, int, int, int]) -> None:
    """t (at most 4-D) must broadcast to full = (B, H, Sq, Sk) as torch broadcasts (right-aligned)."""
    shape = (1,) * (4 - t.dim()) + tuple(t.shape)
    if t.dim() > 4 or any(n != 1 and n != m for n, m in zip(shape, full)):
        raise ValueError(f"{name} must be broadcastable to (B, Hq, Sq, Sk) = {full}, got shape {tuple(t.shape)}")


def no_mods(bias, alibi_slopes, window, softcap, sinks) -> bool:
    """Whether a call asks for no score modifier: each None, softcap None or a number equal to 0.
    (Other falsy softcaps, False, "" or [], are modifiers here, for validate_mods to refuse by name.)"""
    return (bias is None and alibi_slopes is None and window is None and sinks is None
            and (softcap is None or (isinstance(softcap, numbers.Real) and not isinstance(softcap, bool)
                                     and softcap == 0)))


def validate_mods(bias, alibi_slopes, window, softcap, sinks, shape: AttentionShape, q: torch.Tensor,
                  causal: bool) -> ScoreMods | None:
    """Check the score modifiers (fastattn.modifiers) of a call with `shape`; None when there are none.

    bias: a float tensor broadcastable to (B, Hq, Sq, Sk) (packed calls: B sequences, Sq/Sk their
    max lengths, positions within each sequence). alibi_slopes: float32 (Hq,) or (B, Hq).
    window: (left, right) ints >= -1 (-1 = unbounded); with causal, right is at most 0.
    softcap: a float >= 0 (0 = off). sinks: a float (Hq,) tensor."""
    if no_mods(bias, alibi_slopes, window, softcap, sinks):
        return None
    b, hq = shape.batch, shape.heads_q
    full = (b, hq, shape.seqlen_q, shape.seqlen_k)
    if bias is not None:
        if not (type(bias) is torch.Tensor and bias.dtype in FLOAT_DTYPES and 0 < bias.dim() <= 4
                and bias.layout == torch.strided):  # one test for the usual case; else the error
            _check_tensor("bias", bias, bias.dim() if isinstance(bias, torch.Tensor) and 0 < bias.dim() <= 4 else 4,
                          "broadcastable to (B, Hq, Sq, Sk)")
        if bias.device != q.device:
            raise ValueError(f"bias is on {bias.device} but q is on {q.device}")
        check_broadcastable("bias", bias, full)
        if bias.dim() != 4:
            bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))  # a view: leading unit dims
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor):
            raise TypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(alibi_slopes).__name__}")
        if alibi_slopes.dtype != torch.float32:
            raise TypeError(f"alibi_slopes must be float32 (FlashAttention's convention), got {alibi_slopes.dtype}")
        if tuple(alibi_slopes.shape) not in ((hq,), (b, hq)):
            raise ValueError(f"alibi_slopes must have shape (Hq,) = ({hq},) or (B, Hq) = ({b}, {hq}), got "
                             f"{tuple(alibi_slopes.shape)}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but q is on {q.device}")
        if alibi_slopes.requires_grad and torch.is_grad_enabled():
            raise ValueError("alibi_slopes are fixed, not learned: the kernels give them no gradient (pass "
                             "alibi_slopes.detach(), or a bias tensor for a learned positional bias)")
        alibi_slopes = alibi_slopes.reshape(-1, hq)
        if alibi_slopes.stride(-1) != 1:
            alibi_slopes = alibi_slopes.contiguous()
    left, right = -1, -1
    if window is not None:
        if (not isinstance(window, (tuple, list)) or len(window) != 2 or type(window[0]) is not int
                or type(window[1]) is not int or window[0] < -1 or window[1] < -1):
            raise ValueError(f"window must be (left, right), two ints >= -1 (-1 = unbounded), got {window!r}")
        # A side past any sequence length (2**31 rows) reaches every key: unbounded (no int64 overflow).
        left, right = (-1 if w >= 2**31 else w for w in window)
    if causal:  # causal caps the right side at the diagonal; with no left side that is causal alone
        left, right = (-1, -1) if left == -1 else (left, 0)
    if softcap is None:
        softcap = 0.0
    if (isinstance(softcap, bool) or not isinstance(softcap, numbers.Real)  # (NumPy floats too, as scale)
            or not (softcap == 0 or MIN_SOFTCAP <= softcap <= MAX_SOFTCAP)):  # (NaN, inf: outside; no isfinite)
        raise ValueError(f"softcap must be 0 (off) or a float in [{MIN_SOFTCAP:g}, {MAX_SOFTCAP:g}], got {softcap!r}")
    softcap = float(softcap)
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or sinks.dtype not in FLOAT_DTYPES:
            raise TypeError(f"sinks must be a floating torch.Tensor of shape (Hq,), got "
                            f"{getattr(sinks, 'dtype', type(sinks).__name__)}")
        if sinks.dim() != 1 or sinks.shape[0] != hq:
            raise ValueError(f"sinks must have shape (Hq,) = ({hq},), got {tuple(sinks.shape)}")
        if sinks.device != q.device:
            raise ValueError(f"sinks is on {sinks.device} but q is on {q.device}")
        if sinks.stride(0) != 1:
            sinks = sinks.contiguous()  # the kernels read it with unit stride (differentiable copy)
    if bias is None and alibi_slopes is None and left == right == -1 and softcap == 0 and sinks is None:
        return None  # e.g. window=(-1, -1), or causal's own window
    return ScoreMods(bias, alibi_slopes, (left, right), float(softcap), sinks)


def validate_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def value_checks(device: torch.device) -> bool:
    """Whether to check tensor values on the host (cu_seqlens): always on CPU tensors, where reading
    them costs no device sync; on CUDA tensors only with FASTATTN_CHECK_VALUES=1 (hot paths stay
    sync-free and CUDA-graph capturable); never while torch.compile traces."""
    if torch.compiler.is_compiling():
        return False
    return device.type != "cuda" or os.environ.get("FASTATTN_CHECK_VALUES", "0") == "1"


def _check_same_shape(k, v) -> None:
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")


def validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> AttentionShape:
    """Check packed q (Tq, Hq, D), k/v (Tk, Hkv, D) and FlashAttention-style cumulative lengths.

    Returns the shape with batch = number of sequences and seqlen_q/k = max_seqlen_q/k. The value
    checks (start at 0, non-decreasing, end at the total, max_seqlen large enough) read cu_seqlens
    on the host, which for CUDA tensors is a device sync: they run for CPU tensors, and for CUDA
    tensors only when FASTATTN_CHECK_VALUES=1 (never while torch.compile traces). Without them the
    kernels still stay inside the tensors (they clamp each sequence to its total and max length), but
    bad lengths give wrong rows.
    """
    fast = _varlen_fast_path(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if fast is not None:
        return fast
    layout = "(total_tokens, H, D)"
    # Reuse the padded checks on a (1, T, H, D) view: same rules for heads, head dim, dtypes, devices.
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x, 3, layout)
    _check_same_shape(k, v)  # (before the (1, T, H, D) views: the error shows the shapes passed)
    shape = validate_qkv(q[None], k[None], v[None], layout=layout)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _check_index_tensor(name, cu, 1, q.device)
        if cu.numel() < 1:
            raise ValueError(f"{name} must be 1-D with batch + 1 entries, got shape {tuple(cu.shape)}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 0:  # (NumPy ints too, as torch)
            raise TypeError(f"{name} must be a non-negative int, got {m!r}")
    max_seqlen_q, max_seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
    if value_checks(cu_seqlens_q.device):
        both = torch.stack([cu_seqlens_q, cu_seqlens_k]).tolist()  # one host sync for both
        for name, values, total, max_len, mname in (
            ("cu_seqlens_q", both[0], q.shape[0], max_seqlen_q, "max_seqlen_q"),
            ("cu_seqlens_k", both[1], k.shape[0], max_seqlen_k, "max_seqlen_k"),
        ):
            if values[0] != 0:
                raise ValueError(f"{name} must start at 0, got {values[0]}")
            if values[-1] != total:
                raise ValueError(f"{name} must end at the total number of tokens ({total}), got {values[-1]}")
            lengths = [b - a for a, b in zip(values[:-1], values[1:])]
            if any(n < 0 for n in lengths):
                raise ValueError(f"{name} must be non-decreasing, got {values}")
            if lengths and max(lengths) > max_len:
                raise ValueError(f"{mname} ({max_len}) is smaller than the longest sequence ({max(lengths)})")
    batch = cu_seqlens_q.numel() - 1
    return AttentionShape(batch, max_seqlen_q, max_seqlen_k, shape.heads_q, shape.heads_kv, shape.head_dim)


def _varlen_fast_path(q, k, v, cu_q, cu_k, max_q, max_k) -> AttentionShape | None:
    """validate_varlen's result for a valid call whose values need no host check (CUDA tensors),
    from one combined test (every packed call runs it); None otherwise, and the full checks raise
    the error that names the argument."""
    try:
        dev = q.device
        ok = (_qkv_ok(q, k, v, 3) and type(cu_q) is type(cu_k) is torch.Tensor
              and cu_q.dtype == cu_k.dtype == torch.int32 and cu_q.dim() == 1 and cu_q.shape == cu_k.shape
              and cu_q.layout == cu_k.layout == torch.strided
              and cu_q.shape[0] >= 1 and cu_q.device == dev and cu_k.device == dev and type(max_q) is int
              and type(max_k) is int and max_q >= 0 and max_k >= 0 and not value_checks(dev))
    except (AttributeError, TypeError, RuntimeError):  # (a strided nested tensor has no sizes)
        ok = False
    return AttentionShape(cu_q.shape[0] - 1, max_q, max_k, q.shape[1], k.shape[1], q.shape[2]) if ok else None


def validate_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table) -> tuple[AttentionShape, int]:
    """Check a call on a KV cache: q (B, Sq, Hq, D); the cache, the new k/v and the lengths as
    ``validate_cache``. Returns (shape with seqlen_k = the cache's capacity per sequence, S_new)."""
    fast = _kvcache_fast_path(q, k_cache, v_cache, k, v, cache_seqlens, block_table)
    if fast is not None:
        return fast
    _check_tensor("q", q, 4, "(B, S, H, D)")
    b, sq, hq, d = q.shape
    if sq < 1:
        raise ValueError(f"q must hold at least one query token per sequence, got shape {tuple(q.shape)}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim (last dim of q) must be between 1 and {MAX_HEAD_DIM}, got {d}")
    capacity, n_new = validate_cache(k_cache, v_cache, k, v, cache_seqlens, block_table, like=q, what="q")
    hkv = k_cache.shape[2]
    if hq % hkv:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the cache's key/value heads ({hkv})")
    return AttentionShape(b, sq, capacity, hq, hkv, d), n_new


def _kvcache_fast_path(q, k_cache, v_cache, k, v, cache_seqlens, block_table):
    """validate_kvcache's result for a valid call whose values need no host check (CUDA tensors),
    from one combined test (a decode step is host-bound: this runs every token); None otherwise,
    and the full checks below raise the error that names the argument."""
    try:
        qs, cs, dt, dev = q.shape, k_cache.shape, q.dtype, q.device
        b, paged = qs[0], block_table is not None
        ok = (len(qs) == 4 and len(cs) == 4 and v_cache.shape == cs and qs[1] >= 1 and 1 <= qs[3] <= MAX_HEAD_DIM
              and cs[3] == qs[3] and cs[2] > 0 and qs[2] % cs[2] == 0 and dt in FLOAT_DTYPES
              and k_cache.dtype == dt and v_cache.dtype == dt and k_cache.device == dev and v_cache.device == dev
              and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
              and q.layout == k_cache.layout == v_cache.layout == torch.strided
              and cache_seqlens.dtype == torch.int32 and cache_seqlens.shape == (b,) and cache_seqlens.device == dev
              and cache_seqlens.layout == torch.strided
              and (cs[0] == b if not paged else (block_table.dtype == torch.int32 and block_table.dim() == 2
                                                  and block_table.layout == torch.strided
                                                  and block_table.shape[0] == b and block_table.device == dev
                                                  and cs[0] >= 1 and cs[1] >= 1)))
        if ok and k is not None:
            ks = k.shape
            ok = (v is not None and v.shape == ks and len(ks) == 4 and ks[0] == b and ks[2:] == cs[2:]
                  and 0 not in k_cache.stride() and 0 not in v_cache.stride()  # else the full check: _shares_rows
                  and k.dtype == dt and v.dtype == dt and k.device == dev and v.device == dev
                  and k.layout == v.layout == torch.strided)
        elif ok:
            ok = v is None
    except (AttributeError, TypeError, RuntimeError):  # (a strided nested tensor has no sizes)
        ok = False
    if not ok or value_checks(dev):
        return None
    capacity = cache_layouts.capacity(k_cache, block_table)
    return AttentionShape(b, qs[1], capacity, qs[2], cs[2], qs[3]), 0 if k is None else k.shape[1]


def validate_cache(k_cache, v_cache, k, v, cache_seqlens, block_table, *, like: torch.Tensor,
                   what: str) -> tuple[int, int]:
    """Check a KV cache and what is appended to it against `like` (named `what`: q, or the new k),
    whose batch size, head dim, dtype and device they must share.

    k_cache/v_cache: (B, S_max, Hkv, D), or paged (num_pages, page_size, Hkv, D) with block_table
    (B, max_pages) int32; optional new k/v (B, S_new, Hkv, D); cache_seqlens (B,) int32.
    Returns (capacity per sequence, S_new). The value checks (lengths fit the cache, the pages they
    use exist) read cache_seqlens and block_table on the host: always for CPU tensors, for CUDA
    tensors only with FASTATTN_CHECK_VALUES=1 (see value_checks); without them the kernels clamp
    to the cache (wrong rows for bad values, never a write outside it)."""
    paged = block_table is not None
    layout = "(num_pages, page_size, Hkv, D)" if paged else "(B, S_max, Hkv, D)"
    b, d = like.shape[0], like.shape[-1]
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, x, 4, layout)
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (it is written in place), got strides "
                             f"{tuple(x.stride())}")
        if x.device != like.device:
            raise ValueError(f"{name} is on {x.device} but {what} is on {like.device}; all inputs must share a device")
        if x.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but {what} has {like.dtype}; they must share a dtype")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    if k_cache.shape[3] != d:
        raise ValueError(f"k_cache has head dim {k_cache.shape[3]} but {what} has {d}; they must match")
    hkv = k_cache.shape[2]
    if hkv == 0:
        raise ValueError("k_cache must have at least one key/value head")
    if paged:
        _check_index_tensor("block_table", block_table, 2, like.device)
        if block_table.shape[0] != b:
            raise ValueError(f"block_table must have shape (B, max_pages) with B = {b}, got {tuple(block_table.shape)}")
        if k_cache.shape[0] < 1 or k_cache.shape[1] < 1:
            raise ValueError(f"a paged k_cache needs at least one page of at least one row, got {tuple(k_cache.shape)}")
        capacity, page_size = cache_layouts.capacity(k_cache, block_table), k_cache.shape[1]
    else:
        if k_cache.shape[0] != b:
            raise ValueError(f"k_cache has batch size {k_cache.shape[0]} but {what} has {b} (a paged cache needs "
                             "block_table)")
        capacity, page_size = k_cache.shape[1], 0
    n_new = 0
    if (k is None) != (v is None):
        raise ValueError("pass both k and v (the new tokens' keys and values) or neither")
    if k is not None:
        for name, x in (("k", k), ("v", v)):
            _check_tensor(name, x, 4, "(B, S_new, Hkv, D)")
            if x.device != like.device or x.dtype != like.dtype:
                raise ValueError(f"{name} must be a {like.dtype} tensor on {like.device}, got {x.dtype} on {x.device}")
            if x.shape[0] != b or x.shape[2:] != k_cache.shape[2:]:
                raise ValueError(f"{name} must have shape (B, S_new, Hkv, D) = ({b}, S_new, {hkv}, {d}), got "
                                 f"{tuple(x.shape)}")
        _check_same_shape(k, v)
        n_new = k.shape[1]
        for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
            if _shares_rows(x):
                raise ValueError(f"{name} is written in place (k and v are appended) but rows share memory: shape "
                                 f"{tuple(x.shape)}, strides {tuple(x.stride())} (an expanded tensor); pass a cache "
                                 "that owns its rows (e.g. .clone())")
    _check_index_tensor("cache_seqlens", cache_seqlens, 1, like.device)
    if cache_seqlens.shape[0] != b:
        raise ValueError(f"cache_seqlens must have shape (B,) = ({b},), got {tuple(cache_seqlens.shape)}")
    if value_checks(like.device):
        _check_cache_values(cache_seqlens, block_table, n_new, capacity, page_size, k_cache.shape[0])
    return capacity, n_new


def _shares_rows(cache: torch.Tensor) -> bool:
    """A cache dim of size > 1 with stride 0 (expanded): an append to one row writes the others too."""
    return any(n > 1 and st == 0 for n, st in zip(cache.shape[:3], cache.stride()[:3]))


def _check_index_tensor(name: str, x, ndim: int, device: torch.device) -> None:
    """cu_seqlens, cache_seqlens, block_table: int32 tensors of `ndim` dims on `device`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
    if x.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (FlashAttention's convention), got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the other inputs are on {device}")


def _check_cache_values(cache_seqlens, block_table, n_new, capacity, page_size, n_pages) -> None:
    """Lengths inside the cache and, paged, every page a sequence uses inside k_cache (host reads)."""
    lens = cache_seqlens.tolist()
    for i, n in enumerate(lens):
        if n < 0 or n + n_new > capacity:
            raise ValueError(f"cache_seqlens[{i}] = {n} with {n_new} new token(s) does not fit the cache's {capacity} "
                             "positions per sequence")
    if block_table is None:
        return
    for i, (n, row) in enumerate(zip(lens, block_table.tolist())):
        used = row[:-(-(n + n_new) // page_size)]
        bad = [p for p in used if not 0 <= p < n_pages]
        if bad:
            raise ValueError(f"block_table[{i}] points at page {bad[0]}, outside k_cache's {n_pages} pages")
