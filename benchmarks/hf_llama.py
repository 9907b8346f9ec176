"""Hugging Face decoder models on fastattn vs transformers' SDPA: one training step's time, and one
generated token's.

    python benchmarks/hf_llama.py [--out DIR] [--models llama,mistral,llama-padded,llama-generate] [--layers 8]
                                  [--rounds 5]
    python benchmarks/hf_llama.py --smoke    # tiny float32 models through the Triton interpreter (CPU)

On a GPU, bf16, from configs (no download), hidden 2048, 16 heads, 4 KV heads (GQA), 8 layers:
- llama: LlamaForCausalLM, batch 4 x 2048 tokens, no padding (transformers then passes no mask:
  SDPA takes its flash/cuDNN kernels with GQA; fastattn its dense causal kernel);
- mistral: MistralForCausalLM with a sliding window of 1024 keys, batch 2 x 4096 tokens, padded (SDPA
  gets the window as a boolean mask; fastattn skips the key tiles outside it);
- llama-padded: the llama batch padded (SDPA gets a boolean mask and repeats K/V: its slow path);
- llama-generate: inference, batch 8 x 2048 prompt tokens, two prompts left-padded (a quarter and
  an eighth): one more token per sequence over the prompt's DynamicCache (transformers' default
  cache; 32 MiB of K/V per layer), the step generate() repeats (fastattn: the decode kernel with the
  key-padding mask, launchers.decode.attend_full; SDPA: the mask, so no flash kernel). The cache
  grows by a token per timed call, as in generation; each round starts again from the prompt's.
A padded training batch has the last quarter of one sequence as padding. Forward + backward of the LM
loss with attn_implementation "sdpa", "fastattn" (fastattn.integrations.transformers.register())
and "flash_attention_2" where the flash_attn package is installed (CUDA), on the same weights,
timed in one run, in rounds (--rounds, default 5; the implementations take turns, the median is
reported). Each step is then taken apart (benchmarks.common.step_anatomy): the host's time to issue
it, the GPU's busy time and idle share, syncs, launches, the top kernels. Bar (issue 23): the Llama
step with fastattn >= 1.0x sdpa, unpadded; the others are reported. An implementation that raises is
recorded with its error and the run goes on; a fastattn row whose calls fell back to SDPA (or made
none) is flagged and not ranked.

Gate, before timing: each implementation's logits on the real tokens against the same model in
float32 with "sdpa" as the reference, under the tests' tolerance rule with the bf16 "sdpa" run as
the naive low-precision result (fastattn.testing.compare). A row that fails it is timed but not
ranked. Writes hf_llama.json / hf_llama.md. Needs transformers (pip install fastattn[hf]); without
it the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    # Appended, not prepended: the repository's kernels/ folder must not shadow the PyPI package
    # `kernels` that transformers imports.
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, step_anatomy, time_ms, use_interpreter_without_gpu  # noqa: E402

use_interpreter_without_gpu()

import torch  # noqa: E402

from fastattn import testing  # noqa: E402


@dataclass(frozen=True)
class Model:
    """One model of the run: its transformers class and shape."""

    name: str
    cls: str  # transformers' CausalLM class; its config class is the same name with Config
    batch: int
    seqlen: int
    window: int | None = None  # sliding_window (Mistral): keys a query sees, its own included
    bar: float | None = None  # fastattn / sdpa step-time bar, where the issue sets one
    padded: bool = True  # the last quarter of one sequence is padding (else no mask at all)
    generate: bool = False  # time one generated token over the prompt's cache (inference), not a training step

    def config(self, layers: int, hidden: int, heads: int, kv_heads: int, vocab: int):
        import transformers

        extra = {} if self.window is None else {"sliding_window": self.window}
        cfg_cls = getattr(transformers, self.cls.replace("ForCausalLM", "Config"))
        return cfg_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=self.seqlen,
                       **extra)


MODELS = {"llama": Model("llama", "LlamaForCausalLM", 4, 2048, bar=1.0, padded=False),
          "mistral": Model("mistral", "MistralForCausalLM", 2, 4096, window=1024),
          "llama-padded": Model("llama-padded", "LlamaForCausalLM", 4, 2048),
          "llama-generate": Model("llama-generate", "LlamaForCausalLM", 8, 2048, generate=True)}
SMOKE_MODELS = {"llama": Model("llama", "LlamaForCausalLM", 2, 16, padded=False),
                "mistral": Model("mistral", "MistralForCausalLM", 2, 16, window=5),
                "llama-padded": Model("llama-padded", "LlamaForCausalLM", 2, 16),
                "llama-generate": Model("llama-generate", "LlamaForCausalLM", 4, 16, generate=True)}


def flash_attention_2_missing(device: str) -> str | None:
    """Why transformers' "flash_attention_2" cannot run here (None: it can)."""
    if device != "cuda":
        return "flash_attention_2 needs CUDA"
    try:
        from transformers.utils import is_flash_attn_2_available
    except ImportError as e:
        return f"this transformers cannot say whether flash_attn is installed ({e})"
    return None if is_flash_attn_2_available() else "flash_attn (FlashAttention 2) is not installed"


