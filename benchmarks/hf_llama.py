"""A Llama-style Hugging Face model on fastattn vs transformers' SDPA: one training step's time.

    python benchmarks/hf_llama.py [--out DIR] [--seqlen 2048] [--batch 4] [--layers 8]
    python benchmarks/hf_llama.py --smoke    # a tiny float32 model through the Triton interpreter (CPU)

On a GPU: LlamaForCausalLM from a config (hidden 2048, 16 heads, 4 KV heads: GQA, no download), bf16,
padded batch (the last quarter of one sequence is padding), forward + backward of the LM loss with
attn_implementation "sdpa" and "fastattn" (fastattn.integrations.transformers.register()) on the
same weights, timed in one run. Bar (issue 13): fastattn >= 1.0x sdpa.

Gate, before timing: the fastattn model's logits on the real tokens against the same model in
float32 with "sdpa" as the reference, under the tests' tolerance rule with the bf16 "sdpa" run as
the naive low-precision result (fastattn.testing.compare). Writes hf_llama.json / hf_llama.md.
Needs transformers (pip install fastattn[hf]); without it the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Appended, not prepended: the repository's kernels/ folder must not shadow the PyPI package
    # `kernels` that transformers imports.
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, time_ms, use_interpreter_without_gpu  # noqa: E402

use_interpreter_without_gpu()

import torch  # noqa: E402

from fastattn import testing  # noqa: E402


def build(args, device, dtype, impl):
    import transformers

    config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 2,
                                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                      num_key_value_heads=args.kv_heads, max_position_embeddings=args.seqlen)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(device, dtype).train().requires_grad_(True), config, impl


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="hf_llama")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args(argv)
    try:
        from fastattn.integrations import transformers as fhf
    except ImportError as e:
        print(f"skipped: {e}")
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    smoke = args.smoke or device == "cpu"
    if smoke:
        args.seqlen, args.batch, args.layers = 16, 2, 1
        args.hidden, args.heads, args.kv_heads, args.vocab = 32, 4, 2, 64
        dtype, backend = torch.float32, "triton"
    else:
        args.hidden, args.heads, args.kv_heads, args.vocab = 2048, 16, 4, 32000
        dtype, backend = torch.bfloat16, "auto"
    name = fhf.register(backend=backend)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seqlen), generator=g).to(device)
    mask = torch.ones_like(tokens)
    mask[0, -args.seqlen // 4:] = 0  # right padding in one sequence
    real = mask.bool()

    models = {}
    for impl in ("sdpa", name):
        model, _, _ = build(args, device, dtype, impl)
        model.config._attn_implementation = impl
        models[impl] = model
    models[name].load_state_dict(models["sdpa"].state_dict())
    ref_model = build(args, device, torch.float32 if not smoke else torch.float64, "sdpa")[0]
    ref_model.load_state_dict({k: v.to(ref_model.dtype) for k, v in models["sdpa"].state_dict().items()})
    with torch.no_grad():
        logits = {impl: m(input_ids=tokens, attention_mask=mask).logits[real] for impl, m in models.items()}
        ref = ref_model(input_ids=tokens, attention_mask=mask).logits[real]
    gate = testing.compare("logits", logits[name], logits["sdpa"], ref, testing.OUT_FACTOR)
    del ref_model

    def step(model):
        def run():
            out = model(input_ids=tokens, attention_mask=mask, labels=tokens.masked_fill(~real, -100))
            out.loss.backward()
        return run

    fhf.reset_counts()
    rows = []
    for impl, model in models.items():
        ms = time_ms(step(model), device=device, grad_to_none=list(model.parameters()),
                     rep_ms=30 if smoke else 200)
        rows.append({"attn_implementation": impl, "ms": ms})
    ratio = rows[0]["ms"] / rows[1]["ms"]
    doc = {"environment": environment(device), "smoke": smoke, "dtype": str(dtype), "backend": backend,
           "shape": {k: getattr(args, k) for k in ("batch", "seqlen", "layers", "hidden", "heads", "kv_heads")},
           "gate": str(gate), "gate_ok": gate.ok, "rows": rows, "fastattn_vs_sdpa": ratio,
           "fastattn_calls": fhf.CALLS["fastattn"], "bar_met": None if smoke else (gate.ok and ratio >= 1.0)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hf_llama.json").write_text(json.dumps(doc, indent=2))
    md = [f"# Llama-style training step, attn_implementation fastattn vs sdpa ({doc['environment']['device']})", "",
          f"{'**Smoke run** (tiny float32 model, Triton interpreter): times mean nothing.' if smoke else ''}", "",
          f"B={args.batch} S={args.seqlen} layers={args.layers} hidden={args.hidden} heads {args.heads}/{args.kv_heads}"
          f" {dtype}; gate: {gate}", "", "| attn_implementation | fwd+bwd ms |", "|---|---|"]
    md += [f"| {r['attn_implementation']} | {r['ms']:.3f} |" for r in rows]
    md += ["", f"fastattn vs sdpa: {ratio:.2f}x (bar >= 1.0x: "
           f"{'not judged on a smoke run' if smoke else 'met' if doc['bar_met'] else 'NOT met'})"]
    (out / "hf_llama.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if gate.ok else 1


if __name__ == "__main__":
    sys.exit(main())
