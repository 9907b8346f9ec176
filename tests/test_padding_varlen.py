"""Key-padding masks and packed (varlen) sequences in the Triton kernels, against the float64
reference (docs/design.md tolerance rule), plus the padded <-> packed helpers."""

import pytest
import torch
from conftest import DEVICE

import fastattn
from fastattn import testing
from fastattn.launchers.key_bounds import key_bounds, key_bounds_torch

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def random_mask(batch, sk, gen, kind):
    """(B, Sk) bool, True = real key: right/left/interior padding, plus edge rows."""
    m = torch.ones(batch, sk, dtype=torch.bool)
    for b in range(batch):
        n = int(torch.randint(0, sk + 1, (1,), generator=gen))
        if kind == "right":
            m[b, n:] = False
        elif kind == "left":
            m[b, :sk - n] = False
        else:
            m[b] = torch.rand(sk, generator=gen) > 0.5
    m[0] = False  # a batch element with no real key at all
    if batch > 2:
        m[2] = True  # and one with no padding
    return m.to(DEVICE)


def assert_ok(results, what):
    bad = [str(r) for r in results if not r.ok]
    assert not bad, f"{what}: " + "; ".join(bad)


# (B, Sq, Sk, Hq, Hkv, D)
MASK_SHAPES = [(3, 1, 300, 2, 1, 64), (3, 37, 50, 4, 2, 40), (3, 130, 17, 2, 2, 80), (4, 64, 64, 2, 1, 128)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["right", "left", "random"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_key_padding_mask_matches_reference(shape, causal, kind, dtype, gen):
    b, sq, sk, hq, hkv, d = shape
    q, k, v = testing.random_qkv(b, sq, sk, hq, hkv, d, dtype=dtype, device=DEVICE, generator=gen)
    mask = random_mask(b, sk, gen, kind)

    def fn(a, b_, c):
        out, lse = fastattn.attention(a, b_, c, causal=causal, key_padding_mask=mask, return_lse=True,
                                      backend="triton")
        assert torch.isfinite(out).all()  # padded queries and key-less rows stay finite
        return out, lse

    assert_ok(testing.check_against_reference(fn, q, k, v, causal=causal, key_padding_mask=mask, lse_grad=True,
                                              generator=gen), f"mask {kind} q{tuple(q.shape)} k{tuple(k.shape)}")


@pytest.mark.parametrize("kind", ["right", "left", "random"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_key_padding_mask_on_torch_backend(shape, causal, kind, gen):
    """PyTorch SDPA with the mask turned into attn_mask: key-less rows give 0 and zero gradients
    (SDPA alone gives NaN there), everything else matches the reference."""
    b, sq, sk, hq, hkv, d = shape
    q, k, v = testing.random_qkv(b, sq, sk, hq, hkv, d, device=DEVICE, generator=gen)
    mask = random_mask(b, sk, gen, kind)

    def fn(a, b_, c):
        out = fastattn.attention(a, b_, c, causal=causal, key_padding_mask=mask, backend="torch")
        assert torch.isfinite(out).all()
        return out, None

    results = testing.check_against_reference(fn, q, k, v, causal=causal, key_padding_mask=mask, lse=False,
                                              generator=gen)
    assert_ok(results, f"torch mask {kind} q{tuple(q.shape)} k{tuple(k.shape)}")


def test_all_padding_batch_element_gives_zeros_and_zero_grads(gen):
    q, k, v = testing.random_qkv(2, 20, 40, 2, 2, 32, device=DEVICE, generator=gen, requires_grad=True)
    mask = torch.ones(2, 40, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    out, lse = fastattn.attention(q, k, v, key_padding_mask=mask, return_lse=True, backend="triton")
    out.sum().backward()
    assert (out[1] == 0).all() and (lse[1] == float("-inf")).all()
    assert (q.grad[1] == 0).all() and (k.grad[1] == 0).all() and (v.grad[1] == 0).all()
    assert (k.grad[0] != 0).any()


def test_mask_with_no_keys(gen):
    q, k, v = testing.random_qkv(2, 5, 0, 2, 2, 16, device=DEVICE, generator=gen)
    mask = torch.ones(2, 0, dtype=torch.bool, device=DEVICE)
    assert (fastattn.attention(q, k, v, key_padding_mask=mask, backend="triton") == 0).all()


def test_key_bounds(gen):
    m = torch.tensor([[0, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert key_bounds(m.to(DEVICE)).tolist() == [[1, 5], [6, 0], [0, 6]]  # no real key: an empty range
    assert key_bounds_torch(m).tolist() == [[1, 5], [6, 0], [0, 6]]
    # The kernel against the torch version: rows shorter and longer than its 1024-byte step, empty
    # rows, a mask seen through a non-contiguous view, no keys at all.
    for b, sk in ((5, 1), (3, 100), (4, 1024), (3, 2500), (2, 0)):
        masks = torch.rand(b, sk, generator=gen) > torch.rand(b, 1, generator=gen)
        if b > 2:
            masks[1] = False
        for mask in (masks, torch.cat([masks, masks], dim=1)[:, ::2]):
            got = key_bounds(mask.to(DEVICE))
            assert got.dtype == torch.int32 and got.is_contiguous()
            assert torch.equal(got.cpu(), key_bounds_torch(mask)), (b, sk)


def packed(lengths_q, lengths_k, hq, hkv, d, dtype, gen):
    cu_q = torch.tensor([0] + lengths_q, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEVICE)
    cu_k = torch.tensor([0] + lengths_k, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEVICE)
    q = torch.randn(sum(lengths_q), hq, d, generator=gen).to(DEVICE, dtype)
    k = torch.randn(sum(lengths_k), hkv, d, generator=gen).to(DEVICE, dtype)
    v = torch.randn(sum(lengths_k), hkv, d, generator=gen).to(DEVICE, dtype)
    return q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k)


VARLEN_CASES = [
    ([5, 0, 33, 17], [9, 4, 33, 70], 4, 2, 64),   # an empty query sequence, Sq != Sk both ways
    ([1, 300, 7], [1, 300, 1], 2, 1, 40),          # lengths 1..300, MQA
    ([64, 65], [64, 65], 2, 2, 128),
    ([3, 12], [0, 12], 2, 2, 32),                  # a sequence with no keys
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: "-".join(map(str, c[0])))
def test_varlen_matches_reference(case, causal, dtype, gen):
    lengths_q, lengths_k, hq, hkv, d = case
    q, k, v, cu_q, cu_k, mq, mk = packed(lengths_q, lengths_k, hq, hkv, d, dtype, gen)

    def varlen(backend):
        return lambda a, b, c: fastattn.attention_varlen(a, b, c, cu_q, cu_k, mq, mk, causal=causal,
                                                         return_lse=True, backend=backend)

    assert_ok(testing.check_against_reference(varlen("triton"), q, k, v, lse_grad=True, generator=gen,
                                              ref_fn=varlen("reference")), f"varlen {lengths_q}/{lengths_k}")


@pytest.mark.parametrize("backend", ["triton", "reference", "torch", "auto"])
def test_varlen_with_no_sequences(backend):
    """A packed batch of no sequences (cu_seqlens [0], no tokens): empty out (and lse where the
    backend returns it) that gradients still flow through to q, k, v (empty, as they are) and a
    learned bias or sinks (zeros), on every backend (the padded-layout ones run sequence by sequence:
    nothing to run)."""
    cu = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(0, h, 16, device=DEVICE, requires_grad=True) for h in (4, 2, 2))
    lse_too = backend in ("triton", "reference")
    got = fastattn.attention_varlen(q, k, v, cu, cu, 0, 0, causal=True, return_lse=lse_too, backend=backend)
    out, lse = got if lse_too else (got, None)
    assert out.shape == (0, 4, 16) and out.requires_grad
    if lse_too:
        assert lse.shape == (4, 0) and lse.dtype == torch.float32 and lse.requires_grad
    loss = out.sum() + (lse.sum() if lse_too else 0)
    assert [tuple(g.shape) for g in torch.autograd.grad(loss, (q, k, v))] == [(0, 4, 16), (0, 2, 16), (0, 2, 16)]
    if backend == "torch":
        return  # SDPA runs no sinks
    bias, sinks = torch.zeros(1, 4, 1, 1, device=DEVICE, requires_grad=True), torch.zeros(4, device=DEVICE,
                                                                                           requires_grad=True)
    out = fastattn.attention_varlen(q, k, v, cu, cu, 0, 0, bias=bias, sinks=sinks, backend=backend)
    grads = torch.autograd.grad(out.sum(), (bias, sinks))
    assert [tuple(g.shape) for g in grads] == [(1, 4, 1, 1), (4,)] and not any(g.any() for g in grads)


def test_varlen_equals_padded_with_mask(gen):
    """unpad -> attention_varlen -> pad equals padded attention with the same mask, on real tokens."""
    b, s, h, d = 3, 45, 2, 32
    x = torch.randn(b, s, h, d, generator=gen).to(DEVICE)
    mask = torch.ones(b, s, dtype=torch.bool, device=DEVICE)
    mask[0, 30:] = False
    mask[1, :7] = False
    packed_x, idx, cu, max_len = fastattn.unpad_input(x, mask)
    assert packed_x.shape == (int(mask.sum()), h, d) and cu.tolist() == [0, 30, 68, 113] and max_len == 45
    out = fastattn.attention_varlen(packed_x, packed_x, packed_x, cu, cu, max_len, max_len, causal=True,
                                    backend="triton")
    padded = fastattn.pad_input(out, idx, b, s)
    # Bottom-right causal per sequence == causal over the real tokens of each padded row.
    for i in range(b):
        real = x[i][mask[i]][None]
        alone = fastattn.attention(real, real, real, causal=True, backend="triton")[0]
        torch.testing.assert_close(padded[i][mask[i]], alone, rtol=1e-5, atol=1e-5)
        assert (padded[i][~mask[i]] == 0).all()


def test_non_contiguous_cu_seqlens(gen):
    q, k, v, cu_q, cu_k, mq, mk = packed([5, 9, 3], [5, 9, 3], 2, 2, 16, torch.float32, gen)
    strided = torch.full((8,), 99, dtype=torch.int32, device=DEVICE)
    strided[::2] = cu_q
    cu_view = strided[::2]
    assert not cu_view.is_contiguous()
    out = fastattn.attention_varlen(q, k, v, cu_view, cu_view, mq, mk, backend="triton")
    torch.testing.assert_close(out, fastattn.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, backend="triton"))


def test_unpad_accepts_integer_masks(gen):
    x = torch.randn(2, 4, 3, generator=gen)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 1]])  # Hugging Face attention_mask: int64 1/0
    packed_x, idx, cu, max_len = fastattn.unpad_input(x, mask)
    assert cu.tolist() == [0, 2, 5] and max_len == 3
    torch.testing.assert_close(packed_x, x.reshape(8, 3)[[0, 1, 4, 6, 7]])
    with pytest.raises(TypeError, match="bool or integer"):
        fastattn.unpad_input(x, mask.float())


def test_pad_unpad_round_trip_and_gradients(gen):
    x = torch.randn(2, 6, 3, generator=gen, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    p, idx, cu, max_len = fastattn.unpad_input(x, mask)
    assert cu.tolist() == [0, 3, 3] and max_len == 3 and cu.dtype == torch.int32
    back = fastattn.pad_input(p, idx, 2, 6)
    torch.testing.assert_close(back, x * mask[..., None])
    back.sum().backward()
    torch.testing.assert_close(x.grad, mask[..., None].float().expand_as(x))


BAD_CU = [
    ("int64", lambda cu: cu.long(), TypeError, "int32"),
    ("2-D", lambda cu: cu[None], ValueError, "1-D"),
    ("not from 0", lambda cu: cu + 1, ValueError, "start at 0"),
    ("wrong total", lambda cu: torch.cat([cu[:-1], cu[-1:] - 1]), ValueError, "end at the total"),
    ("decreasing", lambda cu: torch.tensor([0, 10, 4, 20], dtype=torch.int32, device=cu.device), ValueError,
     "non-decreasing"),
    ("wrong length", lambda cu: cu[:-1], ValueError, "same length"),
]


@pytest.mark.parametrize("desc,mutate,exc,fragment", BAD_CU, ids=[c[0] for c in BAD_CU])
def test_bad_cu_seqlens(desc, mutate, exc, fragment, gen, monkeypatch):
    monkeypatch.setenv("FASTATTN_CHECK_VALUES", "1")  # CUDA tensors: values are checked on request only
    q, k, v, cu_q, cu_k, mq, mk = packed([4, 6, 10], [4, 6, 10], 2, 2, 16, torch.float32, gen)
    with pytest.raises(exc, match=fragment):
        fastattn.attention_varlen(q, k, v, mutate(cu_q), cu_k, mq, mk)


def test_fast_validation_path(gen, monkeypatch):
    """Without value checks (CUDA tensors) a valid packed call passes one combined test with the full
    checks' shape; an invalid one falls through to the full checks, which name the argument."""
    from types import SimpleNamespace

    from fastattn import validation

    q, k, v, cu_q, cu_k, mq, mk = packed([4, 0, 10], [5, 6, 2], 4, 2, 16, torch.float32, gen)
    full = validation.validate_varlen(q, k, v, cu_q, cu_k, mq, mk)  # (CPU: values checked too)
    monkeypatch.setattr(validation, "value_checks", lambda device: False)
    assert validation._varlen_fast_path(q, k, v, cu_q, cu_k, mq, mk) == full
    meta = lambda x: x.to("meta")
    bad = [  # (arguments, error, message): every condition of the one test, broken once
        ((q[None], k, v, cu_q, cu_k, mq, mk), ValueError, "q must have 3 dims"),
        ((q, k[None], v[None], cu_q, cu_k, mq, mk), ValueError, "k must have 3 dims"),
        ((q, k, v[:, :1], cu_q, cu_k, mq, mk), ValueError, "same shape"),
        ((q[..., :8], k, v, cu_q, cu_k, mq, mk), ValueError, "head dim"),
        ((q, k[:, :0], v[:, :0], cu_q, cu_k, mq, mk), ValueError, "multiple of the number of key/value heads"),
        ((q[:, :3], k, v, cu_q, cu_k, mq, mk), ValueError, "multiple of the number of key/value heads"),
        ((*(torch.zeros(20, 2, 300, device=DEVICE) for _ in range(3)), cu_q, cu_k, mq, mk), ValueError,
         "between 1 and 256"),
        ((q.int(), k.int(), v.int(), cu_q, cu_k, mq, mk), TypeError, "q must be a floating tensor"),
        ((q, k.double(), v, cu_q, cu_k, mq, mk), TypeError, "k has dtype"),
        ((q, k, v.double(), cu_q, cu_k, mq, mk), TypeError, "v has dtype"),
        ((q.to_sparse(), k, v, cu_q, cu_k, mq, mk), TypeError, "dense"),
        ((q, meta(k), v, cu_q, cu_k, mq, mk), ValueError, "k is on meta"),
        ((q, k, meta(v), cu_q, cu_k, mq, mk), ValueError, "v is on meta"),
        ((q, k, v, cu_q.tolist(), cu_k, mq, mk), TypeError, "cu_seqlens_q must be a torch.Tensor"),
        ((q, k, v, cu_q, cu_k.tolist(), mq, mk), TypeError, "cu_seqlens_k must be a torch.Tensor"),
        ((q, k, v, SimpleNamespace(dtype=cu_q.dtype, dim=cu_q.dim, shape=cu_q.shape, device=cu_q.device), cu_k, mq,
          mk), TypeError, "cu_seqlens_q must be a torch.Tensor"),  # tensor-like attributes are not enough
        ((q, k, v, cu_q.long(), cu_k, mq, mk), TypeError, "cu_seqlens_q must be int32"),
        ((q, k, v, cu_q, cu_k.long(), mq, mk), TypeError, "cu_seqlens_k must be int32"),
        ((q, k, v, cu_q[None], cu_k[None], mq, mk), ValueError, "cu_seqlens_q must be 1-D"),
        ((q, k, v, cu_q, cu_k[:-1], mq, mk), ValueError, "same length"),
        ((q, k, v, cu_q[:0], cu_k[:0], mq, mk), ValueError, "batch \\+ 1 entries"),
        ((q, k, v, meta(cu_q), cu_k, mq, mk), ValueError, "cu_seqlens_q is on meta"),
        ((q, k, v, cu_q, meta(cu_k), mq, mk), ValueError, "cu_seqlens_k is on meta"),
        ((q, k, v, cu_q, cu_k, float(mq), mk), TypeError, "max_seqlen_q"),
        ((q, k, v, cu_q, cu_k, mq, True), TypeError, "max_seqlen_k"),
        ((q, k, v, cu_q, cu_k, -1, mk), TypeError, "max_seqlen_q"),
        ((q, k, v, cu_q, cu_k, mq, -1), TypeError, "max_seqlen_k"),
        ((q, k, v, cu_q.to_sparse(), cu_k, mq, mk), TypeError, "cu_seqlens_q must be a dense"),
        ((q, k, v, cu_q, cu_k.to_sparse(), mq, mk), TypeError, "cu_seqlens_k must be a dense"),
    ]
    for args, exc, fragment in bad:
        assert validation._varlen_fast_path(*args) is None, fragment
        with pytest.raises(exc, match=fragment):
            validation.validate_varlen(*args)


def test_a_repeated_packed_call_is_validated_and_placed_once(gen, monkeypatch):
    """Without value checks (CUDA tensors), a packed call without score modifiers whose tensors' sizes,
    dtypes, devices and layouts, max lengths, return_lse and backend were seen before (the next layer
    of a step) skips validate_varlen and backends.choose; one that differs in any of them takes both
    again, and a bad one after a remembered good one gets its own error; flags and scale are checked
    every time. With value checks (CPU tensors) every call is validated and nothing is remembered."""
    from fastattn import api, backends, validation

    monkeypatch.setenv("FASTATTN_CHECK_VALUES", "1")  # values read on the host (CPU tensors always)
    seen = []
    real_validate, real_choose = api.validate_varlen, backends.choose
    monkeypatch.setattr(api, "validate_varlen", lambda *a, **kw: seen.append("validate") or real_validate(*a, **kw))
    monkeypatch.setattr(backends, "choose", lambda *a, **kw: seen.append("choose") or real_choose(*a, **kw))
    monkeypatch.setattr(api, "_PLAIN_VARLEN_CALLS", {})  # (as in a fresh process)
    q, k, v, cu_q, cu_k, mq, mk = packed([4, 0, 10], [5, 6, 2], 4, 2, 16, torch.float32, gen)

    def call(*args, **kw):
        args = args or (q, k, v, cu_q, cu_k, mq, mk)
        return fastattn.attention_varlen(*args, **{"causal": True, "backend": "triton", **kw})

    for _ in range(2):  # values read on the host: nothing remembered
        call()
    assert seen == ["validate", "choose"] * 2 and not api._PLAIN_VARLEN_CALLS
    monkeypatch.setattr(validation, "value_checks", lambda device: False)
    monkeypatch.setattr(api, "value_checks", lambda device: False)
    expected = call()
    seen.clear()
    torch.testing.assert_close(call(q.clone(), k.clone(), v, cu_q.clone(), cu_k, mq, mk), expected, rtol=0, atol=0)
    assert seen == []
    with pytest.raises(TypeError, match="causal must be a bool"):
        call(causal=1)
    with pytest.raises(ValueError, match="scale must be"):
        call(scale=float("inf"))
    assert seen == []
    for args, error, match in (((q, k, v, cu_q.long(), cu_k, mq, mk), TypeError, "cu_seqlens_q must be int32"),
                               ((q, k, v, cu_q, cu_k, mq, True), TypeError, "max_seqlen_k"),
                               ((q, k, v, cu_q, cu_k.to("meta"), mq, mk), ValueError, "cu_seqlens_k is on meta"),
                               ((q, k.double(), v, cu_q, cu_k, mq, mk), TypeError, "k has dtype")):
        with pytest.raises(error, match=match):
            call(*args)
    for args, kw in (((q, k, v, cu_q, cu_k, mq + 1, mk), {}), ((q[:, :2], k, v, cu_q, cu_k, mq, mk), {}),
                     ((q, k, v, cu_q[:3], cu_k[:3], mq, mk), {}), ((), dict(return_lse=True))):
        seen.clear()
        call(*args, **kw)
        assert seen == ["validate", "choose"], (args, kw)
    one = packed([1], [1], 2, 2, 16, torch.float32, gen)
    call(*one)
    with pytest.raises(TypeError, match="max_seqlen_k"):  # True == 1, and hashes alike: its type is in the key
        call(*one[:-1], True)


def test_bad_max_seqlen(gen, monkeypatch):
    monkeypatch.setenv("FASTATTN_CHECK_VALUES", "1")  # CUDA tensors: values are checked on request only
    q, k, v, cu_q, cu_k, mq, mk = packed([4, 6, 10], [4, 6, 10], 2, 2, 16, torch.float32, gen)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        fastattn.attention_varlen(q, k, v, cu_q, cu_k, 9, mk)
    with pytest.raises(TypeError, match="max_seqlen_k"):
        fastattn.attention_varlen(q, k, v, cu_q, cu_k, mq, 10.0)
    with pytest.raises(ValueError, match="q must have 3 dims"):
        fastattn.attention_varlen(q[None], k, v, cu_q, cu_k, mq, mk)
