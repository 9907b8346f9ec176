"""benchmarks/ring.py --smoke: two CPU processes under torchrun, gloo; the gates pass and the
report is written (the GPU run is the same script under torchrun on a multi-GPU machine)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ring_benchmark_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           str(ROOT / "benchmarks" / "ring.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "ring.json").read_text())
    assert len(rows) == 4 and all(r["ring gate"] == "ok" for r in rows)
    assert sum("all-gather gate" in r for r in rows) == 3  # not the padded non-causal case
    assert all(r["ring fwd_bwd ms"] > 0 for r in rows)
    assert (tmp_path / "ring.md").exists()


def test_ring_compute_benchmark_smoke(tmp_path):
    """benchmarks/ring_compute.py --smoke: one process plays rank 0 of a 2-rank ring (CPU)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ring_compute.py"), "--smoke", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "ring_compute.json").read_text())
    assert len(rows) == 2 and all(r["gate"] == "ok" for r in rows)
    assert all(r["ring compute fwd_bwd ms"] > 0 and r["gathered fwd ms"] > 0 for r in rows)
