"""Launch plans (fastattn.launchers.plans): built once per signature and reused, keyed finely enough
that a compiled kernel never serves arguments Triton would specialise differently, the constexpr
tail in the kernels' argument order, the one-time check of a direct launch, and (GPU) direct
launches and CUDA-graph capture."""

import inspect
import warnings

import pytest
import torch
from conftest import DEVICE, HAS_CUDA

import fastattn
from fastattn import reference, testing
from fastattn.kernels import configs
from fastattn.launchers import plans
from fastattn.launchers import triton_attention as launch


@pytest.fixture
def fresh_plans():
    launch.clear_plans()
    yield
    launch.clear_plans()


def count_builds(monkeypatch):
    built = []
    real = plans.build

    def spy(name, *args, **kwargs):
        built.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(plans, "build", spy)
    return built


def check(q, k, v, gen, **kw):
    results = testing.check_against_reference(
        lambda q, k, v: fastattn.attention(q, k, v, return_lse=True, backend="triton", **kw), q, k, v,
        causal=kw.get("causal", False), key_padding_mask=kw.get("key_padding_mask"), generator=gen)
    assert all(r.ok for r in results), [str(r) for r in results if not r.ok]


def test_a_signature_builds_its_plans_once_and_reuses_them(fresh_plans, gen, monkeypatch):
    built = count_builds(monkeypatch)
    q, k, v = testing.random_qkv(1, 20, 36, 4, 2, 32, device=DEVICE, generator=gen)
    check(q, k, v, gen, causal=True)  # forward + backward: 1 + 3 kernels
    assert sorted(built) == ["bwd_preprocess", "dkdv", "dq", "fwd"]
    for _ in range(2):  # fresh values, same signature: the cached plans, still right
        q2, k2, v2 = (torch.randn(x.shape, generator=gen).to(x) for x in (q, k, v))
        check(q2, k2, v2, gen, causal=True)
    assert len(built) == 4
    check(*testing.random_qkv(1, 20, 37, 4, 2, 32, device=DEVICE, generator=gen), gen, causal=True)  # new Sk
    # (the forward's plan is found by its specialisation class, plans.class_key: 37 keys specialise as 36)
    assert built[4:] == ["bwd_preprocess", "dkdv", "dq"]


def test_strides_and_alignment_are_part_of_the_key(fresh_plans, gen, monkeypatch):
    """A (B, H, S, D) view and a tensor starting 2 bytes past an aligned address are new signatures
    (Triton specialises on strides and alignment), and both stay correct. The view's strides
    specialise as the contiguous tensor's (multiples of 16): the forward finds its plan by that
    class (plans.class_key); the unaligned pointer does not."""
    built = count_builds(monkeypatch)
    q, k, v = testing.random_qkv(1, 24, 24, 2, 2, 32, dtype=torch.float16, device=DEVICE, generator=gen)
    check(q, k, v, gen)
    n = len(built)
    qt, kt, vt = testing.random_qkv(1, 24, 24, 2, 2, 32, dtype=torch.float16, device=DEVICE, layout="bhsd",
                                    generator=gen)
    check(qt, kt, vt, gen)
    assert len(built) == 2 * n - 1 and "fwd" not in built[n:]
    flat = torch.randn(q.numel() + 1, generator=gen).to(DEVICE, torch.float16)
    q_off = flat[1:].view(q.shape)  # 2 bytes past an aligned pointer
    assert q_off.data_ptr() % 16
    check(q_off, k, v, gen)
    assert len(built) == 3 * n - 1 and "fwd" in built[2 * n - 1:]


def test_a_growing_kv_cache_finds_the_forwards_plan_by_its_class(fresh_plans, gen, monkeypatch):
    """One query over keys that grow by one per call (a transformers generate() step over its
    DynamicCache, below the decode kernel's threshold): the forward is built once per
    specialisation class and tuning bucket, not once per length, and every call is right."""
    built = count_builds(monkeypatch)
    q = torch.randn(1, 4, 1, 16, generator=gen).to(DEVICE, torch.float16)
    for sk in range(20, 41):
        kv = torch.randn(1, 2, sk, 16, generator=gen).to(DEVICE, torch.float16)  # (B, Hkv, S, D), as transformers
        with torch.no_grad():
            out = fastattn.attention(q.transpose(1, 2), kv.transpose(1, 2), kv.transpose(1, 2), backend="triton")
        ref = reference.attention(q.transpose(1, 2).double(), kv.transpose(1, 2).double(), kv.transpose(1, 2).double())
        torch.testing.assert_close(out.double(), ref, rtol=2e-3, atol=2e-3)
    # classes: Sk a multiple of 16 or not (32), tuning buckets 32 and 64 (Sk > 32)
    assert built == ["fwd"] * len(built) and len(built) <= 4


