"""fastattn as PyTorch's flash-attention impl (fastattn/integrations/torch_flash.py): registration
with torch.nn.attention, the aten ops through the dispatcher on CPU (torch's varlen_attn, the dense
_flash_attention_forward, varlen_attn_out) and the SDPA wrappers called directly, each against the
float64 reference under the tolerance rule; every refusal; on a GPU, SDPA / varlen_attn /
torch.compile / CUDA graphs dispatching into fastattn and matching aten's own kernel."""

import inspect
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import DEVICE

import fastattn
from fastattn import testing
from fastattn.integrations import torch_flash

pytestmark = pytest.mark.skipif(torch_flash.hook_missing() is not None, reason=str(torch_flash.hook_missing()))

if torch_flash.hook_missing() is None:
    from torch.nn.attention import (
        activate_flash_attention_impl,
        current_flash_attention_impl,
        list_flash_attention_impls,
        restore_flash_attention_impl,
    )
    from torch.nn.attention.varlen import AuxRequest, varlen_attn

    varlen_attn_out = getattr(torch.nn.attention.varlen, "varlen_attn_out", None)  # torch 2.12+
    VARLEN_KEYWORDS = set(inspect.signature(varlen_attn).parameters)


def torch_varlen_attn(*args, **kw):
    """torch's varlen_attn with what this torch takes: enable_gqa (2.12+) is dropped where it does not
    exist (2.11's packed kernel takes grouped heads as they come); a test needing seqused_k or
    block_table (2.12+) skips."""
    if "enable_gqa" not in VARLEN_KEYWORDS:
        kw.pop("enable_gqa", None)
    missing = sorted(set(kw) - VARLEN_KEYWORDS)
    if missing:
        pytest.skip(f"torch {torch.__version__}'s varlen_attn has no {missing}")
    return varlen_attn(*args, **kw)


def aten_takes(argument: str) -> bool:
    """Whether this torch's aten::_flash_attention_forward has the argument (block_table: 2.12+)."""
    return any(a.name == argument for a in torch.ops.aten._flash_attention_forward.default._schema.arguments)


@pytest.fixture
def fastattn_active():
    activate_flash_attention_impl("fastattn")
    yield
    restore_flash_attention_impl()


@pytest.fixture(params=["kernels", "reference"])
def engine(request, monkeypatch):
    """On CPU the ops run the Triton kernels through the interpreter, or, without it, the reference."""
    if request.param == "reference":
        monkeypatch.setattr(torch_flash, "_backend", lambda x: "reference")
    elif DEVICE == "cpu" and not torch_flash.triton_backend.interpreter():
        pytest.skip("the Triton interpreter is off")
    return request.param


def assert_ok(results, what):
    bad = [str(r) for r in results if not r.ok]
    assert not bad, f"{what}: " + "; ".join(bad)


def fastattn_lse(lse):
    """aten's lse (+inf for a row without keys, FlashAttention 2's) -> fastattn's (-inf)."""
    return lse.masked_fill(lse == math.inf, -math.inf)


def packed(lengths_q, lengths_k, hq, hkv, d, dtype, gen):
    cu = [torch.tensor([0] + lens).cumsum(0).to(DEVICE, torch.int32) for lens in (lengths_q, lengths_k)]
    q = torch.randn(sum(lengths_q), hq, d, generator=gen).to(DEVICE, dtype)
    k, v = (torch.randn(sum(lengths_k), hkv, d, generator=gen).to(DEVICE, dtype) for _ in range(2))
    return q, k, v, cu[0], cu[1], max(lengths_q), max(lengths_k)


# ---------------------------------------------------------------- registration


def test_registered_at_import_never_activated():
    assert "fastattn" in list_flash_attention_impls()
    assert current_flash_attention_impl() != "fastattn"
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("aten::_flash_attention_forward", "CPU")


