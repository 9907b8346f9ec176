"""The cuda backend's wiring, checked without a GPU: availability and its reasons, per-call refusals,
"auto" routing, the launcher's input preparation, setup.py's build decision, and (when a developer
built fastattn._C here) the binding's argument checks."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HAS_CUDA

import fastattn
from fastattn import backends, testing
from fastattn.launchers import cuda_attention as launch
from fastattn.validation import validate_qkv

ROOT = Path(__file__).resolve().parent.parent


def call_for(q, k, v, causal=False, mask=None, **kw):
    return backends.AttentionCall(q, k, v, validate_qkv(q, k, v), causal, 0.125, mask, True, **kw)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-machine answer")
def test_unavailable_on_cpu_with_a_clear_reason(gen):
    st = fastattn.available_backends()["cuda"]
    assert not st.available
    assert ("not built" in st.reason and "FASTATTN_BUILD_CUDA" in st.reason) or "no CUDA GPU" in st.reason
    q, k, v = testing.random_qkv(1, 8, 8, 2, 2, 64, dtype=torch.float16, generator=gen)
    with pytest.raises(ValueError, match="backend='cuda' cannot run this call"):
        fastattn.attention(q, k, v, backend="cuda")


def test_unsupported_reasons():
    def meta(d, dtype=torch.float16, sq=8, sk=8):
        q = torch.empty(1, sq, 2, d, dtype=dtype, device="meta")
        k = torch.empty(1, sk, 1, d, dtype=dtype, device="meta")
        return q, k, k

    def why(call, kind="attention"):
        return backends.cannot_run("cuda", kind, call)

    assert "head dim 48" in why(call_for(*meta(48)))
    assert "head dim 256" in why(call_for(*meta(256)))
    assert "head dim" not in why(call_for(*meta(80)))  # only "CUDA tensors"
    assert "dtype torch.float32" in why(call_for(*meta(64, torch.float32)))
    assert "CUDA tensors" in why(call_for(*meta(128)))
    qp = torch.empty(10, 2, 64, dtype=torch.float16, device="meta")
    kp = torch.empty(12, 1, 64, dtype=torch.float16, device="meta")
    cu = torch.tensor([0, 10], dtype=torch.int32)
    varlen = backends.AttentionCall(qp, kp, kp, validate_qkv(qp[None], kp[None], kp[None]), False, 0.1, None,
                                    False, cu, cu, 10, 12)
    assert "attention_varlen" in why(varlen, "varlen")


def test_auto_never_routes_to_cuda_yet():
    # Not until GPU measurements show the CUDA kernels faster (see backends.AUTO): for every kind, ring included.
    assert "cuda" not in backends.auto_order(torch.device("cuda"))
    assert "cuda" not in backends.auto_order(torch.device("cpu"))


def test_prepare_keeps_aligned_views_and_copies_the_rest():
    x = torch.randn(2, 4, 8, 64, dtype=torch.float16).transpose(1, 2)  # (B, H, S, D) seen as (B, S, H, D)
    assert launch.prepare(x) is x
    flat = torch.randn(2 * 8 * 4 * 64 + 1, dtype=torch.float16)
    off = flat[1:].view(2, 8, 4, 64)  # 2 bytes past an aligned pointer
    y = launch.prepare(off)
    assert y is not off and y.data_ptr() % 16 == 0 and torch.equal(y, off)
    strided = torch.randn(2, 8, 4, 128, dtype=torch.float16)[..., ::2]  # last dim not contiguous
    assert launch.prepare(strided).stride(-1) == 1
    odd_heads = torch.randn(1, 8, 3, 68, dtype=torch.float16)[..., :64]  # row stride 68*3: not 16-byte
    assert launch.prepare(odd_heads) is not odd_heads
    expanded = torch.ones(1, 1, 1, 1, dtype=torch.float16).expand(2, 8, 4, 64)  # autograd's sum() cotangent
    assert launch.prepare(expanded).stride(-1) == 1


def test_key_bounds_are_the_shared_ones():
    """The CUDA launcher's key bounds are the Triton kernels' ([first real key, last + 1]; [Sk, 0]
    for a row without one, which the CUDA kernels, like the Triton ones, read as an empty range) and
    the torch version's, on every kind of row."""
    from conftest import DEVICE

    from fastattn.launchers.key_bounds import key_bounds_torch

    mask = torch.tensor([[0, 1, 1, 0, 1, 0], [0] * 6, [1] * 6, [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    want = torch.tensor([[1, 5], [6, 0], [0, 6], [5, 6]], dtype=torch.int32)
    assert torch.equal(launch.key_bounds(mask.to(DEVICE)).cpu(), want)
    assert torch.equal(key_bounds_torch(mask), want)


# ---------------------------------------------------------------- setup.py
def _load_setup():
    spec = importlib.util.spec_from_file_location("fastattn_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # not __main__: setup() is not called
    return mod


def test_setup_build_mode():
    s = _load_setup()
    yes, no = (lambda: True), (lambda: False)
    assert s.build_mode({}, gpu=no) == "skip"
    assert s.build_mode({}, gpu=yes) == "optional"
    assert s.build_mode({"FASTATTN_BUILD_CUDA": "auto"}, gpu=yes) == "optional"
    assert s.build_mode({"FASTATTN_BUILD_CUDA": "1"}, gpu=no) == "required"
    assert s.build_mode({"FASTATTN_BUILD_CUDA": "0"}, gpu=yes) == "skip"
    with pytest.raises(SystemExit, match="FASTATTN_BUILD_CUDA"):
        s.build_mode({"FASTATTN_BUILD_CUDA": "maybe"}, gpu=no)


def test_setup_installs_every_package():
    """A wheel holds what PACKAGES names: every folder of fastattn/ with an __init__.py (a list by hand
    left fastattn.distributed out, so a non-editable install could not import the models)."""
    s = _load_setup()
    pkgs = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fastattn").rglob("__init__.py")}
    assert pkgs <= set(s.PACKAGES) and "fastattn.distributed" in pkgs and "fastattn.kernels" in s.PACKAGES


def test_setup_gencode_flags():
    s = _load_setup()
    flags = " ".join(s.gencode_flags("80;90a"))
    assert "arch=compute_80,code=sm_80" in flags and "arch=compute_90a,code=sm_90a" in flags
    assert "arch=compute_80,code=compute_80" in flags  # PTX for newer GPUs
    # Arch-specific PTX (compute_90a) runs on sm_90 only: the PTX drops the suffix.
    assert s.gencode_flags("90a")[-1] == "arch=compute_90,code=compute_90"
    assert s.CU_SOURCES and all((ROOT / "csrc" / n).exists() for n in s.CU_SOURCES)


def test_setup_skips_fast_without_torch_when_no_gpu():
    """CI installs with build isolation on a CPU machine: setup.py must decide without torch or nvcc."""
    code = (
        "import sys, importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('s', {str(ROOT / 'setup.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert m.extensions() == []\n"
        "assert 'torch' not in sys.modules, 'setup.py imported torch'\n"
        "print('skipped-ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FASTATTN_BUILD_CUDA"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU visible, whatever the machine
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0 and "skipped-ok" in res.stdout, res.stderr
    assert "not building fastattn._C" in res.stderr


# ---------------------------------------------------------------- the binding (when built here)
@pytest.mark.skipif(launch._C is None, reason="fastattn._C not built on this machine")
def test_binding_checks_arguments():
    C = launch._C
    assert tuple(C.HEAD_DIMS) == launch.HEAD_DIMS == (32, 40, 64, 80, 96, 128)
    sizes = [1, 1, 1, 1, 1, 64]
    with pytest.raises(ValueError, match="strides"):
        C.fwd(0, 0, 0, 0, 0, 0, 0, 0, [0] * 14, sizes, 1.0, False, 0)
    with pytest.raises(ValueError, match="head dim 48"):
        C.fwd(0, 0, 0, 0, 0, 0, 0, 0, [0] * 15, [1, 1, 1, 1, 1, 48], 1.0, False, 0)
    with pytest.raises(ValueError, match="multiple"):
        C.bwd(1, *([0] * 13), 0, [0] * 26, [1, 1, 1, 3, 2, 128], 1.0, False, 0)
    with pytest.raises(ValueError, match="dtype"):
        C.fwd(5, 0, 0, 0, 0, 0, 0, 0, [0] * 15, sizes, 1.0, False, 0)
    if not HAS_CUDA:  # the launch itself reports the CUDA error as a RuntimeError
        with pytest.raises(RuntimeError, match="fastattn._C.fwd"):
            C.fwd(0, 0, 0, 0, 0, 0, 0, 0, [0] * 15, sizes, 1.0, False, 0)


def test_launcher_refuses_cpu_tensors_by_name(monkeypatch):
    """The ops can be called without the API's checks: CPU tensors get an error naming q, not
    pybind11's list of the binding's signatures."""
    monkeypatch.setattr(launch, "_C", object())  # as if built
    q = torch.zeros(1, 4, 2, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match="CUDA tensors, got q on cpu"):
        launch.forward(q, q, q, None, None, False, 1.0)
    with pytest.raises(ValueError, match="CUDA tensors, got q on cpu"):
        launch.backward(q, q, q, q, q, torch.zeros(1, 2, 4), None, None, None, False, 1.0)
