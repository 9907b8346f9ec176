"""fastattn.scaled_dot_product_attention against torch's, on every case it accepts."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE

import fastattn
from fastattn import api


def bhsd(gen, b, h, s, d, dtype=torch.float32):
    return torch.randn(b, h, s, d, generator=gen).to(DEVICE, dtype).requires_grad_()


def compare_with_torch(gen, q, k, v, **kw):
    """Outputs and gradients of the drop-in vs torch's SDPA (float32: close to rounding)."""
    dout = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=gen).to(DEVICE)
    results = []
    # backend="triton": the kernels themselves (through the interpreter on CPU), not "auto"'s pick.
    ours = lambda *a, **k: fastattn.scaled_dot_product_attention(*a, **k, backend="triton")
    for fn in (ours, F.scaled_dot_product_attention):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        if fn is F.scaled_dot_product_attention and kw.get("attn_mask") is not None:
            # torch's CUDA kernels reject a broadcast mask whose last dim has stride 0 (seen on an H100
            # with torch 2.11: "(*bias): last dimension must be contiguous"): give torch a dense one.
            kw = {**kw, "attn_mask": kw["attn_mask"].expand(q.shape[:-1] + (k.shape[-2],)).contiguous()}
        out = fn(*xs, **kw)
        out.backward(dout)
        results.append((out, [x.grad for x in xs]))
    (o1, g1), (o2, g2) = results
    assert o1.shape == o2.shape
    torch.testing.assert_close(o1, o2, rtol=1e-4, atol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sq,sk", [(33, 33), (17, 50), (50, 17), (1, 40)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_torch(sq, sk, is_causal, gen):
    # torch's causal is top-left: query i sees keys j <= i, also when Sq != Sk.
    q, k, v = bhsd(gen, 2, 4, sq, 32), bhsd(gen, 2, 4, sk, 32), bhsd(gen, 2, 4, sk, 32)
    compare_with_torch(gen, q, k, v, is_causal=is_causal, scale=0.3)


def test_masks_that_are_not_masks_name_attn_mask(gen):
    """A mask that is not a tensor, or a 0-d one (torch refuses it too), is refused naming attn_mask."""
    q, k, v = bhsd(gen, 1, 2, 5, 16), bhsd(gen, 1, 2, 6, 16), bhsd(gen, 1, 2, 6, 16)
    with pytest.raises(TypeError, match="attn_mask must be a torch.Tensor or None, got list"):
        fastattn.scaled_dot_product_attention(q, k, v, attn_mask=[[1.0]], backend="triton")
    for mask in (torch.tensor(0.5), torch.tensor(True)):
        with pytest.raises(ValueError, match="attn_mask must have at least one dim"):
            fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="triton")


def test_gqa(gen):
    q, k, v = bhsd(gen, 2, 6, 20, 16), bhsd(gen, 2, 2, 30, 16), bhsd(gen, 2, 2, 30, 16)
    compare_with_torch(gen, q, k, v, is_causal=True, enable_gqa=True)
    with pytest.raises(ValueError, match="enable_gqa"):
        fastattn.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("shapes,gqa", [
    (((2, 4), (1, 4), (1, 4)), False),  # one key/value batch for every query batch
    (((2, 4), (1, 1), (2, 1)), False),  # batch and heads of 1, mixed between key and value
    (((1, 1), (2, 4), (2, 4)), False),  # the query broadcast
    (((2, 6), (1, 2), (1, 2)), True),   # a batch of 1 with GQA
])
def test_batch_and_heads_of_one_broadcast_as_in_torch(shapes, gqa, gen):
    """torch's SDPA broadcasts a batch dim of 1 (and a heads dim of 1 without enable_gqa); the
    drop-in refused them ("k has batch size 1 but q has 2")."""
    (bq, hq), (bk, hk), (bv, hv) = shapes
    q, k, v = bhsd(gen, bq, hq, 9, 16), bhsd(gen, bk, hk, 11, 16), bhsd(gen, bv, hv, 11, 16)
    results = []
    for fn in (lambda *a, **kw: fastattn.scaled_dot_product_attention(*a, **kw, backend="triton"),
               F.scaled_dot_product_attention):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out = fn(*xs, is_causal=True, enable_gqa=gqa)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE))
        results.append([out] + [x.grad for x in xs])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="k has batch size 3 but q has 2"):
        fastattn.scaled_dot_product_attention(bhsd(gen, 2, 4, 9, 16), bhsd(gen, 3, 4, 11, 16), bhsd(gen, 3, 4, 11, 16))


