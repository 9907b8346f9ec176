"""Decoding over a KV cache: fastattn.attention_with_kvcache / append_to_kvcache, the split-KV Triton
kernel (interpreter on CPU) and the torch fallback, against fastattn.reference in float64 on each
sequence's own keys (the tolerance rule), contiguous and paged caches, several new tokens, GQA/MQA,
forced split counts; the appends, the validation, the split heuristic, the ops; on a GPU, CUDA-graph
capture, no host sync, and direct launches."""

import warnings

import pytest
import torch
from conftest import DEVICE, HAS_CUDA, KERNEL_DTYPES

import fastattn
import fastattn.ops  # noqa: F401  (registers the ops)
from fastattn import reference, testing, validation
from fastattn.launchers import decode as launch
from fastattn.launchers import plans


def make_cache(lens, capacity, hkv, d, *, dtype, page_size, gen, spare_pages=3):
    """testing.random_kv_cache on DEVICE: (k_cache, v_cache, block_table, cache_seqlens)."""
    return testing.random_kv_cache(lens, capacity, hkv, d, dtype=dtype, page_size=page_size, device=DEVICE,
                                   generator=gen, spare_pages=spare_pages)


def expected_keys(k_cache, v_cache, table, lens):
    """Each sequence's first lens[b] keys and values (the test's own reading of the layouts)."""
    return ([testing.cached_rows(k_cache, table, b, n) for b, n in enumerate(lens)],
            [testing.cached_rows(v_cache, table, b, n) for b, n in enumerate(lens)])


