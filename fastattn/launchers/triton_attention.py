"""Launch the Triton attention kernels (kernels/ -> here -> fastattn.ops).

Inputs are FlashAttention-layout tensors q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) with any strides
whose last dim is contiguous; they are passed to the kernels as base pointer + strides, with no
copy. Outputs are allocated contiguous.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
from triton.runtime.errors import OutOfResources

from fastattn.kernels import configs
from fastattn.kernels.attn_bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, attn_bwd_preprocess_kernel
from fastattn.kernels.attn_fwd import attn_fwd_kernel

LOG2E = math.log2(math.e)
_KERNELS = {"fwd": attn_fwd_kernel, "dkdv": attn_bwd_dkdv_kernel, "dq": attn_bwd_dq_kernel}
_AUTOTUNE_KEY = ["HEAD_DIM", "CAUSAL", "DOT_PRECISION", "SEQ_BUCKET"]


def _needs_wide_offsets(*xs: torch.Tensor) -> bool:
    """True when a row offset inside one (batch, head) slice can reach 2**31 elements: the kernels
    then compute row offsets in 64 bits (slower: 64-bit offset vectors spill registers)."""
    return any((x.shape[1] + 256) * x.stride(1) >= 2**31 for x in xs)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    # The kernels index the head dim with unit stride; anything else needs the one copy.
    return x if x.stride(-1) == 1 else x.contiguous()


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs are computed in true fp32: tf32 would fail the tolerance rule on a GPU.
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _autotuned(kind: str, cands: tuple[configs.BlockConfig, ...]):
    return triton.autotune(configs=[c.as_triton() for c in cands], key=_AUTOTUNE_KEY)(_KERNELS[kind])


_first_fitting: dict[tuple, int] = {}


def _launch(kind: str, grid, args: tuple, **constexprs) -> None:
    """Launch kernel `kind` with the config(s) the table gives for this head dim: autotuned over
    the candidates on a GPU, else the first candidate that fits the chip."""
    fp32 = constexprs["DOT_PRECISION"] == "ieee"
    cands = configs.candidates(kind, constexprs["BLOCK_D"], fp32)
    if len(cands) > 1 and configs.autotune_enabled() and not fp32:
        _autotuned(kind, tuple(cands))[lambda meta: grid(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **constexprs)
        return
    key = (kind, tuple(cands), args[0].dtype, tuple(sorted(constexprs.items())))
    for i in range(_first_fitting.get(key, 0), len(cands)):
        c = cands[i]
        try:
            _KERNELS[kind][grid(c.block_m, c.block_n)](
                *args, BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages,
                **constexprs)
        except OutOfResources:
            if i == len(cands) - 1:
                raise
            continue
        _first_fitting[key] = i
        return


def _on_device(x: torch.Tensor):
    # Triton launches on the current CUDA device: make it the tensors' device.
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    """Returns out (B, Sq, Hq, D) in q's dtype and lse (B, Hq, Sq) float32 (natural log)."""
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    out = torch.empty((b, sq, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    with _on_device(q):
        _launch(
            "fwd",
            lambda bm, bn: (triton.cdiv(sq, bm), hq, b),
            (q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
             hq, hq // hkv, sq, sk, scale * LOG2E, configs.seq_bucket(max(sq, sk))),
            CAUSAL=causal, HEAD_DIM=d, DOT_PRECISION=_dot_precision(q.dtype), BLOCK_D=_block_d(d),
            WIDE=_needs_wide_offsets(q, k, v, out),
        )
    return out, lse


def backward(dout, q, k, v, out, lse, dlse, causal: bool, scale: float):
    """Gradients (dq, dk, dv) of attention, given dout (and dlse, the lse's gradient, or None)."""
    dout, q, k, v, out = (_last_dim_contiguous(x) for x in (dout, q, k, v, out))
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    dq = torch.empty((b, sq, hq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, sk, hkv, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((b, sk, hkv, d), dtype=v.dtype, device=v.device)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.contiguous()
    delta = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    block_d = _block_d(d)
    wide = _needs_wide_offsets(q, k, v, out, dout, dq, dk, dv)
    common = dict(CAUSAL=causal, HEAD_DIM=d, DOT_PRECISION=_dot_precision(q.dtype), BLOCK_D=block_d, WIDE=wide)
    bucket = configs.seq_bucket(max(sq, sk))
    with _on_device(q):
        pre_m = 64
        has_dlse = dlse is not None
        attn_bwd_preprocess_kernel[(triton.cdiv(sq, pre_m), hq, b)](
            out, dout, dlse.float().contiguous() if has_dlse else delta, delta,
            *_strides(out), *_strides(dout), hq, sq,
            HAS_DLSE=has_dlse, HEAD_DIM=d, BLOCK_M=pre_m, BLOCK_D=block_d, WIDE=wide,
        )
        _launch(
            "dkdv",
            lambda bm, bn: (triton.cdiv(sk, bn), hkv, b),
            (q, k, v, dout, lse, delta, dk, dv, *_strides(q), *_strides(k), *_strides(v), *_strides(dout),
             *_strides(dk), *_strides(dv), hq, hkv, hq // hkv, sq, sk, scale, scale * LOG2E, bucket),
            **common,
        )
        _launch(
            "dq",
            lambda bm, bn: (triton.cdiv(sq, bm), hq, b),
            (q, k, v, dout, lse, delta, dq, *_strides(q), *_strides(k), *_strides(v), *_strides(dout),
             *_strides(dq), hq, hq // hkv, sq, sk, scale, scale * LOG2E, bucket),
            **common,
        )
    return dq, dk, dv