def test_specialization_key_is_at_least_as_fine_as_tritons():
    """Two arguments with the same key must get the same specialisation from Triton itself."""
    native = pytest.importorskip("triton._C.libtriton").native_specialize_impl
    from triton.backends.compiler import BaseBackend

    base = torch.zeros(64, dtype=torch.float16)
    values = [0, 1, 2, 15, 16, 17, 32, 48, -1, -16, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, 2**32, 2**62,
              2**63, 2**63 + 16, 1.5, base, base[1:], base[8:], base[16:]]
    triton_spec = lambda x: native(BaseBackend, x, False, True, True)
    for a in values:
        for b in values:
            if plans.specialization((a,)) == plans.specialization((b,)) and type(a) is type(b):
                assert triton_spec(a) == triton_spec(b), (a if not isinstance(a, torch.Tensor) else "tensor", b)


def test_aligned():
    x = torch.zeros(64, dtype=torch.float16)
    assert plans.aligned((x, x[8:])) is True
    assert plans.aligned((x, x[1:], x[8:])) == (True, False, True)


@pytest.mark.parametrize("kernel_name", ["attn_fwd_kernel", "attn_bwd_preprocess_kernel", "attn_bwd_dkdv_kernel",
                                         "attn_bwd_dq_kernel"])
def test_kernel_arguments_are_runtime_first_then_constexprs(kernel_name):
    """A compiled kernel takes every argument in order: the plans pass the runtime ones, then the
    constexpr tail, so no runtime argument may come after a constexpr."""
    import fastattn.kernels.attn_bwd as bwd
    import fastattn.kernels.attn_fwd as fwd

    kernel = getattr(fwd, kernel_name, None) or getattr(bwd, kernel_name)
    params = list(inspect.signature(kernel.fn).parameters.values())
    is_constexpr = ["constexpr" in str(p.annotation) for p in params]
    first = is_constexpr.index(True)
    assert all(is_constexpr[first:]), [p.name for p in params[first:]]


def test_plans_tail_matches_the_kernel_signature(fresh_plans, gen):
    """Every plan the launcher builds has its constexprs in the kernel's order after the runtime
    arguments (what a compiled kernel is called with)."""
    q, k, v = testing.random_qkv(2, 17, 33, 4, 2, 40, device=DEVICE, generator=gen, requires_grad=True)
    mask = torch.rand(2, 33, generator=gen).to(DEVICE) > 0.3
    fastattn.attention(q, k, v, key_padding_mask=mask, return_lse=True, backend="triton")[1].sum().backward()
    built = [p for ps in launch._plans.values() for p in ps]
    assert len(built) == 4
    for plan in built:
        names = plan.kernel.arg_names
        n_args = len(names) - len(plan.tail)
        assert dict(zip(names[n_args:], plan.tail)) == plan.constexprs


def test_packed_batches_of_other_totals_reuse_plans(fresh_plans, gen, monkeypatch):
    """Packed batches with other token totals (same max lengths, same specialisation of the totals)
    hit the cached plans: the totals are keyed by how Triton specialises them, not their values."""
    built = count_builds(monkeypatch)

    def run(lengths):
        cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEVICE)
        total = sum(lengths)
        q, k, v = (torch.randn(total, 2, 16, generator=gen).to(DEVICE).requires_grad_() for _ in range(3))
        out = fastattn.attention_varlen(q, k, v, cu, cu, 12, 12, causal=True, backend="triton")
        out.sum().backward()
        ref = fastattn.attention_varlen(q, k, v, cu, cu, 12, 12, causal=True, backend="reference")
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    run([5, 12, 7])  # total 24
    n = len(built)
    run([12, 3, 10])  # total 25: not a multiple of 16 either
    assert len(built) == n
    run([12, 12, 8])  # total 32: a multiple of 16, specialised otherwise by Triton
    assert len(built) == 2 * n