def test_the_fallback_keeps_to_torchs_own_kernels(gen, monkeypatch):
    """While fastattn is torch's flash impl (CUDA), the fallback's SDPA call would pick fastattn as its
    flash backend, which refuses what the fallback is for (dropout): it runs under own_kernels."""
    from fastattn.backends import sdpa_backend

    class CudaLike:
        is_cuda = True
    monkeypatch.setattr(sdpa_backend, "flash_is_fastattn", lambda: True)
    assert type(sdpa_backend.own_kernels(CudaLike())).__name__ != "nullcontext"
    assert type(sdpa_backend.own_kernels(bhsd(gen, 1, 1, 2, 8).cpu())).__name__ == "nullcontext"
    entered = []

    class Recorder:
        def __enter__(self):
            entered.append(True)

        def __exit__(self, *exc):
            return False
    monkeypatch.setattr(sdpa_backend, "own_kernels", lambda query: Recorder())
    q, k, v = bhsd(gen, 1, 2, 10, 16), bhsd(gen, 1, 2, 12, 16), bhsd(gen, 1, 2, 12, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
    assert entered


class _CudaLike:  # what own_kernels reads of a CUDA query
    is_cuda = True


@pytest.mark.parametrize("user", [
    ("MATH",),
    ("FLASH_ATTENTION", "MATH"),
    ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "OVERRIDEABLE"),
    ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH", "OVERRIDEABLE"),  # torch's default
])
def test_own_kernels_keeps_within_the_callers_sdpa_kernel(user, monkeypatch):
    """own_kernels takes flash (fastattn itself while active) out of the backends the caller's
    sdpa_kernel / torch.backends.cuda.enable_*_sdp left on, and adds none back (it replaced the
    caller's restriction with cuDNN, efficient and math); the caller's exact state returns after it,
    also when the body raises. The flags are process-wide, so a CPU run checks them."""
    from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends, sdpa_kernel

    from fastattn.backends import sdpa_backend

    monkeypatch.setattr(sdpa_backend, "flash_is_fastattn", lambda: True)
    allowed = [getattr(SDPBackend, name) for name in user]
    with sdpa_kernel(allowed):
        before = _cur_sdpa_kernel_backends()
        with sdpa_backend.own_kernels(_CudaLike()):
            assert set(_cur_sdpa_kernel_backends()) == set(allowed) - {SDPBackend.FLASH_ATTENTION}
        assert _cur_sdpa_kernel_backends() == before
        with pytest.raises(KeyError), sdpa_backend.own_kernels(_CudaLike()):
            raise KeyError("the body")
        assert _cur_sdpa_kernel_backends() == before


def test_own_kernels_refuses_a_restriction_to_flash_alone(monkeypatch):
    """Nothing of PyTorch's own left (flash, and overrideable, which is no CUDA kernel): a RuntimeError
    naming what the caller allowed, as torch raises when every kernel it may use is off (it has no
    math fallback then); the caller's state is untouched."""
    from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends, sdpa_kernel

    from fastattn.backends import sdpa_backend

    monkeypatch.setattr(sdpa_backend, "flash_is_fastattn", lambda: True)
    for allowed in ([SDPBackend.FLASH_ATTENTION], [SDPBackend.FLASH_ATTENTION, SDPBackend.OVERRIDEABLE]):
        with sdpa_kernel(allowed):
            with pytest.raises(RuntimeError, match=r"allows only \[FLASH_ATTENTION.*fastattn itself"):
                with sdpa_backend.own_kernels(_CudaLike()):
                    pytest.fail("entered")
            assert set(_cur_sdpa_kernel_backends()) == set(allowed)


