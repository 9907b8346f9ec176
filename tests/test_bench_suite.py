"""The benchmark suite's own logic, on tiny sizes: case FLOPs and bytes, provider skipping with
reasons, the correctness gate (flagged, not ranked), ratios, reports, plot data, the CLI."""

import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import DEVICE  # noqa: E402

import fastattn  # noqa: E402
from benchmarks import cases, common, measure, plots, providers, report  # noqa: E402
from benchmarks.cases import Case  # noqa: E402
from benchmarks.providers import PROVIDERS, Provider  # noqa: E402
from fastattn import reference  # noqa: E402
from fastattn.flops import attention_flops  # noqa: E402

TINY = Case(1, 24, 24, 2, 2, 16, kind="self", causal=True, dtype="float32")
FAST = measure.Timing(warmup_ms=1, rep_ms=2)


def test_grids():
    from benchmarks import run

    std = cases.standard()
    assert len(std) == 2 * 3 * 2 * 6  # dtypes x head dims x causal x seq lens
    assert all(c.batch * c.seqlen_q == 16384 and c.heads_q * c.head_dim == 2048 for c in std)
    full = cases.full_gpu()
    assert set(cases.quick_gpu()) <= set(full) and len(set(full)) == len(full)
    assert {c.kind for c in full} == {"self", "cross", "gqa", "padded", "decode"}
    # Most wanted first: the D=128 bf16 rows lead, fp16 comes last.
    assert (full[0].head_dim, full[0].dtype) == (128, "bfloat16") and full[-1].dtype == "float16"
    assert all(c.scores_bytes() < 2**24 for c in cases.cpu_quick())
    # The quick grid (a short GPU stage) starts with the Hopper bar's 16k-token D=128 pair, Triton
    # and cuDNN first among the providers.
    assert {(c.seqlen_q, c.head_dim, c.causal) for c in cases.quick_gpu()[:2]} == {(16384, 128, False),
                                                                                  (16384, 128, True)}
    assert run.SETTINGS["quick"]["providers"][:2] == ["fastattn-triton", "sdpa-cudnn"]
    assert sorted(run.SETTINGS["quick"]["providers"]) == sorted(p for p in PROVIDERS if p != "flex")


def test_case_flops_and_bytes_use_the_one_formula():
    c = Case(2, 8, 32, 4, 2, 16, kind="cross", causal=True, dtype="bfloat16")
    for mode in ("fwd", "bwd", "fwd_bwd"):
        assert c.flops(mode) == attention_flops(2, 4, 8, 32, 16, causal=True, mode=mode)
    # Padded: each batch element's queries see its own number of real keys, from fill * Sk up.
    p = Case(3, 16, 16, 2, 2, 8, kind="padded", causal=False, dtype="float16", fill=0.5)
    assert p.key_lengths() == [8, 12, 16]
    assert p.flops("fwd") == sum(attention_flops(1, 2, 16, n, 8, causal=False) for n in (8, 12, 16))
    # Causal and padded: query i sees keys j <= i (aligned to all 16 positions) and j < n.
    pc = dataclasses.replace(p, causal=True)
    assert pc.flops("fwd") == 4 * 2 * 8 * sum(min(i + 1, n) for n in (8, 12, 16) for i in range(16))
    q, kv = 2 * 8 * 4 * 16, 2 * 32 * 2 * 16  # elements of q and of each of k, v
    assert c.bytes("fwd") == (2 * q + 2 * kv) * 2 and c.bytes("bwd") == (4 * q + 4 * kv) * 2
    with pytest.raises(ValueError, match="mode"):
        c.bytes("both")
    q_, k_, v_, mask = cases.make_inputs(p, DEVICE)
    assert mask.sum(dim=1).tolist() == [8, 12, 16] and q_.abs().sum() > 0


def _fake(name, role, fn_of):
    """A provider built from the reference: fn_of(ref_fn) -> fn(q, k, v)."""
    return Provider(name, role, name, lambda case, mask, device: fn_of(
        lambda q, k, v: reference.attention(q, k, v, causal=case.causal, key_padding_mask=mask)))


def _raises(case, mask, device):
    raise RuntimeError("no kernel for this shape\nsecond line")