def run_case(gen, lens, hq, hkv, d, n_new, page_size, splits, dtype=torch.float32, backend="triton", sq=None,
             capacity=None, causal=True, mods=None):
    sq = n_new if sq is None else sq
    capacity = capacity or max(lens) + n_new + 5
    k_cache, v_cache, table, seqlens = make_cache(lens, capacity, hkv, d, dtype=dtype, page_size=page_size, gen=gen)
    b = len(lens)
    q = torch.randn(b, sq, hq, d, generator=gen).to(DEVICE, dtype)
    k = v = None
    if n_new:
        k = torch.randn(b, n_new, hkv, d, generator=gen).to(DEVICE, dtype)
        v = torch.randn(b, n_new, hkv, d, generator=gen).to(DEVICE, dtype)
    untouched = (k_cache.clone(), v_cache.clone())
    lse_wanted = backend != "torch"
    outputs = []

    def call():
        result = fastattn.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, block_table=table,
                                                 causal=causal, return_lse=lse_wanted, num_splits=splits,
                                                 backend=backend, **(mods or {}))
        outputs.append(result if lse_wanted else (result, None))
        return outputs[-1]

    results = testing.check_kvcache_against_reference(call, q, k_cache, v_cache, k, v, seqlens, table, causal=causal,
                                                      mods=mods)
    assert all(r.ok for r in results), [str(r) for r in results]
    out = outputs[0][0]
    # The cache now holds the new tokens at their positions, and nothing else changed.
    after_k, after_v = expected_keys(k_cache, v_cache, table, [n + n_new for n in lens])
    before_k, before_v = expected_keys(*untouched, table, lens)
    for b_ in range(b):
        if k is not None:
            assert torch.equal(after_k[b_], torch.cat([before_k[b_], k[b_]]))
            assert torch.equal(after_v[b_], torch.cat([before_v[b_], v[b_]]))
    written = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    for b_, n in enumerate(lens):
        for j in range(n, n + n_new):
            written[(b_, j) if table is None else (int(table[b_, j // page_size]), j % page_size)] = True
    assert torch.equal(k_cache[~written], untouched[0][~written])
    assert torch.equal(v_cache[~written], untouched[1][~written])
    return out


# (cache lengths per sequence, Hq, Hkv): batch 1..5, lengths 0..1000 differing per sequence,
# GQA 8:1 and MQA.
LENGTHS_HEADS = [
    ((1000,), 16, 2),
    ((0, 17, 300), 4, 1),
    ((300, 0, 17, 1000, 1), 16, 2),
    ((17, 1), 4, 1),
]


@pytest.mark.parametrize("page_size", [0, 16, 64], ids=["contiguous", "paged16", "paged64"])
@pytest.mark.parametrize("n_new", [1, 4])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("case", range(len(LENGTHS_HEADS)))
def test_matches_reference(case, splits, n_new, page_size, gen):
    lens, hq, hkv = LENGTHS_HEADS[case]
    dtype = KERNEL_DTYPES[(case + splits) % len(KERNEL_DTYPES)]
    run_case(gen, list(lens), hq, hkv, 64, n_new, page_size, splits, dtype=dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("d", [40, 128, 256])
def test_head_dims_and_dtypes(d, dtype, gen):
    run_case(gen, [33, 130], 8, 2, d, 1, 16 if d == 40 else 0, 2, dtype=dtype)


@pytest.mark.parametrize("splits", [1, 4])
def test_many_splits_and_long_sequences(splits, gen):
    """More splits than a short sequence has key tiles: the empty splits weigh nothing."""
    run_case(gen, [1000, 2, 0], 2, 2, 32, 1, 0, 16 if splits == 4 else 1)


def test_no_new_tokens_and_empty_sequences(gen):
    """k = v = None attends over what is cached; a sequence with nothing cached gets 0, lse -inf."""
    out = run_case(gen, [0, 5, 40], 4, 2, 32, 0, 16, 2, sq=2)
    assert torch.equal(out[0], torch.zeros_like(out[0]))


def test_more_queries_than_keys_is_bottom_right(gen):
    """Sq = 4 over 0 cached + 2 new keys: the first two queries see nothing (0), as attention()."""
    out = run_case(gen, [0, 3], 2, 1, 32, 2, 0, 1, sq=4)
    assert torch.equal(out[0, :2], torch.zeros_like(out[0, :2]))


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("page_size", [0, 16])
def test_fallback_backends(backend, page_size, gen):
    run_case(gen, [0, 17, 40], 8, 2, 32, 4, page_size, 0, backend=backend)


def test_not_causal(gen):
    run_case(gen, [5, 30], 4, 2, 32, 3, 16, 2, causal=False)


def decode_mods(name, b, hq, sq, capacity, gen):
    """One score modifier for a decode call over a cache of `capacity` positions."""
    return {"softcap": {"softcap": 2.0},
            "alibi": {"alibi_slopes": torch.rand(b, hq, generator=gen).to(DEVICE)},
            "window": {"window": (28, -1)},  # sequence 2: its first visible key (62) is just below a tile
            "window2": {"window": (3, 1)},
            "sinks": {"sinks": torch.randn(hq, generator=gen).to(DEVICE)},
            "bias": {"bias": torch.randn(b, 1, sq, capacity, generator=gen).to(DEVICE)}}[name]


MODS = ["softcap", "alibi", "window", "window2", "sinks", "bias"]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mod", MODS)
def test_score_modifiers(mod, causal, backend, gen):
    """Each modifier by cache position, split (triton: 3 splits over a window that starts mid-cache)
    and paged, against the reference on each sequence's own keys."""
    lens, n_new, sq, page = [0, 17, 90], 3, 3, 16
    capacity = max(lens) + n_new + 5
    mods = decode_mods(mod, len(lens), 4, sq, -(-capacity // page) * page, gen)
    run_case(gen, lens, 4, 2, 32, n_new, page, 3, sq=sq, capacity=capacity, causal=causal, mods=mods,
             backend=backend)


def test_all_modifiers_together_and_many_new_tokens(gen):
    """More new tokens than the window spans: those before its first key are still written."""
    lens, n_new, sq = [5, 60], 12, 1
    mods = {"softcap": 3.0, "window": (4, 0), "sinks": torch.randn(4, generator=gen).to(DEVICE),
            "alibi_slopes": torch.rand(4, generator=gen).to(DEVICE)}
    run_case(gen, lens, 4, 1, 32, n_new, 0, 2, sq=sq, mods=mods)


def test_transforms_are_refused_by_name_and_run_on_the_reference(gen):
    """Decoding and appending under torch.func.vmap, or with forward-mode AD dual tensors: the Triton
    kernels refuse by name (their launchers would read a batched tensor's missing storage, or drop
    the tangent); the reference backend runs the vmapped call, each copy as the call alone."""
    import torch.autograd.forward_ad as fwd_ad

    k_cache, v_cache, _, seqlens = make_cache([8, 3], 10, 1, 16, dtype=torch.float32, page_size=0, gen=gen)
    qs = torch.randn(3, 2, 1, 2, 16, generator=gen).to(DEVICE)  # 3 copies of a (B=2, Sq=1, Hq=2, D=16) query

    def attend(q, backend):
        return fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, backend=backend)

    with pytest.raises(RuntimeError, match="do not run under torch.func transforms"):
        torch.func.vmap(lambda q: attend(q, "triton"))(qs)
    new = torch.randn(3, 2, 1, 1, 16, generator=gen).to(DEVICE)
    with pytest.raises(RuntimeError, match="do not run under torch.func transforms"):
        torch.func.vmap(lambda x: fastattn.append_to_kvcache(k_cache.clone(), v_cache.clone(), x, x,
                                                             cache_seqlens=seqlens, backend="triton"))(new)
    with fwd_ad.dual_level(), pytest.raises(NotImplementedError, match="no forward-mode AD"):
        attend(fwd_ad.make_dual(qs[0], torch.ones_like(qs[0])), "triton")
    sinks = torch.randn(2, generator=gen).to(DEVICE)
    with fwd_ad.dual_level(), pytest.raises(NotImplementedError, match="no forward-mode AD"):  # a modifier's tangent
        fastattn.attention_with_kvcache(qs[0], k_cache, v_cache, cache_seqlens=seqlens, backend="triton",
                                        sinks=fwd_ad.make_dual(sinks, torch.ones_like(sinks)))
    got = torch.func.vmap(lambda q: attend(q, "reference"))(qs)
    for i in range(3):
        torch.testing.assert_close(got[i], attend(qs[i], "reference"))


def test_modifiers_are_validated_and_refuse_grad(gen):
    a = bad_inputs(gen)
    with pytest.raises(ValueError, match="inference-only"):
        fastattn.attention_with_kvcache(**a, sinks=torch.zeros(4, device=DEVICE, requires_grad=True))
    with pytest.raises(ValueError, match=r"bias must be broadcastable to \(B, Hq, Sq, Sk\) = \(2, 4, 1, 32\)"):
        fastattn.attention_with_kvcache(**a, bias=torch.zeros(2, 4, 1, 31, device=DEVICE))


def test_auto_takes_the_decode_kernel_on_cuda_and_sdpa_on_cpu(gen):
    """"auto" on CUDA tensors is the Triton split-KV kernel (GPU-verified), the torch path on CPU."""
    from fastattn import backends

    assert backends.auto_order(torch.device("cuda"))[0] == "triton" and "kvcache" in backends.TABLE["triton"].kinds
    k_cache, v_cache, table, seqlens = make_cache([3], 8, 1, 16, dtype=torch.float32, page_size=0, gen=gen)
    q = torch.randn(1, 1, 2, 16, generator=gen).to(DEVICE)
    call = backends.KVCacheCall(q, k_cache, v_cache, None, None, seqlens, None,
                                fastattn.shape.AttentionShape(1, 1, 8, 2, 1, 16), 0, True, 1.0, False, 0)
    assert backends.choose("kvcache", call) == ("triton" if DEVICE == "cuda" else "torch")
    assert "does not run KV-cache decoding" in backends.cannot_run("cuda", "kvcache", call)


# ---------------------------------------------------------------- attention() with few queries

# (B, Sq, Sk, Hq, Hkv, D): one query over many keys (a generate() step), GQA 4:1 and MQA, Sq up to
# FEW_QUERIES, Sq > Sk (causal rows that see no key), one key, a head dim that is not a power of two.
FEW = [(2, 1, 37, 4, 1, 16), (1, 3, 70, 8, 2, 40), (2, 16, 29, 2, 2, 16), (1, 7, 3, 2, 1, 16), (2, 1, 1, 2, 2, 8)]
FEW_MODS = {"none": {}, "softcap": {"softcap": 2.0}, "window": {"window": (4, 0)}, "window2": {"window": (3, 2)},
            "alibi": {"alibi_slopes": "slopes"}, "sinks": {"sinks": "sinks"}, "bias": {"bias": "bias"}}


def few_query_mods(name, b, sq, sk, hq, gen):
    mods = dict(FEW_MODS[name])
    made = {"slopes": lambda: torch.rand(b, hq, generator=gen).to(DEVICE),
            "sinks": lambda: torch.randn(hq, generator=gen).to(DEVICE),
            "bias": lambda: torch.randn(1, hq, sq, sk, generator=gen).to(DEVICE)}
    return {k: made[v]() if isinstance(v, str) else v for k, v in mods.items()}


@pytest.mark.parametrize("shape", FEW, ids=str)
@pytest.mark.parametrize("causal,mods", [(c, m) for c in (True, False) for m in FEW_MODS
                                         if not (c and m == "window2")])  # (causal caps the right side at 0)
def test_attention_with_few_queries_runs_as_a_decode_step(shape, causal, mods, gen, monkeypatch):
    """fastattn.attention of at most FEW_QUERIES queries that needs no gradient runs the decode kernel
    over k/v as a full cache (launchers.decode.attend_full), with the results of attention: the
    tolerance rule against the float64 reference, out and lse."""
    b, sq, sk, hq, hkv, d = shape
    monkeypatch.setattr(launch, "FEW_QUERIES_MIN_BYTES", 0)  # (test shapes are small)
    routed = []
    real = launch.attend_full
    monkeypatch.setattr(launch, "attend_full", lambda *a, **kw: routed.append(1) or real(*a, **kw))
    q, k, v = testing.random_qkv(b, sq, sk, hq, hkv, d, dtype=torch.float16, device=DEVICE, generator=gen)
    fn = lambda a, b_, c, **m: fastattn.attention(a, b_, c, causal=causal, return_lse=True, backend="triton", **m)
    results = testing.check_against_reference(fn, q, k, v, causal=causal, grads=False, generator=gen,
                                              mods=few_query_mods(mods, b, sq, sk, hq, gen))
    assert all(r.ok for r in results), [str(r) for r in results]
    assert routed, "not run as a decode step"


def assert_rule(got, q, k, v, **kw):
    """got (out, or (out, lse) with return_lse=True in kw) against fastattn.reference under the
    tolerance rule: the float64 result, and the naive one in q's dtype for the bound."""
    def ref_in(dtype):
        m = {n: x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x for n, x in kw.items()}
        return reference.attention(q.to(dtype), k.to(dtype), v.to(dtype), **m)

    ref, naive = ref_in(torch.float64), ref_in(q.dtype)
    names = ("out", "lse") if kw.get("return_lse") else ("out",)
    got, ref, naive = ((x,) if len(names) == 1 else x for x in (got, ref, naive))
    for name, g, n, r in zip(names, got, naive, ref):
        result = testing.compare(name, g, n, r, testing.OUT_FACTOR)
        assert result.ok, str(result)


def few_query_padding(pattern: str, b: int, sk: int, gen) -> torch.Tensor:
    """(B, Sk) key-padding mask: "left" (left-padded batched generation: each row's real keys are a
    suffix, of another length per row), "holes" (random keys padded), "empty" (left padding, and
    row 0 without a real key)."""
    if pattern == "holes":
        return torch.rand(b, sk, generator=gen).to(DEVICE) < 0.6
    starts = torch.randint(0, sk, (b,), generator=gen).to(DEVICE)
    mask = torch.arange(sk, device=DEVICE)[None, :] >= starts[:, None]
    if pattern == "empty":
        mask[0] = False
    return mask


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("shape", FEW, ids=str)
@pytest.mark.parametrize("causal,pattern,mods", [(True, "left", "none"), (False, "left", "sinks"),
                                                 (True, "holes", "window"), (False, "holes", "bias"),
                                                 (True, "empty", "alibi"), (False, "empty", "softcap")])
def test_few_queries_with_a_key_padding_mask_run_as_a_decode_step(shape, causal, pattern, mods, splits, gen,
                                                                  monkeypatch):
    """With a key-padding mask too (a left-padded batch's generate() step): the decode kernel, with
    attention's results (a row with no real key: out 0, lse -inf, or the sink's), and padded keys
    never read (their keys and values are NaN here). splits: the key ranges split as on a GPU's SMs
    (the interpreter's one SM never splits), each share narrowed to the real keys, then combined."""
    b, sq, sk, hq, hkv, d = shape
    monkeypatch.setattr(launch, "FEW_QUERIES_MIN_BYTES", 0)
    monkeypatch.setattr(launch, "num_splits_heuristic", lambda *a: splits)
    routed = []
    real = launch.attend_full
    monkeypatch.setattr(launch, "attend_full", lambda *a, **kw: routed.append(1) or real(*a, **kw))
    q, k, v = testing.random_qkv(b, sq, sk, hq, hkv, d, dtype=torch.float16, device=DEVICE, generator=gen)
    mask = few_query_padding(pattern, b, sk, gen)
    k, v = (x.masked_fill(~mask[:, :, None, None], float("nan")) for x in (k, v))
    fn = lambda a, b_, c, **m: fastattn.attention(a, b_, c, causal=causal, key_padding_mask=mask, return_lse=True,
                                                  backend="triton", **m)
    results = testing.check_against_reference(fn, q, k, v, causal=causal, key_padding_mask=mask, grads=False,
                                              generator=gen, mods=few_query_mods(mods, b, sq, sk, hq, gen))
    assert all(r.ok for r in results), [str(r) for r in results]
    assert routed, "not run as a decode step"


def test_a_batch_broadcast_key_padding_mask_and_none_get_plans_of_their_own(gen, monkeypatch):
    """A mask broadcast over the batch (expand: batch stride 0, as transformers' (1, 1, 1, Sk) mask
    arrives) and no mask, same shapes, in either order: each its own plan (the placeholder's
    stride is 0 too), each right."""
    monkeypatch.setattr(launch, "FEW_QUERIES_MIN_BYTES", 0)
    q, k, v = testing.random_qkv(2, 1, 40, 4, 2, 16, dtype=torch.float16, device=DEVICE, generator=gen)
    mask = (torch.arange(40, device=DEVICE) >= 30)[None].expand(2, 40)
    for order in ((None, mask), (mask, None)):
        plans.clear()
        for m in order:
            with torch.no_grad():
                out = fastattn.attention(q, k, v, key_padding_mask=m, backend="triton")
            assert_rule(out, q, k, v, key_padding_mask=m)
    plans.clear()


def test_a_full_cache_and_a_cache_with_lengths_get_plans_of_their_own(gen, monkeypatch):
    """The few-query route tells the kernel the cache is full (FULL: no lengths tensor); a decode
    step over the same tensors with shorter lengths (attention_with_kvcache, nothing appended) has
    the same integers: in either order, each its own plan and its own keys."""
    monkeypatch.setattr(launch, "FEW_QUERIES_MIN_BYTES", 0)
    q, k, v = testing.random_qkv(2, 1, 40, 4, 2, 16, dtype=torch.float16, device=DEVICE, generator=gen)
    lengths = torch.tensor([25, 9], dtype=torch.int32, device=DEVICE)
    real = torch.arange(40, device=DEVICE)[None] < lengths[:, None].long()
    calls = {"full": (lambda: fastattn.attention(q, k, v, causal=True, backend="triton"), None),
             "lengths": (lambda: fastattn.attention_with_kvcache(q, k, v, cache_seqlens=lengths, backend="triton"),
                         real)}
    for order in (("full", "lengths"), ("lengths", "full")):
        plans.clear()
        for name in order:
            fn, mask = calls[name]
            with torch.no_grad():
                out = fn()
            assert_rule(out, q, k, v, causal=mask is None, key_padding_mask=mask)
    plans.clear()


def test_few_query_calls_alike_in_shape_never_share_a_wrong_plan(gen, monkeypatch):
    """Calls of one shape that differ only in what they pass (no mask, a mask contiguous, broadcast
    over the batch or strided, each modifier), run one after another in two orders: each gives what
    it gives alone after plans.clear() (a plan key missing a field hands one call another's plan)."""
    monkeypatch.setattr(launch, "FEW_QUERIES_MIN_BYTES", 0)
    routed = []
    real = launch.attend_full
    monkeypatch.setattr(launch, "attend_full", lambda *a, **kw: routed.append(1) or real(*a, **kw))
    q, k, v = testing.random_qkv(2, 2, 40, 4, 2, 16, dtype=torch.float16, device=DEVICE, generator=gen)
    wide = torch.rand(2, 80, generator=gen).to(DEVICE) < 0.7
    variants = {"none": {}, "mask": dict(key_padding_mask=wide[:, :40].contiguous()),
                "broadcast mask": dict(key_padding_mask=wide[:1, :40].expand(2, 40)),
                "strided mask": dict(key_padding_mask=wide[:, ::2]), "window": dict(window=(5, 0)),
                "softcap": dict(softcap=3.0), "sinks": dict(sinks=torch.randn(4, generator=gen).to(DEVICE)),
                "alibi": dict(alibi_slopes=torch.rand(4, generator=gen).to(DEVICE)),
                "bias": dict(bias=torch.randn(1, 4, 2, 40, generator=gen).to(DEVICE))}

    def run(name):
        with torch.no_grad():
            return fastattn.attention(q, k, v, causal=True, backend="triton", **variants[name])

    alone = {}
    for name in variants:
        plans.clear()
        alone[name] = run(name)
    for order in (list(variants), list(variants)[::-1]):
        plans.clear()
        for name in order:
            assert torch.equal(run(name), alone[name]), name
    assert len(routed) == 3 * len(variants)  # every call ran as a decode step
    plans.clear()


def test_the_decode_launcher_refuses_a_key_padding_mask_it_cannot_read():
    """launchers.decode.attend reads a key-padding mask by cache position: one of another length, or
    one given with new tokens to append (whose positions it does not cover), is refused by name."""
    q, kv = torch.randn(2, 1, 4, 16).to(DEVICE), torch.randn(2, 30, 2, 16).to(DEVICE)
    lengths = torch.full((2,), 29, dtype=torch.int32, device=DEVICE)
    for mask, new in ((torch.ones(2, 29, dtype=torch.bool, device=DEVICE), None),
                      (torch.ones(2, 30, dtype=torch.bool, device=DEVICE), kv[:, :1])):
        with pytest.raises(ValueError, match="key_padding_mask"):
            launch.attend(q, kv.clone(), kv.clone(), new, new, lengths, None, False, 1.0, key_padding_mask=mask)


def test_a_growing_cache_finds_the_decode_plans_by_their_class(gen, monkeypatch):
    """One query over keys that grow by one per call, run as a decode step (attend_full): the decode
    plans are built once per specialisation class and tuning bucket, not once per length, and every
    call is right."""
    monkeypatch.setattr(launch, "FEW_QUERIES_MIN_BYTES", 0)
    plans.clear()
    built = []
    real = plans.build
    monkeypatch.setattr(plans, "build", lambda name, *a, **kw: built.append(name) or real(name, *a, **kw))
    q = torch.randn(1, 1, 4, 16, generator=gen).to(DEVICE, torch.float16)
    for sk in range(20, 41):
        kv = torch.randn(1, 2, sk, 16, generator=gen).to(DEVICE, torch.float16).transpose(1, 2)  # (B, S, Hkv, D) view
        with torch.no_grad():
            out = fastattn.attention(q, kv, kv, backend="triton")
        torch.testing.assert_close(out.double(), reference.attention(q.double(), kv.double(), kv.double()),
                                   rtol=2e-3, atol=2e-3)
    assert built and set(built) <= {"decode", "decode_combine"} and built.count("decode") <= 4
    plans.clear()


def test_which_calls_run_as_a_decode_step(gen, monkeypatch):
    """Only calls that need no gradient, at most FEW_QUERIES queries, at
    least FEW_QUERIES_MIN_BYTES of keys and values (at least one key) and a unit-stride head dim in k
    and v take the decode kernel; the others the prefill kernel, with the same results."""
    small = 2 * 2 * 40 * 2 * 16 * 4  # k and v below: (2, 40, 2, 16) float32
    monkeypatch.setattr(launch, "FEW_QUERIES_MIN_BYTES", small)
    routed = []
    real = launch.attend_full
    monkeypatch.setattr(launch, "attend_full", lambda *a, **kw: routed.append(1) or real(*a, **kw))
    q, k, v = testing.random_qkv(2, launch.FEW_QUERIES + 1, 40, 4, 2, 16, device=DEVICE, generator=gen)
    few = q[:, -launch.FEW_QUERIES:]
    wide_k = torch.randn(2, 40, 16, 2, generator=gen).to(DEVICE).transpose(2, 3)  # (B, Sk, Hkv, D), head dim strided
    mask = torch.ones(2, 40, dtype=torch.bool, device=DEVICE)
    cases = {"few": (dict(q=few), True), "many": (dict(), False), "key padding": (dict(q=few, key_padding_mask=mask),
                                                                                True),
             "no key": (dict(q=few, k=k[:, :0], v=v[:, :0]), False), "strided head dim": (dict(q=few, k=wide_k), False),
             "grad": (dict(q=few.clone().requires_grad_()), False), "reference": (dict(q=few, backend="reference"),
                                                                              False),
             "fewer bytes": (dict(q=few, k=k[:, 1:], v=v[:, 1:]), False)}
    for name, (change, expected) in cases.items():
        args = {**dict(q=q, k=k, v=v, causal=True, backend="triton"), **change}
        routed.clear()
        out = fastattn.attention(**args)
        assert bool(routed) == expected, name
        ref = reference.attention(*(args.pop(n).double() for n in ("q", "k", "v")), causal=True,
                                  key_padding_mask=args.get("key_padding_mask"))
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4, msg=name)
    routed.clear()
    with torch.no_grad():
        fastattn.attention(few.clone().requires_grad_(), k, v, causal=True, backend="triton")
    assert routed  # grad mode off: nothing to record


# ---------------------------------------------------------------- appends


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("page_size", [0, 16])
def test_append_writes_exactly_the_new_positions(backend, page_size, gen):
    lens = [0, 7, 30]
    k_cache, v_cache, table, seqlens = make_cache(lens, 40, 2, 24, dtype=torch.float16, page_size=page_size, gen=gen)
    k = torch.randn(3, 5, 2, 24, generator=gen).to(DEVICE, torch.float16)
    v = torch.randn(3, 5, 2, 24, generator=gen).to(DEVICE, torch.float16)
    before = (k_cache.clone(), v_cache.clone())
    old_k, old_v = expected_keys(k_cache, v_cache, table, lens)
    fastattn.append_to_kvcache(k_cache, v_cache, k, v, cache_seqlens=seqlens, block_table=table, backend=backend)
    got_k, got_v = expected_keys(k_cache, v_cache, table, [n + 5 for n in lens])
    for b in range(3):
        assert torch.equal(got_k[b], torch.cat([old_k[b], k[b]])) and torch.equal(got_v[b], torch.cat([old_v[b], v[b]]))
    changed = (k_cache != before[0]).flatten(2).any(-1) | (v_cache != before[1]).flatten(2).any(-1)
    assert changed.sum() <= 15  # only the 3 x 5 new rows (a random row may equal the old one)


def test_append_skips_positions_outside_the_cache(gen):
    """Bad lengths or pages (not checked on the host for CUDA tensors) are clamped or skipped by the
    kernel: nothing outside the cache is written."""
    big = torch.randn(2, 24, 1, 16, generator=gen).to(DEVICE)
    k_cache, v_cache = big[:, :16], big.clone()[:, :16]
    k = torch.randn(2, 4, 1, 16, generator=gen).to(DEVICE)
    snapshot = big.clone()
    seqlens = torch.tensor([14, 100], dtype=torch.int32, device=DEVICE)  # 14 + 4 runs past 16; 100 is outside
    launch.append(k, k, k_cache, v_cache, seqlens, None)
    assert torch.equal(big[:, 16:], snapshot[:, 16:])  # past the cache view: untouched
    assert torch.equal(big[0, 14:16], k[0, :2]) and torch.equal(big[1], snapshot[1])

    pages = torch.randn(6, 4, 1, 16, generator=gen).to(DEVICE)
    paged, spare = pages[:4], pages[4:].clone()
    table = torch.tensor([[0, -1], [1, 7]], dtype=torch.int32, device=DEVICE)  # -1, 7: not pages of the cache
    before = pages.clone()
    launch.append(k, k, paged, paged.clone(), torch.tensor([2, 2], dtype=torch.int32, device=DEVICE), table)
    assert torch.equal(pages[4:], spare)
    assert torch.equal(pages[0, 2:], k[0, :2]) and torch.equal(pages[1, 2:], k[1, :2])
    assert torch.equal(pages[2:4], before[2:4])


APPEND_NEAR_INT32_MAX = """
import torch
from fastattn.launchers import decode as launch
buf = torch.zeros(1, 72, 1, 16, device="{device}")
k_cache, v_cache = buf[:, 64:], torch.zeros(1, 8, 1, 16, device="{device}")
k = torch.ones(1, 3, 1, 16, device="{device}")
launch.append(k, k, k_cache, v_cache, torch.tensor([2**31 - 2], dtype=torch.int32, device="{device}"), None)
assert not buf.any() and not v_cache.any(), "a length past the cache wrote rows"
print("nothing written")
"""


def test_append_near_the_int32_limit_writes_nothing():
    """cache_seqlens[b] + t is formed in 64 bits: in 32 bits, 2**31 - 2 + 2 wrapped negative, passed
    `pos < CAPACITY` and wrote 2**31 rows before the cache (a crash). In a subprocess: such a write
    kills the process."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")}
    res = subprocess.run([sys.executable, "-c", APPEND_NEAR_INT32_MAX.format(device=DEVICE)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "nothing written" in res.stdout, (res.returncode, res.stderr[-2000:])


def test_torch_append_skips_what_the_kernel_skips(gen, monkeypatch):
    """Unchecked lengths and pages (CUDA tensors): the torch-ops append writes what the kernel writes.
    Paged: a position past the cache or on a page index outside the pool is skipped (clamped, it
    overwrote another sequence's row; skipped by writing a slot's old value back, it could undo a good
    write to the slot it was clamped onto: page 0, row 0 in the second case). Both layouts: a negative
    length counts as 0. (Contiguous, a position past the cache lands on the last row: not compared.)"""
    monkeypatch.setattr(validation, "value_checks", lambda device: False)
    pool = torch.randn(8, 4, 1, 16, generator=gen).to(DEVICE)
    k = torch.randn(3, 2, 1, 16, generator=gen).to(DEVICE)
    cases = [([[0, 1], [2, -1], [3, 9]], [2, 3, 3]),  # -1, 9: not pages of the pool
             ([[0, 1], [-1, 2], [9, 3]], [0, 0, 0]),  # the bad entries clamp onto page 0 row 0, a good write
             ([[-1, -1], [9, 9], [-5, 4]], [0, 1, 2]),  # no good entry at all
             ([[0, 1], [2, 3], [4, 5]], [7, -2, 30])]  # past the capacity of 8; a negative length
    for table, lens in cases:
        want = pool.clone()
        for b, length in enumerate(lens):  # the kernel's rule: a position inside the cache, on a page of the pool
            for t in range(k.shape[1]):
                pos = max(length, 0) + t
                page = table[b][pos // 4] if pos < 8 else -1
                if 0 <= page < 8:
                    want[page, pos % 4] = k[b, t]
        args = dict(cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=DEVICE),
                    block_table=torch.tensor(table, dtype=torch.int32, device=DEVICE))
        for backend in ("triton", "torch"):
            kc, vc = pool.clone(), pool.clone()
            fastattn.append_to_kvcache(kc, vc, k, k, backend=backend, **args)
            assert torch.equal(kc, want) and torch.equal(vc, want), (table, lens, backend)
    cache = torch.randn(2, 8, 1, 16, generator=gen).to(DEVICE)
    lens = torch.tensor([-2, 3], dtype=torch.int32, device=DEVICE)
    got = [cache.clone() for _ in range(2)]
    for backend, c in zip(("triton", "torch"), got):
        fastattn.append_to_kvcache(c, c.clone(), k[:2], k[:2], cache_seqlens=lens, backend=backend)
    assert torch.equal(got[0], got[1]) and torch.equal(got[1][0, :2], k[0]) and torch.equal(got[1][1, 3:5], k[1])


def test_torch_paged_append_needs_no_host_sync():
    """The torch-ops paged append reads nothing on the host (a 0-d index tensor would: .item()), so it
    runs on meta tensors, as it would inside a CUDA graph."""
    from fastattn import cache_layouts

    meta = dict(device="meta")
    cache_layouts.append(torch.empty(4, 4, 1, 16, **meta), torch.empty(4, 4, 1, 16, **meta),
                         torch.empty(3, 2, 1, 16, **meta), torch.empty(3, 2, 1, 16, **meta),
                         torch.empty(3, dtype=torch.int32, **meta), torch.empty(3, 2, dtype=torch.int32, **meta))


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_an_expanded_cache_is_not_written(backend, gen):
    """A cache expanded over the batch (one prompt shared by every sequence) can be read, but an append
    would write each sequence's new rows into the same memory: refused by name, not a wrong answer."""
    base = torch.randn(1, 16, 2, 16, generator=gen).to(DEVICE)
    kc, vc = base.expand(2, -1, -1, -1), base.clone().expand(2, -1, -1, -1)
    q, k = (torch.randn(2, 1, 2, 16, generator=gen).to(DEVICE) for _ in range(2))
    lens = torch.tensor([3, 9], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="k_cache is written in place"):
        fastattn.attention_with_kvcache(q, kc, vc, k, k, cache_seqlens=lens, backend=backend)
    with pytest.raises(ValueError, match="v_cache is written in place"):
        fastattn.append_to_kvcache(base.clone().expand(2, -1, -1, -1).contiguous(), vc, k, k, cache_seqlens=lens,
                                   backend=backend)
    results = testing.check_kvcache_against_reference(  # reading it is fine
        lambda: (fastattn.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, backend=backend), None),
        q, kc, vc, None, None, lens)
    assert all(r.ok for r in results), [str(r) for r in results]


def test_append_check_looks_only_where_the_kernel_writes(gen):
    """The one-time check of a direct append launch (launch.appended) compares the positions inside
    the cache: positions the kernel skips (past the cache, on pages outside it) do not fail it (on an
    H200 they did, and the append stayed on Triton's slower launch path); rows not written do."""
    cache = torch.randn(2, 16, 1, 16, generator=gen).to(DEVICE)
    k = torch.randn(2, 4, 1, 16, generator=gen).to(DEVICE)
    for lens in ([14, 3], [14, 100]):  # 14 + 4 runs past 16; 100 is outside
        seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
        kc, vc = cache.clone(), cache.clone()
        assert not launch.appended(k, k, kc, vc, seqlens, None)
        launch.append(k, k, kc, vc, seqlens, None)
        assert launch.appended(k, k, kc, vc, seqlens, None)
    outside = torch.tensor([100, 16], dtype=torch.int32, device=DEVICE)
    assert not launch.appended(k, k, cache, cache, outside, None)  # nothing written: nothing proven

    pages = torch.randn(4, 4, 1, 16, generator=gen).to(DEVICE)
    table = torch.tensor([[0, -1], [1, 7]], dtype=torch.int32, device=DEVICE)  # -1, 7: not pages of the cache
    seqlens = torch.tensor([2, 2], dtype=torch.int32, device=DEVICE)
    kc, vc = pages.clone(), pages.clone()
    assert not launch.appended(k, k, kc, vc, seqlens, table)
    launch.append(k, k, kc, vc, seqlens, table)
    assert launch.appended(k, k, kc, vc, seqlens, table)


def test_attend_clamps_lengths_to_the_cache(gen):
    """A length past the cache (unchecked on CUDA) attends over the whole cache, no further."""
    k_cache, v_cache, _, _ = make_cache([0], 20, 1, 16, dtype=torch.float32, page_size=0, gen=gen)
    q = torch.randn(1, 1, 1, 16, generator=gen).to(DEVICE)
    out, lse = launch.attend(q, k_cache, v_cache, None, None, torch.tensor([500], dtype=torch.int32, device=DEVICE),
                             None, True, 0.25, 1)
    ref, ref_lse = reference.attention(q, k_cache, v_cache, scale=0.25, return_lse=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- validation


def bad_inputs(gen, **changes):
    k_cache, v_cache, table, seqlens = make_cache([3, 5], 32, 2, 16, dtype=torch.float32, page_size=8, gen=gen)
    new = [torch.randn(2, 1, 2, 16, generator=gen).to(DEVICE) for _ in range(2)]
    args = dict(q=torch.randn(2, 1, 4, 16, generator=gen).to(DEVICE), k_cache=k_cache, v_cache=v_cache,
                k=new[0], v=new[1], cache_seqlens=seqlens, block_table=table)
    args.update(changes)
    return args


# (change to valid inputs, error, message); VALUE_ERRORS need the host to read the values.
BAD_INPUTS = [
    (lambda a: dict(cache_seqlens=a["cache_seqlens"].long()), TypeError, "cache_seqlens must be int32"),
    (lambda a: dict(cache_seqlens=a["cache_seqlens"][:1]), ValueError, "cache_seqlens must have shape"),
    (lambda a: dict(block_table=a["block_table"].long()), TypeError, "block_table must be int32"),
    (lambda a: dict(block_table=a["block_table"][:1]), ValueError, "block_table must have shape"),
    (lambda a: dict(cache_seqlens=torch.tensor([3, 32], dtype=torch.int32, device=DEVICE)), ValueError, "does not fit"),
    (lambda a: dict(cache_seqlens=torch.tensor([-1, 3], dtype=torch.int32, device=DEVICE)), ValueError, "does not fit"),
    (lambda a: dict(block_table=a["block_table"].clone().fill_(99)), ValueError, "outside k_cache"),
    (lambda a: dict(v=None), ValueError, "both k and v"),
    (lambda a: dict(k=a["k"][:, :, :1], v=a["v"][:, :, :1]), ValueError, "must have shape"),
    (lambda a: dict(k_cache=a["k_cache"].half()), TypeError, "k_cache has dtype"),
    (lambda a: dict(q=a["q"][:, :, :3]), ValueError, "multiple of the cache's key/value heads"),
    (lambda a: dict(q=a["q"][..., :8]), ValueError, "head dim"),
    (lambda a: dict(v_cache=a["v_cache"][:, :4]), ValueError, "same shape"),
    (lambda a: dict(k_cache=a["k_cache"].transpose(1, 3)), ValueError, "contiguous last dim|same shape"),
    (lambda a: dict(block_table=None), ValueError, "batch size"),
    (lambda a: dict(k_cache=a["k_cache"][:0], v_cache=a["v_cache"][:0]), ValueError, "at least one page"),
    (lambda a: dict(k_cache=a["k_cache"][:1].expand_as(a["k_cache"])), ValueError, "k_cache is written in place"),
    (lambda a: dict(q=a["q"][:, :0]), ValueError, "at least one query"),
    (lambda a: dict(cache_seqlens=a["cache_seqlens"].to_sparse()), TypeError, "cache_seqlens must be a dense"),
    (lambda a: dict(block_table=a["block_table"].to_sparse()), TypeError, "block_table must be a dense"),
]
VALUE_ERRORS = ("does not fit", "outside k_cache")


@pytest.mark.parametrize("change,error,match,value_checks", [(*c, True) for c in BAD_INPUTS]
                         + [(*c, False) for c in BAD_INPUTS if c[2] not in VALUE_ERRORS])
def test_bad_inputs_name_the_argument(change, error, match, value_checks, gen, monkeypatch):
    """Every bad input raises the error naming it, also on the path CUDA tensors take (no host
    reads of the values, where lengths and pages are clamped by the kernels instead: the one-test
    fast path, then the full checks), there after a valid call that was remembered by its signature
    (fastattn.api._PLAIN_KVCACHE_CALLS)."""
    if not value_checks:
        no_value_checks(monkeypatch)
        good = bad_inputs(gen)
        fastattn.attention_with_kvcache(good.pop("q"), good.pop("k_cache"), good.pop("v_cache"), good.pop("k"),
                                        good.pop("v"), backend="triton", **good)
    else:
        monkeypatch.setenv("FASTATTN_CHECK_VALUES", "1")  # CUDA tensors: the opt-in host checks
    args = bad_inputs(gen)
    args.update(change(args))
    with pytest.raises(error, match=match):
        fastattn.attention_with_kvcache(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), args.pop("k"),
                                        args.pop("v"), backend="triton", **args)


def no_value_checks(monkeypatch):
    """The path of CUDA tensors (their values are not read on the host), for CPU tensors; and a fresh
    process's empty cache of validated calls."""
    from fastattn import api

    monkeypatch.setattr(validation, "value_checks", lambda device: False)
    monkeypatch.setattr(api, "value_checks", lambda device: False)
    monkeypatch.setattr(api, "_PLAIN_KVCACHE_CALLS", {})


def test_a_repeated_decode_call_is_validated_and_placed_once(gen, monkeypatch):
    """Without value checks (CUDA tensors), a call without score modifiers whose tensors' sizes,
    dtypes, devices, layouts and cache strides, return_lse and backend were seen before skips
    validate_kvcache and backends.choose (a decode step is host-bound); one that differs in any of
    them takes both again; flags, scale, num_splits and the grad refusal are checked every time.
    With value checks (CPU tensors, FASTATTN_CHECK_VALUES=1) every call is validated."""
    from fastattn import api, backends

    monkeypatch.setenv("FASTATTN_CHECK_VALUES", "1")  # values read on the host (CPU tensors always)
    monkeypatch.setattr(api, "_PLAIN_KVCACHE_CALLS", {})
    seen = []
    real_validate, real_choose = api.validate_kvcache, backends.choose
    monkeypatch.setattr(api, "validate_kvcache", lambda *a, **kw: seen.append("validate") or real_validate(*a, **kw))
    monkeypatch.setattr(backends, "choose", lambda *a, **kw: seen.append("choose") or real_choose(*a, **kw))
    args = bad_inputs(gen)
    q, kc, vc, k, v = (args.pop(n) for n in ("q", "k_cache", "v_cache", "k", "v"))

    def call(q=q, kc=kc, vc=vc, k=k, v=v, **kw):
        return fastattn.attention_with_kvcache(q, kc.clone(), vc.clone(), k, v, **{**args, **kw})

    for _ in range(2):  # values read on the host: nothing remembered
        call()
    assert seen == ["validate", "choose"] * 2 and not api._PLAIN_KVCACHE_CALLS
    no_value_checks(monkeypatch)
    expected = call()
    seen.clear()
    torch.testing.assert_close(call(q.clone(), k=k.clone()), expected, rtol=0, atol=0)
    assert seen == []
    for bad, error, match in ((dict(causal=1), TypeError, "causal must be a bool"),
                              (dict(scale=float("nan")), ValueError, "scale must be"),
                              (dict(num_splits=129), ValueError, "num_splits"),
                              (dict(q=q.clone().requires_grad_()), ValueError, "inference-only")):
        with pytest.raises(error, match=match):
            call(**bad)
    assert seen == []
    for other in (dict(q=q[:, :, :2]), dict(kc=kc[:, :, :1], vc=vc[:, :, :1], k=k[:, :, :1], v=v[:, :, :1]),
                  dict(k=None, v=None), dict(return_lse=True), dict(backend="reference"),
                  dict(cache_seqlens=args["cache_seqlens"][:1], q=q[:1], k=k[:1], v=v[:1],
                       block_table=args["block_table"][:1]),
                  dict(kc=torch.zeros(2, 32, 2, 16, device=DEVICE), vc=torch.zeros(2, 32, 2, 16, device=DEVICE),
                       block_table=None)):
        seen.clear()
        call(**other)
        assert seen == ["validate", "choose"], other
    seen.clear()
    monkeypatch.setattr(api, "value_checks", lambda device: True)  # e.g. FASTATTN_CHECK_VALUES=1 set later
    call()
    assert seen == ["validate", "choose"]
    held = [x for key in api._PLAIN_KVCACHE_CALLS for part in key
            for x in (part if isinstance(part, tuple) else (part,))]
    assert held and not any(isinstance(x, torch.Tensor) for x in held)  # sizes, dtypes, devices: no tensor


def test_fast_validation_path_accepts_valid_calls(gen, monkeypatch):
    """Without value checks (CUDA tensors) a valid call takes the one-test path, with the same shape."""
    args = bad_inputs(gen)
    full = validation.validate_kvcache(*args.values())
    monkeypatch.setattr(validation, "value_checks", lambda device: False)
    assert validation._kvcache_fast_path(*args.values()) == full
    args.update(k=None, v=None, block_table=None, k_cache=torch.zeros(2, 8, 2, 16, device=DEVICE),
                v_cache=torch.zeros(2, 8, 2, 16, device=DEVICE))
    assert validation._kvcache_fast_path(*args.values()) == validation.validate_kvcache(*args.values())


def test_other_bad_arguments(gen):
    args = bad_inputs(gen)
    q, kc, vc, k, v = (args.pop(n) for n in ("q", "k_cache", "v_cache", "k", "v"))
    with pytest.raises(ValueError, match="num_splits"):
        fastattn.attention_with_kvcache(q, kc, vc, k, v, num_splits=129, **args)
    with pytest.raises(ValueError, match="inference-only"):
        fastattn.attention_with_kvcache(q.requires_grad_(), kc, vc, k, v, **args)
    with pytest.raises(ValueError, match="backend='cuda' cannot run"):
        fastattn.attention_with_kvcache(q.detach(), kc, vc, k, v, backend="cuda", **args)
    with pytest.raises(ValueError, match="return_lse"):
        fastattn.attention_with_kvcache(q.detach(), kc, vc, k, v, backend="torch", return_lse=True, **args)
    with pytest.raises(ValueError, match="KV-cache append"):
        fastattn.append_to_kvcache(kc, vc, k, v, backend="cuda", **args)


# ---------------------------------------------------------------- splits, plans, ops


def test_split_heuristic():
    h = launch.num_splits_heuristic
    assert h(106, 132, 1000) == 1  # >= 80% of the SMs busy: no split
    assert h(8, 132, 1) == 1  # one key tile: nothing to split
    for programs, sms, tiles in [(8, 132, 128), (1, 132, 2048), (32, 132, 16), (64, 108, 500)]:
        n = h(programs, sms, tiles)
        assert 1 <= n <= min(128, sms, tiles)
        eff = lambda s: (programs * s / sms) / -(-programs * s // sms)
        best = max(eff(s) for s in range(1, min(128, sms, tiles) + 1))
        assert eff(n) >= 0.85 * best
        assert all(eff(s) < 0.85 * best or -(-tiles // s) == -(-tiles // (s - 1)) for s in range(2, n))
    assert h(8, 132, 128) > 1  # batch 1 x 8 KV heads on an H100: split


def test_plans_are_reused_across_steps(gen, monkeypatch):
    """A decode loop's steps share one signature (the cache is static; lengths live on the device)."""
    launch._plans.clear()
    built = []
    real = plans.build
    monkeypatch.setattr(plans, "build", lambda name, *a, **kw: built.append(name) or real(name, *a, **kw))
    k_cache, v_cache, table, seqlens = make_cache([3, 9], 40, 1, 16, dtype=torch.float32, page_size=8, gen=gen)
    for _ in range(3):
        q = torch.randn(2, 1, 2, 16, generator=gen).to(DEVICE)
        k = torch.randn(2, 1, 1, 16, generator=gen).to(DEVICE)
        fastattn.attention_with_kvcache(q, k_cache, v_cache, k, k, cache_seqlens=seqlens, block_table=table,
                                        num_splits=2, backend="triton")
        seqlens += 1
    assert sorted(built) == ["decode", "decode_combine"]  # the append is part of the decode launch


def test_opcheck(gen):
    k_cache, v_cache, table, seqlens = make_cache([3, 9], 24, 1, 16, dtype=torch.float32, page_size=8, gen=gen)
    q = torch.randn(2, 2, 2, 16, generator=gen).to(DEVICE)
    k = torch.randn(2, 2, 1, 16, generator=gen).to(DEVICE)
    torch.library.opcheck(torch.ops.fastattn.triton_kvcache_append.default, (k, k, k_cache, v_cache, seqlens, table))
    torch.library.opcheck(torch.ops.fastattn.triton_kvcache_attention.default,
                          (q, k_cache, v_cache, k, k, seqlens, table, True, 0.25, 2))


def test_compile_fullgraph_matches_eager(gen):
    torch._dynamo.reset()
    k_cache, v_cache, table, seqlens = make_cache([3, 9], 24, 1, 16, dtype=torch.float32, page_size=8, gen=gen)
    q = torch.randn(2, 1, 2, 16, generator=gen).to(DEVICE)
    k = torch.randn(2, 1, 1, 16, generator=gen).to(DEVICE)

    def step(q, k, k_cache, v_cache, seqlens):
        out = fastattn.attention_with_kvcache(q, k_cache, v_cache, k, k, cache_seqlens=seqlens, block_table=table,
                                              backend="triton")
        return out * 2

    caches = (k_cache.clone(), v_cache.clone())
    eager = step(q, k, k_cache, v_cache, seqlens)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, *caches, seqlens)
    assert torch.equal(compiled, eager)
    assert torch.equal(caches[0], k_cache) and torch.equal(caches[1], v_cache)  # the append happened, in place


def test_few_queries_compile_fullgraph_as_a_decode_step(gen, monkeypatch):
    """Under torch.compile (a compiled generate() step), a few-query call with nothing to record
    traces to fastattn::triton_attn_few_queries (the decode kernel), key padding and modifiers
    included, with eager's result; opcheck checks the op's schema and fake."""
    monkeypatch.setattr(launch, "FEW_QUERIES_MIN_BYTES", 0)
    torch._dynamo.reset()
    q, k, v = testing.random_qkv(2, 1, 40, 4, 2, 16, dtype=torch.float16, device=DEVICE, generator=gen)
    mask = few_query_padding("left", 2, 40, gen)
    sinks = torch.randn(4, generator=gen).to(DEVICE)
    ops = []

    def counting(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    def step(q, k, v, mask):
        return fastattn.attention(q, k, v, causal=True, key_padding_mask=mask, window=(7, 0), sinks=sinks,
                                  return_lse=True, backend="triton")

    with torch.no_grad():
        eager = step(q, k, v, mask)
        compiled = torch.compile(step, fullgraph=True, backend=counting)(q, k, v, mask)
    assert "fastattn.triton_attn_few_queries.default" in ops, ops
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)
    assert_rule(eager, q, k, v, causal=True, key_padding_mask=mask, window=(7, 0), sinks=sinks, return_lse=True)
    torch.library.opcheck(torch.ops.fastattn.triton_attn_few_queries.default,
                          (q, k, v, mask, True, 0.25, None, None, sinks, 7, 0, 0.0))


# ---------------------------------------------------------------- GPU


def decode_inputs(gen, b=4, cap=2048, hq=16, hkv=4, d=128, page_size=0, dtype=torch.bfloat16):
    k_cache, v_cache, table, seqlens = make_cache([100 * (i + 1) for i in range(b)], cap, hkv, d, dtype=dtype,
                                                  page_size=page_size, gen=gen)
    q = torch.randn(b, 1, hq, d, generator=gen).to(DEVICE, dtype)
    k = torch.randn(b, 1, hkv, d, generator=gen).to(DEVICE, dtype)
    return q, k, k_cache, v_cache, table, seqlens


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [0, 64])
def test_cuda_graph_captures_decode_steps(page_size, gen):
    """Warmed-up decode steps (append + split-KV attention + combine) captured once and replayed per
    token give the eager results; the lengths advance on the device inside the graph."""
    q, k, k_cache, v_cache, table, seqlens = decode_inputs(gen, page_size=page_size)
    static_q, static_k = q.clone(), k.clone()
    eager_caches = (k_cache.clone(), v_cache.clone())
    eager_lens = seqlens.clone()

    def step(q_, k_, kc, vc, lens):
        out = fastattn.attention_with_kvcache(q_, kc, vc, k_, k_, cache_seqlens=lens, block_table=table,
                                              backend="triton")
        lens += 1
        return out

    saved = seqlens.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step(static_q, static_k, k_cache, v_cache, seqlens)
    torch.cuda.current_stream().wait_stream(stream)
    seqlens.copy_(saved)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(static_q, static_k, k_cache, v_cache, seqlens)
    for _ in range(3):
        qn = torch.randn(q.shape, generator=gen).to(q)
        kn = torch.randn(k.shape, generator=gen).to(k)
        static_q.copy_(qn)
        static_k.copy_(kn)
        graph.replay()
        eager = step(qn, kn, *eager_caches, eager_lens)
        assert torch.equal(static_out, eager)
        assert torch.equal(seqlens, eager_lens)


@pytest.mark.gpu
def test_no_host_sync_when_decoding(gen):
    q, k, k_cache, v_cache, table, seqlens = decode_inputs(gen, b=1, page_size=16)
    for splits in (0, 1):
        fastattn.attention_with_kvcache(q, k_cache, v_cache, k, k, cache_seqlens=seqlens, block_table=table,
                                        num_splits=splits, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for splits in (0, 1):
            fastattn.attention_with_kvcache(q, k_cache, v_cache, k, k, cache_seqlens=seqlens, block_table=table,
                                            num_splits=splits, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_direct_launches_match_the_jit_path(gen, monkeypatch):
    def run():
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        results = []
        for page_size, splits in ((0, 1), (16, 0), (64, 5)):
            q, k, k_cache, v_cache, table, seqlens = decode_inputs(g, b=2, page_size=page_size)
            for _ in range(2):
                out, lse = fastattn.attention_with_kvcache(q, k_cache, v_cache, k, k, cache_seqlens=seqlens,
                                                           block_table=table, num_splits=splits, return_lse=True,
                                                           backend="triton")
                results += [out, lse, k_cache.clone()]
        return results

    plans.clear()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fastattn: launching")
        direct = run()
    assert all(p.handle is not None for ps in launch._plans.values() for p in ps if p is not None)
    plans.clear()
    monkeypatch.setenv("FASTATTN_DIRECT_LAUNCH", "0")
    jit = run()
    for a, b in zip(direct, jit):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("padded", [False, True])
def test_few_queries_at_scale_take_the_decode_kernel_without_syncs_and_capture(padded, gen, monkeypatch):
    """A generate() step at its real size (B=4, one query, a 4096-key cache of 8 KV heads, D=128,
    bf16: 64 MiB of K/V, over FEW_QUERIES_MIN_BYTES), left-padded or not: routed to the decode kernel
    (the real threshold, split ranges on the GPU's SMs), right under the tolerance rule, no host sync
    once warm, and captured in a CUDA graph it replays eager's results."""
    b, sk, hq, hkv, d = 4, 4096, 32, 8, 128
    q = torch.randn(b, 1, hq, d, generator=gen).to(DEVICE, torch.bfloat16)
    k, v = (torch.randn(b, sk, hkv, d, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(2))
    mask = (torch.arange(sk, device=DEVICE)[None] >= torch.tensor([0, 5, 700, 4000], device=DEVICE)[:, None]
            if padded else None)
    routed = []
    real = launch.attend_full
    monkeypatch.setattr(launch, "attend_full", lambda *a, **kw: routed.append(1) or real(*a, **kw))
    call = lambda q_: fastattn.attention(q_, k, v, causal=True, key_padding_mask=mask, backend="triton")
    out = call(q)
    assert routed
    assert_rule(out, q, k, v, causal=True, key_padding_mask=mask)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call(q)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    static_q = q.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call(static_q)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = call(static_q)
    for _ in range(2):
        qn = torch.randn(q.shape, generator=gen).to(q)
        static_q.copy_(qn)
        graph.replay()
        assert torch.equal(static_out, call(qn))


@pytest.mark.skipif(HAS_CUDA, reason="CPU: the split count is 1 without SMs to fill")
def test_interpreter_does_not_split_by_default(gen):
    assert launch.sm_count(-1) == 1
    run_case(gen, [200, 3], 4, 1, 32, 1, 0, 0)


@pytest.mark.parametrize("head_dim", [128, 256])
def test_a_query_chunk_past_the_decode_grid_is_refused(head_dim, monkeypatch):
    """The decode grid's axis 1 is KV heads x query row tiles (CUDA allows 65535): a long chunk of
    queries over the cache (chunked prefill through flash_attn_with_kvcache) past it is refused by
    "triton", naming the most queries that fit (so "auto" takes the next backend), instead of a
    launch error on the GPU (the table checked batch and query heads only). Meta tensors: no memory."""
    from fastattn import backends
    from fastattn.backends import triton_backend
    from fastattn.backends.call import KVCacheCall
    from fastattn.shape import AttentionShape

    monkeypatch.setattr(triton_backend, "interpreter", lambda: True)  # meta tensors pass as CPU ones on a GPU too
    hq, hkv, cap = 32, 8, 1 << 19
    most = 65535 // hkv * launch.row_tile(1 << 20, head_dim) // (hq // hkv)

    def call(sq):
        q = torch.empty(1, sq, hq, head_dim, device="meta", dtype=torch.float16)
        kc = torch.empty(1, cap, hkv, head_dim, device="meta", dtype=torch.float16)
        lens = torch.empty(1, device="meta", dtype=torch.int32)
        return KVCacheCall(q, kc, kc, None, None, lens, None, AttentionShape(1, sq, cap, hq, hkv, head_dim), 0,
                           True, head_dim ** -0.5, False, 0, None)

    assert launch.grid_rows(hq, hkv, most, head_dim)[1] <= 65535 < launch.grid_rows(hq, hkv, most + 1, head_dim)[1]
    assert backends.cannot_run("triton", "kvcache", call(most)) is None
    why = backends.cannot_run("triton", "kvcache", call(most + 1))
    assert "KV heads x query row tiles" in why and f"at most {most} queries" in why