@pytest.mark.parametrize("path", ["drop-in fallback", "backend torch"])
def test_fallbacks_run_torch_within_the_callers_sdpa_kernel(path, gen, monkeypatch):
    """Both users of own_kernels (the drop-in's fallback, backend "torch") call torch's SDPA within
    the caller's restriction, here to math: seen at the SDPA call, with own_kernels made to act as
    for a CUDA query while fastattn is active."""
    from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends, sdpa_kernel

    from fastattn.backends import sdpa_backend

    monkeypatch.setattr(sdpa_backend, "flash_is_fastattn", lambda: True)
    own_kernels = sdpa_backend.own_kernels
    monkeypatch.setattr(sdpa_backend, "own_kernels", lambda query: own_kernels(_CudaLike()))
    seen = []

    def spy(*a, **kw):
        seen.append(set(_cur_sdpa_kernel_backends()))
        return F.scaled_dot_product_attention(*a, **kw)
    monkeypatch.setattr(api if path == "drop-in fallback" else sdpa_backend, "F",
                        type("F", (), {"scaled_dot_product_attention": staticmethod(spy)}))
    q, k, v = bhsd(gen, 1, 2, 10, 16), bhsd(gen, 1, 2, 12, 16), bhsd(gen, 1, 2, 12, 16)
    with sdpa_kernel([SDPBackend.MATH]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if path == "drop-in fallback":
            fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
        else:
            fastattn.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, backend="torch")
    assert seen == [{SDPBackend.MATH}]


def test_own_kernels_compiles_with_fullgraph(gen, monkeypatch):
    """Reachable while tracing (the drop-in's fallback, backend "torch" under torch.compile): the flags
    are read and set as Dynamo traces torch's own sdpa_kernel, without a graph break."""
    from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends, sdpa_kernel

    from fastattn.backends import sdpa_backend

    monkeypatch.setattr(sdpa_backend, "flash_is_fastattn", lambda: True)
    own_kernels = sdpa_backend.own_kernels
    monkeypatch.setattr(sdpa_backend, "own_kernels", lambda query: own_kernels(_CudaLike()))
    q, k, v = (x[0] for x in (bhsd(gen, 1, 2, 10, 16), bhsd(gen, 1, 2, 12, 16), bhsd(gen, 1, 2, 12, 16)))  # 3-D
    api._warned.clear()
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b, c: fastattn.scaled_dot_product_attention(a, b, c), fullgraph=True, backend="eager")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        out = fn(q, k, v)
        assert set(_cur_sdpa_kernel_backends()) == {SDPBackend.FLASH_ATTENTION, SDPBackend.MATH}
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 30), (1, 30), (1, 1, 1, 30), (2, 1, 1, 1)])
def test_key_padding_masks_run_in_the_kernel(mask_shape, gen, monkeypatch):
    q, k, v = bhsd(gen, 2, 3, 20, 16), bhsd(gen, 2, 3, 30, 16), bhsd(gen, 2, 3, 30, 16)
    mask = torch.rand(mask_shape, generator=gen) > 0.3
    mask.view(-1)[0] = True  # at least one real key everywhere: torch gives NaN otherwise
    if mask_shape == (2, 1, 1, 1):
        mask[:] = True
    elif len(mask_shape) == 4 and mask_shape[0] == 2:
        mask[:, :, :, 0] = True
    mask = mask.to(DEVICE)
    monkeypatch.setattr(api, "_fallback_to_torch", lambda *a: pytest.fail("fell back to torch"))
    compare_with_torch(gen, q, k, v, attn_mask=mask)


def test_fully_masked_rows_are_zero_not_nan(gen):
    q, k, v = bhsd(gen, 2, 2, 5, 16), bhsd(gen, 2, 2, 7, 16), bhsd(gen, 2, 2, 7, 16)
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="triton")
    assert (out[1] == 0).all() and torch.isfinite(out).all()
    torch.testing.assert_close(out[0], F.scaled_dot_product_attention(q, k, v, attn_mask=mask)[0])