def test_activate_and_restore_put_the_kernels_in_and_out():
    ops = [op for op in torch_flash.CPU_OPS if op in torch_flash.present_ops()]
    assert len(ops) >= 2  # every torch with the hook has the varlen forward and backward
    activate_flash_attention_impl("fastattn")
    try:
        assert current_flash_attention_impl() == "fastattn" and torch_flash.active()
        assert all(torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", "CPU") for op in ops)
        activate_flash_attention_impl("fastattn")  # again: torch restores first, then registers anew
        assert current_flash_attention_impl() == "fastattn"
    finally:
        restore_flash_attention_impl()
    assert current_flash_attention_impl() is None and not torch_flash.active()
    assert not any(torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", "CPU") for op in ops)
    with pytest.raises(RuntimeError):  # aten's own (no CPU kernel) is back
        q = torch.randn(4, 2, 16)
        cu = torch.tensor([0, 4], dtype=torch.int32)
        varlen_attn(q, q, q, cu, cu, 4, 4)


def test_an_unknown_schema_argument_refuses_to_register(monkeypatch):
    schema = torch_flash.SCHEMAS["_flash_attention_backward"]
    monkeypatch.setitem(torch_flash.SCHEMAS, "_flash_attention_backward",
                        schema.replace("SymInt? window_size_left=None", "SymInt? left_window=None"))
    assert "window_size_left" in torch_flash.schema_mismatch("_flash_attention_backward")
    with pytest.raises(RuntimeError, match="fastattn cannot replace PyTorch's flash attention.*window_size_left"):
        activate_flash_attention_impl("fastattn")
    assert current_flash_attention_impl() is None
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("aten::_flash_attention_forward", "CPU")
    assert all(torch_flash.schema_mismatch(n) is None for n in torch_flash.present_ops()
               if n != "_flash_attention_backward")


def test_without_the_hook_nothing_is_registered_and_check_says_so(monkeypatch):
    monkeypatch.delattr(torch.nn.attention, "register_flash_attention_impl")
    assert "register_flash_attention_impl" in torch_flash.hook_missing()
    assert torch_flash.register() is False
    from fastattn import selfcheck

    assert any("register_flash_attention_impl" in line for line in selfcheck._integrations())


def test_check_command_reports_the_hook():
    from fastattn import selfcheck

    assert any('activate_flash_attention_impl("fastattn")' in line for line in selfcheck._integrations())


def test_env_var_activates_at_import():
    code = ("import fastattn, torch.nn.attention as a; print(a.current_flash_attention_impl())")
    root = Path(fastattn.__file__).resolve().parents[1]
    env = {"FASTATTN_ACTIVATE_SDPA": "1", "PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env, check=True)
    assert out.stdout.strip() == "fastattn"


# ---------------------------------------------------------------- the ops against the reference

VARLEN_CASES = [  # lengths_q, lengths_k, Hq, Hkv, D, window_size (varlen_attn's: (-1, 0) is causal)
    ([5, 0, 33, 17], [9, 4, 33, 40], 4, 2, 32, (-1, -1)),   # an empty query sequence, Sq != Sk both ways
    ([5, 0, 33, 17], [9, 4, 33, 40], 4, 2, 32, (-1, 0)),
    ([7, 20], [12, 20], 2, 1, 40, (3, 0)),                  # a causal window, MQA
    ([9, 16], [9, 16], 2, 2, 16, (2, 5)),                   # a two-sided window
    ([3, 12], [0, 12], 2, 2, 16, (-1, -1)),                 # a sequence with no keys
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: f"{c[0]}-{c[1]}-w{c[5]}")
def test_varlen_attn_runs_fastattn(case, dtype, engine, fastattn_active, gen):
    lengths_q, lengths_k, hq, hkv, d, window = case
    q, k, v, cu_q, cu_k, mq, mk = packed(lengths_q, lengths_k, hq, hkv, d, dtype, gen)

    def torch_varlen(a, b, c):
        out, lse = torch_varlen_attn(a, b, c, cu_q, cu_k, mq, mk, return_aux=AuxRequest(lse=True),
                                     window_size=window, enable_gqa=hq != hkv)
        assert lse.shape == (hq, q.shape[0]) and lse.dtype == torch.float32
        return out, fastattn_lse(lse)

    def ref(a, b, c):
        return fastattn.attention_varlen(a, b, c, cu_q, cu_k, mq, mk, causal=window == (-1, 0),
                                         window=None if window in ((-1, -1), (-1, 0)) else window, return_lse=True,
                                         backend="reference")

    assert_ok(testing.check_against_reference(torch_varlen, q, k, v, generator=gen, ref_fn=ref),
              f"varlen_attn {lengths_q}/{lengths_k} window {window}")


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (4, 1)), (True, (3, -1))])
def test_dense_flash_attention_forward_op(causal, window, engine, fastattn_active, gen):
    """aten::_flash_attention_forward on (B, S, H, D) through the dispatcher (and aten's autograd
    into _flash_attention_backward); causal is bottom-right (Sq > Sk: leading rows see no key)."""
    q, k, v = testing.random_qkv(2, 13, 9, 4, 2, 24, device=DEVICE, generator=gen)

    def aten(a, b, c):
        out, lse, rng, unused, debug = torch.ops.aten._flash_attention_forward(
            a, b, c, None, None, 13, 9, 0.0, causal, False, scale=0.3, window_size_left=window[0],
            window_size_right=window[1])
        assert rng.shape == (2,) and rng.dtype == torch.uint64 and unused.shape == () and debug.numel() == 0
        return out, fastattn_lse(lse)

    def ref(a, b, c):
        return fastattn.attention(a, b, c, causal=causal, scale=0.3, window=window, return_lse=True,
                                  backend="reference")

    assert_ok(testing.check_against_reference(aten, q, k, v, generator=gen, ref_fn=ref), f"dense {causal} {window}")