FAKES = [
    _fake("fake-fastattn", "fastattn", lambda ref: ref),
    _fake("fake-right", "baseline", lambda ref: ref),
    _fake("fake-wrong-out", "baseline", lambda ref: (lambda q, k, v: 1.5 * ref(q, k, v))),
    # Right values, wrong dq: q - q.detach() is zero but has gradient 1.
    _fake("fake-wrong-grad", "baseline", lambda ref: (lambda q, k, v: ref(q, k, v) + 0.5 * (q - q.detach()))),
    Provider("fake-raises", "baseline", "raises", _raises),
    PROVIDERS["sdpa-math"],
]


@pytest.fixture(scope="module")
def rows():
    ceilings = {"matmul_tflops": 1.0, "matmul": "test", "copy_gbps": 1.0, "copy": "test"}
    return measure.run_case(TINY, FAKES, ("fwd", "bwd"), device=DEVICE, ceilings=ceilings, timing=FAST,
                            generator=torch.Generator(device=DEVICE).manual_seed(0))


def _row(rows, provider, mode):
    return next(r for r in rows if r.provider == provider and r.mode == mode)


def test_gate_flags_wrong_providers_and_they_are_not_ranked(rows):
    assert len(rows) == len(FAKES) * 2
    fast = _row(rows, "fake-fastattn", "fwd")
    assert fast.gate == "ok" and fast.ms > 0 and fast.tflops > 0 and fast.intensity > 0
    wrong = _row(rows, "fake-wrong-out", "fwd")
    assert wrong.gate.startswith("FAIL out") and wrong.ms is not None and not wrong.ranked
    assert _row(rows, "fake-wrong-grad", "fwd").gate == "ok"
    assert "dq" in _row(rows, "fake-wrong-grad", "bwd").gate and "dk" not in _row(rows, "fake-wrong-grad", "bwd").gate
    # Ratios: against every correct timed provider, never against a flagged one; only fastattn rows get them.
    assert set(fast.ratios) == {"fake-right", "fake-wrong-grad", "sdpa-math"}
    assert set(_row(rows, "fake-fastattn", "bwd").ratios) == {"fake-right", "sdpa-math"}
    assert _row(rows, "fake-right", "fwd").ratios == {}


def test_case_time_cap():
    rows = measure.run_case(TINY, FAKES[:2], ("fwd",), device=DEVICE, ceilings={},
                            timing=measure.Timing(1, 2, case_cap_s=0))
    assert [r.ms for r in rows] == [None, None] and all("time cap of 0 s" in r.skipped for r in rows)


def test_providers_that_cannot_run_say_why(rows):
    r = _row(rows, "fake-raises", "bwd")
    assert r.ms is None and r.skipped == "RuntimeError: no kernel for this shape"
    # Skips known before running: the decode cases (no decode kernel), machine-level unavailability.
    decode = Case(2, 1, 64, 2, 2, 16, kind="decode", causal=False, dtype="float16")
    dec = measure.run_case(decode, list(PROVIDERS.values()), ("fwd",), device=DEVICE, ceilings={}, timing=FAST)
    assert len(dec) == len(PROVIDERS) and all(r.skipped == cases.DECODE_SKIP_REASON for r in dec)
    status = fastattn.available_backends().get("cuda")
    reason = providers.why_not(PROVIDERS["fastattn-cuda"], TINY, DEVICE)
    assert (reason is None) == bool(status and status.available)
    if status is None:
        assert reason == "this fastattn has no 'cuda' backend"
    if not torch.cuda.is_available():
        assert "CUDA" in providers.why_not(PROVIDERS["sdpa-cudnn"], TINY, "cpu")
        bf16 = Case(1, 16, 16, 1, 1, 16, kind="self", causal=False, dtype="bfloat16")
        assert "11584" in providers.why_not(PROVIDERS["fastattn-triton"], bf16, "cpu")
        assert PROVIDERS["fastattn-triton"].timing_skip("cpu")
    big = Case(1, 16384, 16384, 16, 16, 128, kind="self", causal=False, dtype="bfloat16")
    assert "score matrix" in providers.why_not(PROVIDERS["naive"], big, "cuda")


