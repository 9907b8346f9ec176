"""Backend "cuda": the CUDA C++ kernels (csrc/ -> fastattn._C), through fastattn.ops. Padded
batches only, fp16/bf16, the head dims the extension was built for, sm_80+."""

from __future__ import annotations

import torch

from fastattn.backends.call import AttentionCall

# Imported once, eagerly, so that torch.compile never traces an import.
try:
    from fastattn.ops import cuda_attention as ext  # registers the ops; what the extension was built with
    from fastattn.ops import padded_attention
    from fastattn.ops.ring_blocks import KernelBlock

    MAX_GRID_YZ = ext.MAX_GRID_YZ
    _IMPORT_ERROR = None
except Exception as e:  # pragma: no cover - depends on the machine
    padded_attention = ext = None
    MAX_GRID_YZ = 65535
    _IMPORT_ERROR = f"the cuda ops could not be registered: {type(e).__name__}: {e}"


def _capability_reason(device: torch.device) -> str | None:
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"the CUDA kernels need compute capability 8.0+ (mma.sync bf16, cp.async); {device} is {major}.{minor}"
    return None


def unavailable() -> str | None:
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    if ext.IMPORT_ERROR:
        return (f"fastattn._C is not built ({ext.IMPORT_ERROR}); it is built at install time when a CUDA GPU "
                "and nvcc are present, or with FASTATTN_BUILD_CUDA=1 (pip install -e .)")
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (fastattn._C is built, but its kernels need an sm_80+ GPU)"
    return _capability_reason(torch.device("cuda", torch.cuda.current_device()))


def unsupported(kind: str, call: AttentionCall) -> str | None:
    """What the table cannot say (kinds "attention" and "ring"; dtypes, modifiers, grid: the table)."""
    if call.shape.head_dim not in ext.HEAD_DIMS:
        return (f"head dim {call.shape.head_dim} is not supported by the CUDA kernels "
                f"(built for {', '.join(map(str, ext.HEAD_DIMS))})")
    if not call.q.is_cuda:
        return f"tensors are on {call.q.device}; the CUDA kernels need CUDA tensors"
    if max(call.shape.seqlen_q, call.shape.seqlen_k) > ext.MAX_SEQLEN:
        return f"sequence lengths must be <= {ext.MAX_SEQLEN} (32-bit positions in the kernels)"
    return _device_reason(call.q.device)


_device_reasons: dict[torch.device, str | None] = {}


def _device_reason(device: torch.device) -> str | None:
    # The capability of a device does not change: asked once per device.
    if device not in _device_reasons:
        _device_reasons[device] = _capability_reason(device)
    return _device_reasons[device]


def run(call: AttentionCall):
    return padded_attention(call.q, call.k, call.v, call.key_padding_mask, call.causal, call.scale,
                            call.return_lse, "cuda")


def ring_block():
    return KernelBlock("cuda")