@pytest.mark.parametrize("mask_shape", [(10, 12), (1, 2, 10, 12), (2, 1, 10, 1)])
def test_float_masks_run_in_the_kernel_as_a_bias(mask_shape, gen, monkeypatch):
    """A float attn_mask is the kernels' additive bias (broadcast, -inf allowed), with its gradient."""
    q, k, v = bhsd(gen, 2, 2, 10, 16), bhsd(gen, 2, 2, 12, 16), bhsd(gen, 2, 2, 12, 16)
    mask = torch.randn(mask_shape, generator=gen).to(DEVICE)
    mask.view(-1)[1] = float("-inf")
    monkeypatch.setattr(api, "_fallback_to_torch", lambda *a: pytest.fail("fell back to torch"))
    masks = [mask.clone().requires_grad_(True) for _ in range(2)]
    out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=masks[0], backend="triton")
    # torch's CUDA kernels refuse a mask whose last dim has stride 0 ((2, 1, 10, 1)): give it a dense copy.
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[1].expand(2, 2, 10, 12).contiguous())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    dout = torch.randn(out.shape, generator=gen).to(DEVICE)
    out.backward(dout)
    ref.backward(dout)
    torch.testing.assert_close(masks[0].grad, masks[1].grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["full bool mask", "dropout", "3-D inputs", "value head dim", "no heads",
                                  "head dim 0", "head dim 320", "key and value heads differ"])
def test_other_masks_fall_back_with_one_warning(kind, gen):
    """What the kernels do not run falls back to torch's SDPA. The last four are shapes torch runs that
    the drop-in refused with the validator's ValueError on "auto" too (no heads and an empty head
    dim: torch returns an empty output)."""
    q, k, v = bhsd(gen, 1, 2, 10, 16), bhsd(gen, 1, 2, 12, 16), bhsd(gen, 1, 2, 12, 16)
    if kind == "3-D inputs":
        q, k, v = q[0], k[0], v[0]
    elif kind == "value head dim":
        v = bhsd(gen, 1, 2, 12, 24)
    elif kind == "no heads":
        q, k, v = q[:, :0], k[:, :0], v[:, :0]
    elif kind.startswith("head dim"):
        d = int(kind.split()[-1])
        q, k, v = bhsd(gen, 1, 2, 10, d), bhsd(gen, 1, 2, 12, d), bhsd(gen, 1, 2, 12, d)
    elif kind == "key and value heads differ":  # torch's enable_gqa repeats each for the query heads
        q, v = bhsd(gen, 1, 4, 10, 16), bhsd(gen, 1, 1, 12, 16)
    kw = {
        "full bool mask": dict(attn_mask=(torch.rand(1, 2, 10, 12, generator=gen) > 0.2).to(DEVICE)),
        "dropout": dict(dropout_p=0.0001),
        "key and value heads differ": dict(enable_gqa=True),
    }.get(kind, {})
    api._warned.clear()
    with pytest.warns(UserWarning, match="falling back"):
        out = fastattn.scaled_dot_product_attention(q, k, v, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason
        fastattn.scaled_dot_product_attention(q, k, v, **kw)
    if kind != "dropout":
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, **kw))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_a_named_backend_runs_any_bool_mask_and_refuses_the_rest(backend, gen, monkeypatch):
    """A backend named explicitly does not fall back to torch: a general bool mask runs as a bias of
    0 / -inf (as torch, rows with a key), and what it cannot run is a ValueError saying why."""
    q, k, v = bhsd(gen, 2, 2, 10, 16), bhsd(gen, 2, 2, 12, 16), bhsd(gen, 2, 2, 12, 16)
    mask = (torch.rand(2, 1, 10, 12, generator=gen) > 0.3).to(DEVICE)
    mask[..., 0] = True
    monkeypatch.setattr(api, "_warned", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning either
        out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=f"backend='{backend}'.*dropout_p"):
        fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.1, backend=backend)
    with pytest.raises(ValueError, match="value head dim"):
        fastattn.scaled_dot_product_attention(q, k, bhsd(gen, 2, 2, 12, 24), backend=backend)
    with pytest.raises(TypeError, match="attn_mask must be a bool or float tensor"):
        fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask.int(), backend=backend)


