"""Model-level benchmark: a training step and token-by-token generation of the three reference
models with each attention backend, against PyTorch SDPA ("torch") and the naive "reference".

    python benchmarks/bench_models.py [--out DIR] [--size gpu|cpu] [--models decoder,...] [--backends torch,triton]
                                      [--rounds N]

Only the attention kernels differ between rows of one model: same weights, same inputs. A training
step is forward + backward + AdamW on a padded batch (encoder, encoder-decoder) or a full one
(decoder); generation is greedy with the KV cache from left-padded prompts (decoder) or padded
sources (encoder-decoder), reported as new tokens per second. On a machine without a GPU the
"cpu" size runs small models as a smoke test: the numbers are CPU numbers and say so, and the
Triton backend is skipped (the interpreter is a correctness tool, not a timing).
Writes models.json and models.md into --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import use_interpreter_without_gpu  # noqa: E402

use_interpreter_without_gpu()  # before fastattn (and triton) are imported

import torch  # noqa: E402

import fastattn  # noqa: E402
from benchmarks.common import environment, time_ms  # noqa: E402
from fastattn.models import Decoder, Encoder, EncoderDecoder, ModelConfig, pad_left, set_attn_backend  # noqa: E402


@dataclass(frozen=True)
class Size:
    config: ModelConfig
    batch: int
    seqlen: int  # training sequence length (encoder-decoder: the source)
    target_len: int  # encoder-decoder target length in training
    prompt_len: int  # generation: longest prompt / source
    new_tokens: int
    dtype: torch.dtype


SIZES = {
    # Head dim 64 (12 heads of 768), 8 layers: realistic kernels, minutes on an H100 for every row.
    "gpu": Size(ModelConfig.preset("base", n_layers=8), batch=8, seqlen=1024, target_len=256, prompt_len=256,
                new_tokens=64, dtype=torch.bfloat16),
    "cpu": Size(ModelConfig.preset("small", vocab_size=1000, max_len=256), batch=4, seqlen=128, target_len=32,
                prompt_len=32, new_tokens=16, dtype=torch.float32),
}


def backends_to_run(device: str) -> dict[str, str | None]:
    """backend -> None if it runs here, else why not. Baselines first: each round times them
    before any fastattn kernel runs (the log shows which row was running if a kernel crashes)."""
    status = fastattn.available_backends()
    rows = {}
    for name in ["torch", "reference"] + [n for n in ("triton", "cuda") if n in status]:
        if not status[name].available:
            rows[name] = status[name].reason
        elif name == "triton" and device == "cpu":
            rows[name] = "no GPU: the Triton interpreter checks correctness, its speed means nothing"
        else:
            rows[name] = None
    return rows


def lengths(gen: torch.Generator, batch: int, seqlen: int) -> list[int]:
    """Real lengths of a padded batch: one full sequence, the rest uniform in [seqlen/2, seqlen]."""
    rest = torch.randint(seqlen // 2, seqlen + 1, (batch - 1,), generator=gen).tolist()
    return [seqlen] + rest


def right_padded(gen, vocab, batch, seqlen, device):
    tokens = torch.randint(1, vocab, (batch, seqlen), generator=gen)
    mask = torch.arange(seqlen)[None] < torch.tensor(lengths(gen, batch, seqlen))[:, None]
    return tokens.masked_fill(~mask, 0).to(device), mask.to(device)


def workloads(size: Size, device: str, gen: torch.Generator):
    """model name -> (model class, train_fn(model), generate_fn(model) or None, tokens generated)."""
    s, v = size, size.config.vocab_size
    tokens, mask = right_padded(gen, v, s.batch, s.seqlen, device)
    full = torch.randint(1, v, (s.batch, s.seqlen), generator=gen).to(device)
    tgt = torch.randint(1, v, (s.batch, s.target_len), generator=gen).to(device)
    prompts = [torch.randint(1, v, (n,), generator=gen).tolist() for n in lengths(gen, s.batch, s.prompt_len)]
    p_tokens, p_mask = pad_left(prompts, device=device)
    src, src_mask = right_padded(gen, v, s.batch, s.prompt_len, device)
    return {
        "encoder": (Encoder, lambda m: m.mlm_logits(m(tokens, mask)), None),
        "decoder": (Decoder, lambda m: m(full), lambda m, **kw: m.generate(p_tokens, p_mask, s.new_tokens, **kw)),
        "encoder-decoder": (EncoderDecoder, lambda m: m(tokens, tgt, mask),
                            lambda m, **kw: m.generate(src, src_mask, s.new_tokens, bos_id=1, **kw)),
    }


def measure(row: dict, key: str, fn):
    """fn() appended to row["_" + key] (one timing per round), or the reason it failed in
    row[key + "_error"] (e.g. the naive reference out of memory, a backend refusing an input): one
    failure never hides the other measurements, and a failed measurement is not retried."""
    if key + "_error" in row:
        return None
    try:
        ms = fn()
    except Exception as e:  # (Triton's compilation and out-of-resources errors are not RuntimeErrors)
        row[key + "_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return None
    row.setdefault("_" + key, []).append(ms)
    return ms


def train_step(model, forward, opt):
    def step():
        opt.zero_grad(set_to_none=True)
        forward(model).float().square().mean().backward()  # any scalar of every logit
        opt.step()
    return step


def run(size_name: str, out: Path | None = None, device: str | None = None, models: list[str] | None = None,
        backends: list[str] | None = None, rounds: int = 1) -> dict:
    """Every (model, backend) row timed `rounds` times, the backends taking turns within a round
    (a clock or thermal drift hits every backend alike); each figure is the median over rounds."""
    size = SIZES[size_name]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)
    status = backends_to_run(device)
    if backends:
        status = {name: status.get(name, "not a fastattn backend") for name in backends}
    results = []
    env = environment(device)

    def save() -> dict:  # after every model: a run killed at its time limit keeps the models it finished
        report = {"environment": env, "size": size_name, "setup": {**describe(size), "rounds": rounds},
                  "results": results}
        add_ratios(results)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "models.json").write_text(json.dumps(report, indent=2))
            (out / "models.md").write_text(markdown(report))
        return report
    work = workloads(size, device, gen)  # once: every backend gets the same inputs
    for model_name, (cls, forward, generate) in work.items():
        if models and model_name not in models:
            continue
        torch.manual_seed(0)
        base = cls(size.config).to(device=device, dtype=size.dtype)
        rows, runs = [], {}
        for backend, reason in status.items():  # baselines first: their first round runs before any fastattn kernel
            rows.append({"model": model_name, "backend": backend, "skipped": reason})
            if reason is None:
                # Every row starts from the same weights (a fresh copy of the model).
                model = set_attn_backend(copy.deepcopy(base), backend)
                runs[backend] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
        for _ in range(rounds):
            for row in rows:
                if row["backend"] not in runs:
                    continue
                model, opt = runs[row["backend"]]
                model.train()
                # 300 ms of steps per timing (~15 at these sizes): a host-bound step on a noisy host needs them.
                measure(row, "train_ms", lambda: time_ms(train_step(model, forward, opt), device=device, rep_ms=300))
                if generate is None:
                    continue
                model.eval()
                measure(row, "gen_ms", lambda: time_ms(lambda: generate(model), device=device, rep_ms=300))
                if device == "cuda":  # the decode step captured once, replayed per token
                    measure(row, "gen_graph_ms", lambda: time_ms(lambda: generate(model, cuda_graph=True),
                                                                 device=device, rep_ms=300))
        for row in rows:
            for key in ("train_ms", "gen_ms", "gen_graph_ms"):
                times = row.pop("_" + key, None)
                if times:
                    row[key] = statistics.median(times)
                    if len(times) > 1:
                        row[key + "_rounds"] = times
            for key in ("gen", "gen_graph"):
                if row.get(key + "_ms"):
                    row[key + "_tokens_per_s"] = size.batch * size.new_tokens / row[key + "_ms"] * 1e3
            results.append(row)
            print(format_row(row), flush=True)
        del runs, base
        if device == "cuda":
            torch.cuda.empty_cache()
        save()
    return save()


def describe(size: Size) -> dict:
    c = size.config
    return {"d_model": c.d_model, "heads": c.n_heads, "head_dim": c.head_dim, "layers": c.n_layers,
            "decoder_layers": c.decoder_layers,
            "vocab": c.vocab_size, "batch": size.batch, "seqlen": size.seqlen, "target_len": size.target_len,
            "prompt_len": size.prompt_len, "new_tokens": size.new_tokens, "dtype": str(size.dtype).split(".")[-1]}


def add_ratios(results: list[dict]) -> None:
    """Each row's speed-up over "torch" and "reference" on the same model: baseline time / time."""
    by = {(r["model"], r["backend"]): r for r in results}
    for r in results:
        for key in ("train_ms", "gen_ms"):
            for base in ("torch", "reference"):
                b = by.get((r["model"], base), {}).get(key)
                if r.get(key) and b:
                    r[f"{key.split('_')[0]}_vs_{base}"] = b / r[key]
        # Graph-replayed generation against "torch" generating eagerly (what an SDPA user runs) and
        # against "torch" replaying the same graphed step.
        torch_row = by.get((r["model"], "torch"), {})
        for base_key, name in (("gen_ms", "gen_graph_vs_torch"), ("gen_graph_ms", "gen_graph_vs_torch_graph")):
            if r.get("gen_graph_ms") and torch_row.get(base_key):
                r[name] = torch_row[base_key] / r["gen_graph_ms"]


