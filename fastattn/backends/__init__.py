"""The backends behind fastattn's functions: one table of what each runs, and one choose().

    fastattn.api / distributed / models  ->  backends (choose, run)  ->  fastattn.ops  ->  launchers  ->  kernels

Each backend is a record in TABLE (the call kinds it runs, dtypes, modifiers, whether it returns
the lse and is differentiable, its grid limit, where a GPU verified it) plus a module with
``unavailable()`` (why it cannot run on this machine at all, or None; asked once per process),
``unsupported(kind, call)`` (what the record cannot say: why it cannot run this call, or None)
and the runners of the kinds it has. ``choose(kind, call, backend)`` is the one backend choice:
the API, the ring, the models, the benchmarks and ``python -m fastattn check`` all ask it.

Call kinds: "attention" (padded batches), "varlen" (packed sequences), "kvcache" (decoding over a
KV cache), "append" (writing a KV cache), "ring" and "ring-varlen" (one block of ring attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from fastattn import cache_layouts
from fastattn.backends import cuda_backend, reference_backend, sdpa_backend, triton_backend
from fastattn.backends.call import AppendCall, AttentionCall, KVCacheCall

__all__ = ["AppendCall", "AttentionCall", "Backend", "BackendStatus", "BACKENDS", "KINDS", "KVCacheCall", "TABLE",
           "auto_order", "available_backends", "cannot_run", "choose", "ring_block", "run", "why_not"]

KINDS = {"attention": "padded attention", "varlen": "packed sequences (attention_varlen)",
         "kvcache": "KV-cache decoding (attention_with_kvcache)", "append": "KV-cache append",
         "ring": "ring attention blocks", "ring-varlen": "ring attention over packed documents"}
ALL_MODIFIERS = ("bias", "alibi_slopes", "window", "softcap", "sinks")


@dataclass(frozen=True)
class Backend:
    """What one backend runs. dtypes None = any floating dtype; grid_limit: the most batch elements
    and heads a launch takes (None = no limit); gpu_verified: the results folder where a GPU ran its
    tests, per kind ("" = never on a GPU: such a kind stays out of "auto")."""

    name: str
    module: ModuleType
    kinds: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] | None
    modifiers: tuple[str, ...]
    returns_lse: bool
    differentiable: bool
    grid_limit: int | None
    gpu_verified: dict
    about: str


H200_VERIFY = "benchmarks/results/2026-12-04-h200-verify"
TABLE = {b.name: b for b in (
    Backend("triton", triton_backend, ("attention", "varlen", "kvcache", "append", "ring", "ring-varlen"),
            (torch.float16, torch.bfloat16, torch.float32), ALL_MODIFIERS, returns_lse=True, differentiable=True,
            grid_limit=triton_backend.MAX_GRID_YZ,
            gpu_verified={kind: H200_VERIFY for kind in ("attention", "varlen", "kvcache", "append", "ring")},
            about="the Triton kernels (kernels/); CPU tensors through the Triton interpreter"),
    Backend("cuda", cuda_backend, ("attention", "ring"), (torch.float16, torch.bfloat16), (), returns_lse=True,
            differentiable=True, grid_limit=cuda_backend.MAX_GRID_YZ,
            gpu_verified={"attention": H200_VERIFY},
            about="the CUDA C++ kernels (csrc/, fastattn._C); correct on a GPU but slower than 'triton'"),
    Backend("torch", sdpa_backend, ("attention", "varlen", "kvcache", "append", "ring"), None,
            ("bias", "alibi_slopes", "window"), returns_lse=False, differentiable=True, grid_limit=None,
            gpu_verified={}, about="PyTorch's scaled_dot_product_attention (what users would otherwise call)"),
    Backend("reference", reference_backend, ("attention", "varlen", "kvcache", "append", "ring", "ring-varlen"), None,
            ALL_MODIFIERS, returns_lse=True, differentiable=True, grid_limit=None, gpu_verified={},
            about="fastattn.reference, the naive implementation (materialised scores)"),
)}
BACKENDS = tuple(TABLE)

# "auto": the first backend of the device's list whose record and module accept the call. On CUDA
# tensors the Triton kernels (1.05-1.39x SDPA's FlashAttention-2 backend on an H100,
# benchmarks/results/; every kind verified on an H200, H200_VERIFY); the CUDA C++ kernels are correct
# on a GPU but slower (0.62-0.76x FlashAttention-2), so "auto" never picks them: backend="cuda" does.
# On CPU tensors PyTorch's SDPA, then the reference where SDPA cannot (the lse, softcap, sinks).
AUTO = {"cuda": ("triton", "torch", "reference"), "cpu": ("torch", "reference")}


@dataclass(frozen=True)
class BackendStatus:
    """One backend as available_backends() reports it."""

    name: str
    available: bool
    reason: str
    score_modifiers: tuple[str, ...] = ()  # the attention() arguments it runs (bias, alibi_slopes, ...)
    kinds: tuple[str, ...] = ()
    returns_lse: bool = False
    gpu_verified: tuple[str, ...] = ()  # the kinds a GPU has verified
    about: str = ""


_unavailable: dict[str, str | None] = {}


@torch.compiler.assume_constant_result  # a constant of the process: torch.compile neither traces the
def unavailable_reason(name: str) -> str | None:  # cache's filling nor guards on it (a recompile each)
    """Why backend `name` cannot run on this machine (None if it can); found once per process."""
    if name not in _unavailable:
        _unavailable[name] = TABLE[name].module.unavailable()
    return _unavailable[name]


def available_backends() -> dict[str, BackendStatus]:
    """Every backend with whether it is usable on this machine and, if not, why: the table, rendered."""
    result = {}
    for name, b in TABLE.items():
        reason = unavailable_reason(name)
        result[name] = BackendStatus(name, reason is None, reason or "available", b.modifiers, b.kinds,
                                     b.returns_lse, tuple(k for k in b.kinds if b.gpu_verified.get(k)), b.about)
    return result


def why_not(name: str, kind: str, call) -> str | None:
    """None if backend `name` can run `call` of `kind` here, else the reason it cannot (a kind it never
    runs said first: that is the more useful reason)."""
    reason = unavailable_reason(name)
    if reason is None or kind not in TABLE[name].kinds:
        return cannot_run(name, kind, call)
    return reason


def cannot_run(name: str, kind: str, call) -> str | None:
    """Why backend `name` cannot run `call` of `kind` on any machine (None if it can): first what its
    record says (kind, modifiers, dtype, lse, grid), then its module's own checks."""
    b = TABLE[name]
    if kind not in b.kinds:
        return f"backend {name!r} does not run {KINDS[kind]}"
    mods = call.mods
    if mods is not None:
        missing = [m for m in mods.names() if m not in b.modifiers]
        if missing:
            why = getattr(b.module, "MODIFIERS_WHY", None)
            return f"score modifiers ({', '.join(missing)}) are not supported by backend {name!r}" + \
                (f": {why}" if why else "")
    if b.dtypes is not None and call.dtype not in b.dtypes:
        return f"dtype {call.dtype} is not supported by backend {name!r} ({', '.join(str(d)[6:] for d in b.dtypes)})"
    if not b.returns_lse and call.return_lse and kind in ("attention", "varlen", "kvcache"):
        return f"return_lse=True: backend {name!r} does not return the log-sum-exp"
    if b.grid_limit is not None:
        batch, heads = call.grid_extent
        if batch > b.grid_limit or heads > b.grid_limit:
            return f"batch size and head count must be <= {b.grid_limit} (CUDA grid limit)"
    return b.module.unsupported(kind, call)


