"""Ring attention across GPUs: fastattn.distributed.ring_attention against the all-gather way, and
its scaling against one GPU.

    torchrun --nproc-per-node 8 benchmarks/ring.py [--seqlens 32768,131072] [--out DIR]
    torchrun --nproc-per-node 2 benchmarks/ring.py --smoke     # CPU, gloo, tiny shapes (a test)

Each rank holds S / W tokens of one sequence (batch 1, 16 heads, D = 128, bf16; zig-zag layout),
causal and not. Per case, in one run, forward and forward+backward:

- ring: ``ring_attention`` (K/V shards travel the ring, overlapped with the kernels);
- all-gather: K/V all-gathered (backward: reduce-scattered), then local attention of the rank's
  queries against the whole sequence (causal: its two chunks against their key prefixes);
- one GPU (rank 0 alone, the others wait): ``fastattn.attention`` on the whole sequence, when it
  fits; scaling efficiency = T(one GPU) / (W x T(ring)), 1.0 = perfect.

Times: a fixed number of calls on every rank (collectives need the same count), CUDA events, the
slowest rank's mean. TFLOPS per GPU count the whole sequence's FLOP / W (fastattn.flops).
Correctness gate first, for the ring and the all-gather way: 256 query positions spread over the
sequence (every rank, every kind of ring block) of head 0, their outputs and dQ, and dK, dV of KV
head 0 under a cotangent on those rows only, against the float64 reference over the whole
gathered sequence, under the tests' tolerance rule. Writes ring.json and ring.md into --out (rank
0); exit status 1 when a gate fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import fastattn  # noqa: E402
from fastattn import reference, semantics, testing  # noqa: E402
from fastattn.distributed import ring_attention, unshard, zigzag_positions  # noqa: E402
from fastattn.flops import attention_flops  # noqa: E402

GATE_QUERIES = 256  # query positions checked per case, spread over the sequence


class GatherSequence(torch.autograd.Function):
    """All-gather along the sequence dim in rank order (backward: each rank's part of the summed
    gradient: reduce-scatter, or all-reduce where the transport has none)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        world, rank = dist.get_world_size(), dist.get_rank()
        chunks = [c.contiguous() for c in grad.chunk(world, dim=1)]
        if dist.get_backend() == "nccl":
            mine = torch.empty_like(chunks[0])
            dist.reduce_scatter(mine, chunks)
            return mine
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(world, dim=1)[rank]


def all_gather_attention(q, k, v, causal, seqlen, backend):
    """The rank's queries against the whole sequence's K/V, gathered."""
    k_all, v_all = GatherSequence.apply(k), GatherSequence.apply(v)  # (B, S, Hkv, D), zig-zag order
    return gathered_attention(q, k_all, v_all, causal, seqlen, dist.get_world_size(), dist.get_rank(), backend)


def gathered_attention(q, k_all, v_all, causal, seqlen, world, rank, backend):
    """Rank `rank`'s queries (zig-zag shard) against the whole K/V (B, S_padded, Hkv, D), which is
    in rank order of the shards."""
    if not causal:
        return fastattn.attention(q, k_all, v_all, backend=backend)
    order = torch.cat([zigzag_positions(seqlen, world, r, q.device) for r in range(world)]).argsort()
    k_all, v_all = k_all.index_select(1, order), v_all.index_select(1, order)  # positions in order
    half = q.shape[1] // 2
    ends = (zigzag_positions(seqlen, world, rank)[[half - 1, -1]] + 1).tolist()  # last position + 1
    # Bottom-right causal: a chunk of queries ending at position e sees keys < e.
    return torch.cat([fastattn.attention(q[:, :half], k_all[:, :ends[0]], v_all[:, :ends[0]], causal=True,
                                         backend=backend),
                      fastattn.attention(q[:, half:], k_all[:, :ends[1]], v_all[:, :ends[1]], causal=True,
                                         backend=backend)], dim=1)


