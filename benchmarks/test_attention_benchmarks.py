"""The benchmark cases as pytest-benchmark tests, for regression tracking:

    pytest benchmarks/                                   # GPU: the quick grid; CPU: a tiny subset
    FASTATTN_BENCH_GRID=full pytest benchmarks/          # the full grid (GPU)
    pytest benchmarks/ --benchmark-save=NAME / --benchmark-compare

Same cases, providers and correctness gate as benchmarks/run.py. Each timed round is one call
followed by a device synchronisation (setup, which resets gradients and synchronises first, is not
timed), so a round is the call's wall-clock time including launch overhead; run.py's do_bench
numbers (CUDA events, L2 flushed) are the ones reported as TFLOPS. A fastattn provider that fails
the gate fails its test; a baseline that cannot run a case, or fails the gate, is skipped with why.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from benchmarks import cases
from benchmarks.measure import GATE_OK, Gate, describe, mode_callable
from benchmarks.providers import PROVIDERS, why_not
from benchmarks.run import SETTINGS

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
GRID = os.environ.get("FASTATTN_BENCH_GRID", "quick" if CUDA else "cpu")
# Without a GPU: a tiny subset (CPU timings of the torch providers; the interpreter is not timed).
CASES = cases.GRIDS[GRID]() if CUDA else cases.cpu_quick()[:2]
ROUNDS, WARMUP = (20, 3) if CUDA else (5, 1)
# The grid's providers and modes as benchmarks/run.py has them (quick: no FlexAttention, fwd and bwd).
GRID_SETTINGS = SETTINGS[GRID]
PARAMS = [(c, p, m) for c in CASES for p in GRID_SETTINGS["providers"] for m in GRID_SETTINGS["modes"].split(",")]


@functools.lru_cache(maxsize=1)  # tests run case by case: keep one case's inputs and reference
def _prepared(case: cases.Case, grads: bool):
    inputs = cases.make_inputs(case, DEVICE, torch.Generator(device=DEVICE).manual_seed(0))
    return inputs, Gate(case, *inputs, grads=grads, generator=torch.Generator(device=DEVICE).manual_seed(1))


@pytest.mark.parametrize(("case", "provider", "mode"), PARAMS,
                         ids=[f"{c.label.replace(' ', '_')}-{p}-{m}" for c, p, m in PARAMS])
def test_attention(benchmark, case, provider, mode):
    p = PROVIDERS[provider]
    reason = why_not(p, case, DEVICE) or p.timing_skip(DEVICE)
    if reason:
        pytest.skip(reason)
    (q, k, v, mask), gate = _prepared(case, True)
    with p.context():
        _check_and_time(benchmark, p, case, mode, q, k, v, mask, gate)


def _check_and_time(benchmark, p, case, mode, q, k, v, mask, gate):
    provider = p.name
    try:
        fn = p.build(case, mask, DEVICE)
        verdict = gate.check_forward(fn, q, k, v)
        if verdict == GATE_OK and mode != "fwd":
            verdict = gate.check_backward(fn, q, k, v)
    except Exception as e:
        if p.role == "fastattn":
            raise
        pytest.skip(f"{provider} cannot run this case: {describe(e)}")
    if verdict != GATE_OK:
        if p.role == "fastattn":
            pytest.fail(f"{provider} failed the correctness gate: {verdict}")
        pytest.skip(f"flagged: {provider} failed the correctness gate: {verdict}")

    call, grad_to_none = mode_callable(fn, q, k, v, mode)
    sync = torch.cuda.synchronize if CUDA else (lambda: None)

    def setup():
        for x in grad_to_none or ():
            x.grad = None
        sync()

    def timed():
        call()
        sync()

    benchmark.group = f"{case.label} {mode}"
    benchmark.pedantic(timed, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP)
    stats = getattr(benchmark.stats, "stats", None)  # None under --benchmark-disable
    benchmark.extra_info.update({"case": case.as_dict(), "provider": provider, "mode": mode, "device": DEVICE,
                                 "flops": case.flops(mode)})
    if stats is not None and stats.median > 0:
        benchmark.extra_info["tflops_median"] = case.flops(mode) / stats.median * 1e-12
