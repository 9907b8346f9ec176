"""Bad and awkward inputs, as a new user meets them (issue 26): each case is a clear error naming the
argument, or a defined answer (checked against the float64 reference). One table per kind of case:
garbage where no path may read it, NaN that must show, refusals, the models' arguments."""

import pytest
import torch
from conftest import DEVICE, HAS_CUDA

import fastattn
from fastattn import reference, testing
from fastattn.models import Decoder, EncoderDecoder, ModelConfig

# Every backend that runs here: the Triton kernels (interpreter on CPU), PyTorch SDPA, the reference, auto.
BACKENDS = ["triton", "torch", "reference", "auto"]


def close(got, want, what):
    assert not got.isnan().any(), f"{what}: NaN in the output"
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4, msg=what)


# ---------------------------------------------------------------- garbage nobody may read


@pytest.mark.parametrize("backend", BACKENDS + ["cuda"])
@pytest.mark.parametrize("garbage", [float("nan"), float("inf")])
def test_garbage_in_padded_keys_never_reaches_the_output(backend, garbage, gen):
    """A key that key_padding_mask marks as padding is masked for every query of its sequence:
    its garbage never reaches an output or a gradient (FlashAttention's padded keys come from
    torch.empty too). The CUDA C++ kernels (fp16/bf16, head dims from 32) zero-fill those rows at
    the load (csrc/attn_common.cuh)."""
    status = fastattn.available_backends().get(backend)
    if status is not None and not status.available:
        pytest.skip(f"{backend}: {status.reason}")
    dtype, d = (torch.float16, 32) if backend == "cuda" else (torch.float32, 16)
    b, sq, sk, h = 2, 37, 70, 2
    q, k, v = testing.random_qkv(b, sq, sk, h, h, d, dtype=dtype, device=DEVICE, generator=gen)
    mask = torch.ones(b, sk, dtype=torch.bool, device=DEVICE)
    mask[0, 3] = mask[0, 40:45] = False  # holes inside the real range (masked tiles, not skipped ones)
    mask[1, 50:] = False  # a padded tail
    padded = ~mask[:, :, None, None]

    def fn(a, b_, c):  # garbage in the padded rows of what the kernels get; the reference gets none
        b_, c = (x.masked_fill(padded, garbage) for x in (b_, c))
        return fastattn.attention(a, b_, c, key_padding_mask=mask, backend=backend), None

    results = testing.check_against_reference(fn, q, k, v, key_padding_mask=mask, lse=False, generator=gen)
    assert all(r.ok for r in results), f"{backend}: " + "; ".join(str(r) for r in results if not r.ok)
    # The kernels' own gradients for the padded rows: zero, whatever those rows hold.
    qg, kg, vg = (x.masked_fill(padded, garbage) if x is not q else x for x in (q, k, v))
    qg, kg, vg = (x.clone().requires_grad_() for x in (qg, kg, vg))
    out = fastattn.attention(qg, kg, vg, key_padding_mask=mask, backend=backend)
    out.backward(torch.ones_like(out))
    for name, g in (("dq", qg.grad), ("dk", kg.grad[mask]), ("dv", vg.grad[mask])):
        assert not g.isnan().any(), f"{backend}: NaN in {name}"
    assert (kg.grad[~mask] == 0).all() and (vg.grad[~mask] == 0).all(), "padded keys get zero gradients"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("paged", [False, True])
