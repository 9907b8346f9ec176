"""Fuzzing every call family against the float64 reference under the tolerance rule (issue 26):
padded batches (key-padding masks with empty rows, every score modifier, GQA), packed sequences
(lengths 0 and 1 included) and KV-cache decoding (contiguous and paged, lengths 0, new tokens 0-3,
forced splits), on the Triton kernels and the other backends "auto" may pick.

Quick profile (the normal suite): a few dozen cases per family. Long profile (`-m slow`): 400 per
family (1,200 cases), e.g. ``python -m pytest -m slow tests/test_fuzz.py``. On a GPU
(tools/gpu_check.sh) the same cases run on CUDA tensors, bf16 included. A failing case prints its
arguments; hypothesis replays it (its seed is an argument)."""

import pytest
import torch
from conftest import DEVICE, HAS_CUDA
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastattn
from fastattn import testing

QUICK = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
LONG = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
BACKENDS = ["triton", "auto", "reference"]


@st.composite
def modifiers(draw, hq, batch):
    """Score modifiers as fastattn.attention's keyword arguments (and the reference's)."""
    mods = {}
    if draw(st.booleans()):
        shape = draw(st.sampled_from(["full", "heads", "batch-1", "rows"]))
        mods["bias"] = shape
    if draw(st.integers(0, 3)) == 0:
        mods["alibi_slopes"] = draw(st.sampled_from([(hq,), (batch, hq)]))
    if draw(st.booleans()):
        mods["window"] = (draw(st.integers(-1, 40)), draw(st.integers(-1, 40)))
    if draw(st.integers(0, 3)) == 0:
        mods["softcap"] = draw(st.sampled_from([5.0, 30.0]))
    if draw(st.integers(0, 3)) == 0:
        mods["sinks"] = True
    return mods


def materialise(mods, b, hq, sq, sk, gen):
    """Strategy's modifier description -> tensors on DEVICE."""
    out = {}
    for name, spec in mods.items():
        if name == "bias":
            shape = {"full": (b, hq, sq, sk), "heads": (1, hq, sq, sk), "batch-1": (b, 1, 1, sk),
                     "rows": (1, 1, sq, 1)}[spec]
            out["bias"] = torch.randn(shape, generator=gen).to(DEVICE)
        elif name == "alibi_slopes":
            out["alibi_slopes"] = torch.rand(spec, generator=gen).to(DEVICE)
        elif name == "sinks":
            out["sinks"] = torch.randn(hq, generator=gen).to(DEVICE)
        else:
            out[name] = spec
    return out


def assert_all_ok(results, case):
    bad = [str(r) for r in results if not r.ok]
    assert not bad, f"{case}: " + "; ".join(bad)


def shared(draw) -> dict:
    """What every family draws: dtype, backend, whether lse is asked for, the inputs' seed."""
    return dict(dtype=draw(st.sampled_from(DTYPES)), backend=draw(st.sampled_from(BACKENDS)),
                lse=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def generator(case) -> torch.Generator | None:
    """The case's generator; None when it cannot run here (bf16 needs a GPU: the interpreter's bf16
    dot is wrong)."""
    if case["dtype"] == torch.bfloat16 and not HAS_CUDA:
        return None
    return torch.Generator().manual_seed(case["seed"])


@st.composite
def padded_cases(draw):
    b, hkv, group = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 4]))
    sq, sk = draw(st.integers(0, 90)), draw(st.integers(0, 90))
    return dict(b=b, sq=sq, sk=sk, hkv=hkv, hq=hkv * group, d=draw(st.sampled_from([16, 40, 64, 72])),
                causal=draw(st.booleans()), mask=draw(st.sampled_from([None, "random", "tail", "empty-row"])),
                mods=draw(modifiers(hkv * group, b)), **shared(draw))


def run_padded(case):
    gen = generator(case)
    if gen is None:
        return
    b, sq, sk, hq, hkv, d = (case[n] for n in ("b", "sq", "sk", "hq", "hkv", "d"))
    q, k, v = testing.random_qkv(b, sq, sk, hq, hkv, d, dtype=case["dtype"], device=DEVICE, generator=gen)
    mask = None
    if case["mask"] is not None:
        if case["mask"] == "random":
            mask = torch.rand(b, sk, generator=gen) < 0.7
        else:
            lengths = torch.randint(0, sk + 1, (b,), generator=gen)
            if case["mask"] == "empty-row":
                lengths[0] = 0
            mask = torch.arange(sk)[None] < lengths[:, None]
        mask = mask.to(DEVICE)
    mods = materialise(case["mods"], b, hq, sq, sk, gen)
    backend = case["backend"]

    def fn(a, b_, c, **m):  # without lse "auto" may take PyTorch SDPA
        r = fastattn.attention(a, b_, c, causal=case["causal"], key_padding_mask=mask, return_lse=case["lse"],
                               backend=backend, **m)
        return r if case["lse"] else (r, None)

    results = testing.check_against_reference(fn, q, k, v, causal=case["causal"], key_padding_mask=mask,
                                              generator=gen, mods=mods, lse=case["lse"], lse_grad=case["lse"])
    assert_all_ok(results, case)


