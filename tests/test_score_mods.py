"""Score modifiers (bias, ALiBi, sliding window, softcap, sinks) in the Triton kernels against the
float64 reference with the tolerance rule: outputs, lse and every gradient (dbias and dsinks
included), alone and combined, with causal, key padding, GQA and packed sequences; the torch
backend's share; the errors for what is refused. On CPU through the Triton interpreter."""

import contextlib

import numpy as np
import pytest
import torch
from conftest import DEVICE, HAS_CUDA, KERNEL_DTYPES

import fastattn
from fastattn import reference, semantics, testing
from fastattn.kernels.configs import BlockConfig
from fastattn.launchers import plans
from fastattn.launchers import triton_attention as launch


def assert_ok(results, what):
    bad = [str(r) for r in results if not r.ok]
    assert not bad, f"{what}: " + "; ".join(bad)


def make_mods(names, b, hq, sq, sk, gen, bias_shape=None, dtype=torch.float32):
    """Random modifiers: bias (learnable) of bias_shape (default (1, Hq, Sq, Sk)), slopes, a window,
    a softcap and sinks (learnable), for the given names."""
    mods = {}
    if "bias" in names:
        shape = bias_shape or (1, hq, sq, sk)
        mods["bias"] = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    if "alibi" in names:
        mods["alibi_slopes"] = (torch.rand(hq, generator=gen) * 0.5).to(DEVICE)
    if "window" in names:
        mods["window"] = (int(torch.randint(0, max(sk, 1), (1,), generator=gen)),
                          int(torch.randint(-1, max(sk // 2, 1), (1,), generator=gen)))
    if "softcap" in names:
        mods["softcap"] = 1.5  # small enough to bend the logits of N(0, 1) inputs
    if "sinks" in names:
        mods["sinks"] = torch.randn(hq, generator=gen).to(DEVICE)
    return mods


def check(q, k, v, causal, mods, gen, key_padding_mask=None, lse_grad=True):
    fn = lambda a, b, c, **m: fastattn.attention(a, b, c, causal=causal, key_padding_mask=key_padding_mask,
                                                 return_lse=True, backend="triton", **m)
    results = testing.check_against_reference(fn, q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                                              lse_grad=lse_grad, generator=gen, mods=mods)
    names = [r.name for r in results]
    for name in ("bias", "sinks"):
        assert (name not in mods) or ("d" + name in names)
    described = {n: getattr(m, "shape", m) for n, m in mods.items()}
    assert_ok(results, f"q{tuple(q.shape)} k{tuple(k.shape)} causal={causal} mods={described}")


# (B, Sq, Sk, Hq, Hkv, D): Sq != Sk both ways, GQA, a head dim that is not a power of two.
SHAPES = [(2, 37, 53, 4, 2, 16), (1, 70, 29, 2, 1, 40), (2, 64, 64, 2, 2, 32)]
SINGLE = ["bias", "alibi", "window", "softcap", "sinks"]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mod", SINGLE)
def test_each_modifier_matches_reference(mod, shape, causal, gen):
    b, sq, sk, hq, hkv, d = shape
    q, k, v = testing.random_qkv(b, sq, sk, hq, hkv, d, device=DEVICE, generator=gen)
    check(q, k, v, causal, make_mods([mod], b, hq, sq, sk, gen), gen)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_all_modifiers_with_padding_and_gqa(causal, dtype, gen):
    b, sq, sk, hq, hkv, d = 3, 45, 61, 4, 2, 32
    q, k, v = testing.random_qkv(b, sq, sk, hq, hkv, d, dtype=dtype, device=DEVICE, generator=gen)
    mask = torch.rand(b, sk, generator=gen).to(DEVICE) > 0.3
    mask[1] = False  # a batch element without keys: zeros (the sinks take everything)
    mods = make_mods(SINGLE, b, hq, sq, sk, gen, bias_shape=(b, 1, sq, sk), dtype=dtype)
    mods["window"] = (17, 4)
    check(q, k, v, causal, mods, gen, key_padding_mask=mask)


@pytest.mark.parametrize("shape", [(2, 4, 40, 30), (4, 40, 30), (40, 30), (2, 1, 1, 30), (1, 4, 40, 1), (2, 4, 1, 1)],
                         ids=str)
def test_bias_broadcasts_and_sums_its_gradient(shape, gen):
    """Any of B/H/Sq/Sk broadcast (stride 0, no copy); dbias has the bias's own shape, summed over
    the broadcast dims."""
    q, k, v = testing.random_qkv(2, 40, 30, 4, 2, 16, device=DEVICE, generator=gen)
    check(q, k, v, True, {"bias": torch.randn(shape, generator=gen).to(DEVICE)}, gen)


@pytest.fixture
def bias_grad_kernel(monkeypatch):
    """FASTATTN_BIAS_GRAD=kernel: a bias broadcast over the batch/heads gets its gradient summed in the
    dbias kernel (kernels/bias_grad.py); its plans and tuned configs start afresh."""
    monkeypatch.setenv("FASTATTN_BIAS_GRAD", "kernel")
    launch.clear_plans()
    yield
    launch.clear_plans()


def ran_dbias_kernel() -> bool:
    return any(t["kernel"] == "dbias" for t in plans.tuned_configs())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(4, 40, 30), (2, 1, 40, 30), (40, 30)], ids=str)
def test_bias_gradient_summed_in_the_kernel(shape, causal, gen, bias_grad_kernel):
    """A (1, Hq, ...) table, one (B, 1, ...) mask for every head, one (Sq, Sk) for all: dbias summed
    over the batch and/or heads in the kernel, GQA, Sq != Sk; twice, bit-identical (a fixed order)."""
    q, k, v = testing.random_qkv(2, 40, 30, 4, 2, 16, device=DEVICE, generator=gen)
    bias = torch.randn(shape, generator=gen).to(DEVICE)
    check(q, k, v, causal, {"bias": bias}, gen)
    assert ran_dbias_kernel()
    grads = []
    for _ in range(2):
        b_ = bias.clone().requires_grad_(True)
        fastattn.attention(q, k, v, causal=causal, bias=b_, backend="triton").sum().backward()
        grads.append(b_.grad)
    assert torch.equal(*grads)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_bias_gradient_in_the_kernel_with_every_modifier(dtype, gen, bias_grad_kernel):
    """Key padding (a batch element without keys), window, ALiBi, softcap, sinks, GQA, causal, with
    a (1, Hq) table and a (B, 1) mask, under the interpreter's config and two forced tilings."""
    b, sq, sk, hq, hkv, d = 3, 45, 61, 4, 2, 32
    q, k, v = testing.random_qkv(b, sq, sk, hq, hkv, d, dtype=dtype, device=DEVICE, generator=gen)
    mask = torch.rand(b, sk, generator=gen).to(DEVICE) > 0.3
    mask[1] = False
    for bias_shape, tile in (((1, hq, sq, sk), None), ((b, 1, sq, sk), BlockConfig(16, 16)),
                             ((1, hq, sq, sk), BlockConfig(16, 64))):
        mods = make_mods(SINGLE, b, hq, sq, sk, gen, bias_shape=bias_shape, dtype=dtype)
        mods["window"] = (17, 4)
        with launch.forced_configs(dbias=tile) if tile else contextlib.nullcontext():
            check(q, k, v, True, mods, gen, key_padding_mask=mask)
            assert ran_dbias_kernel()


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_bias_gradient_summed_in_the_kernel(causal, gen, bias_grad_kernel):
    """Packed sequences with a (1, Hq, max_q, max_k) bias: each sequence's positions, an empty
    sequence and one without keys, summed over the sequences in the kernel."""
    lengths_q, lengths_k, hq, hkv, d = [5, 0, 33, 17, 3], [9, 4, 33, 40, 0], 4, 2, 16
    cu_q = torch.tensor([0] + lengths_q).cumsum(0).to(DEVICE, torch.int32)
    cu_k = torch.tensor([0] + lengths_k).cumsum(0).to(DEVICE, torch.int32)
    mq, mk = max(lengths_q), max(lengths_k)
    q = torch.randn(sum(lengths_q), hq, d, generator=gen).to(DEVICE)
    k = torch.randn(sum(lengths_k), hkv, d, generator=gen).to(DEVICE)
    v = torch.randn(sum(lengths_k), hkv, d, generator=gen).to(DEVICE)
    mods = {"bias": torch.randn(1, hq, mq, mk, generator=gen).to(DEVICE), "window": (6, 2)}

    def varlen(backend):
        return lambda a, b_, c, **m: fastattn.attention_varlen(a, b_, c, cu_q, cu_k, mq, mk, causal=causal,
                                                               return_lse=True, backend=backend, **m)

    results = testing.check_against_reference(varlen("triton"), q, k, v, lse_grad=True, generator=gen,
                                              ref_fn=varlen("reference"), mods=mods)
    assert "dbias" in {r.name for r in results} and ran_dbias_kernel()
    assert_ok(results, "varlen")


def test_bias_gradient_in_the_kernel_skips_tiles_outside_the_window(gen, bias_grad_kernel):
    """The dbias kernel visits the key tiles the dQ kernel does: NaN keys in tiles outside every
    window stay out, and their part of dbias is 0."""
    cfg = BlockConfig(16, 16)
    q, k, v = testing.random_qkv(2, 16, 128, 2, 2, 16, device=DEVICE, generator=gen)
    bias = torch.randn(1, 2, 16, 128, generator=gen).to(DEVICE)
    clean_k, clean_v = k.clone(), v.clone()
    k[:, :96], v[:, :96] = float("nan"), float("nan")  # query i sees keys i + 104 .. i + 112
    xs = [x.clone().requires_grad_(True) for x in (q, k, v, bias)]
    with launch.forced_configs(fwd=cfg, dkdv=cfg, dq=cfg, dbias=cfg):
        fastattn.attention(*xs[:3], bias=xs[3], window=(8, 0), backend="triton").sum().backward()
        assert ran_dbias_kernel()
    ref = [x.double().requires_grad_(True) for x in (q, clean_k, clean_v, bias)]
    reference.attention(*ref[:3], bias=ref[3], window=(8, 0)).sum().backward()
    assert (xs[3].grad[..., :96] == 0).all()
    torch.testing.assert_close(xs[3].grad.double(), ref[3].grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["buffer", "kernel"])
def test_an_empty_batch_gives_a_bias_shaped_zero_gradient(mode, monkeypatch):
    """The launcher's dbias has the bias's own shape with a batch of 0 too (a (1, H) bias against B = 0
    was returned as (0, H, Sq, Sk))."""
    monkeypatch.setenv("FASTATTN_BIAS_GRAD", mode)
    q, k, v = (torch.randn(0, 8, 2, 16, device=DEVICE) for _ in range(3))
    bias = torch.randn(1, 2, 8, 8, device=DEVICE)
    out, lse = launch.forward(q, k, v, None, None, True, 0.25, bias=bias)
    dbias = launch.backward(torch.zeros_like(out), q, k, v, out, lse, None, None, None, True, 0.25, bias=bias,
                            bias_grad=True)[3]
    assert dbias.shape == bias.shape and not dbias.any()


def test_bias_grad_switch_names_itself(gen, monkeypatch):
    q, k, v = testing.random_qkv(1, 8, 8, 2, 2, 16, device=DEVICE, generator=gen, requires_grad=True)
    bias = torch.zeros(1, 2, 8, 8, device=DEVICE, requires_grad=True)
    monkeypatch.setenv("FASTATTN_BIAS_GRAD", "fused")
    out = fastattn.attention(q, k, v, bias=bias, backend="triton")
    with pytest.raises(ValueError, match="FASTATTN_BIAS_GRAD must be 'buffer' or 'kernel', got 'fused'"):
        out.sum().backward()


def test_bias_with_strides_and_half_precision(gen):
    """A transposed (non-contiguous) float32 bias with fp16 inputs: read through its strides."""
    q, k, v = testing.random_qkv(2, 33, 33, 2, 2, 16, dtype=torch.float16, device=DEVICE, generator=gen)
    bias = torch.randn(2, 2, 33, 33, generator=gen).to(DEVICE).transpose(2, 3)
    check(q, k, v, False, {"bias": bias}, gen)


@pytest.mark.parametrize("bias_grad", ["buffer", "kernel"])
def test_half_precision_bias_and_sinks_learned_in_a_float32_call(bias_grad, gen, monkeypatch):
    """An fp16 bias (batch-broadcast: the dbias kernel's case too) and fp16 sinks with float32 inputs:
    their gradients come back in fp16, within the tolerance rule (whose floor is then fp16's unit:
    the answer's own rounding)."""
    monkeypatch.setenv("FASTATTN_BIAS_GRAD", bias_grad)
    q, k, v = testing.random_qkv(2, 20, 17, 2, 1, 8, device=DEVICE, generator=gen)
    bias = torch.randn(1, 2, 20, 17, generator=gen).to(DEVICE, torch.float16)
    sinks = torch.randn(2, generator=gen).to(DEVICE, torch.float16)
    check(q, k, v, False, {"bias": bias, "sinks": sinks}, gen)


def test_calls_alike_but_for_the_bias_dtype_each_read_their_own_bias(gen):
    """The same call with a float32, then a float16, then a float32 bias again (and sinks likewise):
    each is right. On a GPU the second is a new launch plan whose compiled kernel must be the one
    typed for its bias (plans key compiled kernels by every argument's dtype; keyed by q's alone, the
    float16 call launched the float32 one's kernel and read its bias's bytes as float32)."""
    q, k, v = testing.random_qkv(2, 33, 40, 2, 2, 16, dtype=torch.float16, device=DEVICE, generator=gen)
    bias = torch.randn(2, 2, 33, 40, generator=gen).to(DEVICE)
    sinks = torch.randn(2, generator=gen).to(DEVICE)
    for dtype in (torch.float32, torch.float16, torch.float32):
        check(q, k, v, True, {"bias": bias.to(dtype), "sinks": sinks.to(dtype)}, gen)


def test_bias_of_minus_infinity_hides_keys(gen):
    """-inf in the bias masks like the key-padding mask, in any tile, with no NaN (a row of only
    -inf returns 0 and zero gradients)."""
    q, k, v = testing.random_qkv(1, 40, 70, 2, 2, 16, device=DEVICE, generator=gen, requires_grad=True)
    bias = torch.randn(1, 2, 40, 70, generator=gen).to(DEVICE)
    bias[..., :35] = float("-inf")  # whole key tiles hidden
    bias[0, 0, 3] = float("-inf")   # one row with no key at all
    bias.requires_grad_(True)
    out = fastattn.attention(q, k, v, bias=bias, backend="triton")
    ref = reference.attention(*(x.detach().double() for x in (q, k, v)), bias=bias.detach().double())
    assert torch.isfinite(out).all() and (out[0, 3, 0] == 0).all()
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    out.square().sum().backward()
    for x in (q, k, v, bias):
        assert torch.isfinite(x.grad).all()
    assert (q.grad[0, 3, 0] == 0).all() and (bias.grad[0, 0, 3] == 0).all() and (bias.grad[..., :35] == 0).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bias_at_the_float32_minimum_hides_keys(backend, gen):
    """torch.finfo(float32).min (transformers' mask value) and anything at or below
    semantics.BIAS_FLOOR hide a key as -inf does, on every backend and in the reference: a row of it
    returns 0 with lse -inf and zero gradients (the kernels' log2 units overflow there, so they
    returned that while the reference returned the mean of V). Just above the floor a bias is finite.
    Prefill forward and backward, and decode."""
    low = torch.finfo(torch.float32).min
    q, k, v = testing.random_qkv(1, 24, 30, 2, 1, 16, device=DEVICE, generator=gen)
    bias = torch.randn(1, 2, 24, 30, generator=gen).to(DEVICE)
    bias[0, 0, 3] = low                      # a whole row of it: no key
    bias[0, 1, 5, :20] = low                 # part of a row: those keys get no weight
    bias[0, 0, 7] = semantics.BIAS_FLOOR     # a whole row at the floor: no key either
    above = bias.clone()
    above[0, 1, 9] = semantics.BIAS_FLOOR * 0.999  # just above it, a whole row: every key, equally
    ref = reference.attention(q.double(), k.double(), v.double(), bias=above.double())
    assert (ref[0, 3, 0] == 0).all() and (ref[0, 7, 0] == 0).all()
    assert torch.allclose(ref[0, 9, 1], v[0, :, 0].double().mean(0))
    # A float64 bias is judged as the float32 value the kernels read: just above the floor rounds onto it.
    onto = torch.full((1, 1, 1, 30), semantics.BIAS_FLOOR * (1 - 1e-9), dtype=torch.float64, device=DEVICE)
    assert (reference.attention(q.double(), k.double(), v.double(), bias=onto) == 0).all()
    # The kernels draw the line at the same float32 value (forward: a whole row just above it loses
    # the backward's precision in float32, as any row below about -1e7, docs/design.md "Score modifiers").
    edge = torch.zeros(1, 2, 24, 30, device=DEVICE)
    floor = torch.tensor(semantics.BIAS_FLOOR, dtype=torch.float32)
    edge[0, 0], edge[0, 1] = floor, floor.nextafter(torch.tensor(0.0))  # at it; one float32 step above
    out = fastattn.attention(q, k, v, bias=edge, backend=backend)
    assert (out[..., 0, :] == 0).all()
    mean_v = v[:, :, 0].mean(1, keepdim=True).expand(-1, 24, -1)  # (B, Sq, D)
    torch.testing.assert_close(out[..., 1, :], mean_v, atol=1e-5, rtol=1e-5)
    # 16-bit inputs, a float32 bias: -1e5 (below float16's range) hides nothing (the torch path built
    # its mask in float16, where it turned to -inf); finfo(float32).min does.
    big = torch.zeros(1, 2, 24, 30, device=DEVICE)
    big[0, 0, 2], big[0, 1, 2] = -1e5, low
    out = fastattn.attention(q.half(), k.half(), v.half(), bias=big, backend=backend)
    assert torch.isfinite(out).all() and (out[0, 2, 1] == 0).all() and (out[0, 2, 0] != 0).any()
    with_lse = backend == "triton"

    def fn(a, b, c, **m):
        res = fastattn.attention(a, b, c, return_lse=with_lse, backend=backend, **m)
        return res if with_lse else (res, None)

    assert_ok(testing.check_against_reference(fn, q, k, v, lse=with_lse, lse_grad=with_lse, generator=gen,
                                              mods={"bias": bias}), f"{backend}, bias at finfo(float32).min")

    q1, k_cache, v_cache = (torch.randn(shape, generator=gen).to(DEVICE) for shape in
                            ((2, 1, 2, 16), (2, 9, 1, 16), (2, 9, 1, 16)))
    lens = torch.tensor([6, 9], dtype=torch.int32, device=DEVICE)
    bias = torch.randn(2, 2, 1, 9, generator=gen).to(DEVICE)
    bias[0, 1], bias[1, 0, 0, :4] = low, low
    call = lambda: (fastattn.attention_with_kvcache(q1, k_cache, v_cache, cache_seqlens=lens, bias=bias,
                                                    backend=backend), None)
    assert_ok(testing.check_kvcache_against_reference(call, q1, k_cache, v_cache, None, None, lens,
                                                      mods={"bias": bias}), f"{backend} decode, finfo(float32).min")


@pytest.mark.parametrize("window", [(0, 0), (5, -1), (-1, 3), (0, 70), (31, 31)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_window_edges(window, causal, gen):
    """Windows narrower than a tile, one-sided, wider than the sequence; causal caps right at 0.
    Sq > Sk leaves rows that see no key."""
    q, k, v = testing.random_qkv(1, 75, 50, 2, 1, 16, device=DEVICE, generator=gen)
    check(q, k, v, causal, {"window": window}, gen)


@pytest.mark.parametrize("fwd,dkdv,dq", [
    (BlockConfig(16, 16), BlockConfig(16, 16), BlockConfig(16, 16)),
    (BlockConfig(16, 64), BlockConfig(64, 16), BlockConfig(16, 64)),
])
def test_window_under_other_tilings(fwd, dkdv, dq, gen):
    q, k, v = testing.random_qkv(1, 90, 110, 2, 2, 16, device=DEVICE, generator=gen)
    with launch.forced_configs(fwd=fwd, dkdv=dkdv, dq=dq):
        for causal, window in ((False, (7, 12)), (True, (20, -1))):
            check(q, k, v, causal, {"window": window, "alibi_slopes": torch.rand(2).to(DEVICE)}, gen)


def test_a_window_tunes_by_the_keys_a_query_sees(gen, monkeypatch):
    """Tuning buckets (plans.build's seq_len) follow a window's width, not the sequence: a narrow
    window must not take the tiles tuned for a wide one (or for no window) at the same length."""
    seen = []
    build = plans.build
    monkeypatch.setattr(plans, "build", lambda name, *a, seq_len, **kw: seen.append((name, seq_len))
                        or build(name, *a, seq_len=seq_len, **kw))
    q, k, v = testing.random_qkv(1, 64, 64, 2, 2, 16, device=DEVICE, generator=gen, requires_grad=True)
    for window, span in (((8, 0), 9), ((3, 5), 9), ((-1, 4), 64), (None, 64)):
        launch.clear_plans()
        seen.clear()
        fastattn.attention(q, k, v, window=window, backend="triton").sum().backward()
        assert {n: s for n, s in seen if n != "bwd_preprocess"} == {"fwd": span, "dkdv": span, "dq": span}, window


def test_window_skips_tiles_outside_it(gen):
    """Key tiles outside every query's window are never read: NaN there must not reach the outputs
    or the gradients (a masked-but-visited tile would give 0 * NaN = NaN)."""
    cfg = BlockConfig(16, 16)
    q, k, v = testing.random_qkv(1, 16, 128, 2, 2, 16, device=DEVICE, generator=gen)
    # Bottom-right aligned: query i sees keys i + 112 - 8 .. i + 112; keys < 96 lie in skipped tiles.
    clean_k, clean_v = k.clone(), v.clone()
    k[:, :96], v[:, :96] = float("nan"), float("nan")
    xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
    with launch.forced_configs(fwd=cfg, dkdv=cfg, dq=cfg):
        out = fastattn.attention(*xs, window=(8, 0), backend="triton")
        out.sum().backward()
    ref = reference.attention(q.double(), clean_k.double(), clean_v.double(), window=(8, 0))
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(xs[0].grad).all()
    assert (xs[1].grad[:, :96] == 0).all() and (xs[2].grad[:, :96] == 0).all()


def test_softcap_bends_large_logits(gen):
    """Logits far beyond the cap (tanh saturates) and gradients through the saturated region."""
    q, k, v = testing.random_qkv(1, 33, 40, 2, 2, 16, device=DEVICE, generator=gen)
    check(q * 4, k * 4, v, True, {"softcap": 5.0}, gen)


@pytest.mark.parametrize("softcap", [1e-30, 0.05, 1e4, 1e8, 1e30], ids=str)
def test_softcaps_from_tiny_to_huge(softcap, gen):
    """Caps across the accepted range, prefill (fwd and bwd) and decode: a huge cap is the identity
    (tanh near 0 must stay accurate relative to its argument: 1 - exp(-2x) cancels there), a tiny one
    flattens every logit to about 0 (its reciprocal must stay finite: no NaN at a zero logit)."""
    q, k, v = testing.random_qkv(2, 21, 35, 4, 2, 32, device=DEVICE, generator=gen)
    check(q, k, v, True, {"softcap": softcap}, gen)
    k_cache, v_cache = (torch.randn(2, 40, 2, 32, generator=gen).to(DEVICE) for _ in range(2))
    seqlens = torch.tensor([0, 33], dtype=torch.int32, device=DEVICE)
    qd, kn, vn = (torch.randn(2, 2, h, 32, generator=gen).to(DEVICE) for h in (4, 2, 2))

    def decode():
        return fastattn.attention_with_kvcache(qd, k_cache, v_cache, kn, vn, cache_seqlens=seqlens, softcap=softcap,
                                               return_lse=True, num_splits=2, backend="triton")

    assert_ok(testing.check_kvcache_against_reference(decode, qd, k_cache, v_cache, kn, vn, seqlens,
                                                      mods={"softcap": softcap}), f"decode softcap={softcap}")


def test_softcap_tanh_switch(gen, monkeypatch):
    """FASTATTN_SOFTCAP_TANH: "exp2" (the default) keeps the tanh from exp2 (SOFTCAP True in the kernels'
    flags); "approx" asks for tanh.approx.f32 (SOFTCAP 2) for 16-bit inputs only (float32 keeps the
    exact tanh, a call without softcap is untouched); the interpreter refuses it by name (it cannot
    run inline PTX), and so does an unknown value."""
    from fastattn.launchers import score_mods

    q16 = torch.zeros(1, 8, 2, 16, dtype=torch.float16, device=DEVICE)

    def softcap_flag(q, mods=None):
        return score_mods.kernel_args(q, 1, 2, 8, 8, mods or score_mods.Mods(softcap=5.0))[3]["SOFTCAP"]

    monkeypatch.delenv("FASTATTN_SOFTCAP_TANH", raising=False)
    assert softcap_flag(q16) is True
    monkeypatch.setenv("FASTATTN_SOFTCAP_TANH", "fast")
    with pytest.raises(ValueError, match="FASTATTN_SOFTCAP_TANH must be 'exp2' or 'approx', got 'fast'"):
        softcap_flag(q16)
    monkeypatch.setenv("FASTATTN_SOFTCAP_TANH", "approx")
    assert softcap_flag(q16, score_mods.Mods(window_left=3)) is False
    q, k, v = testing.random_qkv(1, 8, 8, 2, 2, 16, device=DEVICE, dtype=torch.float16, generator=gen)
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="FASTATTN_SOFTCAP_TANH=approx needs an NVIDIA GPU"):
            fastattn.attention(q, k, v, softcap=5.0, backend="triton")
        fastattn.attention(q, k, v, window=(3, 0), backend="triton")  # no softcap: runs
        monkeypatch.setattr(score_mods.configs, "interpreter_enabled", lambda: False)  # the flags a GPU gets
    assert softcap_flag(q16) == 2 and softcap_flag(q16.to(torch.bfloat16)) == 2
    assert softcap_flag(q16.float()) is True


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_softcap_through_tanh_approx(dtype, gen, monkeypatch):
    """FASTATTN_SOFTCAP_TANH=approx on a GPU: the softcap through tanh.approx.f32 in the forward,
    backward, packed and decode kernels (in the PTX of every plan they built), within the tolerance
    rule of the float64 reference (its error, about 2**-11 of the capped logit, is below 16-bit
    rounding's), logits far past the cap and a window included."""
    from fastattn.launchers import plans

    def softcap_plans():
        return [p for cache in plans._signature_caches for ps in cache.values() for p in ps
                if p is not None and "SOFTCAP" in p.kernel.arg_names]

    def new(since):
        return [p for p in softcap_plans() if all(p is not e for e in since)]

    launch.clear_plans()  # the plans this test builds are then the only ones
    q, k, v = testing.random_qkv(2, 45, 70, 4, 2, 64, device=DEVICE, dtype=dtype, generator=gen)
    monkeypatch.delenv("FASTATTN_SOFTCAP_TANH", raising=False)
    fastattn.attention(q, k, v, causal=True, softcap=1.5, return_lse=True, backend="triton")  # the exp2 plan
    exp2 = softcap_plans()
    assert exp2 and all(p.handle is not None and "tanh.approx" not in p.handle.asm["ptx"] for p in exp2)
    monkeypatch.setenv("FASTATTN_SOFTCAP_TANH", "approx")
    check(q, k, v, True, {"softcap": 1.5}, gen)  # the same forward signature: a plan of its own, not exp2's
    assert any(p.kernel is launch.attn_fwd_kernel for p in new(exp2))
    check(q * 4, k * 4, v, False, {"softcap": 5.0, "window": (20, 5)}, gen)
    cu = torch.tensor([0, 20, 45], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 30, 70], dtype=torch.int32, device=DEVICE)

    def varlen(backend):
        return lambda a, b_, c, **m: fastattn.attention_varlen(a, b_, c, cu, cu_k, 25, 40, causal=True,
                                                               return_lse=True, backend=backend, **m)

    assert_ok(testing.check_against_reference(varlen("triton"), q[0], k[0], v[0], lse_grad=True, generator=gen,
                                              ref_fn=varlen("reference"), mods={"softcap": 2.0}), "varlen")
    k_cache = torch.randn(2, 64, 2, 64, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(2, 64, 2, 64, generator=gen).to(DEVICE, dtype)
    seqlens = torch.tensor([10, 50], dtype=torch.int32, device=DEVICE)
    qd = torch.randn(2, 1, 4, 64, generator=gen).to(DEVICE, dtype)
    kn = torch.randn(2, 1, 2, 64, generator=gen).to(DEVICE, dtype)
    vn = torch.randn(2, 1, 2, 64, generator=gen).to(DEVICE, dtype)

    def decode():
        return fastattn.attention_with_kvcache(qd, k_cache, v_cache, kn, vn, cache_seqlens=seqlens, softcap=2.0,
                                               return_lse=True, num_splits=2, backend="triton")

    assert_ok(testing.check_kvcache_against_reference(decode, qd, k_cache, v_cache, kn, vn, seqlens,
                                                      mods={"softcap": 2.0}), "decode")
    built = new(exp2)
    assert {p.kernel for p in built} >= {launch.attn_fwd_kernel, launch.attn_bwd_dkdv_kernel,
                                         launch.attn_bwd_dq_kernel}
    assert all(p.handle is not None and "tanh.approx.f32" in p.handle.asm["ptx"] for p in built)


def test_sinks_take_mass_and_give_lse(gen):
    """A row without keys: out 0, lse = its sink's logit; a very large sink drives out to 0."""
    q, k, v = testing.random_qkv(1, 10, 4, 2, 2, 16, device=DEVICE, generator=gen)
    sinks = torch.tensor([0.5, 30.0], device=DEVICE)
    out, lse = fastattn.attention(q, k, v, causal=True, sinks=sinks, return_lse=True, backend="triton")
    assert (out[:, :6] == 0).all()
    torch.testing.assert_close(lse[0, :, :6], sinks[:, None].expand(2, 6))
    assert out[..., 1, :].abs().max() < 1e-6  # the second head's sink holds ~all the mass


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_with_modifiers(causal, gen):
    """Packed sequences: bias (B, Hq, max_q, max_k) by positions within each sequence, per-sequence
    slopes, window, softcap, sinks; an empty sequence and one without keys."""
    lengths_q, lengths_k, hq, hkv, d = [5, 0, 33, 17, 3], [9, 4, 33, 40, 0], 4, 2, 16
    cu_q = torch.tensor([0] + lengths_q).cumsum(0).to(DEVICE, torch.int32)
    cu_k = torch.tensor([0] + lengths_k).cumsum(0).to(DEVICE, torch.int32)
    mq, mk, b = max(lengths_q), max(lengths_k), len(lengths_q)
    q = torch.randn(sum(lengths_q), hq, d, generator=gen).to(DEVICE)
    k = torch.randn(sum(lengths_k), hkv, d, generator=gen).to(DEVICE)
    v = torch.randn(sum(lengths_k), hkv, d, generator=gen).to(DEVICE)
    mods = make_mods(SINGLE, b, hq, mq, mk, gen, bias_shape=(b, hq, mq, mk))
    mods["alibi_slopes"] = torch.rand(b, hq, generator=gen).to(DEVICE)
    mods["window"] = (6, 2)

    def varlen(backend):
        return lambda a, b_, c, **m: fastattn.attention_varlen(a, b_, c, cu_q, cu_k, mq, mk, causal=causal,
                                                               return_lse=True, backend=backend, **m)

    results = testing.check_against_reference(varlen("triton"), q, k, v, lse_grad=True, generator=gen,
                                              ref_fn=varlen("reference"), mods=mods)
    assert {"dbias", "dsinks"} <= {r.name for r in results}
    assert_ok(results, "varlen")


def test_backward_with_bias_is_deterministic(gen):
    q, k, v = testing.random_qkv(2, 50, 50, 4, 1, 16, device=DEVICE, generator=gen)
    bias, sinks = torch.randn(1, 4, 50, 50, generator=gen).to(DEVICE), torch.randn(4, generator=gen).to(DEVICE)
    dout = torch.randn(q.shape, generator=gen).to(DEVICE)

    def grads():
        xs = [x.clone().requires_grad_(True) for x in (q, k, v, bias, sinks)]
        fastattn.attention(*xs[:3], bias=xs[3], sinks=xs[4], window=(9, 9), backend="triton").backward(dout)
        return [x.grad for x in xs]

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


def test_bias_without_grad_skips_dbias(gen, monkeypatch):
    """A bias that needs no gradient (a fixed mask) costs no dbias buffer."""
    q, k, v = testing.random_qkv(1, 20, 20, 2, 2, 16, device=DEVICE, generator=gen, requires_grad=True)
    seen = []
    backward = launch.backward
    monkeypatch.setattr("fastattn.ops.autograd._PADDED_LAUNCH",
                        {"triton": (launch.forward, lambda *a: seen.append(a[-1]) or backward(*a))})
    fastattn.attention(q, k, v, bias=torch.zeros(20, 20, device=DEVICE), backend="triton").sum().backward()
    assert seen == [False]


@pytest.mark.parametrize("causal", [False, True])
def test_torch_backend_runs_bias_alibi_window(causal, gen):
    """SDPA with a float mask: matches the reference, bias gradient included; rows without keys 0."""
    b, sq, sk, hq, hkv, d = 2, 23, 17, 4, 2, 16
    q, k, v = testing.random_qkv(b, sq, sk, hq, hkv, d, device=DEVICE, generator=gen)
    mods = make_mods(["bias", "alibi"], b, hq, sq, sk, gen)
    mods["window"] = (5, 2)
    mask = torch.rand(b, sk, generator=gen).to(DEVICE) > 0.3
    fn = lambda a, b_, c, **m: (fastattn.attention(a, b_, c, causal=causal, key_padding_mask=mask, backend="torch",
                                                   **m), None)
    results = testing.check_against_reference(fn, q, k, v, causal=causal, key_padding_mask=mask, lse=False,
                                              generator=gen, mods=mods)
    assert_ok(results, "torch backend")


def test_which_backend_runs_what(gen):
    q, k, v = testing.random_qkv(1, 8, 8, 2, 2, 16, device=DEVICE, generator=gen)
    with pytest.raises(ValueError, match="softcap and sinks cannot be expressed"):
        fastattn.attention(q, k, v, softcap=5.0, backend="torch")
    from fastattn import backends
    from fastattn.modifiers import ScoreMods
    from fastattn.validation import validate_qkv

    call = backends.AttentionCall(q, k, v, validate_qkv(q, k, v), False, 0.25, None, False,
                                  mods=ScoreMods(window=(2, 2), softcap=1.0))
    assert backends.cannot_run("cuda", "attention", call) == \
        "score modifiers (window, softcap) are not supported by backend 'cuda'"
    # "auto" on CPU: torch for what SDPA expresses, else the reference.
    out = fastattn.attention(q, k, v, sinks=torch.zeros(2, device=DEVICE))
    torch.testing.assert_close(out, reference.attention(q, k, v, sinks=torch.zeros(2, device=DEVICE)))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(bias=torch.zeros(3, 8, 8)), ValueError, "bias must be broadcastable"),
    (dict(bias=torch.zeros(8, 8, dtype=torch.int32)), TypeError, "bias must be a floating tensor"),
    (dict(bias=torch.zeros(1, 1, 1, 1, 8, 8)), ValueError, "bias must have"),
    (dict(alibi_slopes=torch.zeros(2, dtype=torch.float16)), TypeError, "alibi_slopes must be float32"),
    (dict(alibi_slopes=torch.zeros(3)), ValueError, "alibi_slopes must have shape"),
    (dict(window=(2,)), ValueError, "window must be"),
    (dict(window=(-2, 0)), ValueError, "window must be"),
    (dict(window=(1.5, 0)), ValueError, "window must be"),
    (dict(softcap=-1.0), ValueError, "softcap must be"),
    (dict(softcap=float("inf")), ValueError, "softcap must be"),
    (dict(softcap="1"), ValueError, "softcap must be"),
    (dict(softcap=False), ValueError, "softcap must be"),  # falsy, but no number: refused, not read as "off"
    (dict(softcap=""), ValueError, "softcap must be"),
    (dict(softcap=[]), ValueError, "softcap must be"),
    (dict(softcap=torch.tensor(0.0)), ValueError, "softcap must be"),
    (dict(softcap=1e-39), ValueError, r"softcap must be 0 \(off\) or a float in \[1e-30, 1e\+30\]"),
    (dict(sinks=torch.zeros(3)), ValueError, "sinks must have shape"),
    (dict(sinks=[0.0, 0.0]), TypeError, "sinks must be"),
])
def test_bad_modifiers_name_the_argument(kwargs, error, match, gen):
    q, k, v = testing.random_qkv(1, 8, 8, 2, 2, 16, generator=gen)
    with pytest.raises(error, match=match):
        fastattn.attention(q, k, v, **kwargs)


