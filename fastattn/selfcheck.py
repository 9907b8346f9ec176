"""`python -m fastattn check`: list the backends usable here and check each against the float64
reference on a handful of awkward cases, printing a table."""

from __future__ import annotations

import time

import torch

from fastattn import api, backends, testing
from fastattn.validation import validate_kvcache, validate_qkv

# (name, B, Sq, Sk, Hq, Hkv, D, causal, layout, padded): padded = a key-padding mask with a
# different number of real keys per batch element, one of them with none.
CASES = [
    ("self", 2, 97, 97, 2, 2, 64, False, "bshd", False),
    ("causal", 1, 130, 130, 2, 2, 64, True, "bshd", False),
    ("cross Sq<Sk causal", 1, 33, 150, 4, 2, 80, True, "bshd", False),
    ("cross Sq>Sk causal (empty rows)", 1, 70, 17, 2, 1, 40, True, "bshd", False),
    ("gqa non-contiguous", 2, 64, 64, 4, 1, 128, False, "bhsd", False),
    ("key padding mask", 3, 50, 90, 2, 2, 64, False, "bshd", True),
]


def _dtypes(device: torch.device) -> list[torch.dtype]:
    if device.type == "cuda":
        # fp32 (FMA dots, slow to compile) is covered by the test suite; keep the check quick.
        return [torch.float16, torch.bfloat16]
    # The interpreter cannot do bf16 tl.dot (triton-lang/triton#11584): bf16 is checked on a GPU.
    return [torch.float32, torch.float16]


def _integrations() -> list[str]:
    """What plugs fastattn into other code: the FlashAttention-compatible functions, and the Hugging
    Face integration when transformers is installed (its version read without importing it)."""
    from importlib import metadata

    lines = ["integrations: fastattn.flash_attn_func / flash_attn_varlen_func / flash_attn_with_kvcache "
             "(FlashAttention 2's API)"]
    try:
        version = metadata.version("transformers")
        lines.append(f"              transformers {version}: fastattn.integrations.transformers.register() adds "
                     "attn_implementation=\"fastattn\"")
    except metadata.PackageNotFoundError:
        lines.append("              transformers not installed (pip install fastattn[hf] for attn_implementation="
                     "\"fastattn\")")
    from fastattn.integrations import torch_flash

    missing = torch_flash.hook_missing()
    lines.append("              PyTorch's flash attention: " + (
        f"not replaceable here: {missing}" if missing else
        'torch.nn.attention.activate_flash_attention_impl("fastattn") routes SDPA\'s flash backend and '
        "varlen_attn to fastattn" + (" (active)" if torch_flash.active() else "")))
    import torch.distributed as dist

    if dist.is_available():
        transports = [name for name, ok in (("nccl", dist.is_nccl_available()), ("gloo", dist.is_gloo_available()))
                      if ok]
        lines.append(f"              fastattn.distributed.ring_attention (context parallel; torchrun): "
                     f"{', '.join(transports) or 'no transport'}")
    else:
        lines.append("              fastattn.distributed: this torch build has no torch.distributed")
    return lines


