"""The FLOP formula and the self-check command."""

import pytest
import torch

from fastattn.flops import attention_flops, mean_visible_keys
from fastattn.semantics import visible_keys


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


def test_mean_visible_keys_counts_what_the_reference_masks():
    """Exact: the mean over queries of the keys fastattn.semantics.visible_keys lets each one see
    (bottom-right aligned window, intersected with causal), for every kind of window and Sq vs Sk."""
    windows = [None, (-1, -1), (0, 0), (3, 0), (0, 3), (2, 5), (5, -1), (-1, 4), (40, 40), (-1, 0)]
    for sq, sk in [(1, 1), (7, 7), (33, 33), (5, 19), (19, 5), (1, 40), (40, 1), (3, 0)]:
        for causal in (False, True):
            for window in windows:
                brute = visible_keys(sq, sk, causal=causal, window=window).sum().item() / sq
                where = (sq, sk, causal, window)
                assert mean_visible_keys(sq, sk, causal, window) == pytest.approx(brute, abs=1e-12), where
                flops = attention_flops(2, 3, sq, sk, 8, causal=causal, window=window, mode="fwd_bwd")
                assert flops == pytest.approx(3.5 * 4 * 2 * 3 * sq * 8 * brute, abs=1e-9), where
                for real in {0, sk // 2, sk}:  # keys padded at the end: the alignment still counts Sk
                    mask = (torch.arange(sk) < real)[None]  # (1, Sk)
                    brute = visible_keys(sq, sk, causal=causal, window=window, key_padding_mask=mask).sum().item()
                    assert mean_visible_keys(sq, sk, causal, window, real) == pytest.approx(brute / sq, abs=1e-12), \
                        (*where, real)


def test_window_flops_scale_with_the_window():
    s = 4096
    # Causal window (w, 0): query i sees min(i, w) + 1 keys; far from the start about w + 1.
    assert mean_visible_keys(s, s, True, (128, 0)) == pytest.approx((sum(range(1, 129)) + (s - 128) * 129) / s)
    # A symmetric window (w, w) without causal: 2w + 1 keys away from both ends.
    assert mean_visible_keys(s, s, False, (64, 64)) == pytest.approx(129 - 2 * sum(range(1, 65)) / s)
    # A window at least as wide as the sequence is no window; with causal, right is ignored as the API does.
    assert mean_visible_keys(s, s, True, (s, -1)) == mean_visible_keys(s, s, True)
    assert mean_visible_keys(s, s, True, (-1, 5)) == mean_visible_keys(s, s, True)
    assert mean_visible_keys(100, 100, False, (200, 200)) == 100.0
    local, full = (attention_flops(1, 1, s, s, 64, causal=True, window=w) for w in ((128, 0), None))
    assert local < full / 15


def test_self_check_runs_and_passes():
    from fastattn.selfcheck import run_check

    lines = []
    assert run_check(out=lines.append)
    text = "\n".join(lines)
    assert "triton" in text and "all checks passed" in text


def test_self_check_fails_when_a_backend_refuses_a_call_it_supports(monkeypatch):
    """A supported call that raises (here a ValueError, which once read as "not supported" and was
    listed as skipped) is a FAIL row and a failed check, not a skip."""
    from fastattn import backends
    from fastattn.backends import sdpa_backend
    from fastattn.selfcheck import run_check

    plain = sdpa_backend.run

    def broken(call):
        if call.key_padding_mask is not None:
            raise ValueError("a regression in the padded path")
        return plain(call)

    monkeypatch.setattr(backends, "BACKENDS", ("torch",))
    monkeypatch.setattr(sdpa_backend, "run", broken)
    lines = []
    assert not run_check("cpu", out=lines.append)
    failed = [line for line in lines if line.startswith("torch ") and "FAIL" in line]
    assert all("regression" in line for line in failed), failed  # the padded calls (the decode check pads too)
    assert any(line.split()[2:5] == ["key", "padding", "mask"] for line in failed), failed
    assert not any("skipped" in line for line in lines if line.startswith("torch ")), lines
    assert "SOME CHECKS FAILED" in lines[-1]


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
    assert "fastattn.distributed.ring_attention (context parallel; torchrun): gloo" in res.stdout