def auto_order(device: torch.device) -> tuple[str, ...]:
    return AUTO["cuda" if device.type == "cuda" else "cpu"]


def check_name(kind: str, backend) -> None:
    """A ValueError unless `backend` is "auto" or a backend that runs calls of `kind`."""
    if backend == "auto":
        return
    if not isinstance(backend, str) or backend not in TABLE:
        names = [n for n, b in TABLE.items() if kind in b.kinds]
        raise ValueError(f"backend must be one of {tuple(names) + ('auto',)} for {KINDS[kind]}, got {backend!r}")


def choose(kind: str, call, backend: str = "auto") -> str:
    """The backend that runs `call` of `kind`: `backend` itself (ValueError saying why if it cannot),
    or for "auto" the first of auto_order that can."""
    if backend == "auto":
        for name in AUTO["cuda" if call.is_cuda else "cpu"]:
            if why_not(name, kind, call) is None:
                return name
        raise AssertionError("the reference backend supports every valid call")  # pragma: no cover
    check_name(kind, backend)
    reason = why_not(backend, kind, call)
    if reason:
        raise ValueError(f"backend={backend!r} cannot run this call: {reason}")
    return backend


def run(name: str, kind: str, call):
    """Run `call` of kind "attention", "varlen", "kvcache" or "append" on backend `name`."""
    module = TABLE[name].module
    if kind in ("attention", "varlen"):
        return module.run(call)
    if kind == "kvcache":
        run_kvcache = getattr(module, "run_kvcache", None)
        # A backend without a decode path of its own: a torch-op append, then dense keys with a mask.
        return call.over_dense_cache(module.run) if run_kvcache is None else run_kvcache(call)
    if kind == "append":
        append = getattr(module, "append_kv", None)
        if append is None:
            return cache_layouts.append(call.k_cache, call.v_cache, call.k, call.v, call.cache_seqlens,
                                        call.block_table)
        return append(call)
    raise ValueError(f"run() takes a call of kind attention/varlen/kvcache/append, got {kind!r}")


def ring_block(name: str):
    """Backend `name`'s ring-attention block (forward -> (out, lse); backward from the merged out/lse)."""
    return TABLE[name].module.ring_block()
