"""The benchmark's padding-cost measurement runs end to end (tiny sizes, CPU timer)."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conftest import DEVICE  # noqa: E402

from benchmarks.padding_cost import padding_cost  # noqa: E402


def wall_clock(fn, grad_to_none=None):
    for x in grad_to_none or []:
        x.grad = None
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def test_padding_cost_rows():
    rows = padding_cost(batch=2, seqlen=48, heads=2, head_dim=16, dtype="float32", timer=wall_clock, device=DEVICE)
    assert {(r["variant"], r["mode"]) for r in rows} == {(v, m) for v in ("dense", "masked", "varlen")
                                                         for m in ("fwd", "bwd")}
    assert all(r["ms"] > 0 for r in rows)
    assert [r["ratio_to_dense"] for r in rows if r["variant"] == "dense"] == [1.0, 1.0]
