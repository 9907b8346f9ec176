"""The backends behind fastattn.attention and how "auto" chooses one.

    fastattn.api  ->  backends (choose)  ->  fastattn.ops (autograd, torch ops)  ->  launchers  ->  kernels

One module per backend, each with three functions: ``unavailable()`` (why it cannot run on this
machine at all, or None; asked once per process), ``unsupported(call)`` (why it cannot run this
call, or None) and ``run(call)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastattn import kvcache
from fastattn.backends import cuda_backend, reference_backend, sdpa_backend, triton_backend
from fastattn.backends.call import AttentionCall, KVCacheCall

__all__ = ["AttentionCall", "BackendStatus", "BACKENDS", "KVCacheCall", "append_kv", "available_backends", "choose",
           "choose_kvcache", "run", "run_kvcache", "why_not"]

BACKENDS = ("triton", "cuda", "torch", "reference")
_MODULES = {"triton": triton_backend, "cuda": cuda_backend, "torch": sdpa_backend, "reference": reference_backend}

# "auto" takes the first backend in the list that supports the call. On CUDA tensors: the Triton
# kernels (1.05-1.39x SDPA's FlashAttention-2 backend on an H100, benchmarks/results/); the CUDA C++
# kernels are correct on a GPU but slower (0.62-0.76x FlashAttention-2), so "auto" does not pick them
# yet: backend="cuda" selects them. On CPU tensors: PyTorch's SDPA.
AUTO_CUDA_ORDER = ("triton", "torch", "reference")
AUTO_CPU_ORDER = ("torch", "reference")
# Calls with score modifiers (bias, ALiBi, window, softcap, sinks): the Triton modifier variants
# (verified on an H200, benchmarks/results/2026-12-04-h200-verify/); SDPA takes what they cannot.
AUTO_CUDA_MODS_ORDER = ("triton", "torch", "reference")
# attention_with_kvcache: a module's unsupported_kvcache / run_kvcache, or for a module without a
# decode path of its own (torch, reference) its unsupported / run on the dense cache
# (KVCacheCall.padded: a torch-op append, then a key-padding mask per query). On CUDA tensors the
# Triton split-KV decode kernel (verified on an H200, same results folder), then that torch path.
AUTO_KVCACHE_CUDA_ORDER = ("triton", "torch", "reference")


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str
    score_modifiers: tuple[str, ...] = ()  # the attention() arguments it runs (bias, alibi_slopes, ...)


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
        result[name] = BackendStatus(name, reason is None, reason or "available", _MODULES[name].SCORE_MODIFIERS)
    return result


def why_not(name: str, call: AttentionCall) -> str | None:
    """None if backend `name` can run `call`, else the reason it cannot."""
    return unavailable_reason(name) or _MODULES[name].unsupported(call)


def auto_order(device: torch.device, mods=None) -> tuple[str, ...]:
    if device.type != "cuda":
        return AUTO_CPU_ORDER
    return AUTO_CUDA_ORDER if mods is None else AUTO_CUDA_MODS_ORDER


def choose(backend: str, call: AttentionCall) -> str:
    """The backend that runs `call`: `backend` itself (ValueError saying why if it cannot), or for
    "auto" the first of auto_order that can."""
    return _choose(backend, call, auto_order(call.q.device, call.mods), "unsupported")


def choose_kvcache(backend: str, call: KVCacheCall) -> str:
    """choose() for attention_with_kvcache."""
    order = AUTO_KVCACHE_CUDA_ORDER if call.q.device.type == "cuda" else AUTO_CPU_ORDER
    return _choose(backend, call, order, "unsupported_kvcache")


def _choose(backend, call, order, check) -> str:
    def why(name):
        module = _MODULES[name]
        return unavailable_reason(name) or getattr(module, check, module.unsupported)(call)

    if backend == "auto":
        for name in order:
            if why(name) is None:
                return name
        raise AssertionError("the reference backend supports every valid call")  # pragma: no cover
    if not isinstance(backend, str) or backend not in _MODULES:
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {backend!r}")
    reason = why(backend)
    if reason:
        raise ValueError(f"backend={backend!r} cannot run this call: {reason}")
    return backend


def run(name: str, call: AttentionCall):
    return _MODULES[name].run(call)


def run_kvcache(name: str, call: KVCacheCall):
    module = _MODULES[name]
    if hasattr(module, "run_kvcache"):
        return module.run_kvcache(call)
    return call.padded(module.run)


def append_kv(backend: str, k, v, k_cache, v_cache, cache_seqlens, block_table) -> None:
    """Write new keys/values into a KV cache in place: the Triton kernel for backend="triton" (and
    "auto" on CUDA tensors when it can run the call); torch ops otherwise."""
    if backend == "auto" and k.device.type == "cuda" and AUTO_KVCACHE_CUDA_ORDER[0] == "triton" \
            and not (unavailable_reason("triton") or triton_backend.unsupported_append(k)):
        backend = "triton"
    if backend == "triton":
        reason = unavailable_reason("triton") or triton_backend.unsupported_append(k)
        if reason:
            raise ValueError(f"backend='triton' cannot run this call: {reason}")
        triton_backend.append_kv(k, v, k_cache, v_cache, cache_seqlens, block_table)
    elif backend in ("auto", "torch", "reference"):
        kvcache.append(k_cache, v_cache, k, v, cache_seqlens, block_table)
    else:
        raise ValueError(f"backend must be one of 'auto', 'triton', 'torch', 'reference' for a KV-cache append, "
                         f"got {backend!r}")
