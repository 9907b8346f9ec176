"""Launch the Triton attention kernels (kernels/ -> here -> fastattn.ops).

Inputs are FlashAttention-layout tensors q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), or packed
sequences q (Tq, Hq, D), k/v (Tk, Hkv, D) with int32 cu_seqlens, with any strides whose last dim is
contiguous; they are passed to the kernels as base pointer + strides, with no copy. An optional
key-padding mask (B, Sk) (True = real key) applies to padded inputs. Outputs are allocated contiguous.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import triton
from triton.runtime.errors import OutOfResources

from fastattn.kernels import configs
from fastattn.kernels.attn_bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, attn_bwd_preprocess_kernel
from fastattn.kernels.attn_fwd import attn_fwd_kernel
from fastattn.launchers.masks import key_bounds

LOG2E = math.log2(math.e)
_KERNELS = {"fwd": attn_fwd_kernel, "dkdv": attn_bwd_dkdv_kernel, "dq": attn_bwd_dq_kernel}
_AUTOTUNE_KEY = ["HEAD_DIM", "CAUSAL", "HAS_KPM", "VARLEN", "DOT_PRECISION", "SEQ_BUCKET"]


def _needs_wide_offsets(pb, *xs: torch.Tensor) -> bool:
    """True when a row offset inside one (batch, head) slice can reach 2**31 elements: the kernels
    then compute row offsets in 64 bits (slower: 64-bit offset vectors spill registers). Packed
    inputs (T, H, D) add a 64-bit sequence start, so only their rows within a sequence count."""
    if pb.varlen:
        return any((max(pb.seqlen_q, pb.seqlen_k) + 256) * x.stride(0) >= 2**31 for x in xs)
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


_dummies: dict[tuple, torch.Tensor] = {}


def _dummy(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A placeholder for a pointer argument the kernel will not read (its constexpr flag is off)."""
    key = (device, dtype)
    if key not in _dummies:
        _dummies[key] = torch.zeros(2, dtype=dtype, device=device)
    return _dummies[key]


@dataclass
class _Problem:
    """Everything the kernels need besides q/k/v: padded (B, S, H, D) or packed (T, H, D) inputs."""

    batch: int
    seqlen_q: int  # max over sequences when packed
    seqlen_k: int
    heads_q: int
    heads_kv: int
    head_dim: int
    causal: bool
    varlen: bool
    kpm: torch.Tensor | None  # uint8 view of the (B, Sk) key-padding mask
    kv_bounds: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor

    def strides(self, x: torch.Tensor) -> tuple[int, int, int]:
        # Packed tensors (T, H, D): the batch index picks a sequence through cu_seqlens, not a stride.
        return (0, x.stride(0), x.stride(1)) if self.varlen else (x.stride(0), x.stride(1), x.stride(2))

    def lse_shape(self, total_q: int) -> tuple[int, ...]:
        return (self.heads_q, total_q) if self.varlen else (self.batch, self.heads_q, self.seqlen_q)

    def lse_strides(self, lse: torch.Tensor) -> tuple[int, int]:
        return (0, lse.stride(0)) if self.varlen else (lse.stride(0), lse.stride(1))

    def mask_args(self, device) -> tuple:
        kpm = self.kpm if self.kpm is not None else _dummy(device, torch.uint8)
        return kpm, self.kv_bounds, self.cu_q, self.cu_k

    def constexprs(self, dtype: torch.dtype, wide: bool) -> dict:
        return dict(CAUSAL=self.causal, HAS_KPM=self.kpm is not None, VARLEN=self.varlen, HEAD_DIM=self.head_dim,
                    DOT_PRECISION=_dot_precision(dtype), BLOCK_D=_block_d(self.head_dim), WIDE=wide)


def _problem(q, k, causal, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> _Problem:
    device = q.device
    i32 = _dummy(device, torch.int32)
    if cu_seqlens_q is not None:
        # The kernels read cu_seqlens with unit stride.
        return _Problem(cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k, q.shape[1], k.shape[1], q.shape[2],
                        causal, True, None, i32, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous())
    kpm, bounds = None, i32
    if key_padding_mask is not None:
        kpm = _last_dim_contiguous(key_padding_mask).view(torch.uint8)
        bounds = key_bounds(key_padding_mask)
    return _Problem(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], causal, False, kpm,
                    bounds, i32, i32)


