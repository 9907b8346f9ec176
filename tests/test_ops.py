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
    torch.library.opcheck(torch.ops.fastattn.triton_attn_fwd.default, (q, k, v, causal, 0.2, True))


def test_opcheck_backward(gen):
    q, k, v = small_inputs(gen)
    out, lse = torch.ops.fastattn.triton_attn_fwd(q, k, v, True, 0.2, False)
    dout = torch.randn(out.shape, generator=gen).to(out)
    dlse = torch.randn(lse.shape, generator=gen).to(lse)
    for d in (None, dlse):
        torch.library.opcheck(torch.ops.fastattn.triton_attn_bwd.default,
                              (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), d, True, 0.2))


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
