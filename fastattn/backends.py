"""Backends behind ``fastattn.attention``: what each supports, why one is unavailable, how "auto"
chooses. Each backend answers two questions: is it usable on this machine at all
(``unavailable_reason``), and does it support this particular call (``unsupported_reason``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastattn import reference
from fastattn.validation import AttentionShape

BACKENDS = ("triton", "cuda", "torch", "reference")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_GRID_YZ = 65535  # the Triton kernels put heads and batch on CUDA grid axes 1 and 2


@dataclass
class AttentionCall:
    """A validated, normalised call: FlashAttention layout, scale resolved."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    shape: AttentionShape
    causal: bool
    scale: float
    key_padding_mask: torch.Tensor | None
    return_lse: bool
    # Packed sequences (attention_varlen): q (Tq, Hq, D), k/v (Tk, Hkv, D).
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    def sequences(self):
        """Packed call -> one padded (1, S_i, H, D) call per sequence (for the naive backends)."""
        cu_q, cu_k = self.cu_seqlens_q.tolist(), self.cu_seqlens_k.tolist()
        for i in range(len(cu_q) - 1):
            q = self.q[cu_q[i]:cu_q[i + 1]][None]
            k, v = self.k[cu_k[i]:cu_k[i + 1]][None], self.v[cu_k[i]:cu_k[i + 1]][None]
            s = self.shape
            shape = AttentionShape(1, q.shape[1], k.shape[1], s.heads_q, s.heads_kv, s.head_dim)
            yield AttentionCall(q, k, v, shape, self.causal, self.scale, None, self.return_lse)


def _per_sequence(run_one, call: AttentionCall):
    """Run a padded-layout backend on each packed sequence and pack the results back:
    out (Tq, Hq, D) [, lse (Hq, Tq)]."""
    results = [run_one(c) for c in call.sequences()]
    if not call.return_lse:
        return torch.cat([o[0] for o in results], dim=0) if results else call.q.new_zeros(call.q.shape)
    if not results:
        return call.q.new_zeros(call.q.shape), call.q.new_empty((call.q.shape[1], 0), dtype=torch.float32)
    return torch.cat([o[0] for o, _ in results], dim=0), torch.cat([l[0] for _, l in results], dim=1)


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str


# ---------------------------------------------------------------- triton
def _import_triton() -> str | None:
    try:
        import triton  # noqa: F401

        import fastattn.ops  # noqa: F401  (registers the custom ops)
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"triton could not be imported: {type(e).__name__}: {e}"
    return None


# Imported once, eagerly, so that torch.compile never traces an import.
_TRITON_IMPORT_ERROR = _import_triton()


def _interpreter() -> bool:
    from fastattn.kernels.configs import interpreter_enabled

    return interpreter_enabled()


def _triton_unavailable() -> str | None:
    if _TRITON_IMPORT_ERROR:
        return _TRITON_IMPORT_ERROR
    if torch.cuda.is_available() or _interpreter():
        return None
    return ("no CUDA GPU is visible (set TRITON_INTERPRET=1 before importing triton to run the "
            "Triton kernels on the CPU through the interpreter; slow, meant for testing)")


def _triton_unsupported(call: AttentionCall) -> str | None:
    if call.q.dtype not in KERNEL_DTYPES:
        return f"dtype {call.q.dtype} is not supported (float16, bfloat16, float32)"
    if max(call.shape.batch, call.shape.heads_q) > MAX_GRID_YZ:
        return f"batch size and head count must be <= {MAX_GRID_YZ} (CUDA grid limit)"
    if not call.q.is_cuda and not _interpreter():
        return f"tensors are on {call.q.device}; the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)"
    return None


def _triton_run(call: AttentionCall):
    if call.varlen:
        out, lse = torch.ops.fastattn.triton_attn_varlen_fwd(
            call.q, call.k, call.v, call.cu_seqlens_q, call.cu_seqlens_k, call.max_seqlen_q, call.max_seqlen_k,
            call.causal, call.scale, call.return_lse)
    else:
        out, lse = torch.ops.fastattn.triton_attn_fwd(call.q, call.k, call.v, call.key_padding_mask, call.causal,
                                                       call.scale, call.return_lse)
    return (out, lse) if call.return_lse else out