@pytest.mark.parametrize("softcap", [False, "", []], ids=repr)
def test_falsy_softcaps_that_are_no_numbers_are_refused_on_every_entry_point(softcap, gen):
    """attention, attention_varlen and attention_with_kvcache name softcap for False, "" or [] (they
    used to read them as "no softcap"); 0 and 0.0 stay off."""
    q, k, v = testing.random_qkv(1, 8, 8, 2, 2, 16, generator=gen)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    cache = torch.zeros(1, 16, 2, 16)
    lens = torch.tensor([4], dtype=torch.int32)
    calls = (lambda **m: fastattn.attention(q, k, v, **m),
             lambda **m: fastattn.attention_varlen(q[0], k[0], v[0], cu, cu, 8, 8, **m),
             lambda **m: fastattn.attention_with_kvcache(q[:, :1], cache, cache, cache_seqlens=lens, **m))
    for call in calls:
        with pytest.raises(ValueError, match="softcap must be"):
            call(softcap=softcap)
        for off in (0, 0.0, np.float32(0.0)):
            call(softcap=off)


def test_numpy_softcaps_are_numbers(gen):
    """A NumPy float softcap (as scale takes) is the same softcap as the Python float."""
    q, k, v = testing.random_qkv(1, 8, 8, 2, 2, 16, generator=gen)
    torch.testing.assert_close(fastattn.attention(q, k, v, softcap=np.float32(2.5), backend="reference"),
                               fastattn.attention(q, k, v, softcap=2.5, backend="reference"), rtol=0, atol=0)


