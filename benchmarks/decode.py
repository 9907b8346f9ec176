"""The decoding benchmark: one new token per sequence against a long KV cache, in bytes per second.

    python benchmarks/decode.py [--grid quick|full|cpu] [--out DIR]

Decoding is bound by reading the cache: each step reads every cached key and value once. Each case
is timed for fastattn's split-KV decode kernel (contiguous and paged caches), fastattn.attention
with Sq = 1 on the same cache as a user calls it ("fastattn-attention": over >= 8 MiB it runs the
decode kernel over the cache as full, launchers.decode.attend_full) and forced onto the prefill
kernel ("fastattn-prefill"); both again with a key-padding mask ("-kpm": every key real, the
mask's cost), and PyTorch SDPA forced to each of its
backends (flash, efficient, math) on the contiguous cache, all in one run on one device, with the
device's copy bandwidth measured first (benchmarks.common). Reported: milliseconds, GB/s (cache
bytes read / time), % of the copy ceiling, and the ratio to the best SDPA backend and to the prefill
kernel. A correctness gate compares each fastattn row with the float64 reference (the tolerance
rule) on the first sequence. Writes decode.json and decode.md into --out.

Bars (issue 11, on an H100/H200): >= 80% of the copy ceiling for KV >= 8k at batch 1 and 32, and
>= 2x the best SDPA backend on the same cases. On a machine without a GPU the "cpu" grid runs tiny
cases through the interpreter as a smoke test: the gate means something, the times do not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import use_interpreter_without_gpu  # noqa: E402

use_interpreter_without_gpu()  # before fastattn (and triton) are imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import fastattn  # noqa: E402
from benchmarks.common import environment, measure_ceilings, time_ms  # noqa: E402
from fastattn import reference, testing  # noqa: E402
from fastattn.launchers import decode as decode_launch  # noqa: E402
from fastattn.launchers import plans  # noqa: E402


@dataclass(frozen=True)
class DecodeCase:
    batch: int
    kv_len: int  # cached tokens per sequence (the new one included)
    heads_q: int = 32
    heads_kv: int = 8
    head_dim: int = 128
    dtype: str = "bfloat16"
    page_size: int = 64  # the paged row's page size

    @property
    def label(self) -> str:
        return f"B{self.batch} KV{self.kv_len} H{self.heads_q}/{self.heads_kv} D{self.head_dim} {self.dtype}"

    def cache_bytes(self) -> int:
        """What one step must read: every cached key and value (q and out are negligible)."""
        return 2 * self.batch * self.kv_len * self.heads_kv * self.head_dim * getattr(torch, self.dtype).itemsize


GRIDS = {
    # tools/gpu_check.sh: the bars' cases (KV >= 8k, batch 1 and 32) and a short one.
    "quick": lambda: [DecodeCase(b, n) for b in (1, 32) for n in (8192, 32768)] + [DecodeCase(8, 1024)],
    "full": lambda: [DecodeCase(b, n) for b in (1, 8, 32, 64) for n in (1024, 8192, 32768, 131072)
                     if b * n <= 64 * 32768],  # B x KV bounded: the math backend's inputs stay in memory
    "cpu": lambda: [DecodeCase(2, 300, 4, 1, 64, "float16", 16), DecodeCase(1, 1000, 8, 8, 32, "float32", 64)],
}


def make_inputs(case: DecodeCase, device: str, gen: torch.Generator):
    """q (B, 1, Hq, D); the new token's k, v (B, 1, Hkv, D); a contiguous cache (B, KV, Hkv, D) and
    the same keys paged (pages in a shuffled order); cache_seqlens = KV - 1 (the new token fills it)."""
    dt = getattr(torch, case.dtype)
    b, n, hkv, d = case.batch, case.kv_len, case.heads_kv, case.head_dim
    randn = lambda *shape: torch.randn(*shape, device=device, generator=gen).to(dt)  # noqa: E731
    q, k_new, v_new = randn(b, 1, case.heads_q, d), randn(b, 1, hkv, d), randn(b, 1, hkv, d)
    k_cache, v_cache = randn(b, n, hkv, d), randn(b, n, hkv, d)
    per_seq = -(-n // case.page_size)
    table = torch.randperm(b * per_seq, device=device, generator=gen).view(b, per_seq).int()
    pages = torch.zeros(b * per_seq * case.page_size, hkv, d, device=device, dtype=dt)
    rows = (table.long()[:, :, None] * case.page_size + torch.arange(case.page_size, device=device)).view(b, -1)[:, :n]
    k_pages, v_pages = pages.clone(), pages
    k_pages[rows] = k_cache
    v_pages[rows] = v_cache
    seqlens = torch.full((b,), n - 1, dtype=torch.int32, device=device)
    k_pages = k_pages.view(-1, case.page_size, hkv, d)
    v_pages = v_pages.view(-1, case.page_size, hkv, d)
    return q, k_new, v_new, (k_cache, v_cache, None), (k_pages, v_pages, table), seqlens


def providers(case: DecodeCase, inputs):
    """name -> (fn() -> out (B, 1, Hq, D), context() -> the context its calls run in). The decode rows
    append the new token each call (at the same position: the cache does not grow while timed); the
    others read the filled contiguous cache. SDPA's backend choice is a context entered once around
    the row's calls and timings (as a model enters it once), not inside the timed call: its host
    cost would be charged to SDPA's eager time."""
    q, k_new, v_new, contiguous, paged, seqlens = inputs
    k_cache, v_cache, _ = contiguous

    def decode(layout):
        kc, vc, table = layout
        return lambda: fastattn.attention_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=seqlens,
                                                       block_table=table, backend="triton")

    qt, kt, vt = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)  # (B, H, S, D) views

    def sdpa(backend):
        return (lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True).transpose(1, 2),
                lambda: sdpa_kernel(backend))

    attention = lambda: fastattn.attention(q, k_cache, v_cache, causal=True, backend="triton")
    real = torch.ones(k_cache.shape[:2], dtype=torch.bool, device=q.device)  # (B, KV): every key real
    padded = lambda: fastattn.attention(q, k_cache, v_cache, causal=True, key_padding_mask=real, backend="triton")
    return {
        "fastattn-decode": (decode(contiguous), contextlib.nullcontext),
        "fastattn-decode-paged": (decode(paged), contextlib.nullcontext),
        # fastattn.attention with Sq = 1 as called: over >= FEW_QUERIES_MIN_BYTES it runs the decode
        # kernel over the cache as full (launchers.decode.attend_full); and forced onto the prefill kernel
        "fastattn-attention": (attention, contextlib.nullcontext),
        "fastattn-prefill": (attention, prefill_kernel_only),
        # the same with a key-padding mask (a left-padded batch's generate() step; none padded here)
        "fastattn-attention-kpm": (padded, contextlib.nullcontext),
        "fastattn-prefill-kpm": (padded, prefill_kernel_only),
        "sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa-efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
        "sdpa-math": sdpa(SDPBackend.MATH),
    }