def run_check(device: str | None = None, out=print) -> bool:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out(f"fastattn self-check on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}"
        f" (torch {torch.__version__})")
    out("")
    out(f"{'backend':<10} {'available':<9} {'score modifiers':<42} reason")
    statuses = api.available_backends()
    for st in statuses.values():
        mods = ", ".join(st.score_modifiers) or "none"
        out(f"{st.name:<10} {'yes' if st.available else 'no':<9} {mods:<42} {st.reason}")
    out("")
    for line in _integrations():
        out(line)
    out("")
    header = f"{'backend':<10} {'dtype':<9} {'case':<32} {'worst (err / tol)':<28} {'pass':<5} {'time':>6}"
    out(header)
    out("-" * len(header))
    gen = torch.Generator().manual_seed(0)
    all_ok = True
    for name in backends.BACKENDS:
        if not statuses[name].available:
            continue
        for dtype in _dtypes(device):
            for case, b, sq, sk, hq, hkv, d, causal, layout, padded in CASES:
                q, k, v = testing.random_qkv(b, sq, sk, hq, hkv, d, dtype=dtype, device=device,
                                             layout=layout, generator=gen)
                mask = None
                if padded:  # batch element i has its first sk * i / (b - 1) keys real
                    real = torch.arange(b, device=device)[:, None] * sk // (b - 1)
                    mask = torch.arange(sk, device=device)[None, :] < real
                shape = validate_qkv(q, k, v)
                call = backends.AttentionCall(q, k, v, shape, causal, 1.0, mask, False)
                reason = backends.why_not(name, "attention", call)  # decided up front: an error later is a failure
                if reason:
                    out(f"{name:<10} {str(dtype)[6:]:<9} {case:<32} skipped: {reason}")
                    continue
                call.return_lse = True
                lse_ok = backends.why_not(name, "attention", call) is None

                def fn(a, b_, c, name=name, causal=causal, lse_ok=lse_ok, mask=mask):
                    res = api.attention(a, b_, c, causal=causal, key_padding_mask=mask, backend=name,
                                        return_lse=lse_ok)
                    return res if lse_ok else (res, None)

                def check(fn=fn, q=q, k=k, v=v, causal=causal, mask=mask, lse_ok=lse_ok):
                    return testing.check_against_reference(fn, q, k, v, causal=causal, key_padding_mask=mask,
                                                           lse=lse_ok, generator=gen)

                all_ok &= _run_case(out, name, dtype, case, check)
        for dtype in _dtypes(device):
            all_ok &= _check_decode(name, dtype, device, gen, out)
    out("")
    out("all checks passed" if all_ok else "SOME CHECKS FAILED")
    return all_ok


def _check_decode(name: str, dtype: torch.dtype, device: torch.device, gen: torch.Generator, out) -> bool:
    """attention_with_kvcache on a paged cache: 3 sequences of different lengths (one empty), GQA
    4/1, 2 new tokens, split across programs."""
    b, hq, hkv, d, page, pages_each, lens, new = 3, 4, 1, 64, 16, 8, [0, 37, 100], 2
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)  # noqa: E731
    k_cache, v_cache = rand(b * pages_each, page, hkv, d), rand(b * pages_each, page, hkv, d)
    table = torch.randperm(b * pages_each, generator=gen).view(b, pages_each).to(device, torch.int32)
    q, k, v = rand(b, new, hq, d), rand(b, new, hkv, d), rand(b, new, hkv, d)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    case = "decode paged kv-cache"
    shape, n_new = validate_kvcache(q, k_cache, v_cache, k, v, seqlens, table)
    call = backends.KVCacheCall(q, k_cache, v_cache, k, v, seqlens, table, shape, n_new, True, 1.0, False, 3)
    reason = backends.why_not(name, "kvcache", call)  # decided up front: an error later is a failure
    if reason:
        out(f"{name:<10} {str(dtype)[6:]:<9} {case:<32} skipped: {reason}")
        return True
    call.return_lse = True
    lse = backends.why_not(name, "kvcache", call) is None

    def fn():
        res = api.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, block_table=table,
                                         return_lse=lse, num_splits=3, backend=name)
        return res if lse else (res, None)

    return _run_case(out, name, dtype, case,
                     lambda: testing.check_kvcache_against_reference(fn, q, k_cache, v_cache, k, v, seqlens, table))


def _run_case(out, name, dtype, case, check) -> bool:
    """Run `check` (-> comparisons) for a call the backend supports: an exception is a failure."""
    t0 = time.perf_counter()
    try:
        results = check()
    except Exception as e:  # noqa: BLE001 (any error from a supported call fails the check)
        out(f"{name:<10} {str(dtype)[6:]:<9} {case:<32} {'raised ' + type(e).__name__:<28} FAIL  "
            f"{time.perf_counter() - t0:5.1f}s  {e}")
        return False
    return _report(out, name, dtype, case, results, time.perf_counter() - t0)


def _report(out, name, dtype, case, results, seconds) -> bool:
    """One table row: the worst comparison (error / tolerance) and whether all passed."""
    worst = max(results, key=lambda r: r.error / r.tolerance)
    ok = all(r.ok for r in results)
    summary = f"{worst.name} {worst.error:.1e} / {worst.tolerance:.1e}"
    out(f"{name:<10} {str(dtype)[6:]:<9} {case:<32} {summary:<28} {'ok' if ok else 'FAIL':<5} {seconds:5.1f}s")
    return ok