@pytest.mark.parametrize("window", [(-1, 9), (12, 10)])
def test_a_window_side_of_sk_or_more_is_unbounded_forward_and_backward(window, engine, fastattn_active, gen):
    """aten's kernels (FlashAttention 2) read a window side >= Sk as -1, in the forward and the
    backward; the backward used the side as given, which with Sq > 2 Sk hid keys from the first
    rows there only (gradients of another attention than the forward's)."""
    q, k, v = testing.random_qkv(1, 30, 9, 2, 2, 16, device=DEVICE, generator=gen)

    def aten(a, b, c):
        out, lse, *_ = torch.ops.aten._flash_attention_forward(a, b, c, None, None, 30, 9, 0.0, False, False,
                                                               window_size_left=window[0], window_size_right=window[1])
        return out, fastattn_lse(lse)

    def ref(a, b, c):
        return fastattn.attention(a, b, c, return_lse=True, backend="reference")

    assert_ok(testing.check_against_reference(aten, q, k, v, generator=gen, ref_fn=ref), f"window {window}")


def test_rows_without_keys_get_flash_attention_2s_lse(fastattn_active, gen):
    """A row that sees no key: output 0 and lse +inf (FlashAttention 2's, what aten's kernel gives),
    and zero gradients."""
    q, k, v = testing.random_qkv(1, 6, 2, 2, 2, 16, device=DEVICE, generator=gen, requires_grad=True)
    out, lse, *_ = torch.ops.aten._flash_attention_forward(q, k, v, None, None, 6, 2, 0.0, True, False)
    assert torch.isinf(lse[:, :, :4]).all() and (lse[:, :, :4] > 0).all() and torch.isfinite(lse[:, :, 4:]).all()
    assert (out[:, :4] == 0).all()
    out.sum().backward()
    assert (q.grad[:, :4] == 0).all() and torch.isfinite(k.grad).all()


def test_sdpa_wrappers_called_directly(engine, gen):
    """The (B, H, S, D) SDPA ops' implementations (on CUDA the dispatcher calls them; CPU SDPA has an
    op of its own): outputs, the aux values, and the backward from the forward's out and lse."""
    b, h, hkv, sq, sk, d = 2, 4, 2, 11, 11, 32
    q, k, v = (x.transpose(1, 2) for x in testing.random_qkv(b, sq, sk, h, hkv, d, device=DEVICE, generator=gen))
    out, lse, cu_q, cu_k, max_q, max_k, rng, unused, debug = torch_flash.sdpa_flash_forward(q, k, v, 0.0, True,
                                                                                         scale=0.2)
    assert (cu_q, cu_k, max_q, max_k) == (None, None, sq, sk) and out.shape == q.shape and lse.shape == (b, h, sq)
    assert rng.dtype == unused.dtype == torch.uint64 and debug.numel() == 0
    dout = torch.randn(out.shape, generator=gen).to(DEVICE)
    dq, dk, dv = torch_flash.sdpa_flash_backward(dout, q, k, v, out, lse, None, None, sq, sk, 0.0, True, rng, unused,
                                                 scale=0.2)

    def reference(dtype):  # (out, lse, dq, dk, dv) of fastattn.reference in dtype, in the ops' (B, H, S, D) layout
        args = [x.transpose(1, 2).to(dtype).requires_grad_() for x in (q, k, v)]
        o, lse_ = fastattn.attention(*args, causal=True, scale=0.2, return_lse=True, backend="reference")
        o.backward(dout.transpose(1, 2).to(dtype))
        return [o.transpose(1, 2), lse_, *(a.grad.transpose(1, 2) for a in args)]

    ref64, naive = reference(torch.float64), reference(q.dtype)
    grad_scale = testing.magnitude(*ref64[2:])
    results = [testing.compare(name, got, lowprec, want, testing.OUT_FACTOR if name in ("out", "lse") else
                               testing.GRAD_FACTOR, None if name in ("out", "lse") else grad_scale)
               for name, got, lowprec, want in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), naive,
                                                   ref64)]
    assert all(got.shape == want.shape for got, want in zip((out, lse, dq, dk, dv), ref64))
    assert_ok(results, "SDPA wrappers")