def test_garbage_in_unused_cache_rows_is_never_read(backend, paged, gen):
    """A KV cache from torch.empty holds any bits past each sequence's length (+ the new tokens);
    FlashAttention never reads those rows, nor may fastattn (issue 26's repro: NaN past the lengths)."""
    lens, cap, hq, hkv, d, n_new = [5, 20], 32, 4, 2, 16, 1
    k_cache, v_cache, table, seqlens = testing.random_kv_cache(lens, cap, hkv, d, page_size=8 if paged else 0,
                                                                device=DEVICE, generator=gen)
    q = torch.randn(2, n_new, hq, d, generator=gen).to(DEVICE)
    k_new, v_new = (torch.randn(2, n_new, hkv, d, generator=gen).to(DEVICE) for _ in range(2))
    want = []
    for i, n in enumerate(lens):
        keys = torch.cat([testing.cached_rows(k_cache, table, i, n), k_new[i]])[None].double()
        values = torch.cat([testing.cached_rows(v_cache, table, i, n), v_new[i]])[None].double()
        want.append(reference.attention(q[i:i + 1].double(), keys, values, causal=True))
    for i, n in enumerate(lens):  # garbage from row n + n_new on
        testing.fill_cache_rows(k_cache, table, i, n + n_new, float("nan"))
        testing.fill_cache_rows(v_cache, table, i, n + n_new, float("nan"))
    out = fastattn.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens,
                                          block_table=table, causal=True, backend=backend)
    close(out, torch.cat(want), f"{backend} paged={paged}")


# ---------------------------------------------------------------- NaN that must show


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
def test_a_nan_query_gives_a_nan_row(backend, masked, gen):
    """PyTorch's CPU SDPA returns 0 for a query row holding a NaN; every fastattn path returns NaN
    for that row (and only that row), as the reference does."""
    q, k, v = testing.random_qkv(1, 6, 6, 2, 2, 16, device=DEVICE, generator=gen)
    q[0, 2, 1, 5] = float("nan")
    mask = torch.tensor([[True] * 5 + [False]], device=DEVICE) if masked else None
    out = fastattn.attention(q, k, v, key_padding_mask=mask, backend=backend)
    nan_rows = out.isnan().any(-1)  # (B, S, H)
    want = torch.zeros_like(nan_rows)
    want[0, 2, 1] = True
    assert torch.equal(nan_rows, want), f"{backend}: NaN rows {nan_rows.nonzero().tolist()}"


# ---------------------------------------------------------------- refusals naming the argument


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's limitation: CPU tensors only")
def test_bf16_in_the_interpreter_is_refused_not_wrong(gen):
    """The interpreter's tl.dot multiplies bf16 bit patterns (|out| up to 8e8): refused by name;
    "auto" runs such a call elsewhere, correctly."""
    q, k, v = (x.bfloat16() for x in testing.random_qkv(1, 8, 8, 2, 2, 16, generator=gen))
    with pytest.raises(ValueError, match="bfloat16 in the Triton interpreter"):
        fastattn.attention(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="bfloat16 in the Triton interpreter"):
        fastattn.attention_with_kvcache(q[:, :1], k, v, cache_seqlens=torch.tensor([8], dtype=torch.int32),
                                        backend="triton")
    out = fastattn.attention(q, k, v, backend="auto")
    want = reference.attention(*(x.double() for x in (q, k, v)))
    torch.testing.assert_close(out.double(), want, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["k_cache", "v_cache"])
def test_a_cache_that_requires_grad_is_refused_by_name(backend, name, gen):
    k_cache, v_cache, table, seqlens = testing.random_kv_cache([3, 4], 8, 1, 16, device=DEVICE, generator=gen)
    caches = {"k_cache": k_cache, "v_cache": v_cache}
    caches[name] = caches[name].requires_grad_()
    before = [c.detach().clone() for c in caches.values()]
    q = torch.randn(2, 1, 2, 16, generator=gen).to(DEVICE)
    kn = torch.randn(2, 1, 1, 16, generator=gen).to(DEVICE)
    with pytest.raises(ValueError, match=f"{name} requires grad"):
        fastattn.attention_with_kvcache(q, caches["k_cache"], caches["v_cache"], kn, kn, cache_seqlens=seqlens,
                                        backend=backend)
    with pytest.raises(ValueError, match=f"{name} requires grad"):
        fastattn.append_to_kvcache(caches["k_cache"], caches["v_cache"], kn, kn, cache_seqlens=seqlens,
                                   backend="auto" if backend == "auto" else "torch" if backend != "triton"
                                   else "triton")
    assert all(torch.equal(c.detach(), b) for c, b in zip(caches.values(), before)), "a refused call wrote the cache"
    with torch.no_grad():  # inference: fine
        fastattn.attention_with_kvcache(q, caches["k_cache"], caches["v_cache"], kn, kn, cache_seqlens=seqlens,
                                        backend=backend)