def test_packed_batches_of_other_max_lengths_reuse_plans(fresh_plans, gen, monkeypatch):
    """max_seqlen changes with almost every packed batch: without modifiers the plans key on its
    specialisation class, tuning bucket and offset width, not its value, nor the number of
    sequences; the results stay right (forward, lse and gradients under the tolerance rule)."""
    built = count_builds(monkeypatch)

    def run(lengths, max_len=None):
        cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEVICE)
        m = max(lengths) if max_len is None else max_len
        q, k, v = (torch.randn(sum(lengths), h, 16, generator=gen).to(DEVICE) for h in (2, 1, 1))

        def varlen(backend):
            return lambda a, b, c: fastattn.attention_varlen(a, b, c, cu, cu, m, m, causal=True, return_lse=True,
                                                             backend=backend)
        results = testing.check_against_reference(varlen("triton"), q, k, v, lse_grad=True, generator=gen,
                                                  ref_fn=varlen("reference"))
        assert all(r.ok for r in results), [str(r) for r in results if not r.ok]

    run([5, 9, 7])  # max 9
    n = len(built)
    run([10, 3, 6, 4])  # max 10, four sequences
    run([11, 2])  # max 11
    run([5, 9, 7], max_len=13)  # a max_seqlen above the real one
    assert len(built) == n
    run([16, 5])  # max 16: a multiple of 16, specialised otherwise by Triton
    assert len(built) == 2 * n


def test_plan_cache_is_bounded(fresh_plans, gen, monkeypatch):
    monkeypatch.setattr(launch, "MAX_CACHED_SIGNATURES", 3)
    for sk in range(5, 10):
        q, k, v = testing.random_qkv(1, 4, sk, 1, 1, 16, device=DEVICE, generator=gen)
        fastattn.attention(q, k, v, backend="triton")
        assert len(launch._plans) <= 3


def test_forced_configs_are_used_and_dropped(fresh_plans, gen):
    q, k, v = testing.random_qkv(1, 30, 30, 1, 1, 16, device=DEVICE, generator=gen)
    fastattn.attention(q, k, v, backend="triton")
    with launch.forced_configs(fwd=configs.BlockConfig(16, 16)):
        fastattn.attention(q, k, v, backend="triton")
        (plan,), = launch._plans.values()
        assert (plan.config.block_m, plan.config.block_n) == (16, 16)
    assert not launch._plans


def test_a_new_shape_under_other_launch_settings_is_not_given_an_earlier_plan(fresh_plans, gen, monkeypatch):
    """The class key holds the launch settings: a shape of a known class, launched with a config
    pinned by configs.forced() (which, unlike forced_configs, keeps the plans) or with autotuning
    switched, gets a plan of its own, not the one built under the earlier settings."""
    built = count_builds(monkeypatch)
    q, k, v = testing.random_qkv(1, 30, 36, 1, 1, 16, device=DEVICE, generator=gen)
    check(q, k, v, gen)  # (forward and backward: the forward's plans are counted)
    assert built.count("fwd") == 1
    pinned = configs.BlockConfig(16, 16)
    with configs.forced(fwd=pinned):
        check(*testing.random_qkv(1, 30, 37, 1, 1, 16, device=DEVICE, generator=gen), gen)  # 37 keys: 36's class
    assert built.count("fwd") == 2
    assert any(p.config == pinned for (p,) in launch._class_plans.values())
    autotune = configs.autotune_enabled()
    monkeypatch.setattr(configs, "autotune_enabled", lambda: not autotune)
    check(*testing.random_qkv(1, 30, 38, 1, 1, 16, device=DEVICE, generator=gen), gen)
    assert built.count("fwd") == 3


def fresh_build_state(monkeypatch):
    monkeypatch.setattr(plans, "direct_launch_enabled", lambda: True)
    monkeypatch.setattr(plans, "_handles", {})
    monkeypatch.setattr(plans, "_tuned", {})
    monkeypatch.setattr(plans, "_warned", set())


class FakeCompiled:
    """Stands in for Triton's CompiledKernel: `compiled[grid](*args, stream=...)`, writing `value`
    into the output (args[1]) like the real kernel would (None: writing nothing), or failing."""

    def __init__(self, value, fail=False):
        self.value, self.fail, self.calls = value, fail, []

    def __getitem__(self, grid):
        def run(*args, stream=None):
            if self.fail:
                raise TypeError("unexpected launcher arguments")
            self.calls.append((grid, args, stream))
            if self.value is not None:
                args[1].fill_(self.value)
        return run


class FakeKernel:
    """A 'kernel' (x, out, n, SCALE: constexpr, BLOCK_M: constexpr) whose JIT launch writes 1.0 and
    returns `compiled`."""

    arg_names = ["x", "out", "n", "SCALE", "BLOCK_M"]

    def __init__(self, compiled):
        self.compiled, self.jit_calls = compiled, 0

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.jit_calls += 1
            args[1].fill_(1.0)
            return self.compiled
        return run