def test_outputs_and_grads_are_laid_out_as_aten_allocates_them(engine, fastattn_active, gen):
    """aten's flash ops allocate out and dq/dk/dv with empty_like(query/key/value) (FlashAttention 2's
    convention; their fake kernels say so and torch.compile asserts it at run time: the H200 run of
    2026-12-04 failed there). SDPA's query is (B, H, S, D)-contiguous; the kernels write (B, S, H, D)."""
    b, h, hkv, s, d = 2, 4, 2, 13, 16
    bshd = testing.random_qkv(b, s, s, h, hkv, d, device=DEVICE, generator=gen)
    q, k, v = (x.transpose(1, 2).contiguous() for x in bshd)  # (B, H, S, D) memory, as SDPA users hold them
    dout = torch.randn(b, h, s, d, generator=gen).to(DEVICE)
    results = {}
    for layout, (a, b_, c) in (("bhsd", (q, k, v)), ("bshd", (x.transpose(1, 2) for x in bshd))):
        out, lse, *_, rng, unused, _ = torch_flash.sdpa_flash_forward(a, b_, c, 0.0, True)
        grads = torch_flash.sdpa_flash_backward(dout, a, b_, c, out, lse, None, None, s, s, 0.0, True, rng, unused)
        assert [t.stride() for t in (out, *grads)] == [t.stride() for t in (a, a, b_, c)], layout
        results[layout] = (out, *grads)
    for x, y in zip(results["bhsd"], results["bshd"]):  # the layout changes nothing else
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    # The dense aten op through the dispatcher: (B, S, H, D) views of (B, H, S, D) memory.
    qv, kv, vv = (x.transpose(1, 2) for x in (q, k, v))
    out = torch.ops.aten._flash_attention_forward(qv, kv, vv, None, None, s, s, 0.0, True, False)[0]
    assert out.stride() == qv.stride()
    torch.testing.assert_close(out, results["bshd"][0].transpose(1, 2), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(varlen_attn_out is None if torch_flash.hook_missing() is None else False,
                    reason=f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn_out")
def test_varlen_attn_out_writes_the_given_buffer(fastattn_active, gen):
    q, k, v, cu_q, cu_k, mq, mk = packed([4, 9], [6, 9], 2, 2, 16, torch.float32, gen)
    out = torch.full_like(q, float("nan"))
    result = varlen_attn_out(out, q, k, v, cu_q, cu_k, mq, mk, return_aux=AuxRequest(lse=True))
    ref, ref_lse = fastattn.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, return_lse=True, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result[1], ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("paged", [False, True])
def test_seqused_k_runs_the_decode_path(paged, fastattn_active, gen):
    """seqused_k: each sequence's first keys only, bottom-right causal over them (FlashAttention's
    seqlen_k); with block_table a paged cache and one query per sequence (varlen_attn's decode)."""
    b, hq, hkv, d, page = 3, 4, 2, 16, 8
    lens = torch.tensor([5, 17, 1], dtype=torch.int32, device=DEVICE)
    if paged:
        k_pages, v_pages = (torch.randn(10, page, hkv, d, generator=gen).to(DEVICE) for _ in range(2))
        table = torch.tensor([[3, 0, 9], [1, 2, 4], [8, 5, 6]], dtype=torch.int32, device=DEVICE)
        q = torch.randn(b, hq, d, generator=gen).to(DEVICE)
        cu_q = torch.arange(b + 1, dtype=torch.int32, device=DEVICE)
        out, lse = torch_varlen_attn(q, k_pages, v_pages, cu_q, None, 1, 3 * page, return_aux=AuxRequest(lse=True),
                                     window_size=(-1, 0), enable_gqa=True, seqused_k=lens, block_table=table)
        keys = [testing.cached_rows(k_pages, table, i, n) for i, n in enumerate(lens.tolist())]
        values = [testing.cached_rows(v_pages, table, i, n) for i, n in enumerate(lens.tolist())]
        q4, lse = q[:, None], lse.t()[:, :, None]  # (B, H, D) -> (B, 1, H, D); lse (H, B) -> (B, H, 1)
        out = out[:, None]
    else:
        q4 = torch.randn(b, 2, hq, d, generator=gen).to(DEVICE)
        k, v = (torch.randn(b, 20, hkv, d, generator=gen).to(DEVICE) for _ in range(2))
        out, lse, *_ = torch.ops.aten._flash_attention_forward(q4, k, v, None, None, 2, 20, 0.0, True, False,
                                                               seqused_k=lens)
        keys = [k[i, :n] for i, n in enumerate(lens.tolist())]
        values = [v[i, :n] for i, n in enumerate(lens.tolist())]
    for i in range(b):
        ref, ref_lse = fastattn.attention(q4[i:i + 1].double(), keys[i][None].double(), values[i][None].double(),
                                          causal=True, return_lse=True, backend="reference")
        torch.testing.assert_close(out[i:i + 1].double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fastattn_lse(lse[i:i + 1]).double(), ref_lse, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- refusals


def _dense(gen, **kw):
    q, k, v = testing.random_qkv(1, 4, 4, 2, 2, 16, device=DEVICE, generator=gen)
    args = dict(cum_seq_q=None, cum_seq_k=None, max_q=4, max_k=4, dropout_p=0.0, is_causal=False,
                return_debug_mask=False)
    args.update(kw)
    pos = [args.pop(n) for n in ("cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p", "is_causal",
                                 "return_debug_mask")]
    return lambda: torch.ops.aten._flash_attention_forward(q, k, v, *pos, **args)


REFUSALS = [
    (dict(dropout_p=0.1), RuntimeError, "dropout_p=0.1"),
    (dict(return_debug_mask=True), RuntimeError, "return_debug_mask"),
    (dict(window_size_left=-2), RuntimeError, "window_size must be"),
    (dict(block_table=torch.zeros(1, 1, dtype=torch.int32)), RuntimeError, "block_table without seqused_k"),
    (dict(cum_seq_q=torch.tensor([0, 4], dtype=torch.int32)), RuntimeError, "cum_seq_k=None"),
]


@pytest.mark.parametrize("change,error,match", REFUSALS, ids=[r[2] for r in REFUSALS])
def test_refusals_name_the_argument(change, error, match, fastattn_active, gen):
    if "block_table" in change and not aten_takes("block_table"):
        pytest.skip(f"torch {torch.__version__}'s aten::_flash_attention_forward has no block_table")
    change = {n: (x.to(DEVICE) if isinstance(x, torch.Tensor) else x) for n, x in change.items()}
    with pytest.raises(error, match=match):
        _dense(gen, **change)()


def test_inference_only_arguments_are_refused_only_when_a_gradient_is_wanted(fastattn_active, gen):
    """aten::_flash_attention_backward takes no alibi_slopes, seqused_k or block_table: with inputs that
    want a gradient (grad mode on) the forward refuses them by name (seqused_k ran, and its gradient
    came out over every key: silently wrong); under no_grad, or without such inputs, they run."""
    q, k, v = testing.random_qkv(1, 5, 5, 2, 2, 16, device=DEVICE, generator=gen)
    slopes = torch.tensor([0.5, 0.25], device=DEVICE)
    lens = torch.tensor([3], dtype=torch.int32, device=DEVICE)
    out = torch.ops.aten._flash_attention_forward(q, k, v, None, None, 5, 5, 0.0, False, False, alibi_slopes=slopes)[0]
    ref = fastattn.attention(q, k, v, alibi_slopes=slopes, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    q.requires_grad_()
    for kw, match in ((dict(alibi_slopes=slopes), "alibi_slopes with inputs that require grad"),
                      (dict(seqused_k=lens), "seqused_k / block_table with inputs that require grad")):
        with pytest.raises(RuntimeError, match=match):
            torch.ops.aten._flash_attention_forward(q, k, v, None, None, 5, 5, 0.0, False, False, **kw)
        with torch.no_grad():
            torch.ops.aten._flash_attention_forward(q, k, v, None, None, 5, 5, 0.0, False, False, **kw)
    with torch.no_grad():
        out = torch.ops.aten._flash_attention_forward(q, k, v, None, None, 5, 5, 0.0, False, False, seqused_k=lens)[0]
    torch.testing.assert_close(out, fastattn.attention(q, k[:, :3], v[:, :3], backend="reference"), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU's choice of engine")
def test_bfloat16_on_the_cpu_runs_on_the_reference(fastattn_active, gen):
    # The interpreter's bf16 dot is wrong, so the Triton backend refuses it; the impl takes the reference.
    q, k, v = (x.bfloat16().requires_grad_() for x in testing.random_qkv(1, 5, 5, 2, 2, 16, generator=gen))
    out = torch.ops.aten._flash_attention_forward(q, k, v, None, None, 5, 5, 0.0, True, False)[0]
    torch.testing.assert_close(out, fastattn.attention(q, k, v, causal=True, backend="reference"))
    out.float().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_packed_seqused_k_beyond_decode_is_not_implemented(fastattn_active, gen):
    q, k, v, cu_q, cu_k, mq, mk = packed([2, 3], [4, 4], 2, 2, 16, torch.float32, gen)
    lens = torch.tensor([3, 4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(NotImplementedError, match="packed keys and no block_table"):
        torch.ops.aten._flash_attention_forward(q[:2], k, v, cu_q.new_tensor([0, 1, 2]), cu_k, 1, mk, 0.0, False,
                                                False, seqused_k=lens)
    if not aten_takes("block_table"):
        return  # torch 2.11: no paged caches through this op
    table = torch.zeros(2, 1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(NotImplementedError, match="max_q=3"):
        torch.ops.aten._flash_attention_forward(q, k[None], v[None], cu_q, None, mq, mk, 0.0, False, False,
                                                seqused_k=lens, block_table=table)


def test_torch_backend_keeps_to_torchs_kernels_while_active():
    """While fastattn is torch's flash impl, SDPA's flash backend is fastattn: the "torch" backend and
    the benchmarks' SDPA-flash baseline must know (they would measure or call fastattn itself)."""
    from fastattn.backends import sdpa_backend

    assert not sdpa_backend.flash_is_fastattn()
    activate_flash_attention_impl("fastattn")
    try:
        assert sdpa_backend.flash_is_fastattn()
        sys.path.insert(0, str(Path(fastattn.__file__).resolve().parents[1]))
        from benchmarks import providers

        assert "fastattn" in providers.PROVIDERS["sdpa-flash"].unavailable()
    finally:
        restore_flash_attention_impl()


# ---------------------------------------------------------------- on a GPU: the real entry points


def _counting(monkeypatch):
    calls = {"n": 0}
    forward = torch_flash._forward

    def counted(*a, **kw):
        calls["n"] += 1
        return forward(*a, **kw)

    monkeypatch.setattr(torch_flash, "_forward", counted)
    return calls


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_flash_backend_dispatches_into_fastattn_and_matches_aten(causal, monkeypatch, gen):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(2, 8, 300, 64, generator=gen).to("cuda", torch.bfloat16).requires_grad_() for _ in range(3))
    dout = torch.randn(2, 8, 300, 64, generator=gen).to("cuda", torch.bfloat16)

    def run():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION], set_priority=True):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        return [out, *grads]

    aten = run()
    calls = _counting(monkeypatch)
    activate_flash_attention_impl("fastattn")
    try:
        ours = run()
        compiled = torch.compile(lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(
            a, b, c, is_causal=causal))
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION], set_priority=True):
            traced = compiled(q, k, v)
    finally:
        restore_flash_attention_impl()
    assert calls["n"] >= 2
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, aten):
        scale = b.float().abs().max().item()
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=2e-2 * scale, msg=name)
    torch.testing.assert_close(traced.float(), ours[0].float(), rtol=0, atol=1e-2)


@pytest.mark.gpu
def test_varlen_attn_on_cuda_matches_aten_and_captures_in_a_graph(monkeypatch, gen):
    q, k, v, cu_q, cu_k, mq, mk = packed([100, 3, 257], [90, 40, 257], 8, 2, 128, torch.bfloat16, gen)

    def run():
        return torch_varlen_attn(q, k, v, cu_q, cu_k, mq, mk, return_aux=AuxRequest(lse=True), window_size=(-1, 0),
                                 enable_gqa=True)

    aten_out, aten_lse = run()
    calls = _counting(monkeypatch)
    activate_flash_attention_impl("fastattn")
    try:
        out, lse = run()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out, _ = run()
        graph.replay()
        torch.cuda.synchronize()
    finally:
        restore_flash_attention_impl()
    assert calls["n"] >= 2
    torch.testing.assert_close(out.float(), aten_out.float(), rtol=0, atol=2e-2 * aten_out.float().abs().max().item())
    torch.testing.assert_close(lse, aten_lse, rtol=0, atol=1e-2)
    torch.testing.assert_close(static_out, out)


@pytest.mark.gpu
def test_transformers_llama_in_sdpa_mode_runs_fastattn_unchanged(monkeypatch, gen):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa").cuda().to(torch.bfloat16)
    ids = torch.randint(0, 64, (2, 96), generator=gen).cuda()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION], set_priority=True):
        before = model(input_ids=ids).logits
        calls = _counting(monkeypatch)
        activate_flash_attention_impl("fastattn")
        try:
            after = model(input_ids=ids).logits
        finally:
            restore_flash_attention_impl()
    assert calls["n"] == 2  # one per layer
    torch.testing.assert_close(after.float(), before.float(), rtol=0, atol=3e-2 * before.float().abs().max().item())