def test_sdpa_dropin_names_attn_mask(gen):
    q = torch.randn(1, 2, 5, 16, generator=gen).to(DEVICE)
    with pytest.raises(ValueError, match="attn_mask must be broadcastable"):
        fastattn.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(1, 2, 5, 4, device=DEVICE))
    for mask in (torch.zeros(5, 5, device="meta"), torch.ones(5, 5, dtype=torch.bool, device="meta")):
        with pytest.raises(ValueError, match="attn_mask is on meta"):
            fastattn.scaled_dot_product_attention(q, q, q, attn_mask=mask)


# ---------------------------------------------------------------- softmax statistics in float32


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_lse_is_float32_accurate_on_every_path(backend, gen):
    """flash_attn_*(return_attn_probs=True) on CPU fp16 tensors takes the reference backend under
    "auto": its softmax statistics are float32 as the kernels' are (they were fp16: 3e-3 off)."""
    q, k, v = (x.half() for x in testing.random_qkv(2, 33, 40, 2, 1, 32, device=DEVICE, generator=gen))
    q = q * 4  # peaky rows: where an fp16 lse loses most
    out, lse, _ = fastattn.flash_attn_func(q, k, v, causal=True, return_attn_probs=True, backend=backend)
    _, want = reference.attention(*(x.double() for x in (q, k, v)), causal=True, return_lse=True)
    assert lse.dtype == torch.float32
    assert (lse.double() - want).abs().max() < 1e-4 * want.abs().max()


# ---------------------------------------------------------------- models' arguments


MODEL_CASES = [
    (lambda m: m(torch.tensor([1, 2, 3])), "tokens must be a \\(B, S\\) integer tensor"),
    (lambda m: m(torch.tensor([[1.0, 2.0]])), "tokens must be a \\(B, S\\) integer tensor"),
    (lambda m: m(torch.tensor([[1, 40]])), r"tokens must be token ids in \[0, vocab_size=32\)"),
    (lambda m: m(torch.tensor([[-1, 2]])), r"tokens must be token ids in \[0, vocab_size=32\)"),
    (lambda m: m.generate(torch.tensor([[1, 2]]), max_new_tokens=-1), "max_new_tokens must be an int >= 0"),
    (lambda m: m.generate(torch.tensor([[1, 2]]), max_new_tokens=1.5), "max_new_tokens must be an int >= 0"),
    (lambda m: m.generate(torch.tensor([1, 2]), max_new_tokens=2), "tokens must be a \\(B, S\\) integer tensor"),
]


@pytest.mark.parametrize("call,match", MODEL_CASES, ids=[m for _, m in MODEL_CASES])
def test_model_arguments_are_checked_by_name(call, match):
    model = Decoder(ModelConfig.preset("tiny", max_len=64)).eval()
    with pytest.raises(ValueError, match=match):
        call(model)


def test_zero_new_tokens_is_an_empty_continuation():
    cfg = ModelConfig.preset("tiny", max_len=64)
    assert Decoder(cfg).eval().generate(torch.tensor([[1, 2, 3]]), max_new_tokens=0).shape == (1, 0)
    out = EncoderDecoder(cfg).eval().generate(torch.tensor([[1, 2], [3, 4]]), max_new_tokens=0, bos_id=1)
    assert out.shape == (2, 0) and out.dtype == torch.long
    with pytest.raises(ValueError, match="src must be token ids"):
        EncoderDecoder(cfg).eval().generate(torch.tensor([[1, 99]]), max_new_tokens=2, bos_id=1)


