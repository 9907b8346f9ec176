"""The ops and their autograd: opcheck (schema, fake impl), torch.compile(fullgraph), and the
eager shortcut (the autograd Functions call the launchers directly) against the op path."""

import pytest
import torch
from conftest import DEVICE

import fastattn
import fastattn.ops  # noqa: F401  (registers the ops)
from fastattn import testing
from fastattn.launchers.key_bounds import key_bounds


def small_inputs(gen, dtype=torch.float32, causal=True):
    q, k, v = testing.random_qkv(1, 20, 36, 4, 2, 32, dtype=dtype, device=DEVICE, generator=gen,
                                 requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_forward(causal, gen):
    q, k, v = small_inputs(gen)
    torch.library.opcheck(torch.ops.fastattn.triton_attn_fwd.default, (q, k, v, None, None, causal, 0.2))


def test_opcheck_backward(gen):
    q, k, v = (x.detach() for x in small_inputs(gen))
    out, lse = torch.ops.fastattn.triton_attn_fwd(q, k, v, None, None, True, 0.2)
    dout = torch.randn(out.shape, generator=gen).to(out)
    dlse = torch.randn(lse.shape, generator=gen).to(lse)
    for d in (None, dlse):
        torch.library.opcheck(torch.ops.fastattn.triton_attn_bwd.default,
                              (dout, q, k, v, out, lse, d, None, None, True, 0.2))


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
    torch.library.opcheck(torch.ops.fastattn.triton_attn_fwd.default, (q, k, v, mask, key_bounds(mask), True, 0.2))


def varlen_inputs(gen):
    cu = torch.tensor([0, 5, 5, 19], dtype=torch.int32, device=DEVICE)
    q = torch.randn(19, 4, 32, generator=gen).to(DEVICE).requires_grad_()
    k = torch.randn(19, 2, 32, generator=gen).to(DEVICE).requires_grad_()
    v = torch.randn(19, 2, 32, generator=gen).to(DEVICE).requires_grad_()
    return q, k, v, cu


@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_varlen(causal, gen):
    q, k, v, cu = varlen_inputs(gen)
    torch.library.opcheck(torch.ops.fastattn.triton_attn_varlen_fwd.default, (q, k, v, cu, cu, 14, 14, causal, 0.2))
    q, k, v = q.detach(), k.detach(), v.detach()
    out, lse = torch.ops.fastattn.triton_attn_varlen_fwd(q, k, v, cu, cu, 14, 14, causal, 0.2)
    dout = torch.randn(out.shape, generator=gen).to(out)
    torch.library.opcheck(torch.ops.fastattn.triton_attn_varlen_bwd.default,
                          (dout, q, k, v, out, lse, None, cu, cu, 14, 14, causal, 0.2))


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


def test_compile_fullgraph_self_attention_and_unused_lse(gen):
    """attention(x, x, x) (one tensor three times) and an lse that is returned but not used: both
    trace with fullgraph and give eager's gradients."""
    torch._dynamo.reset()
    x = torch.randn(1, 20, 2, 32, generator=gen).to(DEVICE).requires_grad_()

    def f(x):
        out, _ = fastattn.attention(x, x, x, causal=True, return_lse=True, backend="triton")
        return out.square().sum()

    eager = torch.autograd.grad(f(x), x)[0]
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(x), x)[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_compiles_once_and_takes_changing_floats(gen, monkeypatch):
    """A process's first compiled call does not recompile on the next (the backend availability
    cache is a constant, not a traced side effect); a second scale or softcap value (a symbolic float
    to Dynamo) and a changing window_size in flash_attn_func trace (math.isfinite and an eagerly built
    error message failed with fullgraph); each result equals eager's."""
    from fastattn import backends

    monkeypatch.setattr(backends, "_unavailable", {})  # as in a fresh process
    q, k, v = (x.detach() for x in small_inputs(gen))
    compiles = []

    def counting(gm, example_inputs):
        compiles.append(gm)
        return gm.forward
    for kwargs in ({}, {"scale": 0.2}, {"softcap": 7.0}):
        torch._dynamo.reset()
        compiles.clear()
        name, value = next(iter(kwargs.items()), (None, None))
        f = torch.compile(lambda q, k, v, x: fastattn.attention(q, k, v, causal=True, backend="triton",
                                                                **({name: x} if name else {})),
                          backend=counting, fullgraph=True)
        for i in range(3):
            x = None if name is None else value * (1 + i / 10)
            q = q + 1
            assert torch.equal(f(q, k, v, x), fastattn.attention(q, k, v, causal=True, backend="triton",
                                                                 **({name: x} if name else {})))
        if name is None:  # (a new float value recompiles, as with torch's SDPA: the kernels take it as a float)
            assert len(compiles) == 1, len(compiles)
    torch._dynamo.reset()
    flash = torch.compile(lambda q, k, v, w: fastattn.flash_attn_func(q, k, v, window_size=(w, 0)), backend="eager",
                          fullgraph=True, dynamic=True)
    for w in (2, 3, 4):
        assert torch.equal(flash(q, k, v, w), fastattn.flash_attn_func(q, k, v, window_size=(w, 0)))


def test_compile_fullgraph_torch_backend_bottom_right_causal(gen):
    """backend="torch" (what "auto" takes on a CPU) with Sq != Sk and causal: a plain bool mask under
    compile (Dynamo cannot build SDPA's CausalBias), the same result."""
    torch._dynamo.reset()
    q, k, v = (x.detach() for x in small_inputs(gen))
    f = lambda q, k, v: fastattn.attention(q, k, v, causal=True, backend="torch")  # noqa: E731
    torch.testing.assert_close(torch.compile(f, backend="eager", fullgraph=True)(q, k, v), f(q, k, v),
                               rtol=1e-6, atol=1e-6)


def test_ops_take_one_dimensional_alibi_slopes(gen):
    """A direct op call with alibi_slopes (Hq,) gives every batch element the same slopes (it was read
    as (B, Hq), batch b reading past the end); the API reshapes them to (1, Hq) itself."""
    q, k, v = testing.random_qkv(2, 8, 8, 4, 2, 16, device=DEVICE, generator=gen)
    slopes = torch.rand(4, generator=gen).to(DEVICE)
    one_d = torch.ops.fastattn.triton_attn_fwd(q, k, v, None, None, True, 0.25, alibi_slopes=slopes)[0]
    two_d = torch.ops.fastattn.triton_attn_fwd(q, k, v, None, None, True, 0.25, alibi_slopes=slopes[None])[0]
    assert torch.equal(one_d, two_d)


@pytest.mark.parametrize("use", ["out", "lse", "both"])
def test_gradients_when_only_some_outputs_are_used(use, gen):
    """The backward gets no dlse when lse is unused and no dout when only lse is: each case matches
    the reference's gradients."""
    q, k, v = small_inputs(gen)
    grads = {}
    for backend in ("triton", "reference"):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out, lse = fastattn.attention(*xs, causal=True, return_lse=True, backend=backend)
        loss = {"out": out.square().sum(), "lse": lse.sum(), "both": out.square().sum() + lse.sum()}[use]
        grads[backend] = torch.autograd.grad(loss, xs, materialize_grads=True)  # lse alone: dv = 0
    for a, b in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_eager_calls_launch_directly_and_traced_calls_use_the_ops(gen, monkeypatch):
    """Eager: the autograd Function runs the launcher functions (the ops' own kernels) without the
    dispatcher; under a dispatch mode it calls the ops. Both give the same bits."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastattn.ops import autograd

    seen, direct_calls = [], []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    def spy(fn):
        return lambda *a: direct_calls.append(fn.__name__) or fn(*a)

    fwd, bwd = autograd._PADDED_LAUNCH["triton"]
    monkeypatch.setitem(autograd._PADDED_LAUNCH, "triton", (spy(fwd), spy(bwd)))
    q, k, v = small_inputs(gen)
    dout = torch.randn(q.shape, generator=gen).to(DEVICE)

    mask = torch.rand(q.shape[0], k.shape[1], generator=gen).to(DEVICE) > 0.3

    def run():
        results = []
        for kw in ({"causal": True}, {"key_padding_mask": mask}):  # the mask's bounds: a kernel or torch ops
            xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
            out = fastattn.attention(*xs, backend="triton", **kw)
            out.backward(dout)
            results += [out.detach(), *(x.grad for x in xs)]
        return results

    with Record():
        via_ops = run()
    assert "fastattn.triton_attn_fwd.default" in seen and "fastattn.triton_attn_bwd.default" in seen
    assert not direct_calls
    direct = run()
    assert direct_calls == ["forward", "backward"] * 2
    for a, b in zip(direct, via_ops):
        assert torch.equal(a, b)


def test_eager_calls_skip_the_python_apply_wrapper(gen, monkeypatch):
    """Eager calls that record run the Functions through their C++ apply (torch's Function.apply is a
    Python wrapper around it, ~4.5-7.5 us of host time), with Function.apply's outputs and gradients. A
    functorch wrapper whose transform has exited (a tensor captured inside torch.func.grad: q, k, v
    or a bias), which the launchers cannot read, goes through Function.apply, which unwraps it, with
    gradients or without (the inference shortcut must not take it either); so does a call inside a
    transform (refused by name, before either apply)."""
    from fastattn.ops import autograd

    q, k, v = (x.detach() for x in small_inputs(gen))
    cu_q = torch.tensor([0, 7, 20], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 16, 36], dtype=torch.int32, device=DEVICE)
    dout = torch.randn(q.shape, generator=gen).to(DEVICE)
    calls = [((q, k, v), lambda a, b, c: fastattn.attention(a, b, c, causal=True, backend="triton")),
             ((q[0], k[0], v[0]), lambda a, b, c: fastattn.attention_varlen(a, b, c, cu_q, cu_k, 13, 20, causal=True,
                                                                            backend="triton"))]
    paths = []
    for fn in (autograd.PaddedAttention, autograd.VarlenAttention):
        monkeypatch.setattr(fn, "apply", lambda *a, _apply=fn.apply: paths.append("python") or _apply(*a))
        monkeypatch.setitem(autograd._C_APPLY, fn, lambda *a, _apply=autograd._C_APPLY[fn]: paths.append("c++")
                            or _apply(*a))

    def run(xs, call):
        xs = [x.clone().requires_grad_() for x in xs]
        out = call(*xs)
        out.backward(dout.view(-1)[:out.numel()].view(out.shape))
        return [out.detach(), *(x.grad for x in xs)]

    fast = [run(*c) for c in calls]
    assert paths == ["c++", "c++"]
    paths.clear()
    with monkeypatch.context() as m:  # the same calls through Function.apply
        for fn in (autograd.PaddedAttention, autograd.VarlenAttention):
            m.setitem(autograd._C_APPLY, fn, fn.apply)
        wrapped = [run(*c) for c in calls]
    assert paths == ["python", "python"]
    for a, b in zip(sum(fast, []), sum(wrapped, [])):
        assert torch.equal(a, b)

    def exited(x):  # a functorch wrapper of x whose transform has exited
        captured = []
        torch.func.grad(lambda y: captured.append(y) or y.sum())(x.clone())
        assert torch._C._functorch.is_functorch_wrapped_tensor(captured[0])
        return captured[0]

    for (xs, call), expected in zip(calls, fast):
        for i in range(3):  # q, k or v such a wrapper, with gradients (through the backward) and without
            args = [exited(x) if j == i else x for j, x in enumerate(xs)]
            grad_of = 2 if i != 2 else 1  # a plain input that requires grad
            args[grad_of] = args[grad_of].clone().requires_grad_()
            paths.clear()
            out = call(*args)
            out.backward(dout.view(-1)[:out.numel()].view(out.shape))
            assert paths == ["python"] and torch.equal(out.detach(), expected[0])
            assert torch.equal(args[grad_of].grad, expected[1 + grad_of])
            paths.clear()
            with torch.no_grad():
                out = call(*args)
            assert paths == ["python"] and torch.equal(out, expected[0])
    bias = torch.randn(1, 4, 20, 36, generator=gen).to(DEVICE)
    plain = fastattn.attention(q, k, v, bias=bias, backend="triton")
    for grad_mode in (torch.enable_grad, torch.no_grad):  # a modifier tensor such a wrapper
        paths.clear()
        with grad_mode():
            out = fastattn.attention(q, k, v, bias=exited(bias), backend="triton")
        assert paths == ["python"] and torch.equal(out.detach(), plain)
    paths.clear()
    with pytest.raises(RuntimeError, match="do not run under torch.func transforms"):  # refused by name
        torch.func.grad(lambda x: x.sum() + fastattn.attention(q, k, v, backend="triton").sum())(q.clone())
    assert paths == []


@pytest.mark.parametrize("loss", ["square", "sum"])
@pytest.mark.parametrize("packed", [False, True])
def test_double_backward_is_refused(gen, loss, packed):
    """The kernels' gradients are not differentiable again: create_graph=True then a second
    backward raises instead of silently dropping the second-order term, also when the cotangent is
    a constant (out.sum(): a gradient penalty), where torch's once_differentiable attached nothing."""
    q, k, v = small_inputs(gen)
    if packed:
        cu = torch.tensor([0, 7, 20], dtype=torch.int32, device=DEVICE)
        cu_k = torch.tensor([0, 16, 36], dtype=torch.int32, device=DEVICE)
        out = fastattn.attention_varlen(q[0], k[0], v[0], cu, cu_k, 13, 20, backend="triton")
    else:
        out = fastattn.attention(q, k, v, causal=True, backend="triton")
    (dq,) = torch.autograd.grad(getattr(out, loss)().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (out.sum() + dq.square().sum()).backward()


def test_double_backward_is_refused_through_parameters(gen):
    """A gradient penalty on parameters upstream of the attention, with torch.autograd.grad (which
    runs only the nodes on a path to the inputs it is asked about): raises too. The first-order
    gradient made with create_graph=True equals the plain one."""
    q0, k, v = (x.detach() for x in small_inputs(gen))
    w = torch.randn(32, 32, generator=gen).to(DEVICE).requires_grad_()

    def first(create_graph):
        out = fastattn.attention(q0 @ w, k, v, causal=True, backend="triton")
        return torch.autograd.grad(out.sum(), w, create_graph=create_graph)[0]

    dw, plain = first(True), first(False)
    assert torch.equal(dw.detach(), plain)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        torch.autograd.grad(dw.square().sum(), w)


def test_first_order_gradients_with_create_graph_work_as_plain_ones(gen):
    """The guard on create_graph=True gradients changes nothing else: under a non-reentrant
    torch.utils.checkpoint (which allows one unpack of the saved tensors) the gradients equal the
    plain ones, they can be edited in place (a hook scaling them), and a second backward still raises."""
    from torch.utils.checkpoint import checkpoint

    q, k, v = small_inputs(gen)

    def attn(q, k, v):
        return fastattn.attention(q, k, v, causal=True, backend="triton")

    plain = torch.autograd.grad(attn(q, k, v).sum(), (q, k, v))
    grads = torch.autograd.grad(checkpoint(attn, q, k, v, use_reentrant=False).sum(), (q, k, v), create_graph=True)
    assert all(torch.equal(a, b.detach()) for a, b in zip(plain, grads))
    grads[0].mul_(2)  # in place: an alias, not a view of the guard's output
    with pytest.raises(RuntimeError, match="differentiate twice"):
        torch.autograd.grad(grads[1].square().sum(), k)


def test_calls_without_gradients_skip_the_autograd_function(gen, monkeypatch):
    """Nothing to record (grad mode off, or no input that requires grad): the eager shortcut calls
    the forward launcher without the autograd Function, with the Function's bits and a float32 lse
    (fp32 inputs' kernels save a float64 one). A bias or sinks that requires grad, a dispatch mode,
    forward-mode AD or a functorch transform still meets the Function."""
    import torch.autograd.forward_ad as fwd_ad
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastattn.ops import autograd

    q16, k16, v16 = (x.detach() for x in small_inputs(gen, dtype=torch.float16))
    mask = torch.rand(q16.shape[0], k16.shape[1], generator=gen).to(DEVICE) > 0.3
    bias = torch.randn(1, 4, 20, 36, generator=gen).to(DEVICE)
    sinks = torch.randn(4, generator=gen).to(DEVICE)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 16, 36], dtype=torch.int32, device=DEVICE)
    fp32 = [x.float() for x in (q16, k16, v16)]
    calls = [  # (inputs, call)
        ((q16, k16, v16), lambda *x: fastattn.attention(*x, causal=True, return_lse=True, backend="triton")),
        (fp32, lambda *x: fastattn.attention(*x, causal=True, return_lse=True, backend="triton")),
        ((q16, k16, v16), lambda *x: fastattn.attention(*x, key_padding_mask=mask, return_lse=True, backend="triton")),
        ((q16, k16, v16), lambda *x: fastattn.attention(*x, causal=True, bias=bias, window=(9, 0), sinks=sinks,
                                                        return_lse=True, backend="triton")),
        (fp32, lambda a, b, c: fastattn.attention_varlen(a[0], b[0], c[0], cu, cu_k, 13, 20, causal=True,
                                                         return_lse=True, backend="triton")),
    ]
    recorded = [call(*(x.clone().requires_grad_() for x in xs)) for xs, call in calls]  # through the Functions

    applied = []
    for fn in (autograd.PaddedAttention, autograd.VarlenAttention):  # the Function's Python and C++ applies
        monkeypatch.setattr(fn, "apply", lambda *a, _apply=fn.apply: applied.append(1) or _apply(*a))
        monkeypatch.setitem(autograd._C_APPLY, fn, lambda *a, _apply=autograd._C_APPLY[fn]: applied.append(1)
                            or _apply(*a))
    for mode in (torch.no_grad, torch.enable_grad, torch.inference_mode):
        with mode():
            for (xs, call), (ref_out, ref_lse) in zip(calls, recorded):
                out, lse = call(*xs)
                assert lse.dtype == torch.float32
                assert torch.equal(out, ref_out.detach()) and torch.equal(lse, ref_lse.detach())
    with torch.no_grad():  # inputs that require grad, with grad mode off
        out, _ = calls[0][1](*(x.clone().requires_grad_() for x in (q16, k16, v16)))
    assert torch.equal(out, recorded[0][0].detach())
    assert not applied

    def through_function(run):
        applied.clear()
        run()
        return bool(applied)

    assert through_function(lambda: fastattn.attention(q16, k16, v16, bias=bias.clone().requires_grad_(),
                                                       backend="triton"))  # dbias needs the backward
    assert through_function(lambda: fastattn.attention(q16, k16, v16, sinks=sinks.clone().requires_grad_(),
                                                       backend="triton"))  # so does dsinks

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    seen = []
    with torch.no_grad(), Record():
        assert through_function(lambda: fastattn.attention(q16, k16, v16, causal=True, backend="triton"))
    assert "fastattn.triton_attn_fwd.default" in seen  # a dispatch mode sees the op

    def dual():  # forward-mode AD: dual tensors do not require grad; the Function refuses them
        with fwd_ad.dual_level():
            fastattn.attention(fwd_ad.make_dual(q16, torch.ones_like(q16)), k16, v16, backend="triton")

    with pytest.raises(NotImplementedError, match="no forward-mode AD \\(jvp\\)"):
        through_function(dual)
    with torch.no_grad(), pytest.raises(RuntimeError, match="do not run under torch.func transforms"):
        torch.func.vmap(lambda x: fastattn.attention(x, k16, v16, backend="triton"))(q16[None])
