"""benchmarks/hf_llama.py end to end in its smoke mode (tiny float32 Llama and windowed Mistral models
through the Triton interpreter; training steps and a left-padded batch's generated token): the gates
pass, sdpa and fastattn are timed, fastattn ran on its key-padding path, flash_attention_2 says why
it did not run, each step's host time is taken, the reports are written.
In a subprocess: run from the repository root, its kernels/ folder would shadow the PyPI package
`kernels` that transformers imports."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run; gpu_check runs the GPU one"),
              pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs fastattn[hf]")]


def test_hf_llama_benchmark_smoke(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "hf_llama.py"), "--smoke", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    doc = json.loads((tmp_path / "hf_llama.json").read_text())
    assert doc["smoke"] and [m["model"] for m in doc["models"]] == ["llama", "mistral", "llama-padded",
                                                                    "llama-generate"]
    assert doc["models"][1]["window"] and not doc["models"][0]["window"] and doc["transformers"]
    assert [m["padded"] for m in doc["models"]] == [False, True, True, True]  # the bar's llama step: no padding
    assert [m["generate"] for m in doc["models"]] == [False, False, False, True]  # (a left-padded batch's token)
    for m in doc["models"]:
        assert m["bar_met"] is None
        sdpa, fast, fa2 = m["rows"]
        assert [sdpa["attn_implementation"], fast["attn_implementation"]] == ["sdpa", "fastattn"]
        assert fa2["attn_implementation"] == "flash_attention_2" and "CUDA" in fa2["skipped"]
        assert fast["gate_ok"] and sdpa["ms"] > 0 and fast["ms"] > 0
        # One timing per round (one round in a smoke run); the step's anatomy (no GPU: host time only).
        for r in (sdpa, fast):
            assert r["ms_rounds"] == [r["ms"]] and r["host_ms"] > 0 and r["syncs"] == 0, r
            assert "gpu_ms" not in r and "top_kernels" not in r
        # Every layer's call ran fastattn's key-padding path (the sliding window recognised, not a dense
        # bias), or without padding its path without a mask; none fell back.
        calls = fast["fastattn_calls"]
        kind = "mask: key padding" if m["padded"] else "mask: none"
        assert calls["fastattn"] > 0 and calls[kind] == calls["fastattn"] and "not_fastattn" not in fast, calls
    md = (tmp_path / "hf_llama.md").read_text()
    assert "llama: fastattn vs sdpa" in md and "mistral: fastattn vs sdpa" in md and "llama-padded: " in md
    assert "| llama-generate | generate | 4 x 16 |" in md
    gen_fast = doc["models"][3]["rows"][1]  # its calls on the decode kernel (smoke: threshold 0; sdpa: none)
    assert gen_fast["decode_route_calls"] >= 1 and doc["models"][3]["rows"][0]["decode_route_calls"] == 0
