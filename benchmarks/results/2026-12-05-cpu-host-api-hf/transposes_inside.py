"""Would moving the transformers integration's three transposes inside the autograd Function save
host time? Two minimal Functions around the Triton launchers (launches stubbed): one takes (B, S, H, D)
views made outside it (as fastattn does today), one takes transformers' (B, H, S, D) tensors and
transposes them inside (forward) and transposes the gradients back (backward). Thread CPU time per
call, median and minimum over batches taking turns in alternating order.

    python benchmarks/results/2026-12-05-cpu-host-api-hf/transposes_inside.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[3]))
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from benchmarks.host_overhead import stub_launches  # noqa: E402
from fastattn.launchers import triton_attention as launch  # noqa: E402


class Outside(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = launch.forward(q, k, v, None, None, True, 0.25)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv, *_ = launch.backward(dout, q, k, v, out, lse, None, None, None, True, 0.25)
        return dq, dk, dv


class Inside(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qh, kh, vh):
        q, k, v = qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2)
        out, lse = launch.forward(q, k, v, None, None, True, 0.25)
        ctx.save_for_backward(qh, kh, vh, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        qh, kh, vh, out, lse = ctx.saved_tensors
        q, k, v = qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2)
        dq, dk, dv, *_ = launch.backward(dout, q, k, v, out, lse, None, None, None, True, 0.25)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def main(iters=300, rounds=60) -> None:
    stub_launches()
    b, s, h, d = 1, 16, 2, 16
    base = [torch.randn(b, s, h, d, requires_grad=True) for _ in range(3)]
    qh, kh, vh = (x.transpose(1, 2) for x in base)  # what a Llama layer passes
    dout = torch.randn(b, s, h, d)
    outside = lambda: Outside.apply(qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2))
    inside = lambda: Inside.apply(qh, kh, vh)
    fns = {"transposes outside, fwd": outside, "transposes inside, fwd": inside,
           "transposes outside, fwd+bwd": lambda: outside().backward(dout),
           "transposes inside, fwd+bwd": lambda: inside().backward(dout)}
    for fn in fns.values():
        for _ in range(300):
            fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.thread_time_ns()
            for _ in range(iters):
                fns[name]()
            times[name].append((time.thread_time_ns() - t0) / iters / 1e3)
    for name, t in times.items():
        print(f"{name:30s} median {statistics.median(t):6.1f} us  (min {min(t):.1f})")


if __name__ == "__main__":
    main()
