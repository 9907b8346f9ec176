"""Public API: backend choice, the torch backend, and clear errors for bad input."""

import re

import pytest
import torch
from conftest import DEVICE, HAS_CUDA

import fastattn
from fastattn import testing


def qkv(gen, b=1, sq=8, sk=8, hq=2, hkv=2, d=16, dtype=torch.float32):
    return testing.random_qkv(b, sq, sk, hq, hkv, d, dtype=dtype, device=DEVICE, generator=gen)


def test_available_backends_reports_each_with_reason(gen):
    """The report renders the table, and an unavailable backend's reason is the one a call gets."""
    from fastattn import backends

    status = fastattn.available_backends()
    assert set(status) == set(backends.TABLE) == {"triton", "cuda", "torch", "reference"}
    assert status["reference"].available and status["torch"].available
    q, k, v = qkv(gen)
    for name, st in status.items():
        record = backends.TABLE[name]
        assert (st.kinds, st.score_modifiers, st.returns_lse) == (record.kinds, record.modifiers, record.returns_lse)
        assert set(st.gpu_verified) <= set(record.kinds)
        if st.available:
            assert st.reason == "available"
        else:
            assert st.reason != "available"
            for _ in range(2):  # and again: a refused call is never remembered (fastattn.api._PLAIN_CALLS)
                with pytest.raises(ValueError, match=re.escape(st.reason)):
                    fastattn.attention(q, k, v, backend=name)


def test_auto_picks_torch_on_cpu_and_triton_on_cuda(gen, monkeypatch):
    from fastattn import backends

    chosen = []
    real_run = backends.run
    monkeypatch.setattr(backends, "run", lambda name, kind, call: chosen.append(name) or real_run(name, kind, call))
    q, k, v = qkv(gen)
    fastattn.attention(q, k, v)
    assert chosen == ["triton" if HAS_CUDA else "torch"]
    fastattn.attention(q, k, v, return_lse=True)  # torch SDPA has no lse
    assert chosen[-1] == ("triton" if HAS_CUDA else "reference")