def _m(provider, mode, seqlen, tflops, gate="ok", role="baseline", kind="self", ratios=None):
    c = Case(16384 // seqlen, seqlen, seqlen, 16, 16, 128, kind=kind, causal=False, dtype="bfloat16").as_dict()
    return {"case": c, "provider": provider, "mode": mode, "device_type": "cuda", "role": role,
            "ms": None if tflops is None else 1.0, "tflops": tflops, "pct_of_matmul": tflops and tflops / 8,
            "intensity": 100.0, "peak_mib": 12.0, "gate": gate, "skipped": "" if tflops else "why not",
            "ratios": ratios or {}}


def _doc(measurements, padding=()):
    env = {"device_type": "cuda", "device": "Test GPU", "torch": "t", "triton": "t", "cuda": "c", "python": "p",
           "git_commit": "abc", "time_utc": "now", "timer": "do_bench"}
    ceil = {"matmul_tflops": 800.0, "matmul": "8192^3 bf16", "copy_gbps": 3000.0, "copy": "1 GiB"}
    status = {"fastattn-triton": {"available": True, "reason": "", "role": "fastattn", "description": "d",
                                  "timing": "timed"}}
    return report.document(environment=env, ceilings=ceil, grid="quick", modes=("fwd",), providers=status,
                           measurements=list(measurements), padding=list(padding))


MEASUREMENTS = [
    _m("fastattn-triton", "fwd", 4096, 450, role="fastattn", ratios={"sdpa-flash": 1.3, "flex": 1.1}),
    _m("sdpa-flash", "fwd", 4096, 340),
    _m("flex", "fwd", 4096, 400),
    _m("sdpa-cudnn", "fwd", 4096, None),
    _m("fastattn-triton", "fwd", 1024, 400, role="fastattn", ratios={"sdpa-flash": 1.2}),
    _m("sdpa-flash", "fwd", 1024, 330),
    _m("flex", "fwd", 1024, 700, gate="FAIL out 1e-1 > 1e-3"),
    _m("fastattn-triton", "fwd", 2048, 420, role="fastattn", kind="gqa"),
]


def test_markdown_and_summary(tmp_path):
    padding = [{"variant": "dense", "mode": "fwd", "ms": 1.0, "ratio_to_dense": 1.0, "batch": 8, "seqlen": 2048,
                "fill": 0.5}]
    doc = _doc(MEASUREMENTS, padding)
    path = tmp_path / "bench.json"
    report.write_json(doc, str(path))
    assert json.loads(path.read_text()) == json.loads(json.dumps(doc))
    md = report.markdown(doc, ["roofline.png"])
    assert "# fastattn attention benchmark: Test GPU" in md and "800 TFLOPS" in md
    header, rows = report.pivot(doc["measurements"])
    assert header[:5] == ["case", "mode", "triton", "flash", "flex"] and "triton vs cuDNN" not in header
    row = next(r for r in rows if "S4096" in r[0])
    assert row[2:5] == ["450", "340", "400"] and row[-2:] == ["1.30x", "1.10x"]
    assert next(r for r in rows if "S1024" in r[0])[4] == "700 (FAIL)"
    assert "- **sdpa-cudnn** (1 rows, e.g. self B4 S4096 H16 D128 full bfloat16 fwd): why not" in md
    assert "FLAGGED (not ranked): FAIL out" in md and "![roofline.png](roofline.png)" in md
    assert "| dense | fwd | 1.000 | 1.00x |" in md
    s = report.summary(doc)
    assert "3 fastattn timings, 1 rows failed the gate" in s and "| 450 | 56% | 1.30x | 1.10x | ok |" in s
    assert report.main([str(path), "--summary"]) == 0
    path.write_text(json.dumps({"environment": {}, "results": []}))  # the old bench_attention.py format
    assert report.main([str(path)]) == 1


def test_plot_data():
    series = plots.tflops_series(MEASUREMENTS)
    # Only the standard grid, only ranked rows (the flagged flex row at 1024 and the gqa row are out).
    assert series == {("bfloat16", 128, False, "fwd"): {"fastattn-triton": [(1024, 400), (4096, 450)],
                                                         "sdpa-flash": [(1024, 330), (4096, 340)],
                                                         "flex": [(4096, 400)]}}
    points = plots.roofline_points(MEASUREMENTS)
    assert len(points) == 6 and {p["provider"] for p in points} == {"fastattn-triton", "sdpa-flash", "flex"}
    roof = plots.roofline_ceiling({"matmul_tflops": 800.0, "copy_gbps": 3000.0}, 1.0, 10000.0, n=5)
    assert [x for x, _ in roof] == pytest.approx([1, 10, 100, 1000, 10000])
    assert [y for _, y in roof] == pytest.approx([3, 30, 300, 800, 800])  # GB/s x FLOP/B / 1000 = TFLOPS


def test_plots_skip_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    written, why = plots.render(_doc(MEASUREMENTS), str(tmp_path))
    assert written == [] and "matplotlib is not installed" in why


def test_plots_render(tmp_path):
    pytest.importorskip("matplotlib")
    written, why = plots.render(_doc(MEASUREMENTS), str(tmp_path))
    assert why is None and written == ["tflops_bfloat16.png", "roofline.png"]
    assert all((tmp_path / name).read_bytes()[:4] == b"\x89PNG" for name in written)


def test_timer_and_environment():
    x = torch.randn(8, 8, requires_grad=True)
    calls = []

    def step():
        assert x.grad is None  # reset before every call
        calls.append(1)
        (x * x).sum().backward()

    ms = common.time_ms(step, device="cpu", grad_to_none=[x], warmup_ms=0, rep_ms=0)
    assert ms > 0 and len(calls) >= 6  # one warm-up call at least, five timed at least
    assert common.peak_memory_mib(lambda: None, device="cpu") is None
    env = common.environment("cpu")
    assert env["device_type"] == "cpu" and env["torch"] == torch.__version__ and "CPU" in env["device"]


def test_step_anatomy():
    """step_anatomy on this device: a call with a host sync (.item()) and one without. On a GPU both
    launch kernels, only the first syncs (the profiler's count and the sync debug mode agree), and
    the profiler's own sync is not counted; on the CPU there is host time and no GPU."""
    x = torch.randn(256, 256, device=DEVICE)
    with_sync = common.step_anatomy(lambda: (x @ x).sum().item(), calls=2)
    without = common.step_anatomy(lambda: (x @ x).sum(), calls=2)
    for a in (with_sync, without):
        assert a["host_ms"] > 0 and "aten::mm" in a["host_table"], a
    if DEVICE == "cpu":
        assert with_sync["device_ms"] == 0 and with_sync["top_kernels"] == [] and with_sync["launches"] == 0
        assert "sync_warnings" not in with_sync
        return
    assert with_sync["syncs"] >= 1 and with_sync["sync_warnings"] >= 1 and with_sync["first_sync"]
    assert without["syncs"] == 0 and without["sync_warnings"] == 0 and without["first_sync"] is None
    for a in (with_sync, without):
        assert a["device_ms"] > 0 and a["launches"] >= 1 and a["top_kernels"][0][1] > 0, a


def test_cuda_timer_is_do_bench(monkeypatch):
    import triton.testing

    seen = {}
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: seen.update(kw) or 1.5)
    assert common.time_ms(lambda: None, device="cuda", grad_to_none=["g"], warmup_ms=3, rep_ms=7) == 1.5
    assert seen == {"warmup": 3, "rep": 7, "grad_to_none": ["g"], "return_mode": "median"}


