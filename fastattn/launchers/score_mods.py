"""The score modifiers' kernel arguments, shared by the attention and decode launchers: the kernels
take (bias, alibi_slopes, sinks) pointers, seven ints (bias strides (b, h, m, n), the slopes' batch
stride, window left/right), softcap * log2(e) and constexpr flags. A call without modifiers passes
constants (NO_MOD_INTS, NO_FLAGS): the flags compile the modifier code out."""

from __future__ import annotations

import math

LOG2E = math.log2(math.e)


def no_mods(mods) -> bool:
    """True when the (bias, alibi_slopes, sinks, window_left, window_right, softcap) are all off."""
    bias, alibi, sinks, left, right, softcap = mods
    return bias is None and alibi is None and sinks is None and left < 0 and right < 0 and softcap == 0.0


NO_FLAGS = dict(LOCAL=False, HAS_BIAS=False, HAS_ALIBI=False, SOFTCAP=False, HAS_SINKS=False)
NO_MOD_INTS = (0, 0, 0, 0, 0, 0, 0)


def kernel_args(q, b, hq, sq, sk, bias, alibi_slopes, sinks, window_left, window_right, softcap):
    """The kernels' modifier arguments: (pointers bias/alibi/sinks, ints (bias strides (b, h, m, n),
    slope batch stride, window left/right), cap2, flags, whether bias offsets need 64 bits).
    Absent pointers get q (never read). An unbounded window side becomes Sq + Sk (past every key)."""
    flags = dict(LOCAL=window_left >= 0 or window_right >= 0, HAS_BIAS=bias is not None,
                 HAS_ALIBI=alibi_slopes is not None, SOFTCAP=softcap != 0.0, HAS_SINKS=sinks is not None)
    bias_strides, wide = (0, 0, 0, 0), False
    if bias is not None:
        bias_strides = bias.expand(b, hq, sq, sk).stride()  # broadcast dims read with stride 0
        wide = (sq + 256) * abs(bias_strides[2]) + (sk + 256) * abs(bias_strides[3]) >= 2**31
    slope_stride = 0
    if alibi_slopes is not None:
        slope_stride = alibi_slopes.stride(0) if alibi_slopes.shape[0] > 1 else 0
    unbounded = sq + sk
    ints = (*bias_strides, slope_stride, window_left if window_left >= 0 else unbounded,
            window_right if window_right >= 0 else unbounded)
    ptrs = tuple(q if x is None else x for x in (bias, alibi_slopes, sinks))
    return ptrs, ints, softcap * LOG2E, flags, wide
