"""benchmarks/hf_llama.py end to end in its smoke mode (a tiny float32 Llama through the Triton
interpreter): the gate passes, both implementations are timed, fastattn ran, the reports are written.
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
    assert doc["smoke"] and doc["gate_ok"] and doc["bar_met"] is None
    assert [r["attn_implementation"] for r in doc["rows"]] == ["sdpa", "fastattn"]
    assert all(r["ms"] > 0 for r in doc["rows"]) and doc["fastattn_calls"] > 0
    assert "fastattn vs sdpa" in (tmp_path / "hf_llama.md").read_text()
