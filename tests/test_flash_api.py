"""FlashAttention 2's functions on fastattn (fastattn/flash_api.py): FlashAttention's argument names,
defaults and return values, checked against the float64 reference with the tolerance rule, and
the documented differences (no dropout, no rotary) as clear errors."""

import re

import pytest
import torch
from conftest import DEVICE

import fastattn
from fastattn import reference, testing


def assert_ok(results, what):
    bad = [str(r) for r in results if not r.ok]
    assert not bad, f"{what}: " + "; ".join(bad)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_func_with_window_softcap_alibi(causal, gen):
    q, k, v = testing.random_qkv(2, 37, 45, 4, 2, 32, device=DEVICE, generator=gen)
    slopes = torch.rand(4, generator=gen).to(DEVICE)

    def fn(a, b, c):
        out, lse, probs = fastattn.flash_attn_func(a, b, c, 0.0, 0.3, causal, (9, 4), 3.0, slopes,
                                                   return_attn_probs=True, backend="triton")
        assert probs is None
        return out, lse

    ref = lambda a, b, c: reference.attention(a, b, c, causal=causal, scale=0.3, window=(9, 4), softcap=3.0,
                                              alibi_slopes=slopes, return_lse=True)
    assert_ok(testing.check_against_reference(fn, q, k, v, lse_grad=True, generator=gen, ref_fn=ref), "flash_attn_func")


def test_flash_attn_func_defaults_are_flash_attentions(gen):
    """No causal, scale 1/sqrt(D), no window: plain attention; out alone without return_attn_probs."""
    q, k, v = testing.random_qkv(1, 9, 11, 2, 1, 16, device=DEVICE, generator=gen)
    out = fastattn.flash_attn_func(q, k, v, backend="triton")
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, reference.attention(q, k, v), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fastattn.flash_attn_func(q, k, v, deterministic=True, backend="triton"), out)


def test_flash_attn_varlen_func(gen):
    lengths = [5, 17, 1]
    cu = torch.tensor([0] + lengths).cumsum(0).to(DEVICE, torch.int32)
    q = torch.randn(sum(lengths), 2, 16, generator=gen).to(DEVICE)
    k = torch.randn(sum(lengths), 1, 16, generator=gen).to(DEVICE)
    v = torch.randn(sum(lengths), 1, 16, generator=gen).to(DEVICE)

    def varlen(backend):
        def fn(a, b, c):
            out, lse, _ = fastattn.flash_attn_varlen_func(a, b, c, cu, cu, 17, 17, causal=True, window_size=(3, 0),
                                                          return_attn_probs=True, backend=backend)
            return out, lse
        return fn

    assert_ok(testing.check_against_reference(varlen("triton"), q, k, v, generator=gen, ref_fn=varlen("reference")),
              "flash_attn_varlen_func")


def test_flash_attn_with_kvcache(gen):
    """FlashAttention's defaults (causal=False), an int cache_seqlens, the cache written in place and
    not advanced, return_softmax_lse."""
    b, cap, hq, hkv, d = 2, 40, 4, 2, 16
    k_cache = torch.randn(b, cap, hkv, d, generator=gen).to(DEVICE)
    v_cache = torch.randn(b, cap, hkv, d, generator=gen).to(DEVICE)
    q = torch.randn(b, 2, hq, d, generator=gen).to(DEVICE)
    k_new, v_new = (torch.randn(b, 2, hkv, d, generator=gen).to(DEVICE) for _ in range(2))
    keys, values = torch.cat([k_cache[:, :20], k_new], 1), torch.cat([v_cache[:, :20], v_new], 1)
    out, lse = fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=20,
                                                window_size=(8, -1), return_softmax_lse=True, backend="triton")
    ref, ref_lse = reference.attention(q, keys, values, window=(8, -1), return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    assert torch.equal(k_cache[:, 20:22], k_new) and torch.equal(v_cache[:, 20:22], v_new)
    # cache_seqlens=None: the whole cache, no new tokens.
    full = fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, causal=True, backend="triton")
    torch.testing.assert_close(full, reference.attention(q, k_cache, v_cache, causal=True), atol=1e-5, rtol=1e-5)


