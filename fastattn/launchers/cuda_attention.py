"""Launch the CUDA C++ kernels (csrc/ -> fastattn._C -> here -> fastattn.ops.cuda_attention).

fastattn._C knows nothing of torch: it takes data pointers, element strides, sizes and the CUDA
stream. This module allocates the outputs, makes the inputs meet the kernels' alignment needs and
passes everything in. Inputs are FlashAttention-layout q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) with any
strides whose last dim is contiguous (used without a copy when 16-byte aligned), plus an optional
(B, Sk) key-padding mask (True = real key). Outputs are allocated contiguous; lse is (B, Hq, Sq)
float32 in natural log (-inf for a query that sees no key, whose output row is 0).
"""

from __future__ import annotations

import importlib.util

import torch

from fastattn.launchers.device import on_device, stream_of
from fastattn.launchers.key_bounds import key_bounds

IMPORT_ERROR: str | None = None
if importlib.util.find_spec("fastattn._C") is None:  # not built: no GPU / nvcc at install time
    _C, IMPORT_ERROR = None, "the installed package has no compiled fastattn._C"
else:
    try:
        from fastattn import _C
    except ImportError as e:  # built, but does not load (e.g. a CUDA runtime mismatch)
        _C, IMPORT_ERROR = None, f"{type(e).__name__}: {e}"

# Head dims with instantiated kernels (csrc/attn_params.h, FASTATTN_HEAD_DIMS; the built module's
# own list wins).
HEAD_DIMS = tuple(_C.HEAD_DIMS) if _C is not None else (32, 40, 64, 80, 96, 128)
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}
MAX_GRID_YZ = 65535      # heads and batch are CUDA grid axes 1 and 2
MAX_SEQLEN = 2**31 - 1024  # sequence positions are 32-bit ints in the kernels (offsets are 64-bit)


def _aligned(x: torch.Tensor) -> bool:
    """The kernels copy rows with 16-byte cp.async: base pointer and every stride of a dim that
    is actually stepped (size > 1) must be multiples of 16 bytes (8 fp16/bf16 elements)."""
    if x.stride(-1) != 1 or x.data_ptr() % 16:
        return False
    return all(st % 8 == 0 for st, n in zip(x.stride()[:-1], x.shape[:-1]) if n > 1)


def prepare(x: torch.Tensor) -> torch.Tensor:
    """x as is when the kernels can read it in place, else a contiguous, aligned copy."""
    return x if _aligned(x) else x.clone(memory_format=torch.contiguous_format)


def _mask_args(key_padding_mask: torch.Tensor | None, kv_bounds: torch.Tensor | None):
    """(kpm uint8 view, kv_bounds, kpm row stride, tensors to keep alive until the launch)."""
    if key_padding_mask is None:
        return 0, 0, 0, ()
    kpm = key_padding_mask if key_padding_mask.stride(-1) == 1 else key_padding_mask.contiguous()
    kpm = kpm.view(torch.uint8)
    bounds = key_bounds(key_padding_mask) if kv_bounds is None else kv_bounds
    return kpm.data_ptr(), bounds.data_ptr(), kpm.stride(0), (kpm, bounds)


def _bsh(x: torch.Tensor) -> list[int]:
    return [x.stride(0), x.stride(1), x.stride(2)]


def _require(q: torch.Tensor) -> None:
    """fastattn._C is built and q is a CUDA tensor (the API checks both; the ops can be called direct)."""
    if _C is None:
        raise RuntimeError(f"fastattn._C is not built ({IMPORT_ERROR}); see README, 'CUDA backend'")
    if q.device.type != "cuda":
        raise ValueError(f"the CUDA kernels take CUDA tensors, got q on {q.device}")


def forward(q, k, v, key_padding_mask, kv_bounds, causal: bool, scale: float):
    """out (B, Sq, Hq, D) in q's dtype and lse (B, Hq, Sq) float32. kv_bounds: key_bounds of the
    mask (None: computed here)."""
    _require(q)
    q, k, v = prepare(q), prepare(k), prepare(v)
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    out = torch.empty((b, sq, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if sk == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    kpm, bounds, kpm_stride, keep = _mask_args(key_padding_mask, kv_bounds)
    with on_device(q.get_device()):
        stream = stream_of(q)
        _C.fwd(DTYPE_CODES[q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
               kpm, bounds, _bsh(q) + _bsh(k) + _bsh(v) + _bsh(out) + [lse.stride(0), lse.stride(1), kpm_stride],
               [b, sq, sk, hq, hkv, d], float(scale), bool(causal), stream)
    del keep
    return out, lse


def backward(dout, q, k, v, out, lse, dlse, key_padding_mask, kv_bounds, causal: bool, scale: float):
    """(dq, dk, dv) given dout and, when the caller differentiates through lse, dlse (else None)."""
    _require(q)
    dout, q, k, v, out = (prepare(x) for x in (dout, q, k, v, out))
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.float().contiguous()
    delta = torch.empty_like(lse)
    dlse_t = dlse.float().contiguous() if dlse is not None else None
    kpm, bounds, kpm_stride, keep = _mask_args(key_padding_mask, kv_bounds)
    with on_device(q.get_device()):
        stream = stream_of(q)
        _C.bwd(DTYPE_CODES[q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), dout.data_ptr(),
               lse.data_ptr(), dlse_t.data_ptr() if dlse_t is not None else 0, delta.data_ptr(), dq.data_ptr(),
               dk.data_ptr(), dv.data_ptr(), kpm, bounds, kpm_stride,
               _bsh(q) + _bsh(k) + _bsh(v) + _bsh(out) + _bsh(dout) + _bsh(dq) + _bsh(dk) + _bsh(dv)
               + [lse.stride(0), lse.stride(1)],
               [b, sq, sk, hq, hkv, d], float(scale), bool(causal), stream)
    del keep
    return dq, dk, dv
