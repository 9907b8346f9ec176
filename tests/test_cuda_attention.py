"""The CUDA C++ kernels (backend="cuda", fastattn._C) against the float64 reference under docs/design.md's
tolerance rule (fastattn.testing) and against the Triton kernels: forward, lse and the three
gradients, on the awkward shapes of test_triton_attention.py (head dims 40, 64, 80, 128) plus 32 and
96. Every test here runs the kernels, so every test is marked `gpu`; CPU checks are in
test_cuda_backend.py (wiring), test_cuda_fragments.py (fragment index maps) and
test_cuda_kernel_model.py (control flow)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import DEVICE, HAS_CUDA
from test_triton_attention import SHAPES as TRITON_SHAPES

import fastattn
from fastattn import testing
from fastattn.launchers.key_bounds import key_bounds

pytestmark = pytest.mark.gpu


def _cuda_ready() -> str | None:
    if not HAS_CUDA:
        return None  # conftest skips the gpu tests
    return fastattn.available_backends()["cuda"].reason if not fastattn.available_backends()["cuda"].available \
        else None


# A kernel that faults leaves a sticky CUDA error that fails every later GPU test of the session
# (the whole suite runs in one process in tools/gpu_check.sh). So the kernels first run once in a
# child process over every shape family used below; if that crashes, these tests fail with its
# output and nothing runs in this process.
SMOKE = textwrap.dedent("""
    import torch, fastattn
    g = torch.Generator().manual_seed(0)
    shapes = [(1, 1, 1, 1, 1, 64), (2, 17, 97, 4, 2, 40), (1, 257, 17, 2, 2, 128), (1, 97, 1, 3, 1, 80),
              (2, 300, 700, 8, 2, 128), (3, 70, 150, 4, 2, 64), (1, 130, 130, 2, 2, 96), (1, 65, 65, 1, 1, 32)]
    for dtype in (torch.float16, torch.bfloat16):
        for causal in (False, True):
            for masked in (False, True):
                for b, sq, sk, hq, hkv, d in shapes:
                    q = torch.randn(b, sq, hq, d, generator=g).to("cuda", dtype).requires_grad_()
                    k = torch.randn(b, sk, hkv, d, generator=g).to("cuda", dtype).requires_grad_()
                    v = torch.randn(b, sk, hkv, d, generator=g).to("cuda", dtype).requires_grad_()
                    mask = (torch.rand(b, sk, generator=g) < 0.7).cuda() if masked else None
                    out, lse = fastattn.attention(q, k, v, causal=causal, key_padding_mask=mask,
                                                  return_lse=True, backend="cuda")
                    (out.float().sum() + lse.nan_to_num(0.0, neginf=0.0).sum()).backward()
                    torch.cuda.synchronize()
    print("cuda smoke OK")
