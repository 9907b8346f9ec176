"""Who is benchmarked: fastattn's backends and what a user would otherwise pick.

Every provider takes and returns FlashAttention's layout, q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D),
and means the same attention: bottom-right causal (query i sees keys j <= i + Sk - Sq), an
optional key-padding mask (B, Sk), GQA when Hq != Hkv. The torch baselines get (B, H, S, D)
transposed views, as a user converting from this layout would pass them.

A provider that cannot run a case says why: ``unavailable()`` (not on this machine at all),
``unsupported(case, device)`` (not this case; known before running it), or the exception it raises
when run. ``timing_skip(device)`` is why its timings would mean nothing here (the Triton
interpreter on the CPU is checked for correctness but not timed).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fastattn
from benchmarks.cases import DECODE_SKIP_REASON, Case
from benchmarks.common import interpreter_on
from fastattn import reference, semantics

# Non-fused implementations materialise the (B, Hq, Sq, Sk) scores (and more for the backward):
# above this they are skipped instead of running out of memory or time.
MATERIALISED_SCORES_LIMIT = 2 * 2**30


@dataclass(frozen=True)
class Provider:
    name: str
    role: str  # "fastattn" (measured), "baseline" (compared against), "oracle" (the naive reference)
    description: str
    # (case, key_padding_mask, device) -> fn(q, k, v) -> out (B, Sq, Hq, D); setup (masks, compilation) not timed.
    build: Callable
    unavailable: Callable[[], str | None] = lambda: None
    unsupported: Callable[[Case, str], str | None] = lambda case, device: None
    timing_skip: Callable[[str], str | None] = lambda device: None
    # Entered around the provider's gate and timings (not per call: its cost is not the kernel's).
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


# ---------------------------------------------------------------- fastattn (public API only)
def _backend_unavailable(backend: str) -> str | None:
    status = fastattn.available_backends().get(backend)
    if status is None:
        return f"this fastattn has no {backend!r} backend"
    return None if status.available else status.reason


def _triton_unsupported(case: Case, device: str) -> str | None:
    if interpreter_on() and case.dtype == "bfloat16":
        return "the Triton interpreter cannot run bf16 tl.dot (triton-lang/triton#11584): bf16 is measured on a GPU"
    return None


def _fastattn(backend: str):
    def build(case: Case, mask, device):
        return lambda q, k, v: fastattn.attention(q, k, v, causal=case.causal, key_padding_mask=mask, backend=backend)
    return build


# ---------------------------------------------------------------- PyTorch SDPA, forced to one backend
def _sdpa_mask(case: Case, mask, device):
    """SDPA's attn_mask for this case (None: is_causal or no mask). SDPA's is_causal is top-left
    aligned, so bottom-right causal with Sq != Sk needs an explicit mask."""
    if mask is not None:  # key padding, (B, 1, 1, Sk) broadcast; with causal, the full (B, 1, Sq, Sk)
        if case.causal:
            return semantics.visible_keys(case.seqlen_q, case.seqlen_k, causal=True, key_padding_mask=mask,
                                          device=device)
        return mask[:, None, None, :]
    if case.causal and case.seqlen_q != case.seqlen_k:
        return semantics.visible_keys(case.seqlen_q, case.seqlen_k, causal=True, device=device)
    return None


def _flash_bottom_right(q, k, v):
    """SDPA's flash kernel with bottom-right causal (Sq != Sk): the op torch's lower-right
    CausalBias dispatches to (its is_causal is bottom-right, as in FlashAttention >= 2.1). Called
    directly because CausalBias falls back to the efficient or math kernel, whatever backend is
    forced, when flash cannot run; this way such a case fails (and says why) instead."""
    out = torch.ops.aten._scaled_dot_product_flash_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                             v.transpose(1, 2), 0.0, is_causal=True)[0]
    return out.transpose(1, 2)


def _sdpa(backend_name: str):
    def build(case: Case, mask, device):
        bottom_right = case.causal and case.seqlen_q != case.seqlen_k and mask is None
        if backend_name == "FLASH_ATTENTION" and bottom_right and torch.device(device).type == "cuda":
            return _flash_bottom_right
        attn_mask = _sdpa_mask(case, mask, device)
        is_causal = case.causal and attn_mask is None
        gqa = case.heads_q != case.heads_kv
        if backend_name == "EFFICIENT_ATTENTION" and bottom_right and not gqa:
            # The efficient kernel's own bottom-right mask (torch's lower-right CausalBias calls it), as a
            # user would pass it, rather than a dense (Sq, Sk) mask read on every tile.
            from torch.nn.attention.bias import causal_lower_right

            attn_mask = causal_lower_right(case.seqlen_q, case.seqlen_k)

        def run(q, k, v):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=attn_mask, is_causal=is_causal, enable_gqa=gqa)
            return out.transpose(1, 2)  # (B, H, Sq, D) -> (B, Sq, H, D)
        return run
    return build


def _sdpa_only(backend_name: str):
    """SDPA restricted to one backend (the provider's context: the run fails rather than fall back)."""
    def context():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([getattr(SDPBackend, backend_name)])
    return context


def _flash_not_torchs() -> str | None:
    """SDPA's flash backend is not PyTorch's own while another impl is active (fastattn's would
    measure fastattn against itself)."""
    current = getattr(torch.nn.attention, "current_flash_attention_impl", lambda: None)()
    return None if current is None else (f"torch's flash-attention impl is {current!r} "
                                         "(torch.nn.attention.restore_flash_attention_impl() for FlashAttention-2)")


def _materialising_unsupported(case: Case, device: str) -> str | None:
    if case.scores_bytes() > MATERIALISED_SCORES_LIMIT:
        return (f"materialises the {case.scores_bytes() / 2**30:.0f} GiB score matrix "
                f"(limit {MATERIALISED_SCORES_LIMIT / 2**30:.0f} GiB)")
    return None


def _cuda_only() -> str | None:
    return None if torch.cuda.is_available() else "a CUDA backend of SDPA; no CUDA GPU here"


# ---------------------------------------------------------------- FlexAttention (compiled)
def raise_recompile_limits() -> None:
    """One compiled function serves every case: each new shape, dtype, mask or score_mod is a
    recompile of the same frame, and past dynamo's recompile limit (8) it would silently run
    flex_attention eagerly (slow, materialising). Raise the limit for the run."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 1024)
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 4096)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    raise_recompile_limits()
    # Static shapes, as a user with a fixed-shape model compiles it (and as score_mods.py does): with the
    # default, the second shape seen recompiled with symbolic batch and length for every later case,
    # which loses the divisible-length fast path (masked loads on every tile).
    return torch.compile(flex_attention, dynamic=False)


def flex_unavailable() -> str | None:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError as e:
        return f"torch {torch.__version__} has no FlexAttention ({e})"
    return None


def _flex(case: Case, mask, device):
    from torch.nn.attention.flex_attention import create_block_mask

    flex = _compiled_flex()
    offset = case.seqlen_k - case.seqlen_q  # bottom-right causal: query i sees keys j <= i + offset
    block_mask = None
    if mask is not None:
        lengths = mask.sum(dim=1)  # padding at the end of each sequence: element b has its first lengths[b] keys

        def padded(b, h, q_idx, kv_idx):
            visible = kv_idx < lengths[b]
            return visible & (q_idx + offset >= kv_idx) if case.causal else visible
        block_mask = create_block_mask(padded, case.batch, None, case.seqlen_q, case.seqlen_k, device=device)
    elif case.causal:
        def causal(b, h, q_idx, kv_idx):
            return q_idx + offset >= kv_idx
        block_mask = create_block_mask(causal, None, None, case.seqlen_q, case.seqlen_k, device=device)
    gqa = case.heads_q != case.heads_kv

    def run(q, k, v):
        out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, enable_gqa=gqa)
        return out.transpose(1, 2)
    return run


# ---------------------------------------------------------------- naive reference
def _naive(case: Case, mask, device):
    return lambda q, k, v: reference.attention(q, k, v, causal=case.causal, key_padding_mask=mask)


PROVIDERS = {
    p.name: p for p in [
        Provider("fastattn-triton", "fastattn", "fastattn.attention(backend='triton')", _fastattn("triton"),
                 unavailable=lambda: _backend_unavailable("triton"), unsupported=_triton_unsupported,
                 timing_skip=lambda device: None if device == "cuda" else
                 "Triton interpreter (no GPU): correctness only"),
        Provider("fastattn-cuda", "fastattn", "fastattn.attention(backend='cuda')", _fastattn("cuda"),
                 unavailable=lambda: _backend_unavailable("cuda")),
        Provider("sdpa-flash", "baseline", "SDPA, FLASH_ATTENTION backend (FlashAttention-2)",
                 _sdpa("FLASH_ATTENTION"), unavailable=_flash_not_torchs, context=_sdpa_only("FLASH_ATTENTION")),
        Provider("sdpa-cudnn", "baseline", "SDPA, CUDNN_ATTENTION backend", _sdpa("CUDNN_ATTENTION"),
                 unavailable=_cuda_only, context=_sdpa_only("CUDNN_ATTENTION")),
        Provider("sdpa-efficient", "baseline", "SDPA, EFFICIENT_ATTENTION backend (xformers' kernel)",
                 _sdpa("EFFICIENT_ATTENTION"), unavailable=_cuda_only, context=_sdpa_only("EFFICIENT_ATTENTION")),
        Provider("sdpa-math", "baseline", "SDPA, MATH backend (unfused)", _sdpa("MATH"),
                 unsupported=lambda case, device: _materialising_unsupported(case, device),
                 context=_sdpa_only("MATH")),
        Provider("flex", "baseline", "torch.compile(flex_attention), block mask for causal/padding", _flex,
                 unavailable=flex_unavailable),
        Provider("naive", "oracle", "fastattn.reference.attention in the input dtype (unfused)", _naive,
                 unsupported=lambda case, device: _materialising_unsupported(case, device)),
    ]
}
BASELINES = tuple(name for name, p in PROVIDERS.items() if p.role == "baseline")
FASTATTN = tuple(name for name, p in PROVIDERS.items() if p.role == "fastattn")


def why_not(provider: Provider, case: Case, device: str) -> str | None:
    """Why ``provider`` does not run ``case`` here (None: it should run; it may still raise)."""
    if case.kind == "decode":
        return DECODE_SKIP_REASON
    return provider.unavailable() or provider.unsupported(case, device)