# ---------------------------------------------------------------- the rest of the surface, one table


def _sweep_inputs():
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)

    t = dict(q=r(2, 5, 4, 16), k=r(2, 7, 2, 16), v=r(2, 7, 2, 16), kc=r(2, 10, 2, 16), vc=r(2, 10, 2, 16),
             pages=r(6, 4, 2, 16), lens=torch.tensor([3, 4], dtype=torch.int32, device=DEVICE),
             cu=torch.tensor([0, 3, 5], dtype=torch.int32, device=DEVICE))
    t["q1"], t["k1"] = t["q"][:, :1], t["k"][:, :1]
    return t


def i32(*xs):
    return torch.tensor(xs, dtype=torch.int32, device=DEVICE)


# (id, call(t), expected): an exception type and a regex naming the argument, or "ok" (a defined answer,
# checked against the reference where there is one).
SWEEP = [
    ("q 3-D", lambda t: fastattn.attention(t["q"][0], t["k"], t["v"]), (ValueError, "q must have 4 dims")),
    ("integer q", lambda t: fastattn.attention(t["q"].int(), t["k"].int(), t["v"].int()),
     (TypeError, "q must be a floating tensor")),
    ("float64 on triton", lambda t: fastattn.attention(*(t[n].double() for n in "qkv"), backend="triton"),
     (ValueError, "dtype torch.float64 is not supported")),
    ("mixed dtypes", lambda t: fastattn.attention(t["q"].half(), t["k"], t["v"]), (TypeError, "k has dtype")),
    ("head dim 300", lambda t: fastattn.attention(*(torch.zeros(1, 3, 1, 300, device=DEVICE),) * 3),
     (ValueError, "head dim .* between 1 and 256")),
    ("Hq not a multiple of Hkv", lambda t: fastattn.attention(t["q"][:, :, :3], t["k"], t["v"]),
     (ValueError, "multiple of the number of key/value heads")),
    ("k, v shapes differ", lambda t: fastattn.attention(t["q"], t["k"], t["v"][:, :6]),
     (ValueError, "k and v must have the same shape")),
    ("batch sizes differ", lambda t: fastattn.attention(t["q"], t["k"][:1], t["v"][:1]), (ValueError, "batch size")),
    ("k on another device", lambda t: fastattn.attention(t["q"], t["k"].to("meta"), t["v"]),
     (ValueError, "k is on meta")),
    ("key_padding_mask on another device", lambda t: fastattn.attention(
        t["q"], t["k"], t["v"], key_padding_mask=torch.ones(2, 7, dtype=torch.bool, device="meta")),
     (ValueError, "key_padding_mask is on meta")),
    ("bias on another device", lambda t: fastattn.attention(t["q"], t["k"], t["v"], bias=torch.zeros(7, device="meta")),
     (ValueError, "bias is on meta")),
    ("cu_seqlens on another device", lambda t: fastattn.attention_varlen(t["q"][0], t["k"][0], t["v"][0],
                                                                        t["cu"].to("meta"), t["cu"], 3, 3),
     (ValueError, "cu_seqlens_q is on meta")),
    ("k_cache on another device", lambda t: fastattn.attention_with_kvcache(t["q1"], t["kc"].to("meta"), t["vc"],
                                                                           cache_seqlens=t["lens"]),
     (ValueError, "k_cache is on meta")),
    ("cache_seqlens on another device", lambda t: fastattn.attention_with_kvcache(t["q1"], t["kc"], t["vc"],
                                                                                 cache_seqlens=t["lens"].to("meta")),
     (ValueError, "cache_seqlens is on meta")),
    ("empty batch", lambda t: fastattn.attention(t["q"][:0], t["k"][:0], t["v"][:0], backend="triton"), "ok"),
    ("Sq = 0", lambda t: fastattn.attention(t["q"][:, :0], t["k"], t["v"], backend="triton"), "ok"),
    ("Sk = 0", lambda t: fastattn.attention(t["q"], t["k"][:, :0], t["v"][:, :0], backend="triton"), "ok"),
    ("strided last dim", lambda t: fastattn.attention(torch.cat([t["q"]] * 2, -1)[..., ::2], t["k"], t["v"],
                                                      backend="triton"), "ok"),
    ("fp16 values near 65504", lambda t: fastattn.attention(t["q"].half() * 8, t["k"].half(),
                                                           (t["v"].sign() * 60000).half(), backend="triton"), "ok"),
    ("key_padding_mask shape", lambda t: fastattn.attention(t["q"], t["k"], t["v"], key_padding_mask=torch.ones(
        2, 6, dtype=torch.bool, device=DEVICE)), (ValueError, "key_padding_mask must have shape")),
    ("key_padding_mask float", lambda t: fastattn.attention(t["q"], t["k"], t["v"], key_padding_mask=torch.ones(
        2, 7, device=DEVICE)), (TypeError, "key_padding_mask must be a bool tensor")),
    ("window below -1", lambda t: fastattn.attention(t["q"], t["k"], t["v"], window=(-2, 0)),
     (ValueError, "window must be")),
    ("alibi_slopes shape", lambda t: fastattn.attention(t["q"], t["k"], t["v"], alibi_slopes=torch.ones(
        3, device=DEVICE)), (ValueError, "alibi_slopes must have shape")),
    ("bias shape", lambda t: fastattn.attention(t["q"], t["k"], t["v"], bias=torch.ones(2, 4, 5, 6, device=DEVICE)),
     (ValueError, "bias must be broadcastable")),
    ("sinks shape", lambda t: fastattn.attention(t["q"], t["k"], t["v"], sinks=torch.ones(2, device=DEVICE)),
     (ValueError, "sinks must have shape")),
    ("scale NaN", lambda t: fastattn.attention(t["q"], t["k"], t["v"], scale=float("nan")),
     (ValueError, "scale must be finite")),
    ("scale past float32 once times log2(e)", lambda t: fastattn.attention(t["q"], t["k"], t["v"], scale=-3e38),
     (ValueError, "scale must be finite in float32")),
    ("unknown backend", lambda t: fastattn.attention(t["q"], t["k"], t["v"], backend="flash"),
     (ValueError, "backend must be one of")),
    ("cu_seqlens int64", lambda t: fastattn.attention_varlen(t["q"][0], t["k"][0], t["v"][0], t["cu"].long(),
                                                             t["cu"].long(), 3, 3),
     (TypeError, "cu_seqlens_q must be int32")),
    ("cu_seqlens past the tokens", lambda t: fastattn.attention_varlen(t["q"][0], t["k"][0], t["v"][0], i32(0, 3, 9),
                                                                       t["cu"], 6, 3),
     (ValueError, "cu_seqlens_q must end")),
    ("cu_seqlens lengths differ", lambda t: fastattn.attention_varlen(t["q"][0], t["k"][0], t["v"][0], t["cu"],
                                                                      i32(0, 3), 3, 3), (ValueError, "same length")),
    ("max_seqlen too small", lambda t: fastattn.attention_varlen(t["q"][0], t["k"][0], t["v"][0], t["cu"], t["cu"],
                                                                 1, 3), (ValueError, "max_seqlen_q")),
    ("cache_seqlens negative", lambda t: fastattn.attention_with_kvcache(t["q1"], t["kc"], t["vc"],
                                                                         cache_seqlens=i32(-1, 3)),
     (ValueError, r"cache_seqlens\[0\] = -1")),
    ("cache_seqlens past the capacity", lambda t: fastattn.attention_with_kvcache(
        t["q1"], t["kc"], t["vc"], t["k1"], t["k1"], cache_seqlens=i32(10, 3)),
     (ValueError, r"cache_seqlens\[0\] = 10")),
    ("cache_seqlens int64", lambda t: fastattn.attention_with_kvcache(t["q1"], t["kc"], t["vc"],
                                                                      cache_seqlens=t["lens"].long()),
     (TypeError, "cache_seqlens must be int32")),
    ("cache_seqlens a list", lambda t: fastattn.attention_with_kvcache(t["q1"], t["kc"], t["vc"], cache_seqlens=[3, 4]),
     (TypeError, "cache_seqlens must be a torch.Tensor")),
    ("a used page id -1", lambda t: fastattn.attention_with_kvcache(
        t["q1"], t["pages"], t["pages"].clone(), cache_seqlens=t["lens"], block_table=i32(-1, 0, 2, 3).view(2, 2)),
     (ValueError, r"block_table\[0\] points at page -1")),
    ("a used page id past the pages", lambda t: fastattn.attention_with_kvcache(
        t["q1"], t["pages"], t["pages"].clone(), cache_seqlens=t["lens"], block_table=i32(0, 1, 9, 3).view(2, 2)),
     (ValueError, r"block_table\[1\] points at page 9")),
    ("an unused page id -1", lambda t: fastattn.attention_with_kvcache(
        t["q1"], t["pages"], t["pages"].clone(), cache_seqlens=t["lens"], block_table=i32(0, -1, 2, -1).view(2, 2)),
     "ok"),
    ("k_cache dtype", lambda t: fastattn.attention_with_kvcache(t["q1"], t["kc"].half(), t["vc"],
                                                                cache_seqlens=t["lens"]),
     (TypeError, "k_cache has dtype")),
    ("new k's heads", lambda t: fastattn.attention_with_kvcache(t["q1"], t["kc"], t["vc"], t["k1"][:, :, :1],
                                                                t["k1"][:, :, :1], cache_seqlens=t["lens"]),
     (ValueError, "k must have shape")),
    ("k without v", lambda t: fastattn.attention_with_kvcache(t["q1"], t["kc"], t["vc"], t["k1"], None,
                                                              cache_seqlens=t["lens"]),
     (ValueError, "pass both k and v")),
    ("num_splits too large", lambda t: fastattn.attention_with_kvcache(t["q1"], t["kc"], t["vc"],
                                                                       cache_seqlens=t["lens"], num_splits=1000),
     (ValueError, "num_splits must be")),
]