def test_run_cli_end_to_end(tmp_path, monkeypatch):
    """The CPU mode on a patched one-case grid: reports written, gate run through the interpreter."""
    from benchmarks import run

    grid = [Case(1, 32, 32, 2, 1, 16, kind="self", causal=True, dtype="float16"),
            Case(1, 1, 64, 2, 2, 16, kind="decode", causal=False, dtype="float16")]
    monkeypatch.setitem(cases.GRIDS, "cpu", lambda: grid)
    monkeypatch.setitem(run.SETTINGS, "cpu", {**run.SETTINGS["cpu"], "timing": FAST})
    if torch.cuda.is_available():
        pytest.skip("the CPU mode")
    threads = torch.get_num_threads()
    out = tmp_path / "out"
    args = ["--grid", "cpu", "--out", str(out), "--providers", "fastattn-triton,sdpa-math,sdpa-cudnn", "--no-plots"]
    assert run.main(args) == 0
    assert torch.get_num_threads() == threads  # the run's single-thread setting does not leak
    doc = json.loads((out / "bench.json").read_text())
    assert doc["schema"] == report.SCHEMA and doc["environment"]["device_type"] == "cpu"
    by = {(m["provider"], m["mode"], m["case"]["kind"]): m for m in doc["measurements"]}
    assert len(by) == 3 * 3 * 2
    tri = by[("fastattn-triton", "bwd", "self")]
    assert tri["gate"] == "ok" and tri["ms"] is None and "interpreter" in tri["skipped"]
    assert by[("sdpa-math", "fwd_bwd", "self")]["ms"] > 0
    assert by[("sdpa-cudnn", "fwd", "self")]["skipped"] and by[("sdpa-math", "fwd", "decode")]["skipped"]
    md = (out / "bench.md").read_text()
    assert "**CPU run.**" in md and "plots skipped (--no-plots)" in md
    assert run.main(args + ["--kinds", "gqa"]) == 2  # nothing selected
    assert [c.dtype for c in run.select(cases.standard(), "float16", "64,128", "self")] == ["float16"] * 24
    assert run.main(args + ["--budget-s", "0"]) == 0
    doc = json.loads((out / "bench.json").read_text())
    assert all("time budget" in m["skipped"] for m in doc["measurements"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run; gpu_check runs it on the GPU")
def test_host_overhead_cpu_smoke(tmp_path):
    """benchmarks/host_overhead.py end to end on the CPU (in its own process: it stubs the launches),
    with tiny batches: every layer and SDPA measured, the report labelled as stubbed."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "host_overhead.py"), "--iters", "3",
                          "--rounds", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads((tmp_path / "host_overhead.json").read_text())
    assert result["launches_stubbed"] is True
    assert [r["path"] for r in result["rows"]] == ["dense causal", "key-padding mask", "bias + window + sinks",
                                                  "varlen causal", "dense causal, no grad", "decode step"]
    for row in result["rows"][:4]:
        assert all(row[f"{layer} fwd+bwd"] > 0 for layer in ("api", "autograd", "launcher", "launch"))
    no_grad, decode = result["rows"][4:]  # inference: forward only (decode: no autograd layer)
    assert all(no_grad[f"{layer} fwd"] > 0 for layer in ("api", "autograd", "launcher", "launch", "sdpa"))
    assert all(decode[f"{layer} fwd"] > 0 for layer in ("api", "launcher", "launch", "sdpa"))
    assert "api fwd+bwd" not in no_grad and "api fwd+bwd" not in decode and "autograd fwd" not in decode
    assert "STUBBED" in (tmp_path / "host_overhead.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run; gpu_check runs the GPU grid")
def test_decode_benchmark_cpu_smoke(tmp_path, monkeypatch):
    """benchmarks/decode.py end to end on the CPU: every fastattn row passes the gate (interpreter,
    not timed), the SDPA rows are timed or say why not, the report is written."""
    from benchmarks import decode

    monkeypatch.setitem(decode.GRIDS, "cpu", lambda: [decode.DecodeCase(2, 70, 4, 2, 32, "float32", 16)])
    monkeypatch.setattr(decode, "measure_ceilings", lambda device: {"copy_gbps": 10.0})
    assert decode.main(["--grid", "cpu", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "decode.json").read_text())
    rows = {r["provider"]: r for r in doc["rows"]}
    assert set(rows) == {"fastattn-decode", "fastattn-decode-paged", "fastattn-attention", "fastattn-prefill",
                         "fastattn-attention-kpm", "fastattn-prefill-kpm", "sdpa-flash", "sdpa-efficient", "sdpa-math"}
    assert all(r["gate"] == "ok" for name, r in rows.items() if name.startswith("fastattn"))
    assert rows["sdpa-math"]["gbps"] > 0 and rows["sdpa-math"]["vs_best_sdpa"] <= 1.0
    assert "CPU run" in (tmp_path / "decode.md").read_text()
