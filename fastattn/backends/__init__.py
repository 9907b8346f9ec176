"""The backends behind fastattn.attention and how "auto" chooses one.

    fastattn.api  ->  backends (choose)  ->  fastattn.ops (autograd, torch ops)  ->  launchers  ->  kernels

One module per backend, each with three functions: ``unavailable()`` (why it cannot run on this
machine at all, or None; asked once per process), ``unsupported(call)`` (why it cannot run this
call, or None) and ``run(call)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastattn.backends import cuda_backend, reference_backend, sdpa_backend, triton_backend
from fastattn.backends.call import AttentionCall

__all__ = ["AttentionCall", "BackendStatus", "BACKENDS", "available_backends", "choose", "run", "why_not"]

BACKENDS = ("triton", "cuda", "torch", "reference")
_MODULES = {"triton": triton_backend, "cuda": cuda_backend, "torch": sdpa_backend, "reference": reference_backend}

# "auto" takes the first backend in the list that supports the call. On CUDA tensors: the Triton
# kernels (1.05-1.39x SDPA's FlashAttention-2 backend on an H100, benchmarks/results/); the CUDA C++
# kernels are correct on a GPU but slower (0.62-0.76x FlashAttention-2), so "auto" does not pick them
# yet: backend="cuda" selects them. On CPU tensors: PyTorch's SDPA.
AUTO_CUDA_ORDER = ("triton", "torch", "reference")
AUTO_CPU_ORDER = ("torch", "reference")


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str


_unavailable: dict[str, str | None] = {}


def unavailable_reason(name: str) -> str | None:
    """Why backend `name` cannot run on this machine (None if it can); found once per process."""
    if name not in _unavailable:
        _unavailable[name] = _MODULES[name].unavailable()
    return _unavailable[name]


def available_backends() -> dict[str, BackendStatus]:
    """Every backend with whether it is usable on this machine and, if not, why."""
    result = {}
    for name in BACKENDS:
        reason = unavailable_reason(name)
        result[name] = BackendStatus(name, reason is None, reason or "available")
    return result


def why_not(name: str, call: AttentionCall) -> str | None:
    """None if backend `name` can run `call`, else the reason it cannot."""
    return unavailable_reason(name) or _MODULES[name].unsupported(call)


def auto_order(device: torch.device) -> tuple[str, ...]:
    return AUTO_CUDA_ORDER if device.type == "cuda" else AUTO_CPU_ORDER


def choose(backend: str, call: AttentionCall) -> str:
    """The backend that runs `call`: `backend` itself (ValueError saying why if it cannot), or for
    "auto" the first of auto_order that can."""
    if backend == "auto":
        for name in auto_order(call.q.device):
            if why_not(name, call) is None:
                return name
        raise AssertionError("the reference backend supports every valid call")  # pragma: no cover
    if not isinstance(backend, str) or backend not in _MODULES:
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {backend!r}")
    reason = why_not(backend, call)
    if reason:
        raise ValueError(f"backend={backend!r} cannot run this call: {reason}")
    return backend


def run(name: str, call: AttentionCall):
    return _MODULES[name].run(call)