PACKED = {  # form -> (call(q, k, v, cu_q, cu_k, max_q, max_k) -> (out, lse), padded or varlen, same heads)
    "qkvpacked": (lambda a, b, c, *_: fastattn.flash_attn_qkvpacked_func(
        torch.stack([a, b, c], 2), 0.0, 0.3, True, (5, 2), return_attn_probs=True, backend="triton")[:2], False, True),
    "kvpacked": (lambda a, b, c, *_: fastattn.flash_attn_kvpacked_func(
        a, torch.stack([b, c], 2), causal=True, window_size=(5, 2), softmax_scale=0.3, return_attn_probs=True,
        backend="triton")[:2], False, False),
    "varlen_qkvpacked": (lambda a, b, c, cu, _, m, __: fastattn.flash_attn_varlen_qkvpacked_func(
        torch.stack([a, b, c], 1), cu, m, 0.0, 0.3, True, (5, 2), return_attn_probs=True, backend="triton")[:2],
        True, True),
    "varlen_kvpacked": (lambda a, b, c, cu_q, cu_k, mq, mk: fastattn.flash_attn_varlen_kvpacked_func(
        a, torch.stack([b, c], 1), cu_q, cu_k, mq, mk, causal=True, window_size=(5, 2), softmax_scale=0.3,
        return_attn_probs=True, backend="triton")[:2], True, False),
}


@pytest.mark.parametrize("form", list(PACKED))
def test_packed_forms(form, gen):
    """flash_attn_{qkv,kv}packed_func and their varlen twins: views into the packed tensor (the
    gradients flow back into it through the stack), checked against the reference like the others."""
    call, varlen, same_heads = PACKED[form]
    b, sq, hq, d = 2, 23, 4, 16
    sk, hkv = (sq, hq) if same_heads else (31, 2)
    q, k, v = testing.random_qkv(b, sq, sk, hq, hkv, d, device=DEVICE, generator=gen)
    cu_q, cu_k = (torch.arange(0, b * s + 1, s, dtype=torch.int32, device=DEVICE) for s in (sq, sk))
    ref = lambda a, b_, c: reference.attention(a, b_, c, causal=True, window=(5, 2), scale=0.3, return_lse=True)
    if not varlen:
        fn = lambda a, b_, c: call(a, b_, c)
    else:  # two sequences of the batch, packed; lse (Hq, T) -> (B, Hq, Sq) to compare
        def fn(a, b_, c):
            out, lse = call(a.flatten(0, 1), b_.flatten(0, 1), c.flatten(0, 1), cu_q, cu_k, sq, sk)
            return out.unflatten(0, (b, sq)), lse.unflatten(1, (b, sq)).transpose(0, 1)
    assert_ok(testing.check_against_reference(fn, q, k, v, generator=gen, ref_fn=ref), form)


@pytest.mark.parametrize("window_size", [(3, 0), [3, 0], torch.tensor([3, 0]), torch.tensor([3, 0], dtype=torch.int32),
                                         (torch.tensor(3), 0)], ids=["tuple", "list", "int64", "int32", "0-d"])
