"""The FLOP formula and the self-check command."""

import pytest

from fastattn.flops import attention_flops, mean_visible_keys


def test_flops_formula():
    assert attention_flops(2, 16, 1024, 1024, 64, causal=False) == 4 * 2 * 16 * 1024 * 1024 * 64
    # Square causal: a query sees (S + 1) / 2 keys on average (about half).
    assert mean_visible_keys(1024, 1024, causal=True) == pytest.approx(512.5)
    assert attention_flops(1, 1, 4, 4, 8, causal=False, mode="bwd") == 2.5 * 4 * 4 * 4 * 8
    # Bottom-right causal with Sq > Sk: rows that see nothing count nothing.
    assert mean_visible_keys(4, 2, causal=True) == pytest.approx((0 + 0 + 1 + 2) / 4)
    assert mean_visible_keys(2, 5, causal=True) == pytest.approx((4 + 5) / 2)
    with pytest.raises(ValueError, match="mode"):
        attention_flops(1, 1, 1, 1, 1, causal=False, mode="both")


def test_self_check_runs_and_passes():
    from fastattn.selfcheck import run_check

    lines = []
    assert run_check(out=lines.append)
    text = "\n".join(lines)
    assert "triton" in text and "all checks passed" in text


def test_check_command_runs_the_triton_kernels_without_a_gpu():
    """`python -m fastattn check` (the README's main job) must reach the Triton kernels on a CPU
    machine too: the interpreter has to be switched on before triton is imported."""
    import os
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "fastattn", "check"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("triton ")]
    assert rows[0].split()[1] == "yes", rows[0]
    assert sum(" ok " in line for line in rows) >= 10, res.stdout