@pytest.mark.parametrize("handle_value,fail,kept", [(1.0, False, True), (2.0, False, False), (None, False, False),
                                                     (1.0, True, False)])
def test_direct_launch_is_checked_once_against_the_jit(monkeypatch, handle_value, fail, kept):
    """A compiled kernel is launched directly only if its first direct launch writes what the JIT
    launch writes, bit for bit (one that writes a wrong value, nothing at all, or raises is not);
    otherwise the plan keeps the JIT path, warns once, and the outputs are the JIT's."""
    fresh_build_state(monkeypatch)
    compiled = FakeCompiled(handle_value, fail)
    kernel = FakeKernel(compiled)
    x, out = torch.zeros(4), torch.zeros(4)
    cands = [configs.BlockConfig(16, 16)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plans.build("fake", kernel, cands, lambda c: (1, 1, 1), (x, out, 4), {"SCALE": 3},
                           seq_len=4, outputs=(1,), device=torch.device("cpu"))
    assert (plan.handle is compiled) == kept
    assert bool(caught) != kept
    assert torch.equal(out, torch.ones(4))  # the JIT launch's result either way
    assert plan.tail == (3, 16)
    if kept:
        plan.launch((2, 1, 1), (x, out, 4))
        assert compiled.calls[-1] == ((2, 1, 1), (x, out, 4, 3, 16), None)
        assert kernel.jit_calls == 2  # the plan's first launch and the check's reference launch


@pytest.mark.parametrize("handle_value", [1.0, 2.0])
def test_a_signature_specialised_as_an_earlier_one_launches_its_compiled_kernel(monkeypatch, handle_value):
    """A new call signature (e.g. a KV cache one token longer) whose arguments Triton specialises as
    an earlier one's takes the compiled kernel that one checked, launched directly: no JIT launch
    (tens of microseconds of host time per layer and token); one specialised otherwise (n = 16) goes
    through the JIT. A kernel whose check failed (handle_value 2.0) stays on the JIT path."""
    fresh_build_state(monkeypatch)
    compiled = FakeCompiled(handle_value)
    kernel = FakeKernel(compiled)
    x, cands = torch.zeros(4), [configs.BlockConfig(16, 16)]

    def build(n):
        out = torch.zeros(4)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            plan = plans.build("fake", kernel, cands, lambda c: (1, 1, 1), (x, out, n), {"SCALE": 3}, seq_len=4,
                               outputs=(1,), device=torch.device("cpu"))
        return plan, out

    first, _ = build(4)
    jit_calls, direct_calls = kernel.jit_calls, len(compiled.calls)
    second, out = build(5)  # (4 and 5: neither 1 nor a multiple of 16)
    kept = handle_value == 1.0
    assert second.handle is (compiled if kept else None) and first.handle is second.handle
    assert kernel.jit_calls == jit_calls + (0 if kept else 1)
    assert len(compiled.calls) == direct_calls + (1 if kept else 0)
    assert torch.equal(out, torch.full((4,), handle_value if kept else 1.0))
    if kept:
        assert compiled.calls[-1][1] == (x, out, 5, 3, 16)
    build(16)
    assert kernel.jit_calls > jit_calls + (0 if kept else 1)  # another specialisation: the JIT's own launch


class FakeTypedKernel:
    """A 'kernel' (x, out, bias, n, SCALE, BLOCK_M) whose JIT launch returns a compiled kernel per bias
    dtype, as Triton compiles one per argument type."""

    arg_names = ["x", "out", "bias", "n", "SCALE", "BLOCK_M"]

    def __init__(self):
        self.compiled = {}

    def __getitem__(self, grid):
        def run(*args, **kw):
            args[1].fill_(1.0)
            return self.compiled.setdefault(args[2].dtype, FakeCompiled(1.0))
        return run


def test_compiled_kernels_are_told_apart_by_every_arguments_dtype(monkeypatch):
    """Two signatures alike but for the dtype of a tensor other than the first (a bias or sinks in
    another dtype than q) get each its own compiled kernel: launching one typed for the other would
    read the bias's bytes as the wrong type, silently."""
    fresh_build_state(monkeypatch)
    kernel = FakeTypedKernel()
    x, out = torch.zeros(4), torch.zeros(4)
    handles = []
    for dtype in (torch.float16, torch.float32):
        plan = plans.build("fake", kernel, [configs.BlockConfig(16, 16)], lambda c: (1, 1, 1),
                           (x, out, torch.zeros(4, dtype=dtype), 4), {"SCALE": 3}, seq_len=4, outputs=(1,),
                           device=torch.device("cpu"))
        handles.append(plan.handle)
    assert handles == [kernel.compiled[torch.float16], kernel.compiled[torch.float32]]
    assert handles[0] is not handles[1]


class FakeSummingHandle:
    """A compiled 'kernel' whose launch writes `value` into out (args[1]) and adds 1.0 into acc (args[2])."""

    def __init__(self, value):
        self.value = value

    def __getitem__(self, grid):
        def run(*args, stream=None):
            args[1].fill_(self.value)
            args[2].add_(1.0)
        return run


class FakeSummingKernel:
    """A 'kernel' (x, out, acc, n, SCALE: constexpr, BLOCK_M: constexpr) whose JIT launch writes 1.0
    into out, adds 1.0 into acc and returns `handle`."""

    arg_names = ["x", "out", "acc", "n", "SCALE", "BLOCK_M"]

    def __init__(self, handle):
        self.handle = handle

    def __getitem__(self, grid):
        def run(*args, **kw):
            args[1].fill_(1.0)
            args[2].add_(1.0)
            return self.handle
        return run


@pytest.mark.parametrize("direct_value,kept", [(1.0, True), (2.0, False)])
def test_sums_hold_one_launchs_sum_after_the_check(monkeypatch, direct_value, kept):
    """A kernel that adds into a tensor (sums: dK/dV's atomic dQ) is launched three times while its
    plan is built (the plan's launch, the check's JIT and direct launches): the tensor is zeroed
    before each, so it ends up holding one launch's sum, whether the direct launch is kept or not;
    the sums take no part in the comparison."""
    fresh_build_state(monkeypatch)
    handle = FakeSummingHandle(direct_value)
    x, out, acc = torch.zeros(4), torch.zeros(4), torch.zeros(4)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        plan = plans.build("fake", FakeSummingKernel(handle), [configs.BlockConfig(16, 16)], lambda c: (1, 1, 1),
                           (x, out, acc, 4), {"SCALE": 3}, seq_len=4, outputs=(1,), device=torch.device("cpu"),
                           sums=(2,))
    assert (plan.handle is handle) == kept
    assert torch.equal(out, torch.ones(4)) and torch.equal(acc, torch.ones(4))


def test_direct_launch_switch(monkeypatch):
    monkeypatch.setattr(configs, "_INTERPRETER", False)
    monkeypatch.setenv("FASTATTN_DIRECT_LAUNCH", "0")
    assert not plans.direct_launch_enabled()
    monkeypatch.setenv("FASTATTN_DIRECT_LAUNCH", "1")
    assert plans.direct_launch_enabled()


# ---------------------------------------------------------------- GPU: direct launches, CUDA graphs

@pytest.mark.gpu
def test_direct_launches_are_used_and_match_the_jit_path(fresh_plans, gen, monkeypatch):
    """On a GPU every plan launches its compiled kernel directly (no check failed), and the results
    are bit-identical to Triton's own launch path, over shapes that change Triton's specialisation
    (Sq 1 -> 2, Sk 16 -> 17, a misaligned view, a mask, packed sequences)."""
    shapes = [(1, 1, 16, 4, 1, 64), (1, 2, 16, 4, 1, 64), (2, 2, 17, 4, 1, 64), (2, 33, 33, 2, 2, 128)]

    def run_all():
        results = []
        for b, sq, sk, hq, hkv, d in shapes:
            g = torch.Generator().manual_seed(b * 1000 + sq * 10 + sk)
            q, k, v = testing.random_qkv(b, sq, sk, hq, hkv, d, dtype=torch.bfloat16, device="cuda", generator=g,
                                         requires_grad=True)
            mask = (torch.rand(b, sk, generator=g) > 0.3).cuda()
            for kw in ({"causal": True}, {"key_padding_mask": mask}):
                out, lse = fastattn.attention(q, k, v, return_lse=True, backend="triton", **kw)
                (out.float().square().sum() + lse.sum()).backward()
                results += [out, lse, q.grad, k.grad, v.grad]
                q.grad = k.grad = v.grad = None
        return [r.detach().clone() for r in results]

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fastattn: launching")  # a failed direct-launch check warns
        direct = run_all()
        direct = run_all()  # the second round launches every plan directly
    assert all(p.handle is not None for ps in launch._plans.values() for p in ps)
    launch.clear_plans()
    monkeypatch.setenv("FASTATTN_DIRECT_LAUNCH", "0")
    jit = run_all()
    assert all(p.handle is None for ps in launch._plans.values() for p in ps)
    for a, b in zip(direct, jit):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("padded", [False, True])
def test_cuda_graph_captures_a_model_layer_forward_and_backward(padded, gen):
    """A warmed-up attention layer (fwd + bwd, causal or with a key-padding mask) is captured in a
    CUDA graph and replayed on new inputs with the results of eager runs."""
    from fastattn.models.layers import MultiHeadAttention

    torch.manual_seed(0)
    layer = MultiHeadAttention(128, 4, 2, causal=not padded, attn_backend="triton").cuda().to(torch.bfloat16)
    b, s = 2, 96
    static_x = torch.randn(b, s, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    static_mask = None
    if padded:  # captured with only the first 8 keys real: bounds baked in at capture would show on replay
        static_mask = torch.zeros(b, s, dtype=torch.bool, device="cuda")
        static_mask[:, :8] = True
    static_dy = torch.randn(b, s, 128, device="cuda", dtype=torch.bfloat16)

    def step():
        y = layer(static_x, key_padding_mask=static_mask)
        y.backward(static_dy)
        return y

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up: plans built, autotuning (if any) done outside the capture
            layer.zero_grad(set_to_none=False)
            static_x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(stream)
    layer.zero_grad(set_to_none=False)
    static_x.grad = torch.zeros_like(static_x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = step()
    # The tensors the graph accumulates into (the eager runs below give the parameters new ones).
    static_grads = [p.grad for p in layer.parameters()]
    static_grad = layer.q_proj.weight.grad

    for trial in range(2):
        x = torch.randn(b, s, 128, generator=gen).cuda().to(torch.bfloat16)
        dy = torch.randn(b, s, 128, generator=gen).cuda().to(torch.bfloat16)
        mask = None
        if padded:
            mask = torch.rand(b, s, generator=gen).cuda() > 0.4
            mask[:, 0] = True
            static_mask.copy_(mask)
        static_x.data.copy_(x)
        static_dy.copy_(dy)
        static_x.grad.zero_()
        for g in static_grads:
            g.zero_()
        graph.replay()
        torch.cuda.synchronize()
        graph_out = (static_y.detach().clone(), static_x.grad.clone(), static_grad.clone())

        x_eager = x.clone().requires_grad_()
        for p in layer.parameters():
            p.grad = None
        y = layer(x_eager, key_padding_mask=mask)
        y.backward(dy)
        eager_out = (y.detach(), x_eager.grad, layer.q_proj.weight.grad)
        for a, e in zip(graph_out, eager_out):
            # Same kernels on the same inputs; cuBLAS may pick other algorithms under capture, so
            # allow bf16 rounding, far below what stale masks or bounds would do.
            scale = e.float().abs().max().item()
            torch.testing.assert_close(a.float(), e.float(), rtol=0, atol=2e-2 * scale,
                                       msg=lambda m: f"trial {trial}: replay differs from eager: {m}")


@pytest.mark.gpu
def test_no_host_sync_on_the_hot_paths(gen):
    """Padded, masked and packed calls (fwd + bwd, after warm-up) run with torch's sync debug mode
    set to error: nothing reads a device value on the host."""
    q, k, v = testing.random_qkv(2, 64, 64, 4, 2, 64, dtype=torch.float16, device="cuda", generator=gen,
                                 requires_grad=True)
    mask = (torch.rand(2, 64, generator=gen) > 0.2).cuda()
    qp, kp, vp = (x.detach().reshape(128, *x.shape[2:]).requires_grad_() for x in (q, k, v))
    cu = torch.tensor([0, 50, 128], dtype=torch.int32, device="cuda")

    def calls():
        fastattn.attention(q, k, v, causal=True, backend="triton").sum().backward()
        fastattn.attention(q, k, v, key_padding_mask=mask, backend="triton").sum().backward()
        fastattn.attention_varlen(qp, kp, vp, cu, cu, 78, 78, causal=True, backend="triton").sum().backward()

    calls()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        calls()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(HAS_CUDA, reason="CPU: the interpreter never launches compiled kernels")
def test_interpreter_plans_have_no_compiled_kernel(fresh_plans, gen):
    q, k, v = testing.random_qkv(1, 8, 8, 1, 1, 16, device=DEVICE, generator=gen)
    fastattn.attention(q, k, v, backend="triton")
    assert all(p.handle is None for ps in launch._plans.values() for p in ps)