""")


@pytest.fixture(scope="module")
def _smoke():
    if not HAS_CUDA or _cuda_ready():
        return None
    if os.environ.get("FASTATTN_CUDA_SMOKE") == "ok":
        return None  # already run once by the caller (tools/gpu_check.sh: `python tests/test_cuda_attention.py`)
    res = subprocess.run([sys.executable, "-c", SMOKE], capture_output=True, text=True, timeout=600)
    if res.returncode != 0 or "cuda smoke OK" not in res.stdout:
        return f"exit {res.returncode}:\n{(res.stdout + res.stderr)[-3000:]}"
    return None


@pytest.fixture(autouse=True)
def _require_cuda_backend(_smoke):
    reason = _cuda_ready()
    if reason:
        # On a GPU machine the extension must have been built: a missing build is a failure, not a skip.
        pytest.fail(f"backend 'cuda' is unavailable on a GPU machine: {reason}")
    if _smoke:
        pytest.fail(f"the CUDA kernels crashed in a child process; not running them here: {_smoke}")


DTYPES = [torch.float16, torch.bfloat16]

# (B, Sq, Sk, Hq, Hkv, D): the Triton tests' awkward shapes, plus larger ones.
SHAPES = TRITON_SHAPES + [
    (2, 300, 700, 8, 2, 128),  # several tiles both ways, GQA 4
    (1, 200, 130, 2, 1, 96),
    (1, 129, 129, 2, 2, 32),
]


def cuda_fn(causal, scale=None, mask=None, backend="cuda"):
    return lambda q, k, v: fastattn.attention(q, k, v, causal=causal, scale=scale, key_padding_mask=mask,
                                              return_lse=True, backend=backend)


def assert_ok(results, what):
    bad = [str(r) for r in results if not r.ok]
    assert not bad, f"{what}: " + "; ".join(bad)


def check(q, k, v, causal, gen, mask=None, lse_grad=False, scale=None):
    results = testing.check_against_reference(cuda_fn(causal, scale, mask), q, k, v, causal=causal, scale=scale,
                                              key_padding_mask=mask, lse_grad=lse_grad, generator=gen)
    assert_ok(results, f"q{tuple(q.shape)} k{tuple(k.shape)} causal={causal} mask={mask is not None}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, causal, dtype, gen):
    b, sq, sk, hq, hkv, d = shape
    q, k, v = testing.random_qkv(b, sq, sk, hq, hkv, d, dtype=dtype, device=DEVICE, generator=gen)
    check(q, k, v, causal, gen)


def _grads(fn, q, k, v, dout):
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = fn(*xs)
    out.backward(dout)
    return [out, lse] + [x.grad for x in xs]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 17, 97, 4, 2, 64), (1, 257, 200, 2, 1, 128), (1, 130, 130, 2, 2, 80)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_triton(shape, causal, dtype, gen):
    """cuda's error against float64 is at most twice Triton's (+ the floor), tensor by tensor."""
    b, sq, sk, hq, hkv, d = shape
    q, k, v = testing.random_qkv(b, sq, sk, hq, hkv, d, dtype=dtype, device=DEVICE, generator=gen)
    dout = torch.randn(q.shape, generator=gen).to(device=DEVICE, dtype=dtype)
    ref = _grads(lambda a, b_, c: fastattn.reference.attention(a, b_, c, causal=causal, return_lse=True),
                 q.double(), k.double(), v.double(), dout.double())
    cu = _grads(cuda_fn(causal), q, k, v, dout)
    tr = _grads(cuda_fn(causal, backend="triton"), q, k, v, dout)
    grad_scale = testing.magnitude(*ref[2:])
    results = [testing.compare(f"{n} vs triton", c, t, r, f, None if n in ("out", "lse") else grad_scale)
               for n, c, t, r, f in zip(("out", "lse", "dq", "dk", "dv"), cu, tr, ref,
                                        (testing.OUT_FACTOR,) * 2 + (testing.GRAD_FACTOR,) * 3)]
    assert_ok(results, f"shape {shape} causal={causal}")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(causal, dtype, gen):
    # (B, H, S, D) storage seen as (B, S, H, D): used in place, no copy.
    q, k, v = testing.random_qkv(2, 97, 60, 4, 2, 64, dtype=dtype, device=DEVICE, layout="bhsd", generator=gen)
    from fastattn.launchers.cuda_attention import prepare

    assert not q.is_contiguous() and prepare(q) is q
    check(q, k, v, causal, gen)


def test_misaligned_and_last_dim_strided_inputs_are_copied(gen):
    from fastattn.launchers.cuda_attention import prepare

    q, k, v = testing.random_qkv(1, 33, 40, 2, 2, 64, dtype=torch.float16, device=DEVICE, generator=gen)
    flat = torch.empty(q.numel() + 1, dtype=q.dtype, device=DEVICE)
    q_off = flat[1:].view(q.shape).copy_(q)  # data_ptr 2 bytes past an aligned one
    assert prepare(q_off) is not q_off
    k_t = k.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert k_t.stride(-1) != 1
    check(q_off, k_t, v, True, gen)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(4, 70, 150, 4, 2, 64), (4, 1, 257, 2, 1, 128), (4, 200, 65, 2, 2, 128),
                                   (4, 33, 140, 2, 1, 80), (4, 90, 90, 3, 3, 40)],
                         ids=lambda s: "x".join(map(str, s)))
def test_key_padding_mask(shape, causal, dtype, gen):
    b, sq, sk, hq, hkv, d = shape
    q, k, v = testing.random_qkv(b, sq, sk, hq, hkv, d, dtype=dtype, device=DEVICE, generator=gen)
    mask = torch.rand(b, sk, generator=gen) < 0.7
    mask[0] = False                # a batch element with no real key at all
    mask[1, : sk // 2] = False     # left padding (skipped tiles)
    mask[2, sk // 3:] = False      # right padding
    mask[1:, -1] = mask[2, 0] = True  # every other element keeps real keys (incl. the last, for causal)
    assert mask[1:].any(dim=1).all()
    check(q, k, v, causal, gen, mask=mask.to(DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,causal", [((1, 50, 20, 4, 2, 64), True), ((2, 30, 70, 2, 1, 128), False)])
def test_gradient_through_lse(shape, causal, dtype, gen):
    b, sq, sk, hq, hkv, d = shape
    q, k, v = testing.random_qkv(b, sq, sk, hq, hkv, d, dtype=dtype, device=DEVICE, generator=gen)
    check(q, k, v, causal, gen, lse_grad=True)


def test_custom_scale(gen):
    q, k, v = testing.random_qkv(1, 40, 90, 2, 2, 64, dtype=torch.float16, device=DEVICE, generator=gen)
    check(q, k, v, True, gen, scale=0.3)


def test_rows_without_keys_are_zero_with_zero_grads(gen):
    q, k, v = testing.random_qkv(1, 80, 20, 2, 2, 64, dtype=torch.float16, device=DEVICE, generator=gen,
                                 requires_grad=True)
    out, lse = fastattn.attention(q, k, v, causal=True, return_lse=True, backend="cuda")
    out.backward(torch.randn(out.shape, generator=gen).to(out))  # non-zero dO on the empty rows too
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert (out[:, :60] == 0).all() and (lse[:, :, :60] == float("-inf")).all()
    assert (q.grad[:, :60] == 0).all()
    assert torch.isfinite(lse[:, :, 60:]).all() and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    assert (k.grad.abs().sum() > 0) and (v.grad.abs().sum() > 0)  # the rows that see keys still count


def test_empty_key_sequence(gen):
    q, k, v = testing.random_qkv(2, 5, 0, 2, 2, 64, dtype=torch.float16, device=DEVICE, generator=gen,
                                 requires_grad=True)
    out, lse = fastattn.attention(q, k, v, return_lse=True, backend="cuda")
    out.sum().backward()
    assert (out == 0).all() and (lse == float("-inf")).all() and (q.grad == 0).all()


def test_backward_is_deterministic(gen):
    q, k, v = testing.random_qkv(1, 300, 300, 8, 1, 128, dtype=torch.bfloat16, device=DEVICE, generator=gen)
    dout = torch.randn(q.shape, generator=gen).to(device=DEVICE, dtype=q.dtype)
    a = _grads(cuda_fn(True), q, k, v, dout)
    b = _grads(cuda_fn(True), q, k, v, dout)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_unsupported_calls_are_refused_not_run(gen):
    for d in (48, 160, 256):
        q, k, v = testing.random_qkv(1, 8, 8, 2, 2, d, dtype=torch.float16, device=DEVICE, generator=gen)
        with pytest.raises(ValueError, match=f"head dim {d}"):
            fastattn.attention(q, k, v, backend="cuda")
    q, k, v = testing.random_qkv(1, 8, 8, 2, 2, 64, dtype=torch.float32, device=DEVICE, generator=gen)
    with pytest.raises(ValueError, match="dtype"):
        fastattn.attention(q, k, v, backend="cuda")


def test_opcheck(gen):
    q, k, v = testing.random_qkv(1, 37, 70, 4, 2, 64, dtype=torch.float16, device=DEVICE, generator=gen,
                                 requires_grad=True)
    mask = torch.rand(1, 70, generator=gen).to(DEVICE) < 0.8
    torch.library.opcheck(torch.ops.fastattn.cuda_attn_fwd.default, (q, k, v, None, None, True, 0.2))
    torch.library.opcheck(torch.ops.fastattn.cuda_attn_fwd.default, (q, k, v, mask, key_bounds(mask), False, 0.2))
    q, k, v = q.detach(), k.detach(), v.detach()
    out, lse = torch.ops.fastattn.cuda_attn_fwd(q, k, v, None, None, True, 0.2)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.fastattn.cuda_attn_bwd.default,
                          (dout, q, k, v, out, lse, None, None, None, True, 0.2))


def test_compile_fullgraph_matches_eager(gen):
    q, k, v = testing.random_qkv(2, 40, 50, 4, 2, 128, dtype=torch.bfloat16, device=DEVICE, generator=gen,
                                 requires_grad=True)

    def f(a, b, c):
        return fastattn.attention(a, b, c, causal=True, backend="cuda").float().square().sum()

    eager = torch.autograd.grad(f(q, k, v), (q, k, v))
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v), (q, k, v))
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)


if __name__ == "__main__":  # the smoke run alone, once per GPU check (pytest -n N would run it per worker)
    exec(SMOKE)
