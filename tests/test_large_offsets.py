"""Element offsets past 2**31: inputs laid out so that some element they hold lies more than 2**31
elements from their base (a head, batch, row, page or token stride times an index), checked against
the float64 reference with the tolerance rule. A kernel that computes such an offset in 32 bits
wraps it and reads or writes outside the tensor.

Only the elements a view holds are ever written (``_spread``: a strided view of one large
``torch.empty``), so a CPU run touches a few pages of a 4-5 GiB virtual allocation; a GPU allocates
it for real (4-5 GiB per case). Each case runs in a process of its own, because a wrapped offset
usually crashes the process (a segfault in the interpreter, an illegal address on a GPU) instead of
failing an assert: ``python tests/test_large_offsets.py CASE`` runs one case and exits non-zero if it
fails. Strides are multiples of 8 elements (16 bytes), so that the CUDA C++ kernels, which take the
padded cases on a GPU, read the views in place rather than a compact copy.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest
import torch


def past_int32(n: int) -> int:
    """A stride, a multiple of 8, that puts index n - 1 past 2**31 elements while itself fitting
    int32 (so Triton passes it as a 32-bit integer, as it would a real one)."""
    return (2**31 // (n - 1) // 8 + 1) * 8


ROW_STRIDE = past_int32(17)  # rows 0..16


def _spread(shape, strides, gen, device, dtype=torch.float16, count=1):
    """Random values in a view of `shape` with `strides` over one allocation just large enough; with
    count > 1, that many such views (e.g. K and V), each in the gaps the largest stride leaves."""
    big = max(strides)
    inner = 1 + sum((n - 1) * st for n, st in zip(shape, strides) if st != big)  # one step of the big dim
    assert count * inner <= big, "the views would overlap"
    store = torch.empty(1 + sum((n - 1) * st for n, st in zip(shape, strides)) + (count - 1) * inner, dtype=dtype,
                        device=device)
    views = [store[i * inner:].as_strided(shape, strides) for i in range(count)]
    for x in views:
        x.copy_(torch.randn(shape, generator=gen))  # writes only the view's elements
    return views[0] if count == 1 else views


class _SpreadGrad(torch.autograd.Function):
    """Identity whose backward hands on the gradient in a spread-out layout (rows ROW_STRIDE apart):
    the attention backward then reads dO through that layout."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        b, s, h, d = g.shape
        spread = torch.empty(1 + (b * s - 1) * ROW_STRIDE + h * d, dtype=g.dtype, device=g.device)
        out = spread.as_strided(g.shape, (s * ROW_STRIDE, ROW_STRIDE, d, 1))
        return out.copy_(g)


def _padded_case(q, k, v, gen, causal=True, bias=None, spread_dout=False, key_padding_mask=None) -> dict:
    """{backend: comparisons} for the Triton kernels and, where they run (a GPU, no bias), the CUDA
    C++ ones."""
    import fastattn
    from fastattn import testing

    def on(backend):
        def fn(a, b, c, **m):
            out, lse = fastattn.attention(a, b, c, causal=causal, key_padding_mask=key_padding_mask,
                                          return_lse=True, backend=backend, **m)
            return (_SpreadGrad.apply(out) if spread_dout else out), lse
        return fn

    cuda = fastattn.available_backends()["cuda"].available and bias is None
    if cuda:
        from fastattn.launchers import cuda_attention

        if any(cuda_attention.prepare(x) is not x for x in (q, k, v)):  # (else the kernels read a copy)
            raise AssertionError("the CUDA C++ kernels would copy these inputs instead of reading them in place")
    mods = {} if bias is None else {"bias": bias}
    return {backend: testing.check_against_reference(on(backend), q, k, v, causal=causal,
                                                     key_padding_mask=key_padding_mask, lse_grad=True,
                                                     generator=gen, mods=mods)
            for backend in ("triton", "cuda")[:1 + cuda]}


def _qkv(b, s, hq, hkv, d, gen, device):
    return [torch.randn(b, s, h, d, generator=gen).to(device, torch.float16) for h in (hq, hkv, hkv)]


def case_gqa_query_heads(gen, device):
    """Q's heads past_int32(4) apart, a group of 4 (dK/dV walks the group's heads in one loop)."""
    _, k, v = _qkv(1, 16, 4, 1, 32, gen, device)
    q = _spread((1, 16, 4, 32), (0, 32, past_int32(4), 1), gen, device)
    return _padded_case(q, k, v, gen)


def case_gqa_bias_heads(gen, device):
    """A per-head bias whose heads lie past_int32(4) apart, a group of 4 (dbias included)."""
    q, k, v = _qkv(1, 16, 4, 1, 32, gen, device)
    bias = _spread((1, 4, 16, 16), (0, past_int32(4), 16, 1), gen, device)
    return _padded_case(q, k, v, gen, bias=bias)