def test_no_modifier_values_are_plain_attention(gen):
    """window=(-1, -1), softcap=0 and causal's own window are no modifiers at all."""
    from fastattn.validation import validate_mods, validate_qkv

    q, k, v = testing.random_qkv(1, 8, 8, 2, 2, 16, generator=gen)
    shape = validate_qkv(q, k, v)
    assert validate_mods(None, None, (-1, -1), 0.0, None, shape, q, False) is None
    assert validate_mods(None, None, (-1, 5), None, None, shape, q, True) is None
    assert validate_mods(None, None, (3, 5), None, None, shape, q, True).window == (3, 0)


def test_modifiers_through_the_ops_and_compile(gen):
    """The modifier arguments pass opcheck (schemas, fakes) and trace under torch.compile."""
    from fastattn.ops import triton_attention as ops

    q, k, v = testing.random_qkv(1, 20, 24, 2, 1, 16, device=DEVICE, generator=gen)
    bias, slopes, sinks = torch.randn(1, 2, 20, 24).to(DEVICE), torch.rand(2).to(DEVICE), torch.randn(2).to(DEVICE)
    mods = (bias, slopes, sinks, 5, 0, 3.0)
    torch.library.opcheck(ops.triton_attn_fwd, (q, k, v, None, None, True, 0.25, *mods))
    out, lse = ops.triton_attn_fwd(q, k, v, None, None, True, 0.25, *mods)
    torch.library.opcheck(ops.triton_attn_bwd, (torch.randn_like(out), q, k, v, out, lse, None, None, None, True, 0.25,
                                                *mods, True))

    def f(a, b, c, bias_):
        return fastattn.attention(a, b, c, causal=True, bias=bias_, alibi_slopes=slopes, window=(5, 0), softcap=3.0,
                                  sinks=sinks, backend="triton")

    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, bias), f(q, k, v, bias))