def cell(r: dict, key: str, fmt: str) -> str:
    if key in r:
        return format(r[key], fmt)
    err = r.get(key.replace("_tokens_per_s", "_ms") + "_error")
    return f"failed ({err})" if err else "-"


def format_row(r: dict) -> str:
    if r["skipped"]:
        return f"{r['model']:<16} {r['backend']:<10} skipped: {r['skipped']}"
    graph = f", {cell(r, 'gen_graph_tokens_per_s', '.0f')} with a CUDA graph" if "gen_graph_ms" in r else ""
    return (f"{r['model']:<16} {r['backend']:<10} train step {cell(r, 'train_ms', '.2f')} ms, "
            f"generate {cell(r, 'gen_tokens_per_s', '.0f')} tok/s{graph}")


def markdown(report: dict) -> str:
    env, s = report["environment"], report["setup"]
    cpu_note = ("\n**CPU numbers** (no GPU on this machine): a smoke test of the benchmark, not a "
                "measure of the kernels.\n" if env["device_type"] == "cpu" else "")
    lines = [f"# Model benchmark: {env['device']}", cpu_note,
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; {env['timer']}.",
             f"Models: d_model {s['d_model']}, {s['heads']} heads of {s['head_dim']}, {s['layers']} layers, "
             f"{s['dtype']}. Training: batch {s['batch']} x {s['seqlen']} tokens (padded for the encoder and "
             f"the encoder-decoder's source; target {s['target_len']}). Generation: {s['new_tokens']} new "
             f"tokens, batch {s['batch']}, prompts/sources up to {s['prompt_len']} tokens, KV cache "
             f"(the encoder-decoder has {s['layers']} + {s['decoder_layers']} layers).", "",
             "Read with care: attention is a minority of a training step's FLOPs at these sizes (the "
             "projections, feed-forward and output head dominate), so whole-step ratios sit near 1x "
             "whatever the kernel; generation time includes the prompt/source pass and, at small "
             "batch, is bound by launch overhead. The kernel benchmark (benchmarks/run.py) isolates "
             "attention.", "",
             "Generation with a CUDA graph: the decode step captured once and replayed per token "
             "(`generate(..., cuda_graph=True)`, CUDA only); its ratios are to \"torch\" generating eagerly "
             "and to \"torch\" with the same CUDA graph.", "",
             f"Each figure is the median of {s.get('rounds', 1)} timing(s), the backends taking turns "
             "(interleaved: drift hits every backend alike).", "",
             "| model | backend | train step ms | vs torch | vs reference | generate tok/s | vs torch | vs reference "
             "| with CUDA graph tok/s | vs torch eager | vs torch graphed |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    ratio = lambda r, key: f"{r[key]:.2f}x" if key in r else "-"
    for r in report["results"]:
        if r["skipped"]:
            lines.append(f"| {r['model']} | {r['backend']} | skipped: {r['skipped']} |||||||||")
            continue
        lines.append(f"| {r['model']} | {r['backend']} | {cell(r, 'train_ms', '.2f')} | {ratio(r, 'train_vs_torch')} | "
                     f"{ratio(r, 'train_vs_reference')} | {cell(r, 'gen_tokens_per_s', '.0f')} | "
                     f"{ratio(r, 'gen_vs_torch')} | {ratio(r, 'gen_vs_reference')} | "
                     f"{cell(r, 'gen_graph_tokens_per_s', '.0f')} | {ratio(r, 'gen_graph_vs_torch')} | "
                     f"{ratio(r, 'gen_graph_vs_torch_graph')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latest-models"))
    parser.add_argument("--models", help="comma-separated subset of encoder,decoder,encoder-decoder")
    parser.add_argument("--backends", help="comma-separated backends to run, in order (default: all, baselines first)")
    parser.add_argument("--rounds", type=int, default=3 if torch.cuda.is_available() else 1,
                        help="timings per row, backends taking turns; the median is reported")
    args = parser.parse_args(argv)
    split = lambda text: text.split(",") if text else None  # noqa: E731
    run(args.size, args.out, models=split(args.models), backends=split(args.backends), rounds=args.rounds)
    print(f"wrote {args.out / 'models.json'} and {args.out / 'models.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
