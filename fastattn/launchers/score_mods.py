"""The score modifiers of a launcher call (``Mods``) and their kernel arguments, shared by the
attention and decode launchers: the kernels take (bias, alibi_slopes, sinks) pointers, seven ints
(bias strides (b, h, m, n), the slopes' batch stride, window left/right), softcap * log2(e) and
constexpr flags. A call without modifiers passes
constants (NO_MOD_INTS, NO_FLAGS): the flags compile the modifier code out.

The softcap's tanh: from exp2 (SOFTCAP True), or the hardware's tanh.approx.f32 (SOFTCAP 2) for
16-bit inputs when FASTATTN_SOFTCAP_TANH=approx (approx_tanh)."""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch

from fastattn.kernels import configs

LOG2E = math.log2(math.e)


class Mods(NamedTuple):
    """The score modifiers of one launcher call (the launchers' record; fastattn.modifiers.ScoreMods
    is the API's, ``of`` converts): bias, alibi_slopes, sinks, window_left/right (-1 = unbounded),
    softcap (0 = off), as the ops' flat arguments."""

    bias: object = None
    alibi_slopes: object = None
    sinks: object = None
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0

    @classmethod
    def of(cls, mods) -> Mods:
        """From a fastattn.modifiers.ScoreMods (None: no modifiers)."""
        if mods is None:
            return NO_MODS
        return cls(mods.bias, mods.alibi_slopes, mods.sinks, *mods.window, mods.softcap)

    def off(self) -> bool:
        """True when every modifier is off: the kernels' plain path."""
        return (self.bias is None and self.alibi_slopes is None and self.sinks is None and self.window_left < 0
                and self.window_right < 0 and self.softcap == 0.0)


NO_MODS = Mods()


NO_FLAGS = dict(LOCAL=False, HAS_BIAS=False, HAS_ALIBI=False, SOFTCAP=False, HAS_SINKS=False)
NO_MOD_INTS = (0, 0, 0, 0, 0, 0, 0)


def kernel_args(q, b, hq, sq, sk, mods: Mods):
    """The kernels' modifier arguments for a Mods record: (pointers bias/alibi/sinks, ints (bias strides (b, h, m, n),
    slope batch stride, window left/right), cap2, flags, key). Absent pointers get q (never read).
    key: everything about the modifiers that a launch plan depends on (flags, ints, dtypes, whether
    bias offsets need 64 bits: key[2]). Worked out once per layout (_layout), as it runs every call."""
    bias, alibi_slopes, sinks, window_left, window_right, softcap = mods
    layout = _layout(b, hq, sq, sk, None if bias is None else (bias.shape, bias.stride(), bias.dtype),
                     None if alibi_slopes is None else (alibi_slopes.shape, alibi_slopes.stride()),
                     None if sinks is None else sinks.dtype, window_left, window_right, softcap,
                     softcap != 0.0 and approx_tanh(q.dtype))
    ptrs = (q if bias is None else bias, q if alibi_slopes is None else alibi_slopes, q if sinks is None else sinks)
    return (ptrs, *layout)


def approx_tanh(dtype: torch.dtype) -> bool:
    """Whether the softcap's tanh is the hardware's tanh.approx.f32 (one MUFU op per score instead of
    two; relative error about 2**-11) for inputs of `dtype`: with FASTATTN_SOFTCAP_TANH=approx, for
    16-bit inputs (float32 keeps the exact tanh). The default, "exp2", stays until a GPU session has
    checked and timed "approx" (tests/test_score_mods.py; benchmarks/score_mods.py adds its row on a
    GPU). Read per call (forward and backward each): set it for the process, or around a forward and
    its backward both, or the backward recomputes the scores with the other tanh."""
    mode = os.environ.get("FASTATTN_SOFTCAP_TANH", "exp2")
    if mode == "exp2":
        return False
    if mode != "approx":
        raise ValueError(f"FASTATTN_SOFTCAP_TANH must be 'exp2' or 'approx', got {mode!r}")
    if dtype not in (torch.float16, torch.bfloat16):
        return False
    if configs.interpreter_enabled():
        raise RuntimeError("FASTATTN_SOFTCAP_TANH=approx needs an NVIDIA GPU: the Triton interpreter cannot run "
                           "tanh.approx.f32 (inline PTX)")
    return True


def bias_grad_in_kernel() -> bool:
    """Whether the gradient of a bias that broadcasts over the batch and/or heads is summed in the
    dbias kernel (FASTATTN_BIAS_GRAD=kernel: kernels/bias_grad.py, bias-shaped, no float32 buffer)
    instead of written per (batch, head) into a float32 (B, Hq, Sq, Sk) buffer by the dQ kernel and
    summed afterwards ("buffer", the default until a GPU session has checked and timed "kernel":
    tests/test_score_mods.py, benchmarks/score_mods.py). Read per backward call."""
    mode = os.environ.get("FASTATTN_BIAS_GRAD", "buffer")
    if mode not in ("buffer", "kernel"):
        raise ValueError(f"FASTATTN_BIAS_GRAD must be 'buffer' or 'kernel', got {mode!r}")
    return mode == "kernel"


@functools.lru_cache(maxsize=1024)
def _layout(b, hq, sq, sk, bias, alibi, sinks_dtype, window_left, window_right, softcap, approx):
    """(ints, cap2, flags, key) for kernel_args from the modifiers' shapes, strides and dtypes. An
    unbounded window side, or one wider than that, becomes Sq + Sk (past every key). approx: the
    softcap through tanh.approx.f32 (SOFTCAP 2)."""
    flags = dict(LOCAL=window_left >= 0 or window_right >= 0, HAS_BIAS=bias is not None,
                 HAS_ALIBI=alibi is not None, SOFTCAP=2 if approx else softcap != 0.0,
                 HAS_SINKS=sinks_dtype is not None)
    bias_strides, wide, dtypes = (0, 0, 0, 0), False, (None, sinks_dtype)
    if bias is not None:
        shape, stride, dtype = bias
        # Broadcast dims are read with stride 0 (a dim of size 1 against a larger one).
        bias_strides = tuple(0 if n == 1 else st for n, st in zip(shape, stride))
        wide = (sq + 256) * abs(bias_strides[2]) + (sk + 256) * abs(bias_strides[3]) >= 2**31
        dtypes = (dtype, sinks_dtype)
    slope_stride = 0
    if alibi is not None:
        # (B, Hq) per batch element; (1, Hq), or (Hq,) from a direct op call: one row for every element
        slope_stride = alibi[1][0] if len(alibi[0]) == 2 and alibi[0][0] > 1 else 0
    # A side past every key (unbounded, or wider than the sequences) is Sq + Sk: the kernels' int32
    # range arithmetic must not wrap.
    unbounded = sq + sk
    ints = (*bias_strides, slope_stride, window_left if 0 <= window_left < unbounded else unbounded,
            window_right if 0 <= window_right < unbounded else unbounded)
    return ints, softcap * LOG2E, flags, (tuple(flags.values()), ints, wide, dtypes)


def launch_args(q, b, hq, sq, sk, mods: Mods):
    """kernel_args, or for a call without modifiers the constants that compile them out:
    (pointers (q as a never-read placeholder), NO_MOD_INTS, cap2 0.0, NO_FLAGS, key None)."""
    if mods.off():
        return (q, q, q), NO_MOD_INTS, 0.0, NO_FLAGS, None
    return kernel_args(q, b, hq, sq, sk, mods)