# The model's width (GQA: 4 KV heads of 16); smoke: a tiny float32 model for the interpreter.
SHAPE = dict(layers=8, hidden=2048, heads=16, kv_heads=4, vocab=32000)
SMOKE_SHAPE = dict(layers=1, hidden=32, heads=4, kv_heads=2, vocab=64)


def build(model: Model, shape: dict, device, dtype, impl: str):
    import transformers

    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs (a 0.4B model's CPU init takes seconds)
        net = getattr(transformers, model.cls)(model.config(**shape))
    net = net.to(dtype).train().requires_grad_(True)
    net.config._attn_implementation = impl
    return net


def run_model(model: Model, shape: dict, device: str, dtype, impls: list, smoke: bool, rounds: int = 1) -> dict:
    """Gate and time each implementation of one model: its section of hf_llama.json."""
    if model.generate:
        return run_generate(model, shape, device, dtype, impls, smoke, rounds)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, shape["vocab"], (model.batch, model.seqlen), generator=g).to(device)
    mask = torch.ones_like(tokens)
    if model.padded:
        mask[0, -model.seqlen // 4:] = 0  # right padding in one sequence
    real = mask.bool()
    mask = mask if model.padded else None  # no padding: no mask, as a training step without padding has
    labels = tokens.masked_fill(~real, -100)

    rows, nets = _gated(model, shape, device, dtype, impls, smoke,
                        lambda net: net(input_ids=tokens, attention_mask=mask).logits[real])
    steps = {}
    for impl, net in nets.items():
        def step(net=net):
            net(input_ids=tokens, attention_mask=mask, labels=labels).loss.backward()
        steps[impl] = (step, list(net.parameters()))
    return _timed(model, rows, steps, device, smoke, rounds)


def _gated(model: Model, shape: dict, device: str, dtype, impls: list, smoke: bool, logits_of, train: bool = True):
    """Each implementation's model on sdpa's weights, its logits_of(net) gated against the float32
    (smoke: float64) sdpa model's under the tolerance rule, bf16 sdpa's as the naive result: (rows,
    nets of the rows that ran). train False: the models in eval mode. fastattn's call counts start
    here."""
    from fastattn.integrations import transformers as fhf

    sdpa = build(model, shape, device, dtype, "sdpa")  # its weights are every implementation's
    ref_model = build(model, shape, device, torch.float64 if smoke else torch.float32, "sdpa")
    ref_model.load_state_dict({k: v.to(ref_model.dtype) for k, v in sdpa.state_dict().items()})
    with torch.no_grad():
        ref = logits_of(ref_model.train(train))
        naive = logits_of(sdpa.train(train))
    del ref_model

    rows, nets = [], {}
    fhf.reset_counts()  # only fastattn's implementation counts its calls
    for impl, missing in impls:
        row = {"attn_implementation": impl}
        rows.append(row)
        if missing:
            row["skipped"] = missing
            continue
        try:
            net = sdpa if impl == "sdpa" else build(model, shape, device, dtype, impl).train(train)
            if net is not sdpa:
                net.load_state_dict(sdpa.state_dict())
            with torch.no_grad():
                logits = logits_of(net)
        except Exception as e:  # one implementation failing must not lose the others' figures
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            continue
        gate = testing.compare("logits", logits, naive, ref, testing.OUT_FACTOR)
        row.update(gate=str(gate), gate_ok=gate.ok)
        nets[impl] = net
    return rows, nets


def _timed(model: Model, rows: list[dict], steps: dict, device: str, smoke: bool, rounds: int,
           before_round=None) -> dict:
    """Time each gated implementation's step (steps: impl -> (step, params whose grads reset)) in
    rounds, the implementations taking turns (a drifting clock or host hits each alike), take each
    apart, rank against sdpa: the model's section of hf_llama.json. before_round(impl): untimed
    set-up before each of an implementation's rounds."""
    from fastattn.integrations import transformers as fhf

    for _ in range(rounds):
        for row in rows:
            if row["attn_implementation"] in steps and "error" not in row:
                step, params = steps[row["attn_implementation"]]
                try:
                    if before_round is not None:
                        before_round(row["attn_implementation"])
                    row.setdefault("ms_rounds", []).append(
                        time_ms(step, device=device, grad_to_none=params, rep_ms=30 if smoke else 200))
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    row.pop("ms_rounds", None)
    for row in rows:
        if "ms_rounds" in row:
            row["ms"] = statistics.median(row["ms_rounds"])
            step, params = steps[row["attn_implementation"]]
            row.update(_anatomy(step, params, row["ms"], calls=1 if smoke else 3))
        if row["attn_implementation"] not in ("sdpa", "flash_attention_2") and "ms" in row:
            row["fastattn_calls"] = calls = dict(fhf.CALLS)  # how each call went: mask kind, fallbacks
            fell_back = sum(n for kind, n in calls.items() if kind.startswith("fallback"))
            if fell_back or not calls.get("fastattn"):
                row["not_fastattn"] = f"{fell_back} call(s) fell back to SDPA, {calls.get('fastattn', 0)} ran fastattn"
    base = rows[0].get("ms")
    for r in rows:
        if base and "ms" in r and r.get("gate_ok") and "not_fastattn" not in r:
            r["vs_sdpa"] = base / r["ms"]  # > 1: faster than sdpa
    fast = _fastattn_row(rows)
    met = None if smoke or model.bar is None else bool(fast.get("vs_sdpa", 0) >= model.bar)
    return {"model": model.name, "class": model.cls, "batch": model.batch, "seqlen": model.seqlen,
            "window": model.window, "padded": model.padded, "generate": model.generate, "bar": model.bar,
            "bar_met": met, "rows": rows}


def run_generate(model: Model, shape: dict, device: str, dtype, impls: list, smoke: bool, rounds: int) -> dict:
    """One generated token per sequence over the prompt's DynamicCache, left-padded prompts: gate
    (the first step's logits against float32 sdpa's) and time each implementation. A row records how
    many of its attention calls over a prompt and a token took the decode route
    (launchers.decode.attend_full); smoke runs lower the route's threshold to 0, as a real cache's
    bytes pass it."""
    from fastattn.launchers import decode as decode_launch

    if smoke:
        decode_launch.FEW_QUERIES_MIN_BYTES = 0
    g = torch.Generator().manual_seed(1)
    b, s = model.batch, model.seqlen
    tokens = torch.randint(0, shape["vocab"], (b, s), generator=g).to(device)
    nxt = torch.randint(0, shape["vocab"], (b, 1), generator=g).to(device)
    mask = torch.ones(b, s + 4096, dtype=torch.long, device=device)  # prompt, then room for generated tokens
    mask[0, :s // 4] = 0  # left padding (as generate() pads a batch of prompts)
    mask[1, :s // 8] = 0

    def prefill(net):  # the prompt's cache (a fresh DynamicCache)
        with torch.no_grad():
            return net(input_ids=tokens, attention_mask=mask[:, :s], use_cache=True).past_key_values

    def next_token(net, cache):
        n = cache.get_seq_length()
        return net(input_ids=nxt, attention_mask=mask[:, :n + 1], past_key_values=cache, use_cache=True).logits[:, -1]

    rows, nets = _gated(model, shape, device, dtype, impls, smoke, lambda net: next_token(net, prefill(net)),
                        train=False)
    caches, steps = {}, {}
    for row in rows:
        impl = row["attn_implementation"]
        if impl not in nets:
            continue
        routed, real = [], decode_launch.attend_full
        decode_launch.attend_full = lambda *a, **kw: routed.append(1) or real(*a, **kw)  # (not while timed)
        try:
            with torch.no_grad():
                next_token(nets[impl], prefill(nets[impl]))
        finally:
            decode_launch.attend_full = real
        row["decode_route_calls"] = len(routed)

        def step(impl=impl):
            with torch.no_grad():
                next_token(nets[impl], caches[impl])
        steps[impl] = (step, [])

    def fresh_cache(impl):  # each round from the prompt's cache (generated tokens pile up while timed)
        caches[impl] = None
        caches[impl] = prefill(nets[impl])

    return _timed(model, rows, steps, device, smoke, rounds, before_round=fresh_cache)


def _anatomy(step, params, step_ms: float, calls: int) -> dict:
    """Where one step goes (benchmarks.common.step_anatomy): the host's time to issue it, the GPU's
    kernel time and idle share, syncs, launches, the top kernels."""
    def fresh_step():
        for p in params:
            p.grad = None
        step()
    a = step_anatomy(fresh_step, calls=calls)
    out = {"host_ms": a["host_ms"], "syncs": a["syncs"], "launches": a["launches"]}
    if torch.cuda.is_available():
        out.update(gpu_ms=a["device_ms"], gpu_idle=max(0.0, 1 - a["device_ms"] / step_ms), top_kernels=a["top_kernels"],
                   sync_warnings=a["sync_warnings"], first_sync=a["first_sync"])
    return out


def _fastattn_row(rows: list[dict]) -> dict:
    """The row of fastattn's registered implementation (the one that is neither baseline)."""
    return next(r for r in rows if r["attn_implementation"] not in ("sdpa", "flash_attention_2"))


def markdown(doc: dict) -> str:
    shape = doc["shape"]
    lines = [f"# Hugging Face steps, attn_implementation fastattn vs sdpa ({doc['environment']['device']})", ""]
    if doc["smoke"]:
        lines += ["**Smoke run** (tiny float32 models, Triton interpreter): times mean nothing.", ""]
    lines += [f"{shape['layers']} layers, hidden {shape['hidden']}, heads {shape['heads']}/{shape['kv_heads']} (GQA), "
              f"{doc['dtype']}, transformers {doc.get('transformers', '?')}; padded: one sequence a quarter "
              "padding; train: fwd+bwd of the LM loss; generate: one more token per sequence over the prompt's "
              "DynamicCache, prompts left-padded (no backward); same weights.", "",
              f"Each step time is the median of {doc.get('rounds', 1)} timing(s), the implementations taking "
              "turns. host ms: the host's time to issue one step from an idle GPU; GPU ms: kernel time per step "
              "(profiler); GPU idle: 1 - GPU ms / step ms; syncs: CUDA sync calls per step (profiler) / syncs "
              "torch's sync debug mode reports.", "",
              "| model | step | B x S | window | padded | attn_implementation | step ms | rounds | sdpa / this | "
              "host ms | GPU ms | GPU idle | syncs | gate (logits vs float32) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    num = lambda r, key, fmt: format(r[key], fmt) if key in r else "-"  # noqa: E731
    for m in doc["models"]:
        for r in m["rows"]:
            ratio = f"{r['vs_sdpa']:.2f}x" if "vs_sdpa" in r else "-"
            rounds = " / ".join(f"{t:.2f}" for t in r.get("ms_rounds", [])) or "-"
            syncs = f"{r['syncs']:g} / {r.get('sync_warnings', '-')}" if "syncs" in r else "-"
            gate = r.get("skipped") or r.get("error") or ("(the gate's naive run)" if r["attn_implementation"] == "sdpa"
                                                          else r["gate"])
            gate += f"; NOT RANKED: {r['not_fastattn']}" if "not_fastattn" in r else ""
            lines.append(f"| {m['model']} | {'generate' if m.get('generate') else 'train'} | "
                         f"{m['batch']} x {m['seqlen']} | {m['window'] or '-'} | "
                         f"{'yes' if m.get('padded', True) else 'no'} | "
                         f"{r['attn_implementation']} | {num(r, 'ms', '.3f')} | {rounds} | {ratio} | "
                         f"{num(r, 'host_ms', '.2f')} | {num(r, 'gpu_ms', '.2f')} | {num(r, 'gpu_idle', '.0%')} | "
                         f"{syncs} | {gate} |")
    tops = [(m["model"], r) for m in doc["models"] for r in m["rows"] if r.get("top_kernels")]
    if tops:
        lines += ["", "Top kernels by GPU time, ms per step:", ""]
    for name, r in tops:
        top = "; ".join(f"{kernel[:60]} {ms:.2f}" for kernel, ms in r["top_kernels"][:5])
        lines.append(f"- {name}, {r['attn_implementation']}: {top}")
    lines.append("")
    for m in doc["models"]:
        fast = _fastattn_row(m["rows"])
        ratio = f"{fast['vs_sdpa']:.2f}x" if "vs_sdpa" in fast else "not ranked"
        judged = ("not judged on a smoke run" if doc["smoke"] else "reported, no bar" if m["bar"] is None
                  else f"bar >= {m['bar']}x: {'met' if m['bar_met'] else 'NOT met'}")
        lines.append(f"{m['model']}: fastattn vs sdpa: {ratio} ({judged})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="hf_llama")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--models", default=",".join(MODELS), help=f"of {','.join(MODELS)}")
    ap.add_argument("--layers", type=int, default=SHAPE["layers"])
    ap.add_argument("--rounds", type=int, default=None,
                    help="timings per implementation, taking turns; the median is reported (default: 5, smoke 1)")
    args = ap.parse_args(argv)
    try:
        from fastattn.integrations import transformers as fhf
    except ImportError as e:
        print(f"skipped: {e}")
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    smoke = args.smoke or device == "cpu"
    table = SMOKE_MODELS if smoke else MODELS
    unknown = set(args.models.split(",")) - set(table)
    if unknown:
        ap.error(f"--models: unknown {sorted(unknown)}; choose from {list(table)}")
    shape = SMOKE_SHAPE if smoke else {**SHAPE, "layers": args.layers}
    dtype, backend = (torch.float32, "triton") if smoke else (torch.bfloat16, "auto")
    name = fhf.register(backend=backend)
    impls = [("sdpa", None), (name, None), ("flash_attention_2", flash_attention_2_missing(device))]
    rounds = args.rounds or (1 if smoke else 5)  # 3 left a ratio near 1.0x to the noise (~0.2 s each)
    import transformers

    doc = {"environment": environment(device), "smoke": smoke, "dtype": str(dtype), "backend": backend,
           "transformers": transformers.__version__, "shape": shape, "rounds": rounds, "models": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for model in args.models.split(","):
        doc["models"].append(run_model(table[model], shape, device, dtype, impls, smoke, rounds))
        (out / "hf_llama.json").write_text(json.dumps(doc, indent=2))
        (out / "hf_llama.md").write_text(markdown(doc))  # after every model: partial runs survive
    print(markdown(doc))
    failed = [(m["model"], r["attn_implementation"]) for m in doc["models"] for r in m["rows"]
              if r["attn_implementation"] == name and (not r.get("gate_ok") or "error" in r or "not_fastattn" in r)]
    if failed:
        print(f"fastattn failed the gate: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
