"""benchmarks/score_mods.py end to end in its smoke mode (tiny float32 shapes, the Triton interpreter):
every fastattn row passes the float64 gate and is timed, the ratios and both reports are written."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

from fastattn import testing  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run; gpu_check runs the GPU one")


def test_score_mods_benchmark_smoke(tmp_path, monkeypatch):
    from benchmarks import score_mods

    monkeypatch.setattr(score_mods, "measure_ceilings", lambda device: {"matmul_tflops": 1.0, "matmul": "test"})
    assert score_mods.main(["--smoke", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "score_mods.json").read_text())
    rows = doc["rows"]
    by = {(r["case"]["causal"], r["variant"], r["provider"], r["mode"]): r for r in rows}
    variants = {"none", "alibi", "softcap", "sinks", "bias", score_mods.BIAS_KERNEL, "window 8"}
    assert set(by) == {(c, v, p, m) for c in (True, False) for v in variants for p in ("fastattn", "sdpa", "flex")
                       if (p != "sdpa" or v == "bias") and (p == "fastattn" or v != score_mods.BIAS_KERNEL)
                       for m in ("fwd", "fwd_bwd")}
    for r in rows:  # every row checked against float64 (the backward rows with dbias, dsinks) and timed
        if r["provider"] == "flex" and r["mode"] == "fwd_bwd":  # torch has no CPU backward for it
            assert "backward on CPU" in r["skipped"] and "ms" not in r, r
            continue
        assert r["gate"] == "ok" and r["ms"] > 0 and r["tflops"] > 0, r
        if r["provider"] == "fastattn":
            assert r["vs_none"] > 0 and r["time_vs_none"] > 0, r
            assert ("vs_flex" in r) == (r["mode"] == "fwd"), r
    for causal in (True, False):
        none, window = by[causal, "none", "fastattn", "fwd"], by[causal, "window 8", "fastattn", "fwd"]
        assert none["vs_none"] == 1.0
        # TFLOPS count the visible keys only: (8, 0) causal, (8, 8) not.
        assert window["window"] == [8, 0 if causal else 8]
        assert window["keys_per_query"] < none["keys_per_query"] and window["flops"] < none["flops"]
        for variant in ("bias", score_mods.BIAS_KERNEL):  # both against SDPA's (and Flex's) bias rows
            bias = by[causal, variant, "fastattn", "fwd_bwd"]
            assert bias["vs_sdpa"] == pytest.approx(by[causal, "bias", "sdpa", "fwd_bwd"]["ms"] / bias["ms"])
    assert doc["bars"] == []  # judged on GPU runs only
    md = (tmp_path / "score_mods.md").read_text()
    assert "Smoke run" in md and "| self B2 S48 H1 D16 causal float32 | window 8 | " in md
    assert "fastattn vs SDPA with the same float mask" in md
    assert f"| self B2 S48 H1 D16 causal float32 | {score_mods.BIAS_KERNEL} | fwd_bwd | " in md
    assert "| self B2 S48 H1 D16 full float32 | sinks | fwd | " in md.split("vs FlexAttention")[1]


def test_switched_rows_run_with_the_switch_on(monkeypatch):
    """On a GPU the softcap also runs through tanh.approx.f32: its variant (after "softcap"; never in
    the FlexAttention pass) sets FASTATTN_SOFTCAP_TANH=approx while its rows run and restores it after,
    passes the same softcap, and meets the same bars. Likewise the bias with FASTATTN_BIAS_GRAD=kernel
    (after "bias"), on the CPU too."""
    from benchmarks import score_mods
    from benchmarks.cases import Case

    case = Case(1, 40, 40, 2, 2, 16, kind="self", causal=True, dtype="float32")
    names = [v.name for v in score_mods.variants(case, (8,), approx=True)]
    assert names[:4] == ["none", "alibi", "softcap", score_mods.APPROX] and names.count(score_mods.APPROX) == 1
    assert score_mods.APPROX not in [v.name for v in score_mods.variants(case, (8,))]
    approx = score_mods.Variant(score_mods.APPROX)
    assert approx.mods(case, "cpu", torch.Generator()) == {"softcap": score_mods.SOFTCAP}
    for before in (None, "exp2"):
        if before is None:
            monkeypatch.delenv("FASTATTN_SOFTCAP_TANH", raising=False)
        else:
            monkeypatch.setenv("FASTATTN_SOFTCAP_TANH", before)
        with score_mods.switched(score_mods.Variant("softcap")):
            assert os.environ.get("FASTATTN_SOFTCAP_TANH") == before
        with score_mods.switched(approx):
            assert os.environ["FASTATTN_SOFTCAP_TANH"] == "approx"
        assert os.environ.get("FASTATTN_SOFTCAP_TANH") == before
    names = [v.name for v in score_mods.variants(case, (8,), bias_kernel=True)]
    assert names[names.index("bias") + 1] == score_mods.BIAS_KERNEL
    monkeypatch.delenv("FASTATTN_BIAS_GRAD", raising=False)
    with score_mods.switched(score_mods.Variant(score_mods.BIAS_KERNEL)):
        assert os.environ["FASTATTN_BIAS_GRAD"] == "kernel"
    assert "FASTATTN_BIAS_GRAD" not in os.environ
    assert score_mods.compared_as(score_mods.BIAS_KERNEL) == "bias" and score_mods.compared_as("alibi") == "alibi"
    # On a GPU the narrowest window runs once more, tuned: FASTATTN_AUTOTUNE=1 and fresh plans meanwhile.
    names = [v.name for v in score_mods.variants(case, (16, 8, 64), tuned_window=True)]
    assert names[-3:] == ["window 16", "window 8", "window 8 tuned"]  # (64 >= S = 40: not run)
    assert score_mods.compared_as("window 8 tuned") == "window 8"
    cleared = []
    monkeypatch.setattr(score_mods.plans, "clear", lambda: cleared.append(os.environ.get("FASTATTN_AUTOTUNE")))
    monkeypatch.setenv("FASTATTN_AUTOTUNE", "0")
    with score_mods.switched(score_mods.Variant("window 8 tuned", 8)):
        assert os.environ["FASTATTN_AUTOTUNE"] == "1"
    assert os.environ["FASTATTN_AUTOTUNE"] == "0" and cleared == ["1", "0"]
    row = {"case": {"label": "c"}, "provider": "fastattn", "mode": "fwd", "variant": score_mods.APPROX,
           "window": None, "vs_none": 0.95}
    assert score_mods.bars([row]) == [{"case": "c", "check": f"{score_mods.APPROX} fwd TFLOPS / none",
                                       "value": 0.95, "bar": 0.9, "ok": True}]


def test_a_bar_that_cannot_be_measured_is_listed_with_why():
    """A ratio that cannot be formed (its baseline skipped, raised or failed its gate) is a bar check
    'not measured' with the reason, not a check that vanishes from the count."""
    from benchmarks import score_mods

    def row(provider, variant, mode, **kw):
        return {"case": {"label": "c"}, "provider": provider, "variant": variant, "mode": mode, "window": None,
                "gate": score_mods.GATE_OK, "ms": 1.0, **kw}
    rows = [row("fastattn", "none", "fwd_bwd", skipped="OutOfMemoryError", gate=""),
            row("fastattn", "alibi", "fwd_bwd"), row("fastattn", "bias", "fwd_bwd"),
            row("sdpa", "bias", "fwd_bwd", gate="FAIL out"), row("flex", "alibi", "fwd_bwd", gate="FAIL out")]
    score_mods.add_ratios(rows)
    checks = {b["check"]: b for b in score_mods.bars(rows)}
    assert set(checks) == {"alibi fwd+bwd TFLOPS / none", "bias fwd+bwd: SDPA (float mask) time / fastattn",
                           "alibi fwd+bwd: FlexAttention time / fastattn"}
    assert all(b["value"] is None and b["ok"] is None for b in checks.values())
    assert "OutOfMemoryError" in checks["alibi fwd+bwd TFLOPS / none"]["why"]
    assert "sdpa bias: FAIL out" in checks["bias fwd+bwd: SDPA (float mask) time / fastattn"]["why"]
    doc = {"environment": {"device": "x", "torch": "", "triton": "", "cuda": "", "timer": "",
                           "fastattn_autotune": "", "device_type": "cuda"},
           "ceilings": {"matmul_tflops": 1.0, "matmul": ""}, "settings": {"smoke": False}, "rows": rows,
           "bars": score_mods.bars(rows)}
    assert "0 of 3 bar checks met, 0 missed, 3 not measured" in score_mods.markdown(doc)


def test_score_mods_gate_catches_a_wrong_kernel(monkeypatch):
    """A provider that ignores its modifier fails the gate: flagged, not ranked."""
    from benchmarks import score_mods
    from benchmarks.cases import Case, make_inputs

    case = Case(2, 40, 40, 3, 3, 16, kind="self", causal=True, dtype="float32")
    gen = torch.Generator().manual_seed(0)
    q, k, v, _ = make_inputs(case, "cpu", gen)

    def head0(m):  # head 0's slope, sink or bias rows for every head: right on head 0 only
        return {n: x[:1].expand_as(x) if n in ("alibi_slopes", "sinks") else x[:, :1].expand_as(x) if n == "bias"
                else x for n, x in m.items()}
    for name in ("alibi", "softcap", "sinks", "bias"):
        mods = score_mods.Variant(name).mods(case, "cpu", gen)
        gate = score_mods.ModGate(case, q, k, v, mods, gen)
        right = lambda q_, k_, v_, **m: score_mods.reference.attention(q_, k_, v_, causal=True, **m)
        ignores = lambda q_, k_, v_, **m: score_mods.reference.attention(q_, k_, v_, causal=True)
        assert gate.check_forward(right, q, k, v, mods) == "ok"
        assert gate.check_backward(right, q, k, v, mods) == "ok"
        assert gate.check_forward(ignores, q, k, v, mods).startswith("FAIL out"), name
        if name != "softcap":
            wrong = lambda q_, k_, v_, **m: score_mods.reference.attention(q_, k_, v_, causal=True, **head0(m))
            assert gate.check_forward(wrong, q, k, v, mods).startswith("FAIL out[b1,h2]"), name

    def skips_last(q_, k_, v_, **m):  # leaves the last batch element's last head at 0
        out = score_mods.reference.attention(q_, k_, v_, causal=True, **m).clone()
        out[-1, :, -1] = 0
        return out
    gate = score_mods.ModGate(case, q, k, v, {}, gen)
    assert gate.check_forward(skips_last, q, k, v, {}).startswith("FAIL out[b1,h2]")


@pytest.mark.parametrize("shape", [(40, 40, 2, 2), (24, 40, 4, 2), (40, 24, 2, 1)], ids=["self", "cross-gqa", "sq>sk"])
@pytest.mark.parametrize("causal", [True, False])
def test_flex_baseline_means_what_fastattn_means(shape, causal):
    """FlexAttention given each modifier (score_mod, block mask, sinks through the lse) computes
    fastattn.reference's attention: Sq != Sk (bottom-right), GQA, windows open on one side."""
    from benchmarks import flex_mods, score_mods
    from benchmarks.cases import Case, make_inputs

    sq, sk, hq, hkv = shape
    case = Case(2, sq, sk, hq, hkv, 16, kind="cross", causal=causal, dtype="float32")
    gen = torch.Generator().manual_seed(0)
    q, k, v, _ = make_inputs(case, "cpu", gen)
    mods = [score_mods.Variant(n).mods(case, "cpu", gen) for n in ("none", "alibi", "softcap", "sinks")]
    shapes = ((2, hq, sq, sk), (1, hq, sq, sk), (2, 1, sq, sk))  # per batch element and head, broadcast
    mods += [{"bias": torch.randn(*shape, generator=gen)} for shape in shapes]
    mods += [{"alibi_slopes": torch.rand(2, hq, generator=gen)}]  # per batch element
    mods += [{"window": w} for w in ((5, 0), (3, 2), (-1, 4), (6, -1))]
    mods += [{"alibi_slopes": torch.rand(hq, generator=gen), "softcap": 3.0, "window": (7, 1),
              "sinks": torch.randn(hq, generator=gen)}]

    def flex(q_, k_, v_, **m):
        return flex_mods.call(q_, k_, v_, **flex_mods.prepare(case, m)), None
    for m in mods:  # forward only: FlexAttention has no CPU backward (the GPU run's gate checks it)
        results = testing.check_against_reference(flex, q, k, v, causal=causal, grads=False, lse=False, mods=m)
        assert all(r.ok for r in results), (list(m), [str(r) for r in results])