@pytest.mark.parametrize("call,expected", [c[1:] for c in SWEEP], ids=[c[0] for c in SWEEP])
def test_bad_and_awkward_inputs(call, expected):
    t = _sweep_inputs()
    caches = [t[n].clone() for n in ("kc", "vc", "pages")]
    if expected == "ok":
        out = call(t)
        assert not out.isnan().any() and not out.isinf().any()
        return
    error, match = expected
    with pytest.raises(error, match=match):
        call(t)
    assert all(torch.equal(a, t[n]) for a, n in zip(caches, ("kc", "vc", "pages"))), "a call that raised wrote a cache"


def test_packed_calls_name_the_shapes_passed_and_take_numpy_lengths(gen):
    """A k/v mismatch in packed inputs shows the (T, H, D) shapes the caller passed; max_seqlen may be
    a NumPy int, as torch's int arguments take it."""
    import numpy as np

    q, k = (torch.randn(5, 2, 8, generator=gen).to(DEVICE) for _ in range(2))
    cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"got k \(5, 2, 8\) and v \(4, 2, 8\)"):
        fastattn.attention_varlen(q, k, k[:4], cu, cu, 3, 3)
    out = fastattn.attention_varlen(q, k, k, cu, cu, np.int64(3), np.int32(3), causal=True)
    torch.testing.assert_close(out, fastattn.attention_varlen(q, k, k, cu, cu, 3, 3, causal=True), rtol=0, atol=0)
    with pytest.raises(TypeError, match="max_seqlen_q must be a non-negative int"):
        fastattn.attention_varlen(q, k, k, cu, cu, 3.0, 3)
