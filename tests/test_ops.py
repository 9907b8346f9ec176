"""The custom ops: opcheck (fake impl, autograd registration, schema), torch.compile(fullgraph)."""

import pytest
import torch
from conftest import DEVICE

import fastattn
import fastattn.ops  # noqa: F401  (registers the ops)
from fastattn import testing


def small_inputs(gen, dtype=torch.float32, causal=True):
    q, k, v = testing.random_qkv(1, 20, 36, 4, 2, 32, dtype=dtype, device=DEVICE, generator=gen,
                                 requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_forward(causal, gen):
    q, k, v = small_inputs(gen)
    torch.library.opcheck(torch.ops.fastattn.triton_attn_fwd.default, (q, k, v, None, causal, 0.2, True))


def test_opcheck_backward(gen):
    q, k, v = small_inputs(gen)
    out, lse = torch.ops.fastattn.triton_attn_fwd(q, k, v, None, True, 0.2, False)
    dout = torch.randn(out.shape, generator=gen).to(out)
    dlse = torch.randn(lse.shape, generator=gen).to(lse)
    for d in (None, dlse):
        torch.library.opcheck(torch.ops.fastattn.triton_attn_bwd.default,
                              (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), d, None, True,
                               0.2))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(compile_backend, gen):
    torch._dynamo.reset()
    q, k, v = small_inputs(gen)
    w = torch.randn(32, 32, generator=gen).to(DEVICE)

    def f(q, k, v):
        out = fastattn.attention(q, k, v, causal=True, backend="triton")
        return (out @ w).relu().sum(dim=-1)

    compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
    eager_out = f(q, k, v)
    eager_grads = torch.autograd.grad(eager_out.sum(), (q, k, v))
    comp_out = compiled(q, k, v)
    comp_grads = torch.autograd.grad(comp_out.sum(), (q, k, v))
    torch.testing.assert_close(comp_out, eager_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(comp_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_opcheck_key_padding_mask(gen):
    q, k, v = small_inputs(gen)
    mask = torch.rand(1, 36, generator=gen).to(DEVICE) > 0.3
    torch.library.opcheck(torch.ops.fastattn.triton_attn_fwd.default, (q, k, v, mask, True, 0.2, False))


def varlen_inputs(gen):
    cu = torch.tensor([0, 5, 5, 19], dtype=torch.int32, device=DEVICE)
    q = torch.randn(19, 4, 32, generator=gen).to(DEVICE).requires_grad_()
    k = torch.randn(19, 2, 32, generator=gen).to(DEVICE).requires_grad_()
    v = torch.randn(19, 2, 32, generator=gen).to(DEVICE).requires_grad_()
    return q, k, v, cu


@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_varlen(causal, gen):
    q, k, v, cu = varlen_inputs(gen)
    torch.library.opcheck(torch.ops.fastattn.triton_attn_varlen_fwd.default, (q, k, v, cu, cu, 14, 14, causal, 0.2,
                                                                              True))
    out, lse = torch.ops.fastattn.triton_attn_varlen_fwd(q, k, v, cu, cu, 14, 14, causal, 0.2, True)
    dout = torch.randn(out.shape, generator=gen).to(out)
    torch.library.opcheck(torch.ops.fastattn.triton_attn_varlen_bwd.default,
                          (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), None, cu, cu, 14, 14,
                           causal, 0.2))


def test_compile_fullgraph_varlen_and_mask(gen):
    torch._dynamo.reset()
    q, k, v, cu = varlen_inputs(gen)
    qp, kp, vp = small_inputs(gen)
    mask = torch.rand(1, 36, generator=gen).to(DEVICE) > 0.3

    def f(q, k, v, qp, kp, vp):
        a = fastattn.attention_varlen(q, k, v, cu, cu, 14, 14, causal=True, backend="triton")
        b = fastattn.attention(qp, kp, vp, key_padding_mask=mask, backend="triton")
        return a.sum() + b.square().sum()

    args = (q, k, v, qp, kp, vp)
    eager = torch.autograd.grad(f(*args), args)
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(*args), args)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