@pytest.mark.gpu
def test_the_drop_ins_dropout_fallback_keeps_to_torchs_kernels_while_active(monkeypatch, gen):
    """fastattn.scaled_dot_product_attention falls back to torch's SDPA for dropout; with fastattn as
    SDPA's flash impl, that call must not pick flash (fastattn refuses dropout)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(2, 4, 128, 64, generator=gen).to("cuda", torch.bfloat16) for _ in range(3))
    calls = _counting(monkeypatch)
    activate_flash_attention_impl("fastattn")
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
                         set_priority=True), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
    finally:
        restore_flash_attention_impl()
    assert calls["n"] == 0 and out.shape == q.shape and torch.isfinite(out.float()).all()


@pytest.mark.gpu
def test_the_drop_ins_fallback_keeps_to_the_callers_sdpa_kernel_while_active(monkeypatch, gen):
    """Under the caller's sdpa_kernel([MATH]) the dropout fallback runs math, not the cuDNN /
    efficient kernels own_kernels once put in its place; restricted to flash (fastattn) alone, a
    RuntimeError that names it. The caller's flags are theirs again after both."""
    from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends, sdpa_kernel

    from fastattn import api

    q, k, v = (torch.randn(2, 4, 128, 64, generator=gen).to("cuda", torch.bfloat16) for _ in range(3))
    seen = []

    def spy(*a, **kw):
        seen.append(set(_cur_sdpa_kernel_backends()))
        return torch.nn.functional.scaled_dot_product_attention(*a, **kw)
    monkeypatch.setattr(api, "F", type("F", (), {"scaled_dot_product_attention": staticmethod(spy)}))
    calls = _counting(monkeypatch)
    activate_flash_attention_impl("fastattn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
                out = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
                assert set(_cur_sdpa_kernel_backends()) == {SDPBackend.FLASH_ATTENTION, SDPBackend.MATH}
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                with pytest.raises(RuntimeError, match=r"allows only \[FLASH_ATTENTION\]"):
                    fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
                assert _cur_sdpa_kernel_backends() == [SDPBackend.FLASH_ATTENTION]
    finally:
        restore_flash_attention_impl()
    assert seen == [{SDPBackend.MATH}]
    assert calls["n"] == 0 and out.shape == q.shape and torch.isfinite(out.float()).all()