# (B, Sq, Sk, Hq, Hkv, D)
@pytest.mark.parametrize("shape", [(2, 17, 17, 4, 2, 32), (1, 9, 30, 2, 1, 40), (1, 30, 9, 2, 2, 16),
                                   (1, 1, 1, 1, 1, 8)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [None, -0.3, 0.0])
def test_torch_backend_matches_reference(shape, causal, scale, gen):
    """Scales <= 0 too: PyTorch's CPU SDPA applies is_causal as -inf before scaling (a negative scale
    made it +inf: NaN or wrong rows; 0 made NaN), so such causal calls take an explicit mask."""
    q, k, v = qkv(gen, *shape)

    def fn(a, b, c):
        return fastattn.attention(a, b, c, causal=causal, scale=scale, backend="torch"), None

    results = testing.check_against_reference(fn, q, k, v, causal=causal, scale=scale, lse=False, generator=gen)
    assert all(r.ok for r in results), [str(r) for r in results]


@pytest.mark.parametrize("scale", [-0.25, 0.0])
def test_sdpa_dropin_is_causal_with_a_nonpositive_scale(scale, gen):
    q = torch.randn(1, 4, 8, 16, generator=gen).to(DEVICE)
    k, v = (torch.randn(1, 2, 17, 16, generator=gen).to(DEVICE) for _ in range(2))
    out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    top_left = torch.ones(8, 17, dtype=torch.bool, device=DEVICE).tril()  # torch's is_causal, as a mask
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=top_left,
                                                           scale=scale, enable_gqa=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_torch_backend_empty_rows_are_zero(gen):
    q, k, v = qkv(gen, sq=12, sk=4)
    q.requires_grad_()
    out = fastattn.attention(q, k, v, causal=True, backend="torch")
    out.sum().backward()
    assert (out[:, :8] == 0).all() and torch.isfinite(q.grad).all()


BAD_CALLS = [
    # (description, builder(q, k, v) -> kwargs for fastattn.attention, exception, message fragment)
    ("q not a tensor", lambda q, k, v: dict(q=q.tolist(), k=k, v=v), TypeError, "q must be a torch.Tensor"),
    ("q rank 3", lambda q, k, v: dict(q=q[0], k=k, v=v), ValueError, "q must have 4 dims"),
    ("k rank 5", lambda q, k, v: dict(q=q, k=k[None], v=v), ValueError, "k must have 4 dims"),
    ("int dtype", lambda q, k, v: dict(q=q.long(), k=k, v=v), TypeError, "q must be a floating tensor"),
    ("dtype mismatch", lambda q, k, v: dict(q=q, k=k.double(), v=v), TypeError, "k has dtype"),
    ("k/v shape mismatch", lambda q, k, v: dict(q=q, k=k, v=v[:, :-1]), ValueError, "k and v must have the same"),
    ("batch mismatch", lambda q, k, v: dict(q=q, k=k[:1], v=v[:1]), ValueError, "batch size"),
    ("head dim mismatch", lambda q, k, v: dict(q=q, k=k[..., :8], v=v[..., :8]), ValueError, "head dim"),
    ("heads not a multiple", lambda q, k, v: dict(q=q[:, :, :3], k=k, v=v), ValueError, "multiple"),
    ("head dim too large", lambda q, k, v: dict(q=q.new_zeros(2, 8, 4, 300), k=k.new_zeros(2, 8, 2, 300),
                                                 v=v.new_zeros(2, 8, 2, 300)), ValueError, "between 1 and 256"),
    ("scale not a number", lambda q, k, v: dict(q=q, k=k, v=v, scale="0.1"), TypeError, "scale"),
    ("scale nan", lambda q, k, v: dict(q=q, k=k, v=v, scale=float("nan")), ValueError, "scale must be finite"),
    ("causal not bool", lambda q, k, v: dict(q=q, k=k, v=v, causal=1), TypeError, "causal must be a bool"),
    ("unknown backend", lambda q, k, v: dict(q=q, k=k, v=v, backend="flash"), ValueError, "backend must be"),
    ("mask wrong shape", lambda q, k, v: dict(q=q, k=k, v=v, key_padding_mask=torch.ones(2, 3, dtype=torch.bool,
                                              device=q.device), backend="reference"), ValueError, "key_padding_mask"),
    ("mask not bool", lambda q, k, v: dict(q=q, k=k, v=v, key_padding_mask=torch.ones(2, 8, device=q.device),
                                           backend="reference"), TypeError, "key_padding_mask must be a bool"),
    ("lse on torch", lambda q, k, v: dict(q=q, k=k, v=v, return_lse=True, backend="torch"), ValueError,
     "return_lse"),
    ("float64 on triton", lambda q, k, v: dict(q=q.double(), k=k.double(), v=v.double(), backend="triton"),
     ValueError, "float64"),
]


@pytest.mark.parametrize("after_a_good_call", [False, True])
@pytest.mark.parametrize("desc,build,exc,fragment", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_gets_a_clear_error(desc, build, exc, fragment, after_a_good_call, gen):
    """The same error whether or not a valid call of the same q, k, v (and backend) came first and
    was remembered by its signature (fastattn.api._PLAIN_CALLS)."""
    q, k, v = qkv(gen, b=2, hq=4, hkv=2)
    kwargs = build(q, k, v)
    if after_a_good_call:
        backend = kwargs.get("backend", "auto")
        fastattn.attention(q, k, v, backend=backend if backend in fastattn.available_backends() else "auto")
    with pytest.raises(exc, match=fragment):
        fastattn.attention(kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"), **kwargs)


def test_a_repeated_call_is_validated_and_placed_once(gen, monkeypatch):
    """A call without score modifiers whose q, k, v (sizes, dtypes, devices, layouts), return_lse and
    backend were seen before skips validate_qkv and backends.choose (host time per call); a call that
    differs in any of them takes both again; flags, scale and the mask are checked every time."""
    from fastattn import api, backends

    monkeypatch.setattr(api, "_PLAIN_CALLS", {})  # (as in a fresh process)
    q, k, v = qkv(gen, b=2, hq=4, hkv=2)
    mask = torch.ones(2, 8, dtype=torch.bool, device=q.device)
    expected = fastattn.attention(q, k, v, causal=True, key_padding_mask=mask)
    seen = []
    real_validate, real_choose = api.validate_qkv, backends.choose
    monkeypatch.setattr(api, "validate_qkv", lambda *a, **kw: seen.append("validate") or real_validate(*a, **kw))
    monkeypatch.setattr(backends, "choose", lambda *a, **kw: seen.append("choose") or real_choose(*a, **kw))
    torch.testing.assert_close(fastattn.attention(q.clone(), k.clone(), v, causal=True, key_padding_mask=mask),
                               expected, rtol=0, atol=0)
    assert seen == []
    with pytest.raises(TypeError, match="causal must be a bool"):
        fastattn.attention(q, k, v, causal=1)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        fastattn.attention(q, k, v, key_padding_mask=mask[:, :3])
    with pytest.raises(ValueError, match="scale must be finite"):
        fastattn.attention(q, k, v, scale=float("inf"))
    assert seen == []
    for other in (dict(q=q.double(), k=k.double(), v=v.double()), dict(q=q[:1], k=k[:1], v=v[:1]),
                  dict(q=q, k=k, v=v, return_lse=True), dict(q=q, k=k, v=v, backend="reference")):
        seen.clear()
        fastattn.attention(**other)
        assert seen == ["validate", "choose"], other


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged], ids=str)
def test_nested_tensors_are_refused_by_name(layout, gen):
    """A nested q (either layout) gets a TypeError naming q on every entry point; a strided nested
    tensor used to escape as torch's own "NestedTensorImpl doesn't support sizes"."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's prototype warning for the strided layout)
        nq = torch.nested.nested_tensor([torch.randn(3, 4, 16), torch.randn(5, 4, 16)], layout=layout)
        k = torch.randn(8, 2, 16)
        cu = torch.tensor([0, 3, 8], dtype=torch.int32)
        cache = torch.zeros(2, 8, 2, 16)
        calls = (lambda: fastattn.attention(nq, nq, nq),
                 lambda: fastattn.attention_varlen(nq, k, k, cu, cu, 5, 5),
                 lambda: fastattn.attention_with_kvcache(nq, cache, cache, cache_seqlens=cu[:2]))
        for call in calls:
            with pytest.raises(TypeError, match="q must be a dense"):
                call()


def test_remembered_calls_hold_no_tensor(gen):
    import gc
    import weakref

    q, k, v = qkv(gen)
    fastattn.attention(q, k, v)
    refs = [weakref.ref(x) for x in (q, k, v)]
    del q, k, v
    gc.collect()
    assert all(r() is None for r in refs)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a second device type")
@pytest.mark.gpu
def test_device_mismatch(gen):
    q, k, v = qkv(gen)
    with pytest.raises(ValueError, match="k is on"):
        fastattn.attention(q, k.cpu(), v)


def test_device_mismatch_cpu_meta(gen):
    q, k, v = qkv(gen)
    with pytest.raises(ValueError, match="k is on"):
        fastattn.attention(q, k.to("meta"), v)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("sq,sk", [(5, 0), (0, 5)])
def test_empty_sequences_give_zeros_and_zero_grads(backend, sq, sk, gen):
    q, k, v = testing.random_qkv(2, sq, sk, 2, 1, 16, device=DEVICE, generator=gen, requires_grad=True)
    out = fastattn.attention(q, k, v, causal=True, backend=backend)
    assert out.shape == q.shape and (out == 0).all()
    out.sum().backward()
    for x in (q, k, v):
        assert x.grad is not None and (x.grad == 0).all()


def test_triton_rejects_batch_over_grid_limit():
    q = torch.empty(70000, 4, 2, 16, device="meta")
    with pytest.raises(ValueError, match="65535"):
        fastattn.attention(q, q, q, backend="triton")


def test_sparse_input_is_rejected(gen):
    q, k, v = qkv(gen)
    with pytest.raises(TypeError, match="dense"):
        fastattn.attention(q.to_sparse(), k, v)


def test_reference_backend_key_padding_mask(gen):
    q, k, v = qkv(gen, b=2, sk=6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool, device=q.device)
    out = fastattn.attention(q, k, v, key_padding_mask=mask, backend="reference")
    ref = fastattn.attention(q[:1], k[:1, :3], v[:1, :3], backend="reference")
    torch.testing.assert_close(out[:1], ref)
    assert (out[1] == 0).all()