def test_window_size_as_flash_attention_takes_it(window_size, gen):
    """Any two ints: FlashAttention's own tests pass torch.randint(0, seqlen_k, (2,))."""
    q, k, v = testing.random_qkv(1, 9, 9, 2, 2, 16, device=DEVICE, generator=gen)
    got = fastattn.flash_attn_func(q, k, v, window_size=window_size, backend="reference")
    torch.testing.assert_close(got, reference.attention(q, k, v, window=(3, 0)), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("window_size", [4, (1, 2, 3), (1.0, 2), (True, 0), (torch.tensor(True), 0), (-2, 0),
                                         torch.tensor([1.0, 2.0]), torch.tensor([[1, 2]]), "ab", None,
                                         torch.tensor([-2, 0])])
def test_window_size_refused_naming_it(window_size, gen):
    q = torch.randn(1, 3, 2, 16, generator=gen)
    with pytest.raises(ValueError, match="window_size must be") as e:
        fastattn.flash_attn_func(q, q, q, window_size=window_size)
    assert str(e.value).endswith(f"got {window_size!r}")  # as passed (a tensor too)


@pytest.mark.parametrize("softcap", [0.0, -1.0, -30, 0])
def test_softcap_zero_or_negative_is_off_as_in_flash_attention(softcap, gen):
    q, k, v = testing.random_qkv(1, 7, 9, 2, 1, 16, device=DEVICE, generator=gen)
    want = reference.attention(q, k, v, causal=True)
    for call in (lambda: fastattn.flash_attn_func(q, k, v, causal=True, softcap=softcap, backend="reference"),
                 lambda: fastattn.flash_attn_varlen_func(q[0], k[0], v[0], *[torch.tensor([0, n], dtype=torch.int32,
                                                                                          device=DEVICE)
                                                                              for n in (7, 9)], 7, 9, causal=True,
                                                         softcap=softcap, backend="reference")[None]):
        torch.testing.assert_close(call(), want, atol=1e-6, rtol=1e-6)
    with pytest.raises(TypeError, match="softcap"):
        fastattn.flash_attn_func(q, k, v, softcap="1")
    with pytest.raises(ValueError, match="softcap must be a number"):
        fastattn.flash_attn_func(q, k, v, softcap=float("nan"))
    with pytest.raises(ValueError, match="softcap"):  # fastattn's own API keeps its stricter rule
        fastattn.attention(q, k, v, softcap=-1.0)


@pytest.mark.parametrize("call,match", [
    (lambda q: fastattn.flash_attn_func(q, q, q, dropout_p=0.1), "dropout_p=0.1"),
    (lambda q: fastattn.flash_attn_func(q, q, q, window_size=4), "window_size must be"),
    (lambda q: fastattn.flash_attn_varlen_func(q[0], q[0], q[0], *[torch.tensor([0, 3], dtype=torch.int32)] * 2, 3,
                                               3, block_table=torch.zeros(1, 1, dtype=torch.int32)), "block_table"),
    (lambda q: fastattn.flash_attn_with_kvcache(q, q, q, rotary_cos=q), "rotary_cos"),
    (lambda q: fastattn.flash_attn_with_kvcache(q, q, q, cache_batch_idx=q), "cache_batch_idx"),
    (lambda q: fastattn.flash_attn_with_kvcache(q, q, q, q, q), "cache_seqlens is needed"),
    (lambda q: fastattn.flash_attn_with_kvcache(q[0, 0, 0, 0], q, q, cache_seqlens=2), r"q must have 4 dims"),
    (lambda q: fastattn.flash_attn_with_kvcache(q, q[0, 0], q[0, 0], cache_seqlens=2), r"k_cache must have 4 dims"),
    (lambda q: fastattn.flash_attn_with_kvcache(q, q, q, cache_seqlens=2, block_table=[[0]]), r"block_table must be"),
    (lambda q: fastattn.flash_attn_with_kvcache(q, q, q, cache_seqlens=2**40), r"cache_seqlens must be in \[0, "),
    (lambda q: fastattn.flash_attn_qkvpacked_func(q), r"qkv must have shape \(B, S, 3, H, D\)"),
    (lambda q: fastattn.flash_attn_kvpacked_func(q, torch.stack([q] * 3, 2)), r"kv must have shape \(B, S, 2, Hkv"),
    (lambda q: fastattn.flash_attn_varlen_qkvpacked_func(torch.stack([q] * 3, 2), torch.tensor([0, 3]), 3),
     r"qkv must have shape \(T, 3, H, D\)"),
])
def test_what_differs_is_a_clear_error(call, match, gen):
    q = torch.randn(1, 3, 2, 16, generator=gen)
    with pytest.raises(ValueError, match=match):
        call(q)


@pytest.mark.parametrize("call,error,match", [
    (lambda q: fastattn.flash_attn_func(q, q, q, return_attn_probs=1), TypeError, "return_attn_probs must be a bool"),
    (lambda q: fastattn.flash_attn_varlen_func(q[0], q[0], q[0], *[torch.tensor([0, 3], dtype=torch.int32)] * 2, 3, 3,
                                               return_attn_probs=1), TypeError, "return_attn_probs must be a bool"),
    (lambda q: fastattn.flash_attn_with_kvcache(q, q, q, cache_seqlens=2, return_softmax_lse=1), TypeError,
     "return_softmax_lse must be a bool"),
    (lambda q: fastattn.flash_attn_func(q, q, q, softmax_scale="0.1"), TypeError, "softmax_scale must be a float"),
    (lambda q: fastattn.flash_attn_func(q, q, q, softmax_scale=float("nan")), ValueError,
     "softmax_scale must be finite"),
    (lambda q: fastattn.flash_attn_with_kvcache(q, q, q, cache_seqlens=2, softmax_scale=float("inf")), ValueError,
     "softmax_scale must be finite"),
    (lambda q: fastattn.flash_attn_qkvpacked_func(torch.stack([q] * 3, 2).int()), TypeError, "qkv must be a floating"),
    (lambda q: fastattn.flash_attn_kvpacked_func(q, torch.stack([q] * 2, 2).half()), TypeError,
     "kv has dtype torch.float16 but q has torch.float32"),
    (lambda q: fastattn.flash_attn_varlen_kvpacked_func(q[0], torch.stack([q[0]] * 2, 1).long(),
                                                        *[torch.tensor([0, 3], dtype=torch.int32)] * 2, 3, 3),
     TypeError, "kv must be a floating"),
])
def test_errors_use_flash_attentions_names(call, error, match, gen):
    """A bad argument is named as the caller wrote it (return_attn_probs, softmax_scale, qkv), not as
    fastattn.attention calls it (return_lse, scale, q)."""
    q = torch.randn(1, 3, 2, 16, generator=gen)
    with pytest.raises(error, match=match) as e:
        call(q)
    assert not re.search(r"return_lse|\bscale must|^[kv] ", str(e.value))  # (q is the caller's name too)


def test_a_tensor_scale_is_read_once(gen, monkeypatch):
    """A 0-d tensor softmax_scale (torch's SDPA takes one; a CUDA one costs a sync to read) was read
    twice: once for its FlashAttention name, once by fastattn.attention."""
    q, k, v = testing.random_qkv(1, 5, 5, 2, 2, 16, device=DEVICE, generator=gen)
    scale = torch.tensor(0.3, device=DEVICE)
    reads, item = [], torch.Tensor.item

    def counted(self):
        if self is scale:
            reads.append(1)
        return item(self)
    monkeypatch.setattr(torch.Tensor, "item", counted)
    out = fastattn.flash_attn_func(q, k, v, softmax_scale=scale, backend="reference")
    assert len(reads) == 1
    torch.testing.assert_close(out, reference.attention(q, k, v, scale=0.3), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
def test_out_is_laid_out_as_flash_attention_allocates_it(backend, gen):
    """FlashAttention's out is empty_like(q): contiguous for a contiguous (or a packed) q, q's strides for
    a dense permuted one. The torch and reference backends return a transpose of (B, H, S, D), which
    broke out.view(B, S, -1) in code written for FlashAttention."""
    q, k, v = testing.random_qkv(2, 5, 7, 4, 2, 16, device=DEVICE, generator=gen)
    out = fastattn.flash_attn_func(q, k, v, causal=True, backend=backend)
    assert out.is_contiguous()
    out.view(2, 5, -1)
    assert fastattn.flash_attn_func(q, k, v, return_attn_probs=True, backend=backend)[0].is_contiguous()
    qkv = torch.randn(2, 5, 3, 4, 16, generator=gen).to(DEVICE)
    assert fastattn.flash_attn_qkvpacked_func(qkv, backend=backend).is_contiguous()
    permuted = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, S, D) memory
    out = fastattn.flash_attn_func(permuted, k, v, backend=backend)
    assert out.stride() == permuted.stride() or out.is_contiguous()
    cache = torch.randn(2, 8, 2, 16, generator=gen).to(DEVICE)
    assert fastattn.flash_attn_with_kvcache(q, cache, cache.clone(), cache_seqlens=6, backend=backend).is_contiguous()


@pytest.mark.parametrize("window_size", [(-1, 3), (-1, 5), (3, 3), (9, 0)])
def test_a_window_side_of_sk_or_more_is_unbounded_as_in_flash_attention(window_size, gen):
    """FlashAttention sets a side >= Sk to -1 before it applies the window. With Sq > Sk that differs
    from the window's geometry on the right: (-1, 3) at Sq=10, Sk=3 hid every key from rows 0-3."""
    q, k, v = testing.random_qkv(1, 10, 3, 2, 1, 16, device=DEVICE, generator=gen)
    window = tuple(-1 if w >= 3 else w for w in window_size)
    want = reference.attention(q, k, v, window=None if window == (-1, -1) else window)
    got = fastattn.flash_attn_func(q, k, v, window_size=window_size, backend="reference")
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    cu_q, cu_k = (torch.tensor([0, n], dtype=torch.int32, device=DEVICE) for n in (10, 3))
    got = fastattn.flash_attn_varlen_func(q[0], k[0], v[0], cu_q, cu_k, 10, 3, window_size=window_size,
                                          backend="reference")
    torch.testing.assert_close(got[None], want, atol=1e-6, rtol=1e-6)


def test_a_window_wider_than_any_sequence_is_no_window(gen):
    """FlashAttention reads a window side >= Sk as unbounded; a side past 2**63 overflowed int64 here."""
    q, k, v = testing.random_qkv(1, 6, 9, 2, 1, 16, device=DEVICE, generator=gen)
    want = reference.attention(q, k, v, window=(-1, 0))
    for left in (2**31, 2**64):
        torch.testing.assert_close(fastattn.flash_attn_func(q, k, v, window_size=(left, 0), backend="reference"), want,
                                   atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(fastattn.attention(q, k, v, window=(left, 0), backend="reference"), want,
                                   atol=1e-6, rtol=1e-6)


def test_kvcache_lengths_as_a_bool_are_refused(gen):
    """cache_seqlens=True is not the length 1 (an int, a (B,) int32 tensor or None), as num_splits=True
    is not a split count."""
    q = torch.randn(1, 1, 2, 16, generator=gen)
    cache = torch.randn(1, 6, 2, 16, generator=gen)
    with pytest.raises(TypeError, match="cache_seqlens must be an int, a \\(B,\\) int32 tensor or None, got bool"):
        fastattn.flash_attn_with_kvcache(q, cache, cache, cache_seqlens=True)


@pytest.mark.parametrize("name", ["s_aux", "learnable_sink"])
def test_sinks_under_flash_attentions_names(name, gen):
    """Attention sinks as vLLM's FlashAttention 3 (s_aux) and FlashAttention 4 (learnable_sink) name
    them, in the three functions: fastattn's sinks."""
    q, k, v = testing.random_qkv(2, 7, 9, 4, 2, 16, device=DEVICE, generator=gen)
    sinks = torch.randn(4, generator=gen).to(DEVICE)
    want = reference.attention(q, k, v, causal=True, sinks=sinks)
    got = fastattn.flash_attn_func(q, k, v, causal=True, backend="triton", **{name: sinks})
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    cu = torch.tensor([0, 7, 14], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 9, 18], dtype=torch.int32, device=DEVICE)
    packed = fastattn.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu_k, 7, 9,
                                             causal=True, backend="triton", **{name: sinks})
    torch.testing.assert_close(packed, want.flatten(0, 1), atol=1e-5, rtol=1e-5)
    lens = torch.full((2,), 9, dtype=torch.int32, device=DEVICE)
    cached = fastattn.flash_attn_with_kvcache(q, k.contiguous(), v.contiguous(), cache_seqlens=lens, causal=True,
                                              backend="triton", **{name: sinks})
    torch.testing.assert_close(cached, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="s_aux or as learnable_sink, not both"):
        fastattn.flash_attn_func(q, k, v, s_aux=sinks, learnable_sink=sinks)