def forward(q, k, v, causal: bool, scale: float, key_padding_mask=None, cu_seqlens_q=None, cu_seqlens_k=None,
            max_seqlen_q: int = 0, max_seqlen_k: int = 0):
    """Returns out (q's shape and dtype) and lse in float32, natural log: (B, Hq, Sq) for padded
    inputs, (Hq, Tq) for packed ones (cu_seqlens given: q (Tq, Hq, D), k/v (Tk, Hkv, D))."""
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    pb = _problem(q, k, causal, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(pb.lse_shape(q.shape[0]), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or pb.batch == 0:
        return out, lse
    with _on_device(q):
        _launch(
            "fwd",
            lambda bm, bn: (triton.cdiv(pb.seqlen_q, bm), pb.heads_q, pb.batch),
            (q, k, v, out, lse, *pb.mask_args(q.device), *pb.strides(q), *pb.strides(k), *pb.strides(v),
             *pb.strides(out), *pb.lse_strides(lse), pb.kpm.stride(0) if pb.kpm is not None else 0,
             pb.heads_q, pb.heads_q // pb.heads_kv, pb.seqlen_q, pb.seqlen_k, scale * LOG2E,
             configs.seq_bucket(max(pb.seqlen_q, pb.seqlen_k))),
            **pb.constexprs(q.dtype, _needs_wide_offsets(pb, q, k, v, out)),
        )
    return out, lse


def backward(dout, q, k, v, out, lse, dlse, causal: bool, scale: float, key_padding_mask=None,
             cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q: int = 0, max_seqlen_k: int = 0):
    """Gradients (dq, dk, dv) of attention, given dout (and dlse, the lse's gradient, or None)."""
    dout, q, k, v, out = (_last_dim_contiguous(x) for x in (dout, q, k, v, out))
    pb = _problem(q, k, causal, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0 or dk.numel() == 0 or pb.batch == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    wide = _needs_wide_offsets(pb, q, k, v, out, dout, dq, dk, dv)
    consts = pb.constexprs(q.dtype, wide)
    kpm_stride = pb.kpm.stride(0) if pb.kpm is not None else 0
    bucket = configs.seq_bucket(max(pb.seqlen_q, pb.seqlen_k))
    with _on_device(q):
        # Row-wise: packed inputs run as one sequence of Tq rows.
        pre_m = 64
        rows, pre_batch = (q.shape[0], 1) if pb.varlen else (pb.seqlen_q, pb.batch)
        # ... so its row offsets span all Tq rows, not one sequence's.
        pre_wide = wide or (pb.varlen and any((rows + pre_m) * x.stride(0) >= 2**31 for x in (out, dout)))
        has_dlse = dlse is not None
        attn_bwd_preprocess_kernel[(triton.cdiv(rows, pre_m), pb.heads_q, pre_batch)](
            out, dout, dlse.float().contiguous() if has_dlse else delta, delta,
            *pb.strides(out), *pb.strides(dout), *pb.lse_strides(lse), rows,
            HAS_DLSE=has_dlse, HEAD_DIM=pb.head_dim, BLOCK_M=pre_m, BLOCK_D=consts["BLOCK_D"], WIDE=pre_wide,
        )
        _launch(
            "dkdv",
            lambda bm, bn: (triton.cdiv(pb.seqlen_k, bn), pb.heads_kv, pb.batch),
            (q, k, v, dout, lse, delta, dk, dv, *pb.mask_args(q.device), *pb.strides(q), *pb.strides(k),
             *pb.strides(v), *pb.strides(dout), *pb.strides(dk), *pb.strides(dv), *pb.lse_strides(lse), kpm_stride,
             pb.heads_q, pb.heads_kv, pb.heads_q // pb.heads_kv, pb.seqlen_q, pb.seqlen_k, scale, scale * LOG2E,
             bucket),
            **consts,
        )
        _launch(
            "dq",
            lambda bm, bn: (triton.cdiv(pb.seqlen_q, bm), pb.heads_q, pb.batch),
            (q, k, v, dout, lse, delta, dq, *pb.mask_args(q.device), *pb.strides(q), *pb.strides(k),
             *pb.strides(v), *pb.strides(dout), *pb.strides(dq), *pb.lse_strides(lse), kpm_stride,
             pb.heads_q, pb.heads_q // pb.heads_kv, pb.seqlen_q, pb.seqlen_k, scale, scale * LOG2E, bucket),
            **consts,
        )
    return dq, dk, dv