def _summed_bias_case(q, k, v, gen, bias) -> dict:
    """_padded_case with FASTATTN_BIAS_GRAD=kernel (this case's process only): the bias's gradient
    summed over the batch in the dbias kernel (kernels/bias_grad.py), which must have run."""
    from fastattn.launchers import plans

    os.environ["FASTATTN_BIAS_GRAD"] = "kernel"
    results = _padded_case(q, k, v, gen, bias=bias)
    if not any(t["kernel"] == "dbias" for t in plans.tuned_configs()):
        raise AssertionError("the dbias kernel did not run")
    return results


def case_summed_bias_heads(gen, device):
    """A (1, 4) bias whose heads lie past_int32(4) apart, its gradient summed over a batch of 2."""
    q, k, v = _qkv(2, 16, 4, 1, 32, gen, device)
    return _summed_bias_case(q, k, v, gen, _spread((1, 4, 16, 16), (0, past_int32(4), 16, 1), gen, device))


def case_summed_bias_rows(gen, device):
    """A (1, 2) bias whose query rows lie ROW_STRIDE apart (17 rows), its gradient summed over a batch
    of 2 (the dbias kernel's 64-bit row offsets, WIDE)."""
    q, k, v = _qkv(2, 17, 2, 2, 32, gen, device)
    return _summed_bias_case(q, k, v, gen, _spread((1, 2, 17, 17), (0, 17, ROW_STRIDE, 1), gen, device))


def case_kv_batches(gen, device):
    """K and V batches past_int32(4) apart (batch 4), not causal."""
    q, _, _ = _qkv(4, 16, 2, 1, 32, gen, device)
    k, v = _spread((4, 16, 1, 32), (past_int32(4), 32, 32, 1), gen, device, count=2)
    return _padded_case(q, k, v, gen, causal=False)


def case_mask_batches(gen, device):
    """A key-padding mask whose batch rows lie past_int32(4) apart (batch 4; one row all padding)."""
    q, k, v = _qkv(4, 16, 2, 2, 32, gen, device)
    mask = _spread((4, 16), (past_int32(4), 1), gen, device, dtype=torch.bool)
    mask.copy_(torch.rand(4, 16, generator=gen) > 0.3)
    mask[2] = False
    return _padded_case(q, k, v, gen, causal=False, key_padding_mask=mask)


def case_query_rows(gen, device):
    """Q's rows ROW_STRIDE apart (17 rows): offsets within one head pass 2**31 (the kernels' 64-bit
    row offsets, WIDE)."""
    _, k, v = _qkv(1, 17, 2, 2, 32, gen, device)
    q = _spread((1, 17, 2, 32), (0, ROW_STRIDE, 32, 1), gen, device)
    return _padded_case(q, k, v, gen)


def case_bias_rows(gen, device):
    """A bias whose query rows lie ROW_STRIDE apart (17 rows)."""
    q, k, v = _qkv(1, 17, 2, 2, 32, gen, device)
    bias = _spread((1, 2, 17, 17), (0, 17, ROW_STRIDE, 1), gen, device)
    return _padded_case(q, k, v, gen, bias=bias)


def case_dout_rows(gen, device):
    """The output's gradient with rows ROW_STRIDE apart (dO is read by the preprocess, dK/dV and dQ)."""
    q, k, v = _qkv(1, 17, 2, 2, 32, gen, device)
    return _padded_case(q, k, v, gen, spread_dout=True)


def case_packed_rows(gen, device):
    """Packed sequences (17 and 3 tokens) whose tokens lie ROW_STRIDE apart in Q: offsets within the
    first sequence pass 2**31 (a sequence's start is 64-bit anyway)."""
    import fastattn
    from fastattn import testing

    cu = torch.tensor([0, 17, 20], dtype=torch.int32, device=device)
    q = _spread((20, 2, 16), (ROW_STRIDE, 16, 1), gen, device)
    k, v = (torch.randn(20, 1, 16, generator=gen).to(device, torch.float16) for _ in range(2))

    def varlen(backend):
        return lambda a, b, c: fastattn.attention_varlen(a, b, c, cu, cu, 17, 17, causal=True, return_lse=True,
                                                         backend=backend)

    return {"triton": testing.check_against_reference(varlen("triton"), q, k, v, lse_grad=True, generator=gen,
                                                      ref_fn=varlen("reference"))}


def _decode_case(k_cache, v_cache, table, gen, device) -> dict:
    import fastattn
    from fastattn import testing

    b = 3
    lens = torch.tensor([5, 9, 14], dtype=torch.int32, device=device)
    q = torch.randn(b, 1, 2, 16, generator=gen).to(device, torch.float16)
    k, v = (torch.randn(b, 1, 1, 16, generator=gen).to(device, torch.float16) for _ in range(2))
    results = []
    for splits in (1, 3):
        kc, vc = k_cache.clone(), v_cache.clone()  # what the cache held before the call (compact copies)
        fn = lambda: fastattn.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens,
                                                     block_table=table, num_splits=splits, return_lse=True,
                                                     backend="triton")
        results += testing.check_kvcache_against_reference(fn, q, kc, vc, k, v, lens, table)
        _check_appended(k_cache, v_cache, k, v, lens, table, f"attention_with_kvcache, splits={splits}")
    # The append alone (its own kernel), one position further.
    k, v = (torch.randn(b, 1, 1, 16, generator=gen).to(device, torch.float16) for _ in range(2))
    fastattn.append_to_kvcache(k_cache, v_cache, k, v, cache_seqlens=lens + 1, block_table=table, backend="triton")
    _check_appended(k_cache, v_cache, k, v, lens + 1, table, "append_to_kvcache")
    return {"triton": results}


