"""One GPU plays the last rank of a W-rank ring (the one with the most merge work): the ring's
compute per rank (its blocks and merges, the transfers replaced by handing over the next shard),
against the same rank's work done as one attention call over the whole K/V (the all-gather way's
compute) and against 1/W of one-GPU attention on the whole sequence. It measures what overlap
cannot hide: the merges and the smaller blocks (docs/context_parallel.md estimates them for 8 GPUs
at 128k tokens).

    python benchmarks/ring_compute.py [--world 8] [--seqlens 32768,131072] [--out DIR]
    python benchmarks/ring_compute.py --smoke    # CPU, float32, tiny shapes, backend "torch" (a test)

bf16, batch 1, 16 heads, D = 128, causal and not, forward and forward+backward. The dK/dV
accumulators that would arrive from the neighbour are the rank's own (timing only), so only the
output and dQ are gated: GATE rows of head 0 against the float64 reference over the whole K/V
(tolerance rule). Writes ring_compute.json and .md into --out; exit status 1 when a gate fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import fastattn  # noqa: E402
from benchmarks.ring import elapsed_ms, gathered_attention, modes, write  # noqa: E402
from fastattn import reference, semantics, testing  # noqa: E402
from fastattn.distributed import blocks, zigzag_positions  # noqa: E402
from fastattn.distributed.ring import RingAttention  # noqa: E402
from fastattn.flops import attention_flops  # noqa: E402
from fastattn.shape import AttentionShape  # noqa: E402

GATE = 128


class Handover:
    """Stands in for fastattn.distributed.ring.Ring: exchange() of a K/V shard hands over the one
    the next step needs (all shards live on this device); dK/dV accumulators come back as sent."""

    def __init__(self, world: int, rank: int, shards: list[list[torch.Tensor]]):
        self.world, self.rank, self.shards = world, rank, shards

    def exchange(self, tensors, tag: int = 0):
        if tag == 0:
            src = next(i for i, s in enumerate(self.shards) if s[0] is tensors[0])
            return _Done(self.shards[(src - 1) % self.world])
        return _Done(tensors)


class _Done:
    def __init__(self, received):
        self.received = received

    def wait(self):
        return self.received


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--seqlens", default="32768,131072")
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--out", default=".benchmarks/ring_compute")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype, backend = (torch.bfloat16, "auto") if cuda else (torch.float32, "torch")
    heads, head_dim = (16, 128) if cuda else (2, 16)
    world = args.world if cuda else 2
    seqlens = [int(s) for s in args.seqlens.split(",")] if cuda else [64]
    calls = args.calls if cuda else 2
    # The last rank: in the causal zig-zag ring every step after the diagonal merges all of its rows
    # (earlier shards: all queries x half the keys), the most merge work of any rank.
    rank = world - 1
    rows = []
    for seqlen in seqlens:
        if seqlen % (2 * world):
            raise SystemExit(f"--seqlens must be multiples of 2 x world ({2 * world})")
        for causal in (True, False):
            n = seqlen // world
            gen = torch.Generator(device=device).manual_seed(seqlen)
            q = torch.randn(1, n, heads, head_dim, generator=gen, device=device, dtype=dtype).requires_grad_()
            shards = [[torch.randn(1, n, heads, head_dim, generator=gen, device=device, dtype=dtype)
                       for _ in range(2)] for _ in range(world)]
            k, v = (shards[rank][i].requires_grad_() for i in range(2))
            shape = AttentionShape(1, n, n, heads, heads, head_dim)
            scale = head_dim ** -0.5
            block = blocks.choose(backend, q, k, v, shape, causal, scale, None, False)
            ring = Handover(world, rank, shards)
            k_all, v_all = (torch.cat([s[i] for s in shards], dim=1) for i in range(2))  # rank order
            runs = {"ring compute": lambda q_, k_, v_: RingAttention.apply(q_, k_, v_, None, causal, scale, block,
                                                                           ring, None)[0],
                    "gathered": lambda q_, k_, v_: gathered_attention(q_, k_all, v_all, causal, seqlen, world,
                                                                      rank, backend)}
            row = {"seqlen": seqlen, "world": world, "causal": causal, "dtype": str(dtype).replace("torch.", "")}
            row = {"rank": rank, **row}
            row.update(gate(runs["ring compute"], q, k, v, k_all, v_all, causal, seqlen, world, rank))
            for name, run in runs.items():
                for mode, fn in modes(run, [q, k, v]).items():
                    fn()  # warm-up
                    row[f"{name} {mode} ms"] = elapsed_ms(fn, calls, device)
            if cuda:
                row.update(one_gpu_share(seqlen, heads, head_dim, dtype, causal, calls, world))
            for mode in ("fwd", "fwd_bwd"):
                row[f"ring vs gathered {mode}"] = row[f"gathered {mode} ms"] / row[f"ring compute {mode} ms"]
                if f"one-gpu/W {mode} ms" in row:
                    row[f"compute efficiency {mode}"] = row[f"one-gpu/W {mode} ms"] / row[f"ring compute {mode} ms"]
                flop = attention_flops(1, heads, seqlen, seqlen, head_dim, causal=causal, mode=mode) / world
                row[f"ring compute {mode} TFLOPS"] = flop / row[f"ring compute {mode} ms"] / 1e9
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(rows, Path(args.out), "ring_compute")  # after every row: a cut-short run keeps its rows
    if any(r["gate"] == "FAIL" for r in rows):
        sys.exit(1)


def gate(run, q, k, v, k_all, v_all, causal, seqlen, world, rank) -> dict:
    """The rank's first GATE rows and last GATE rows (its head and tail chunks) of head 0: output
    and dQ (cotangent on those rows only) against the float64 reference over the whole K/V."""
    half = q.shape[1] // 2
    rows = torch.cat([torch.arange(min(GATE, half)), torch.arange(q.shape[1] - min(GATE, half), q.shape[1])])
    pos = zigzag_positions(seqlen, world, rank)[rows]
    order = torch.cat([zigzag_positions(seqlen, world, r) for r in range(world)]).argsort()
    keys = [x[:, order.to(x.device), :1].detach().cpu() for x in (k_all, v_all)]  # (1, S, 1, D), in order
    dout_rows = torch.randn(1, rows.shape[0], 1, q.shape[-1], generator=torch.Generator().manual_seed(3))
    dout = torch.zeros_like(q)
    dout[:, rows.to(q.device), :1] = dout_rows.to(q)
    q.grad = None
    out = run(q, k, v)
    out.backward(dout)
    hidden = torch.arange(seqlen)[None, :] > pos[:, None] if causal else torch.zeros(rows.shape[0], seqlen, dtype=bool)
    bias = semantics.bool_to_bias(~hidden, torch.float32)[None, None]  # (1, 1, rows, S)

    def reference_run(dtype):
        qs = q[:, rows.to(q.device), :1].detach().cpu().to(dtype).requires_grad_()
        o = reference.attention(qs, keys[0].to(dtype), keys[1].to(dtype), bias=bias.to(dtype))
        o.backward(dout_rows.to(dtype))
        return o, qs.grad

    (ref, ref_dq), (naive, naive_dq) = reference_run(torch.float64), reference_run(q.dtype)
    results = [testing.compare("out", out[:, rows.to(q.device), :1].cpu(), naive, ref, testing.OUT_FACTOR),
               testing.compare("dq", q.grad[:, rows.to(q.device), :1].cpu(), naive_dq, ref_dq, testing.GRAD_FACTOR)]
    return {"gate": "ok" if all(c.ok for c in results) else "FAIL", "gate_detail": "; ".join(map(str, results))}


def one_gpu_share(seqlen, heads, head_dim, dtype, causal, calls, world) -> dict:
    """1/W of fastattn.attention on the whole sequence on this GPU: the ideal per-rank time."""
    try:
        x = [torch.randn(1, seqlen, heads, head_dim, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)]
        row = {}
        for mode, fn in modes(lambda a, b, c: fastattn.attention(a, b, c, causal=causal), x).items():
            fn()
            row[f"one-gpu/W {mode} ms"] = elapsed_ms(fn, calls, x[0].device) / world
        return row
    except torch.OutOfMemoryError:
        return {"one-gpu": "out of memory"}


if __name__ == "__main__":
    main()