def test_auto_takes_the_modifier_kernels_on_cuda():
    """"auto" on CUDA tensors runs modifier calls in the Triton kernels (GPU-verified), plain calls too;
    on CPU tensors SDPA."""
    from fastattn import backends
    from fastattn.modifiers import ScoreMods

    assert backends.auto_order(torch.device("cuda"))[0] == "triton"
    assert set(ScoreMods(softcap=1.0).names()) <= set(backends.TABLE["triton"].modifiers)
    assert backends.auto_order(torch.device("cpu"))[0] == "torch"


def test_available_backends_say_which_modifiers_they_run():
    statuses = fastattn.available_backends()
    assert statuses["triton"].score_modifiers == ("bias", "alibi_slopes", "window", "softcap", "sinks")
    assert statuses["reference"].score_modifiers == statuses["triton"].score_modifiers
    assert statuses["torch"].score_modifiers == ("bias", "alibi_slopes", "window")
    assert statuses["cuda"].score_modifiers == ()


@pytest.mark.gpu
def test_modifiers_are_graph_safe_and_sync_free(gen):
    """fwd + bwd with every modifier (dbias, dsinks included) and a decode step with them: no host
    sync (sync debug mode "error") after warm-up, and a CUDA graph replays with eager's results."""
    q, k, v = testing.random_qkv(2, 96, 96, 4, 2, 64, dtype=torch.bfloat16, device="cuda", generator=gen)
    bias = torch.randn(1, 4, 96, 96, device="cuda", dtype=torch.bfloat16)
    sinks, slopes = torch.randn(4, device="cuda"), torch.rand(4, device="cuda")
    dout = torch.randn_like(q)
    xs = [x.clone().requires_grad_(True) for x in (q, k, v, bias, sinks)]

    def step():
        for x in xs:
            x.grad = None
        out = fastattn.attention(*xs[:3], causal=True, bias=xs[3], sinks=xs[4], alibi_slopes=slopes, window=(40, 0),
                                 softcap=20.0, backend="triton")
        out.backward(dout)
        return out

    eager = [step().detach().clone()] + [x.grad.clone() for x in xs]
    k_cache, v_cache = (torch.zeros(2, 256, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lens = torch.tensor([10, 200], dtype=torch.int32, device="cuda")  # a host-to-device copy: before the mode
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        with torch.no_grad():
            for _ in range(2):
                fastattn.attention_with_kvcache(q[:, :1], k_cache, v_cache, k[:, :1], v[:, :1], cache_seqlens=lens,
                                                sinks=sinks, alibi_slopes=slopes, window=(64, 0), softcap=20.0,
                                                backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode(0)

    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    for x in xs:
        x.grad = torch.zeros_like(x)
    with torch.cuda.graph(graph):
        out = fastattn.attention(*xs[:3], causal=True, bias=xs[3], sinks=xs[4], alibi_slopes=slopes, window=(40, 0),
                                 softcap=20.0, backend="triton")
        out.backward(dout)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip([out] + [x.grad for x in xs], eager):
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2e-2 * want.float().abs().max().item())


def test_sinks_without_keys_still_get_the_lse_gradient(gen):
    """No keys at all: out = 0 and lse = the sink, so d lse / d sink = 1 reaches dsinks."""
    q = torch.randn(2, 5, 2, 16, generator=gen).to(DEVICE)
    k = v = torch.randn(2, 0, 2, 16, generator=gen).to(DEVICE)
    check(q, k, v, False, {"sinks": torch.randn(2, generator=gen).to(DEVICE)}, gen)


def test_strided_and_infinite_sinks(gen):
    """Sinks read through a strided view (made contiguous for the kernels), and a sink of -inf on
    rows without keys: 0 output, finite (zero) dsinks, as the reference."""
    q, k, v = testing.random_qkv(1, 24, 20, 2, 2, 16, device=DEVICE, generator=gen)
    strided = torch.randn(2, 2, generator=gen).to(DEVICE)[:, 0]
    check(q, k, v, True, {"sinks": strided}, gen)
    check(q, k, v, True, {"sinks": torch.tensor([float("-inf"), 0.5], device=DEVICE)}, gen, lse_grad=False)


@pytest.mark.parametrize("window", [(2**31 - 1, -1), (-1, 2**31 - 1), (2**40, 2**31 - 1)], ids=str)
def test_windows_wider_than_int32_are_unbounded(window, gen):
    q, k, v = testing.random_qkv(1, 10, 8, 2, 2, 16, device=DEVICE, generator=gen)
    check(q, k, v, False, {"window": window}, gen)


def test_alibi_slopes_that_want_a_gradient_are_refused(gen):
    q, k, v = testing.random_qkv(1, 8, 8, 2, 2, 16, generator=gen)
    with pytest.raises(ValueError, match="alibi_slopes are fixed"):
        fastattn.attention(q, k, v, alibi_slopes=torch.rand(2, requires_grad=True))
    with pytest.raises(ValueError, match="softcap must be"):
        fastattn.attention(q, k, v, softcap=1e39)