def test_errors_name_the_backend_and_the_mask(gen):
    """A misspelt backend is named as such, even beside dropout; a general bool mask on a backend
    without a bias (cuda) is named as the mask, not as a bias the caller never passed."""
    q = bhsd(gen, 1, 2, 6, 16)
    with pytest.raises(ValueError, match="backend must be one of .* got 'trtion'"):
        fastattn.scaled_dot_product_attention(q, q, q, dropout_p=0.1, backend="trtion")
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool, device=DEVICE).tril()
    with pytest.raises(ValueError, match="backend='cuda'.*bool attn_mask that is not a key-padding mask"):
        fastattn.scaled_dot_product_attention(q, q, q, attn_mask=mask, backend="cuda")


@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
@pytest.mark.parametrize("sq,sk", [(6, 6), (5, 9), (9, 5)])
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_causal_bias_masks_are_causal(variant, sq, sk, backend, gen):
    """torch.nn.attention.bias.causal_upper_left / causal_lower_right as attn_mask: a tensor subclass
    whose data is not a mask (torch's SDPA dispatches on its variant). It was read as a float bias of
    uninitialised values: wrong outputs on "triton", an AttributeError on "auto" (CPU)."""
    from torch.nn.attention import bias as torch_bias

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's: "lower right causal bias will produce NaNs" (Sq > Sk)
        mask = getattr(torch_bias, f"causal_{variant}")(sq, sk)
    q, k, v = bhsd(gen, 2, 4, sq, 16), bhsd(gen, 2, 2, sk, 16), bhsd(gen, 2, 2, sk, 16)
    dout = torch.randn(2, 4, sq, 16, generator=gen).to(DEVICE)
    results = []
    for fn in (lambda *a, **kw: fastattn.scaled_dot_product_attention(*a, **kw, backend=backend),
               F.scaled_dot_product_attention):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out = fn(*xs, attn_mask=mask, scale=0.3, enable_gqa=True)
        out.backward(dout)
        # Rows that see no key (lower right, Sq > Sk): 0 here, NaN or 0 in torch by its kernel.
        results.append([out.nan_to_num()] + [x.grad.nan_to_num() for x in xs])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"attn_mask is a CausalBias for \(Sq, Sk\) = \(4, 4\) but"):
        fastattn.scaled_dot_product_attention(q, k, v, attn_mask=getattr(torch_bias, f"causal_{variant}")(4, 4),
                                              enable_gqa=True, backend=backend)
    with pytest.raises(ValueError, match="is_causal"):
        fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True,
                                              backend=backend)


def test_scale_takes_the_types_torch_takes(gen):
    import numpy as np

    q, k, v = bhsd(gen, 1, 2, 6, 16), bhsd(gen, 1, 2, 7, 16), bhsd(gen, 1, 2, 7, 16)
    for scale in (np.float32(0.3), np.int64(1), torch.tensor(0.3)):
        torch.testing.assert_close(fastattn.scaled_dot_product_attention(q, k, v, scale=scale, backend="triton"),
                                   F.scaled_dot_product_attention(q, k, v, scale=float(scale)), atol=1e-5, rtol=1e-5)
    for bad in (True, np.bool_(True), torch.tensor([0.3]), "0.3"):
        with pytest.raises(TypeError, match="scale must be a float or None"):
            fastattn.scaled_dot_product_attention(q, k, v, scale=bad)


def test_output_is_a_view_in_sdpa_layout(gen):
    q, k, v = bhsd(gen, 2, 4, 9, 16), bhsd(gen, 2, 4, 9, 16), bhsd(gen, 2, 4, 9, 16)
    out = fastattn.scaled_dot_product_attention(q, k, v, backend="triton")
    assert out.shape == (2, 4, 9, 16)
    assert out.transpose(1, 2).is_contiguous()  # the (B, S, H, D) kernel output: merging heads is free


def test_a_fallback_compiles_with_fullgraph(gen):
    """The fallback's one-time warning broke torch.compile(fullgraph=True) (dynamo cannot trace
    warnings.warn) until an eager call had spent it; torch's own SDPA compiles there."""
    q, k, v = (x[0] for x in (bhsd(gen, 1, 2, 10, 16), bhsd(gen, 1, 2, 12, 16), bhsd(gen, 1, 2, 12, 16)))  # 3-D
    api._warned.clear()
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b, c: fastattn.scaled_dot_product_attention(a, b, c), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(q, k, v), F.scaled_dot_product_attention(q, k, v))
