"""Attention benchmark: fastattn against PyTorch SDPA's backends, on the same card, in one run.

    python benchmarks/bench_attention.py --quick --out DIR      (the subset tools/gpu_check.sh runs)

Measures the card's own ceilings first (large bf16 matmul, device-to-device copy), gates every
provider's forward output against the float64 reference (one head of one batch element, DESIGN.md
tolerance rule), then times forward and backward with CUDA events (triton.testing.do_bench, median)
on fresh random inputs. Writes bench.json and bench.md into --out and prints the table.
Needs a CUDA GPU; the full suite with plots and the CPU mode come with the benchmark issue.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import fastattn  # noqa: E402
from fastattn import reference, testing  # noqa: E402
from fastattn.flops import attention_flops  # noqa: E402


@dataclass
class Case:
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_q: int
    heads_kv: int
    head_dim: int
    causal: bool
    dtype: str

    @property
    def label(self) -> str:
        return (f"B{self.batch} Sq{self.seqlen_q} Sk{self.seqlen_k} H{self.heads_q}/{self.heads_kv} "
                f"D{self.head_dim} {'causal' if self.causal else 'full'} {self.dtype}")


@dataclass
class Result:
    case: Case
    provider: str
    mode: str
    ms: float | None = None
    tflops: float | None = None
    pct_of_matmul: float | None = None
    gate: str = ""
    skipped: str = ""
    ratios: dict = field(default_factory=dict)


def _sdpa(backend):
    def run(q, k, v, causal):
        # fastattn layout (B, S, H, D) -> SDPA's (B, H, S, D) views; this is what a user would pass.
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=causal, enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2)
    return run


PROVIDERS = {
    "fastattn-triton": lambda q, k, v, causal: fastattn.attention(q, k, v, causal=causal, backend="triton"),
    "sdpa-flash": _sdpa(SDPBackend.FLASH_ATTENTION),
    "sdpa-cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
    "sdpa-efficient": _sdpa(SDPBackend.EFFICIENT_ATTENTION),
}
BASELINES = ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient")


def bench(fn, **kw) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median", **kw)


def ceilings() -> dict:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)
    src = torch.randn(256 * 2**20, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms_copy = bench(lambda: dst.copy_(src))
    return {"matmul_bf16_tflops": 2 * 8192**3 / ms * 1e-9, "copy_gbps": 2 * src.numel() * 4 / ms_copy * 1e-6}


def gate(provider_fn, q, k, v, causal) -> str:
    """Forward of one (batch 0, head 0) slice against float64, under the tolerance rule."""
    out = provider_fn(q, k, v, causal)[:1, :, :1]
    qs, ks, vs = q[:1, :, :1], k[:1, :, :1], v[:1, :, :1]
    ref = reference.attention(qs.double(), ks.double(), vs.double(), causal=causal)
    naive = reference.attention(qs, ks, vs, causal=causal)
    c = testing.compare("out", out, naive, ref, testing.OUT_FACTOR)
    return "ok" if c.ok else f"FAIL {c.error:.2e} > {c.tolerance:.2e}"


def run_case(case: Case, ceil: dict, modes) -> list[Result]:
    dtype = getattr(torch, case.dtype)
    q, k, v = testing.random_qkv(case.batch, case.seqlen_q, case.seqlen_k, case.heads_q, case.heads_kv,
                                 case.head_dim, dtype=dtype, device="cuda")
    results = []
    for name, fn in PROVIDERS.items():
        try:
            g = gate(fn, q, k, v, case.causal)
        except Exception as e:  # the provider cannot run this case: report it, do not drop it
            for mode in modes:
                results.append(Result(case, name, mode, skipped=f"{type(e).__name__}: {str(e)[:120]}"))
            continue
        for mode in modes:
            r = Result(case, name, mode, gate=g)
            xs = [x.detach().clone().requires_grad_(mode != "fwd") for x in (q, k, v)]
            if mode == "fwd":
                r.ms = bench(lambda: fn(*xs, case.causal))
            else:
                out = fn(*xs, case.causal)
                dout = torch.randn_like(out)
                r.ms = bench(lambda: out.backward(dout, retain_graph=True), grad_to_none=xs)
            flops = attention_flops(case.batch, case.heads_q, case.seqlen_q, case.seqlen_k, case.head_dim,
                                    causal=case.causal, mode=mode)
            r.tflops = flops / r.ms * 1e-9
            r.pct_of_matmul = 100 * r.tflops / ceil["matmul_bf16_tflops"]
            results.append(r)
    for r in results:
        if r.provider.startswith("fastattn") and r.ms:
            for base in BASELINES:
                other = next((o for o in results if o.provider == base and o.mode == r.mode and o.ms), None)
                if other:
                    r.ratios[base] = other.ms / r.ms  # > 1: fastattn is faster
    return results


def quick_cases() -> list[Case]:
    # FlashAttention's grid at D=128: 16k tokens per batch, hidden 2048 -> 16 heads.
    cases = []
    for dtype in ("bfloat16", "float16"):
        for causal in (False, True):
            for seqlen in (1024, 4096, 16384):
                cases.append(Case(16384 // seqlen, seqlen, seqlen, 16, 16, 128, causal, dtype))
    cases.append(Case(4, 4096, 4096, 32, 32, 64, True, "bfloat16"))
    cases.append(Case(8, 512, 4096, 16, 16, 128, False, "bfloat16"))  # cross-attention
    return cases


def environment(ceil: dict) -> dict:
    return {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "autotune": os.environ.get("FASTATTN_AUTOTUNE", "1"), "ceilings": ceil,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def padding_cost(batch=8, seqlen=2048, heads=16, head_dim=128, dtype="bfloat16", fill=0.5, *, timer=None,
                 device="cuda", modes=("fwd", "bwd")) -> list[dict]:
    """The same batch three ways: "dense" (every token real), "masked" (key_padding_mask, each
    sequence's first fill * S keys real: padded key tiles are skipped, every query still runs) and
    "varlen" (only the real tokens, packed; attention cost ~ fill**2). Returns one row per variant
    and mode with its time and its ratio to dense."""
    timer = timer or bench
    dt = getattr(torch, dtype)
    real = int(seqlen * fill)
    q, k, v = testing.random_qkv(batch, seqlen, seqlen, heads, heads, head_dim, dtype=dt, device=device)
    mask = torch.zeros(batch, seqlen, dtype=torch.bool, device=device)
    mask[:, :real] = True
    packed = [fastattn.unpad_input(x, mask) for x in (q, k, v)]
    _, _, cu, max_len = packed[0]
    variants = {
        "dense": ((q, k, v), lambda a, b, c: fastattn.attention(a, b, c, backend="triton")),
        "masked": ((q, k, v), lambda a, b, c: fastattn.attention(a, b, c, key_padding_mask=mask, backend="triton")),
        "varlen": (tuple(p[0] for p in packed),
                   lambda a, b, c: fastattn.attention_varlen(a, b, c, cu, cu, max_len, max_len, backend="triton")),
    }
    rows = []
    for name, (inputs, fn) in variants.items():
        for mode in modes:
            xs = [x.detach().clone().requires_grad_(mode != "fwd") for x in inputs]
            if mode == "fwd":
                ms = timer(lambda: fn(*xs))
            else:
                out = fn(*xs)
                dout = torch.randn_like(out)
                ms = timer(lambda: out.backward(dout, retain_graph=True), grad_to_none=xs)
            rows.append({"variant": name, "mode": mode, "ms": ms, "batch": batch, "seqlen": seqlen, "fill": fill,
                         "heads": heads, "head_dim": head_dim, "dtype": dtype})
    for r in rows:
        dense = next(d for d in rows if d["variant"] == "dense" and d["mode"] == r["mode"])
        r["ratio_to_dense"] = r["ms"] / dense["ms"]
    return rows


def markdown(env: dict, results: list[Result]) -> str:
    lines = [f"# fastattn benchmark on {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}. Ceilings measured in the same run: "
             f"bf16 matmul {env['ceilings']['matmul_bf16_tflops']:.0f} TFLOPS, copy "
             f"{env['ceilings']['copy_gbps']:.0f} GB/s. Times are medians of CUDA-event timings; ratio = "
             "baseline time / fastattn time (> 1: fastattn faster).", "",
             "| case | mode | provider | ms | TFLOPS | % matmul | vs flash | vs cuDNN | vs efficient | gate |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.skipped:
            lines.append(f"| {r.case.label} | {r.mode} | {r.provider} | skipped: {r.skipped} | | | | | | |")
            continue
        rat = [f"{r.ratios[b]:.2f}x" if b in r.ratios else "" for b in BASELINES]
        lines.append(f"| {r.case.label} | {r.mode} | {r.provider} | {r.ms:.3f} | {r.tflops:.0f} | "
                     f"{r.pct_of_matmul:.0f}% | {' | '.join(rat)} | {r.gate} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the gpu_check subset (the only grid for now)")
    ap.add_argument("--out", default="benchmarks/results", help="folder for bench.json and bench.md")
    ap.add_argument("--modes", default="fwd,bwd")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention needs a CUDA GPU (the CPU quick mode comes with the benchmark suite issue)")
        return 0
    os.makedirs(args.out, exist_ok=True)
    ceil = ceilings()
    env = environment(ceil)
    print(f"{env['device']}: matmul {ceil['matmul_bf16_tflops']:.0f} TFLOPS, copy {ceil['copy_gbps']:.0f} GB/s",
          flush=True)
    results: list[Result] = []
    for case in quick_cases():
        t0 = time.time()
        results += run_case(case, ceil, args.modes.split(","))
        torch.cuda.empty_cache()
        mine = [r for r in results if r.case is case and r.provider == "fastattn-triton" and r.ms]
        print(f"{case.label}: " + ", ".join(
            f"{r.mode} {r.tflops:.0f} TFLOPS ({', '.join(f'{b[5:]} {x:.2f}x' for b, x in r.ratios.items())})"
            for r in mine) + f"  [{time.time() - t0:.0f}s]", flush=True)
        with open(os.path.join(args.out, "bench.json"), "w") as f:  # rewritten per case: partial runs survive
            json.dump({"environment": env, "results": [asdict(r) for r in results]}, f, indent=1)
    padding = padding_cost()
    for r in padding:
        print(f"padding {r['variant']:<6} {r['mode']}: {r['ms']:.3f} ms = {r['ratio_to_dense']:.2f}x dense "
              f"(B{r['batch']} S{r['seqlen']} {r['fill']:.0%} real)", flush=True)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump({"environment": env, "results": [asdict(r) for r in results], "padding": padding}, f, indent=1)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(markdown(env, results))
        f.write("\n## Cost of padding (fastattn-triton, time relative to the unpadded batch)\n\n"
                "| variant | mode | ms | vs dense |\n|---|---|---|---|\n")
        for r in padding:
            f.write(f"| {r['variant']} | {r['mode']} | {r['ms']:.3f} | {r['ratio_to_dense']:.2f}x |\n")
    failed = [r for r in results if r.gate.startswith("FAIL")]
    print(f"{len(results)} measurements, {len(failed)} failed the correctness gate")
    return 1 if any(r.provider.startswith("fastattn") for r in failed) else 0


if __name__ == "__main__":
    sys.exit(main())