@st.composite
def varlen_cases(draw):
    hkv, group = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2]))
    n = draw(st.integers(1, 4))
    lengths_q = draw(st.lists(st.sampled_from([0, 1, 2, 17, 33, 64]), min_size=n, max_size=n))
    same = draw(st.booleans())
    lengths_k = lengths_q if same else draw(st.lists(st.sampled_from([0, 1, 5, 40, 70]), min_size=n, max_size=n))
    return dict(lengths_q=lengths_q, lengths_k=lengths_k, hkv=hkv, hq=hkv * group,
                d=draw(st.sampled_from([16, 32, 64])), causal=draw(st.booleans()),
                window=draw(st.sampled_from([None, (3, 0), (8, 8), (-1, 2)])), **shared(draw))


def run_varlen(case):
    gen = generator(case)
    if gen is None:
        return
    hq, hkv, d, dt = case["hq"], case["hkv"], case["d"], case["dtype"]
    lq, lk = case["lengths_q"], case["lengths_k"]
    q = torch.randn(sum(lq), hq, d, generator=gen).to(DEVICE, dt)
    k, v = (torch.randn(sum(lk), hkv, d, generator=gen).to(DEVICE, dt) for _ in range(2))
    cu_q, cu_k = (torch.tensor([0] + lens).cumsum(0).to(DEVICE, torch.int32) for lens in (lq, lk))
    mq, mk = max(lq), max(lk)
    mods = {} if case["window"] is None else {"window": case["window"]}

    def fn(a, b_, c, **m):
        r = fastattn.attention_varlen(a, b_, c, cu_q, cu_k, mq, mk, causal=case["causal"], return_lse=case["lse"],
                                      backend=case["backend"], **m)
        return r if case["lse"] else (r, None)

    def per_sequence(a, b_, c, **m):  # the reference, sequence by sequence, packed back
        outs, lses = [], []
        for i in range(len(lq)):
            o, l_ = fastattn.reference.attention(a[cu_q[i]:cu_q[i + 1]][None], b_[cu_k[i]:cu_k[i + 1]][None],
                                                 c[cu_k[i]:cu_k[i + 1]][None], causal=case["causal"],
                                                 return_lse=True, **m)
            outs.append(o[0])
            lses.append(l_[0])
        return torch.cat(outs), torch.cat(lses, dim=1)

    results = testing.check_against_reference(fn, q, k, v, causal=case["causal"], generator=gen, mods=mods,
                                              ref_fn=per_sequence, lse=case["lse"])
    assert_all_ok(results, case)


@st.composite
def decode_cases(draw):
    n = draw(st.integers(1, 3))
    hkv, group = draw(st.integers(1, 2)), draw(st.sampled_from([1, 4]))
    return dict(lens=draw(st.lists(st.integers(0, 70), min_size=n, max_size=n)), n_new=draw(st.integers(0, 3)),
                sq=draw(st.integers(1, 3)), hkv=hkv, hq=hkv * group, d=draw(st.sampled_from([16, 64])),
                page_size=draw(st.sampled_from([0, 8, 16])), splits=draw(st.sampled_from([0, 1, 3])),
                causal=draw(st.booleans()), window=draw(st.sampled_from([None, (5, 0), (-1, -1)])),
                sinks=draw(st.booleans()), **shared(draw))


def run_decode(case):
    gen = generator(case)
    if gen is None:
        return
    lens, n_new, hq, hkv, d, dt = (case[n] for n in ("lens", "n_new", "hq", "hkv", "d", "dtype"))
    sq = n_new if n_new else case["sq"]
    capacity = max(lens) + n_new + 3
    k_cache, v_cache, table, seqlens = testing.random_kv_cache(lens, capacity, hkv, d, dtype=dt,
                                                               page_size=case["page_size"], device=DEVICE,
                                                               generator=gen)
    b = len(lens)
    q = torch.randn(b, sq, hq, d, generator=gen).to(DEVICE, dt)
    k = v = None
    if n_new:
        k, v = (torch.randn(b, n_new, hkv, d, generator=gen).to(DEVICE, dt) for _ in range(2))
    mods = {}
    if case["window"] is not None:
        mods["window"] = case["window"]
    if case["sinks"]:
        mods["sinks"] = torch.randn(hq, generator=gen).to(DEVICE)
    kw = dict(cache_seqlens=seqlens, block_table=table, causal=case["causal"], return_lse=case["lse"],
              backend=case["backend"], **mods)
    if case["backend"] == "triton":
        kw["num_splits"] = case["splits"]

    def call():
        r = fastattn.attention_with_kvcache(q, k_cache, v_cache, k, v, **kw)
        return r if case["lse"] else (r, None)

    results = testing.check_kvcache_against_reference(call, q, k_cache, v_cache, k, v, seqlens, table,
                                                      causal=case["causal"], mods=mods)
    assert_all_ok(results, case)


FAMILIES = {"padded": (padded_cases, run_padded), "varlen": (varlen_cases, run_varlen),
            "decode": (decode_cases, run_decode)}


def fuzz(family: str, profile):
    strategy, run = FAMILIES[family]

    @profile
    @given(strategy())
    def check(case):
        run(case)

    check()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fuzz_quick(family):
    fuzz(family, QUICK)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fuzz_long(family):
    fuzz(family, LONG)
