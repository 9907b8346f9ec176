"""benchmarks/bench_models.py on the CPU: every model and backend gets a row (timed, or skipped /
failed with the reason), ratios are baseline time / time, and the reports are written."""

import json

import torch

from benchmarks import bench_models
from fastattn.models import ModelConfig


def test_model_benchmark_cpu_smoke(tmp_path, monkeypatch):
    tiny = bench_models.Size(ModelConfig.preset("tiny", max_len=64), batch=2, seqlen=16, target_len=8,
                             prompt_len=8, new_tokens=3, dtype=torch.float32)
    monkeypatch.setitem(bench_models.SIZES, "tiny", tiny)
    monkeypatch.setattr(bench_models, "time_ms", lambda fn, **kw: (fn(), 2.0)[1])  # run once, fixed time
    report = bench_models.run("tiny", tmp_path, device="cpu")  # the CPU path, on any machine
    rows = {(r["model"], r["backend"]): r for r in report["results"]}
    assert {m for m, _ in rows} == {"encoder", "decoder", "encoder-decoder"}
    ref = rows[("decoder", "reference")]
    assert ref["train_ms"] == 2.0 and ref["train_vs_torch"] == 1.0  # both fake-timed at 2 ms
    assert ref["gen_tokens_per_s"] == 2 * 3 / 2.0 * 1e3
    assert rows[("decoder", "triton")]["skipped"].startswith("no GPU")  # interpreter: not a timing
    for r in report["results"]:  # nothing vanishes: a number, or a reason
        assert r["skipped"] or "train_ms" in r or "train_ms_error" in r
    saved = json.loads((tmp_path / "models.json").read_text())
    assert saved["environment"]["device_type"] == "cpu"
    md = (tmp_path / "models.md").read_text()
    assert "CPU numbers" in md and "| decoder | reference | 2.00 |" in md


def test_model_benchmark_selects_and_interleaves(tmp_path, monkeypatch):
    tiny = bench_models.Size(ModelConfig.preset("tiny", max_len=64), batch=2, seqlen=16, target_len=8,
                             prompt_len=8, new_tokens=3, dtype=torch.float32)
    monkeypatch.setitem(bench_models.SIZES, "tiny", tiny)
    order = []
    times = iter([4.0, 1.0, 2.0, 3.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0])

    def fake_time(fn, **kw):
        fn()
        order.append(kw.get("rep_ms", 100))
        return next(times)

    monkeypatch.setattr(bench_models, "time_ms", fake_time)
    report = bench_models.run("tiny", tmp_path, device="cpu", models=["decoder"], backends=["torch", "reference"],
                              rounds=2)
    rows = {r["backend"]: r for r in report["results"]}
    assert set(rows) == {"torch", "reference"} and {r["model"] for r in report["results"]} == {"decoder"}
    # Round 1: torch train 4, gen 1; reference train 2, gen 3. Round 2: torch 5, 6; reference 7, 8.
    assert rows["torch"]["train_ms_rounds"] == [4.0, 5.0] and rows["torch"]["train_ms"] == 4.5
    assert rows["reference"]["gen_ms_rounds"] == [3.0, 8.0] and rows["reference"]["gen_ms"] == 5.5
    assert report["setup"]["rounds"] == 2