def elapsed_ms(fn, calls: int, device) -> float:
    """Mean ms per call over `calls` back-to-back calls (CUDA events on a GPU, wall clock on a CPU)."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) * 1e3 / calls
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def timed_ms(fn, calls: int, warmup: int, device) -> float:
    """elapsed_ms after `warmup` calls, the same counts on every rank (collectives need them); the
    slowest rank's time."""
    for _ in range(warmup):
        fn()
    dist.barrier()
    slowest = torch.tensor([elapsed_ms(fn, calls, device)], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.item()


def modes(run, inputs):
    """{"fwd": fn, "fwd_bwd": fn} for run(q, k, v) -> out."""
    q, k, v = inputs
    dout = torch.randn_like(q)

    def fwd_bwd():
        for x in inputs:
            x.grad = None
        run(q, k, v).backward(dout)

    def fwd():
        with torch.no_grad():
            run(q, k, v)

    return {"fwd": fwd, "fwd_bwd": fwd_bwd}


def gate(run, inputs, causal, seqlen) -> dict:
    """Forward and backward of `run` on head 0: GATE_QUERIES query positions spread over the whole
    sequence (so every rank and every kind of ring block holds some) against the float64 reference
    over the whole K/V; the cotangent is random on those rows of head 0 and zero elsewhere, so dQ of
    those rows and dK, dV of KV head 0 (every position) are the reference's too. Tolerance rule of
    the tests; rank 0 reports."""
    q, k, v = inputs
    world, rank = dist.get_world_size(), dist.get_rank()
    chosen = torch.linspace(0, seqlen - 1, min(GATE_QUERIES, seqlen)).round().long().unique()
    gen = torch.Generator().manual_seed(7)  # the same cotangent on every rank
    d_chosen = torch.randn(chosen.shape[0], q.shape[-1], generator=gen)  # (n, D)
    pos = zigzag_positions(seqlen, world, rank)
    mine = torch.isin(pos, chosen)  # this rank's rows among the chosen
    dout = torch.zeros_like(q)
    dout[0, mine.to(q.device), 0] = d_chosen[torch.searchsorted(chosen, pos[mine])].to(q)
    for x in inputs:
        x.grad = None
    out = run(q, k, v)
    out.backward(dout)
    # Head 0 of everything, the whole sequence on every rank: (1, S, 1, D) each.
    whole = {name: unshard(x[:1, :, :1].detach(), seqlen) for name, x in
             (("q", q), ("k", k), ("v", v), ("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad))}
    if rank != 0:
        return {}
    keys = torch.arange(seqlen)
    hidden = keys[None, :] > chosen[:, None] if causal else torch.zeros(chosen.shape[0], seqlen, dtype=torch.bool)
    bias = semantics.bool_to_bias(~hidden, torch.float32)[None, None]  # (1, 1, n, S): causal by position

    def reference_run(dtype):
        xs = [whole[n][:, chosen].to("cpu", dtype) if n == "q" else whole[n].to("cpu", dtype) for n in ("q", "k", "v")]
        for x in xs:
            x.requires_grad_()
        o = reference.attention(*xs, bias=bias.to(dtype))
        o.backward(d_chosen[None, :, None].to(dtype))
        return {"out": o, "dq": xs[0].grad, "dk": xs[1].grad, "dv": xs[2].grad}

    ref, naive = reference_run(torch.float64), reference_run(q.dtype)
    got = {"out": whole["out"][:, chosen], "dq": whole["dq"][:, chosen], "dk": whole["dk"], "dv": whole["dv"]}
    grad_scale = testing.magnitude(ref["dq"], ref["dk"], ref["dv"])
    results = [testing.compare(n, got[n].cpu(), naive[n], ref[n], testing.OUT_FACTOR if n == "out" else
                               testing.GRAD_FACTOR, None if n == "out" else grad_scale) for n in got]
    return {"gate": "ok" if all(c.ok for c in results) else "FAIL",
            "gate_detail": "; ".join(str(c) for c in results)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", default="32768,131072")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--out", default=".benchmarks/ring")
    p.add_argument("--smoke", action="store_true", help="CPU (gloo), float32, tiny shapes")
    args = p.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = torch.device("cuda" if cuda else "cpu")
    dtype, backend = (torch.bfloat16, "auto") if cuda else (torch.float32, "torch")
    heads, head_dim = (args.heads, args.head_dim) if cuda else (2, 16)
    smoke_lengths = [32 * world + 3, 32 * world]  # padded shards, and not
    seqlens = smoke_lengths if args.smoke else [int(s) for s in args.seqlens.split(",")]
    calls, warmup = (args.calls, 3) if cuda else (2, 1)
    rows = []
    for seqlen in seqlens:
        for causal in (True, False):
            local = -(-seqlen // (2 * world)) * 2  # zig-zag shard length (padded)
            gen = torch.Generator(device=device).manual_seed(1000 + rank)  # each rank its own tokens
            inputs = [torch.randn(1, local, heads, head_dim, generator=gen, device=device, dtype=dtype)
                      .requires_grad_() for _ in range(3)]
            # Padding at the end of the sequence: causal never sees it; otherwise mask it.
            pos = zigzag_positions(seqlen, world, rank, device)
            mask = None if causal or local * world == seqlen else (pos < seqlen)[None]
            flops = {m: attention_flops(1, heads, seqlen, seqlen, head_dim, causal=causal, mode=m) / world
                     for m in ("fwd", "fwd_bwd")}
            runs = {"ring": lambda q, k, v: ring_attention(q, k, v, causal=causal, key_padding_mask=mask,
                                                           backend=backend)}
            if mask is None:  # (the padded non-causal case, smoke shapes only, runs the ring alone)
                runs["all-gather"] = lambda q, k, v: all_gather_attention(q, k, v, causal, seqlen, backend)
            row = {"seqlen": seqlen, "causal": causal, "world": world, "dtype": str(dtype).replace("torch.", "")}
            for name, run in runs.items():
                row.update({f"{name} {key}": value for key, value in gate(run, inputs, causal, seqlen).items()})
                for mode, fn in modes(run, inputs).items():
                    ms = timed_ms(fn, calls, warmup, device)
                    row[f"{name} {mode} ms"] = ms
                    row[f"{name} {mode} TFLOPS/GPU"] = flops[mode] / ms / 1e9
            if cuda and rank == 0:
                row.update(one_gpu(seqlen, heads, head_dim, dtype, causal, calls, flops, world))
            dist.barrier()
            for mode in ("fwd", "fwd_bwd"):
                if f"one-gpu {mode} ms" in row:
                    row[f"scaling {mode}"] = row[f"one-gpu {mode} ms"] / (world * row[f"ring {mode} ms"])
                if f"all-gather {mode} ms" in row:
                    row[f"ring vs all-gather {mode}"] = row[f"all-gather {mode} ms"] / row[f"ring {mode} ms"]
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
    if rank == 0:
        write(rows, Path(args.out))
    dist.destroy_process_group()
    if rank == 0 and any(value == "FAIL" for r in rows for value in r.values()):
        sys.exit(1)


def one_gpu(seqlen, heads, head_dim, dtype, causal, calls, flops, world) -> dict:
    """fastattn.attention on the whole sequence on this GPU alone (no collectives)."""
    try:
        q, k, v = (torch.randn(1, seqlen, heads, head_dim, device="cuda", dtype=dtype, requires_grad=True)
                   for _ in range(3))
        row = {}
        for mode, fn in modes(lambda a, b, c: fastattn.attention(a, b, c, causal=causal), (q, k, v)).items():
            fn()  # warm-up
            ms = elapsed_ms(fn, calls, q.device)
            row[f"one-gpu {mode} ms"] = ms
            row[f"one-gpu {mode} TFLOPS"] = flops[mode] * world / ms / 1e9
        return row
    except torch.OutOfMemoryError:
        return {"one-gpu": "out of memory"}


def write(rows, out: Path, name: str = "ring") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    keys = sorted({k for r in rows for k in r if not k.endswith("gate_detail")}, key=lambda k: (k.count(" "), k))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r.get(k), float) else str(r.get(k, ""))
                                       for k in keys) + " |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