# ---------------------------------------------------------------- cuda (csrc/, fastattn._C)
def _import_cuda_ops() -> str | None:
    try:
        import fastattn.ops.cuda_attention  # noqa: F401  (registers fastattn::cuda_attn_fwd / _bwd)
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"the cuda ops could not be registered: {type(e).__name__}: {e}"
    return None


_CUDA_OPS_ERROR = _import_cuda_ops()
CUDA_DTYPES = (torch.float16, torch.bfloat16)


def _cuda_capability_reason(device: torch.device) -> str | None:
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"the CUDA kernels need compute capability 8.0+ (mma.sync bf16, cp.async); {device} is {major}.{minor}"
    return None


def _cuda_unavailable() -> str | None:
    from fastattn.launchers import cuda_attention as launch

    if _CUDA_OPS_ERROR:
        return _CUDA_OPS_ERROR
    if launch.IMPORT_ERROR:
        return (f"fastattn._C is not built ({launch.IMPORT_ERROR}); it is built at install time when a CUDA GPU "
                "and nvcc are present, or with FASTATTN_BUILD_CUDA=1 (pip install --no-build-isolation -e .)")
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (fastattn._C is built, but its kernels need an sm_80+ GPU)"
    return _cuda_capability_reason(torch.device("cuda", torch.cuda.current_device()))


def _cuda_unsupported(call: AttentionCall) -> str | None:
    from fastattn.launchers import cuda_attention as launch

    if call.varlen:
        return "packed sequences (attention_varlen) are not supported by the CUDA kernels yet"
    if call.q.dtype not in CUDA_DTYPES:
        return f"dtype {call.q.dtype} is not supported by the CUDA kernels (float16, bfloat16)"
    if call.shape.head_dim not in launch.HEAD_DIMS:
        return (f"head dim {call.shape.head_dim} is not supported by the CUDA kernels "
                f"(built for {', '.join(map(str, launch.HEAD_DIMS))})")
    if not call.q.is_cuda:
        return f"tensors are on {call.q.device}; the CUDA kernels need CUDA tensors"
    if max(call.shape.batch, call.shape.heads_q) > launch.MAX_GRID_YZ:
        return f"batch size and head count must be <= {launch.MAX_GRID_YZ} (CUDA grid limit)"
    if max(call.shape.seqlen_q, call.shape.seqlen_k) > launch.MAX_SEQLEN:
        return f"sequence lengths must be <= {launch.MAX_SEQLEN} (32-bit positions in the kernels)"
    return _cuda_capability_reason(call.q.device)


def _cuda_run(call: AttentionCall):
    out, lse = torch.ops.fastattn.cuda_attn_fwd(call.q, call.k, call.v, call.key_padding_mask, call.causal,
                                                 call.scale, call.return_lse)
    return (out, lse) if call.return_lse else out


# ---------------------------------------------------------------- torch (SDPA)
def _torch_unsupported(call: AttentionCall) -> str | None:
    if call.return_lse:
        return "return_lse=True: PyTorch SDPA does not return the log-sum-exp"
    return None


def _torch_run(call: AttentionCall):
    if call.varlen:
        return _per_sequence(_torch_run, call)
    b, sq, sk = call.shape.batch, call.shape.seqlen_q, call.shape.seqlen_k
    q, k, v = call.q, call.k, call.v
    skipped = 0
    if call.causal and sq > sk:
        # Bottom-right causal: the first Sq - Sk queries see no key and return 0 (SDPA would give NaN).
        skipped, q = sq - sk, q[:, sq - sk:]
    if sk == 0 or q.shape[1] == 0:
        return _reference_run(call)  # empty: zeros that stay attached to the autograd graph
    # (B, S, H, D) -> (B, H, S, D), SDPA's layout.
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = call.shape.heads_q != call.shape.heads_kv
    if call.key_padding_mask is not None:
        out = _sdpa_with_padding(qt, kt, vt, call, gqa)
    elif call.causal and q.shape[1] != sk:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(q.shape[1], sk)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=call.scale, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=call.causal, scale=call.scale, enable_gqa=gqa)
    out = out.transpose(1, 2)  # back to (B, S, H, D)
    if skipped:
        out = torch.cat([out.new_zeros(b, skipped, *out.shape[2:]), out], dim=1)
    return out