def _check_appended(k_cache, v_cache, k, v, lens, table, what):
    """Each sequence's new key/value (one token) sits at its cache position lens[i]."""
    from fastattn.testing import cached_rows

    for i, n in enumerate(lens.tolist()):
        if not (torch.equal(cached_rows(k_cache, table, i, n + 1)[-1], k[i, 0])
                and torch.equal(cached_rows(v_cache, table, i, n + 1)[-1], v[i, 0])):
            raise AssertionError(f"{what}: sequence {i}'s new key/value is not at its cache position")


def case_decode_cache_batches(gen, device):
    """A contiguous KV cache whose batches lie past_int32(3) apart (batch 3): append + split-KV decode."""
    k_cache, v_cache = _spread((3, 16, 1, 16), (past_int32(3), 16, 16, 1), gen, device, count=2)
    return _decode_case(k_cache, v_cache, None, gen, device)


def case_decode_pages(gen, device):
    """A paged KV cache whose pages lie past_int32(4) apart (4 pages of 16; sequences on pages 3, 2, 1)."""
    k_cache, v_cache = _spread((4, 16, 1, 16), (past_int32(4), 16, 16, 1), gen, device, count=2)
    table = torch.tensor([[3], [2], [1]], dtype=torch.int32, device=device)
    return _decode_case(k_cache, v_cache, table, gen, device)


def case_decode_heads(gen, device):
    """KV heads past_int32(3) apart (a transformers-style head-major cache seen as (B, S, H, D)) and
    query heads past_int32(6) apart: attention with one query (the decode route, attend_full) and
    attention_with_kvcache appending a token (the append's head offset too)."""
    import fastattn
    from fastattn import testing
    from fastattn.launchers import decode

    decode.FEW_QUERIES_MIN_BYTES = 0  # (this process only: the view holds few bytes)
    k, v = _spread((1, 16, 3, 16), (16, 16, past_int32(3), 1), gen, device, count=2)
    q = _spread((1, 1, 6, 16), (16, 16, past_int32(6), 1), gen, device)
    fn = lambda a, b_, c: fastattn.attention(a, b_, c, return_lse=True, backend="triton")
    results = testing.check_against_reference(fn, q, k, v, grads=False, generator=gen)
    lens = torch.tensor([12], dtype=torch.int32, device=device)
    k_new, v_new = (torch.randn(1, 1, 3, 16, generator=gen).to(device, torch.float16) for _ in range(2))
    kc, vc = k.clone(), v.clone()
    call = lambda: fastattn.attention_with_kvcache(q, k, v, k_new, v_new, cache_seqlens=lens, return_lse=True,
                                                   backend="triton")
    results += testing.check_kvcache_against_reference(call, q, kc, vc, k_new, v_new, lens, None)
    _check_appended(k, v, k_new, v_new, lens, None, "attention_with_kvcache, heads apart")
    return {"triton": results}


def case_decode_group_heads(gen, device):
    """A GQA group's query heads past_int32(3) apart (3 heads on one KV head): the decode route."""
    import fastattn
    from fastattn import testing
    from fastattn.launchers import decode

    decode.FEW_QUERIES_MIN_BYTES = 0  # (this process only)
    q = _spread((1, 1, 3, 16), (16, 16, past_int32(3), 1), gen, device)
    k, v = (torch.randn(1, 20, 1, 16, generator=gen).to(device, torch.float16) for _ in range(2))
    fn = lambda a, b_, c: fastattn.attention(a, b_, c, return_lse=True, backend="triton")
    return {"triton": testing.check_against_reference(fn, q, k, v, grads=False, generator=gen)}


CASES = {name[len("case_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_offsets_past_int32(case):
    from conftest import SEED

    env = {**os.environ, "FASTATTN_TEST_SEED": str(SEED)}
    if not torch.cuda.is_available():
        env.setdefault("TRITON_INTERPRET", "1")
    env.setdefault("FASTATTN_AUTOTUNE", "0")
    res = subprocess.run([sys.executable, __file__, case], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{case}: exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    assert "all ok" in res.stdout, res.stdout


def _main(case: str) -> int:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash is this test's failure: no core file
    from conftest import DEVICE, SEED  # the tests' device, seed and interpreter set-up

    gen = torch.Generator().manual_seed((SEED + sum(map(ord, case))) % (2**31))
    print(f"case {case} on {DEVICE}, FASTATTN_TEST_SEED={SEED}", flush=True)
    results = [(backend, r) for backend, rs in CASES[case](gen, DEVICE).items() for r in rs]
    for backend, r in results:
        print(backend, r, flush=True)
    bad = [r for _, r in results if not r.ok]
    print("all ok" if results and not bad else f"{len(bad)} of {len(results)} comparisons failed")
    return 1 if bad or not results else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