@contextlib.contextmanager
def prefill_kernel_only():
    """fastattn.attention with few queries on the prefill kernel, whatever the bytes."""
    saved = decode_launch.FEW_QUERIES_MIN_BYTES
    decode_launch.FEW_QUERIES_MIN_BYTES = 1 << 62
    try:
        yield
    finally:
        decode_launch.FEW_QUERIES_MIN_BYTES = saved


def gate(out: torch.Tensor, q, k_cache, v_cache) -> str:
    """The tolerance rule on the first sequence, against the float64 reference over its cache."""
    ref = reference.attention(q[:1].double(), k_cache[:1].double(), v_cache[:1].double(), causal=True)
    naive = reference.attention(q[:1], k_cache[:1], v_cache[:1], causal=True)
    c = testing.compare("out", out[:1], naive, ref, testing.OUT_FACTOR)
    return "ok" if c.ok else f"FAIL: {c}"


def run_case(case: DecodeCase, device: str, copy_gbps: float, gen: torch.Generator, timed: bool) -> list[dict]:
    inputs = make_inputs(case, device, gen)
    q, k_cache, v_cache = inputs[0], *inputs[3][:2]
    rows = []
    for name, (fn, context) in providers(case, inputs).items():
        row = {"case": {**asdict(case), "label": case.label}, "provider": name}
        with context():
            try:
                out = fn()
                if name.startswith("fastattn"):
                    row["gate"] = gate(out, q, k_cache, v_cache)
                if timed or not name.startswith("fastattn"):
                    row["ms"] = time_ms(fn, device=device)
                    row["gbps"] = case.cache_bytes() / row["ms"] / 1e6
                    row["pct_copy"] = 100 * row["gbps"] / copy_gbps
                else:
                    row["skipped"] = "interpreter: checked, not timed"
            except (RuntimeError, ValueError) as e:  # an SDPA backend refusing the case says why
                row["skipped"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
            if device == "cuda" and "ms" in row:
                graph_time(row, fn, case, copy_gbps)
        rows.append(row)
        if device == "cuda":
            torch.cuda.empty_cache()
    for key in ("ms", "graph_ms"):  # eager calls; and replays from a CUDA graph
        best_sdpa = min((r[key] for r in rows if r["provider"].startswith("sdpa") and key in r), default=None)
        prefill = {name: r.get(key) for r in rows for name in ("fastattn-prefill", "fastattn-prefill-kpm")
                   if r["provider"] == name}
        prefix = "" if key == "ms" else "graph_"
        for r in rows:
            if key in r and best_sdpa:
                r[prefix + "vs_best_sdpa"] = best_sdpa / r[key]
            # (a -kpm row against the prefill kernel with the same mask)
            prefill_ms = prefill.get("fastattn-prefill" + ("-kpm" if r["provider"].endswith("-kpm") else ""))
            if key in r and prefill_ms:
                r[prefix + "vs_prefill"] = prefill_ms / r[key]
    return rows


def graph_time(row: dict, fn, case: DecodeCase, copy_gbps: float) -> None:
    """The call's device time: captured once in a CUDA graph and replayed, so no host work is timed
    (a decode step at batch 1 is a few microseconds of GPU work behind tens of host microseconds;
    a model's graphed decode step replays it this way)."""
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        row["graph_ms"] = time_ms(graph.replay, device="cuda")
        row["graph_gbps"] = case.cache_bytes() / row["graph_ms"] / 1e6
        row["graph_pct_copy"] = 100 * row["graph_gbps"] / copy_gbps
    except (RuntimeError, ValueError) as e:
        row["graph_skipped"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"


def markdown(doc: dict) -> str:
    env = doc["environment"]
    lines = [f"# Decode benchmark: {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; {env['timer']}. Copy ceiling "
             f"{doc['copy_gbps']:.0f} GB/s (measured in this run). GB/s = cached K and V bytes read per step / time.",
             "" if env["device_type"] == "cuda" else
             "\n**CPU run**: interpreter correctness only; times mean nothing.\n",
             "Eager: each call launched from Python (host time included where the host is slower than "
             "the GPU). Graphed: the same call captured in a CUDA graph and replayed (device time only; a "
             "model's graphed decode step runs this way). Ratios compare like with like.", "",
             "| case | provider | ms | GB/s | % of copy | vs best SDPA | vs prefill kernel | graphed ms | graphed GB/s "
             "| graphed % of copy | graphed vs best SDPA | gate |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda r, k, fmt: format(r[k], fmt) if k in r else "-"  # noqa: E731
    x = lambda r, k: f"{r[k]:.2f}x" if k in r else "-"  # noqa: E731
    for r in doc["rows"]:
        if "ms" not in r:
            lines.append(f"| {r['case']['label']} | {r['provider']} | {r.get('skipped', '-')} |||||||||| "
                         f"{r.get('gate', '-')} |")
            continue
        lines.append(f"| {r['case']['label']} | {r['provider']} | {f(r, 'ms', '.4f')} | {f(r, 'gbps', '.0f')} | "
                     f"{f(r, 'pct_copy', '.0f')}% | {x(r, 'vs_best_sdpa')} | {x(r, 'vs_prefill')} | "
                     f"{f(r, 'graph_ms', '.4f')} | {f(r, 'graph_gbps', '.0f')} | {f(r, 'graph_pct_copy', '.0f')}% | "
                     f"{x(r, 'graph_vs_best_sdpa')} | {r.get('gate', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    ap.add_argument("--grid", choices=sorted(GRIDS), default="quick" if cuda else "cpu")
    ap.add_argument("--out", type=Path, default=Path(".benchmarks/decode"))
    args = ap.parse_args(argv)
    device = "cuda" if cuda else "cpu"
    if args.grid != "cpu" and not cuda:
        print(f"--grid {args.grid} needs a CUDA GPU; without one run --grid cpu")
        return 2
    copy_gbps = measure_ceilings(device)["copy_gbps"]
    gen = torch.Generator(device=device).manual_seed(0)
    doc = {"environment": environment(device), "grid": args.grid, "copy_gbps": copy_gbps, "rows": []}
    args.out.mkdir(parents=True, exist_ok=True)
    for case in GRIDS[args.grid]():
        rows = run_case(case, device, copy_gbps, gen, timed=cuda)
        doc["rows"] += rows
        for r in rows:
            print(f"{case.label:<36} {r['provider']:<22} "
                  + (f"{r['ms']:.4f} ms {r['gbps']:7.0f} GB/s {r['pct_copy']:4.0f}% of copy"
                     + (f"  {r['vs_best_sdpa']:.2f}x best SDPA" if "vs_best_sdpa" in r else "")
                     + (f"; graphed {r['graph_ms']:.4f} ms {r['graph_pct_copy']:4.0f}% of copy" if "graph_ms" in r
                        else "")
                     if "ms" in r else r.get("skipped", "")) + (f"  gate {r['gate']}" if "gate" in r else ""),
                  flush=True)
        doc["tuned_configs"] = [c for c in plans.tuned_configs() if c["kernel"].startswith(("decode", "kv_append"))]
        (args.out / "decode.json").write_text(json.dumps(doc, indent=2))  # after every case: partial runs survive
    (args.out / "decode.md").write_text(markdown(doc))
    failed = [r for r in doc["rows"] if r.get("gate", "ok") != "ok"]
    print(f"wrote {args.out / 'decode.json'} and decode.md; {len(failed)} fastattn rows failed the gate")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