def _sdpa_with_padding(qt, kt, vt, call: AttentionCall, gqa: bool) -> torch.Tensor:
    """SDPA with key_padding_mask as a boolean attn_mask (and the bottom-right causal mask):
    (B, H, Sq, D) -> (B, H, Sq, D). SDPA returns NaN for a query that sees no key, and NaN
    gradients through it; such rows get every key un-masked (finite values) and are then zeroed,
    so they return 0 with zero gradients, as the kernels do."""
    visible = reference.visible_keys(qt.shape[2], kt.shape[2], causal=call.causal,
                                     key_padding_mask=call.key_padding_mask, device=qt.device)  # (B, 1, Sq, Sk)
    empty = ~visible.any(dim=-1, keepdim=True)  # (B, 1, Sq or 1, 1)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=visible | empty, scale=call.scale, enable_gqa=gqa)
    return out.masked_fill(empty, 0.0)


# ---------------------------------------------------------------- reference
def _reference_run(call: AttentionCall):
    if call.varlen:
        return _per_sequence(_reference_run, call)
    return reference.attention(call.q, call.k, call.v, causal=call.causal, scale=call.scale,
                               key_padding_mask=call.key_padding_mask, return_lse=call.return_lse)


_UNAVAILABLE = {"triton": _triton_unavailable, "cuda": _cuda_unavailable, "torch": lambda: None,
                "reference": lambda: None}
_UNSUPPORTED = {"triton": _triton_unsupported, "cuda": _cuda_unsupported, "torch": _torch_unsupported,
                "reference": lambda call: None}
_RUN = {"triton": _triton_run, "cuda": _cuda_run, "torch": _torch_run, "reference": _reference_run}


def available_backends() -> dict[str, BackendStatus]:
    """Every backend with whether it is usable on this machine and, if not, why."""
    result = {}
    for name in BACKENDS:
        reason = _UNAVAILABLE[name]()
        result[name] = BackendStatus(name, reason is None, reason or "available")
    return result


def why_not(name: str, call: AttentionCall) -> str | None:
    """None if backend `name` can run `call`, else the reason it cannot."""
    return _UNAVAILABLE[name]() or _UNSUPPORTED[name](call)


# "auto" on CUDA tensors prefers the fastest fastattn kernel that supports the call. The CUDA C++
# kernels are not in that order yet: they have been compile-checked but not yet run or timed on a
# GPU, so "auto" keeps the Triton kernels (measured faster than SDPA's FA2 on an H100) until a GPU
# run shows the cuda backend correct and faster; then put "cuda" first where it wins. backend="cuda"
# selects it explicitly.
AUTO_CUDA_ORDER = ("triton", "torch", "reference")


def auto_order(device: torch.device) -> tuple[str, ...]:
    # CUDA: the fastest fastattn kernel that supports the call; CPU: PyTorch's SDPA.
    return AUTO_CUDA_ORDER if device.type == "cuda" else ("torch", "reference")


def choose(backend: str, call: AttentionCall) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {backend!r}")
    if backend != "auto":
        reason = why_not(backend, call)
        if reason:
            raise ValueError(f"backend={backend!r} cannot run this call: {reason}")
        return backend
    for name in auto_order(call.q.device):
        if why_not(name, call) is None:
            return name
    raise AssertionError("the reference backend supports every valid call")  # pragma: no cover


def run(name: str, call: AttentionCall):
    return _RUN[name](call)
