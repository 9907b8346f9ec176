"""Where the decoder's time goes, per attention backend (GPU): one training step and one generated
token, timed and taken apart (benchmarks.common.step_anatomy: host time to issue, GPU kernel time,
syncs, launches, the top kernels and host ops).

    python tools/profile_model_step.py [--out DIR] [--backends torch,triton] [--autotune]

The model, batch, prompt and training step are benchmarks/bench_models.py's "gpu" size and
train_step (forward + backward + AdamW, timed the same way), so its figures explain that
benchmark's. Per backend it prints and writes into DIR/profile.md:
- attention alone at the step's shape: fwd and fwd+bwd ms (CUDA events; host time per call is
  benchmarks/host_overhead.py's);
- the train step: ms as bench_models times it, the host's ms to issue it, the GPU's kernel ms and
  idle share (step - kernels), syncs (CUDA API calls, and what torch's sync debug mode reports),
  launches, the top kernels by GPU time and the top host ops by self CPU time;
- one generated token (the cached decode step, eager and replayed from a CUDA graph): ms, syncs,
  launches, and the top host ops of the eager step.
FASTATTN_AUTOTUNE=0 is set unless --autotune (the model benchmark's untuned configs).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def cuda_ms(fn, reps: int = 20) -> float:
    """Median ms of fn() between CUDA events after 3 warm-up calls (host gaps included: a
    host-bound call shows)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def kernels_table(anatomy: dict) -> str:
    """The top kernels of a step_anatomy as a markdown table (ms per step)."""
    rows = [f"| {name[:110]} | {ms:.3f} |" for name, ms in anatomy["top_kernels"]]
    return "\n".join(["| kernel | GPU ms per step |", "|---|---|", *rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(".benchmarks/profile"))
    ap.add_argument("--backends", default="torch,triton")
    ap.add_argument("--autotune", action="store_true", help="let the Triton kernels autotune (default: untuned)")
    args = ap.parse_args(argv)
    if not args.autotune:
        os.environ["FASTATTN_AUTOTUNE"] = "0"
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2

    import fastattn
    from benchmarks.bench_models import SIZES, train_step, workloads
    from benchmarks.common import step_anatomy, time_ms
    from fastattn.models import Decoder, set_attn_backend

    size = SIZES["gpu"]
    cfg, b, s, h, d = size.config, size.batch, size.seqlen, size.config.n_heads, size.config.head_dim
    gen = torch.Generator().manual_seed(0)
    forward = workloads(size, "cuda", gen)["decoder"][1]
    torch.manual_seed(0)
    base = Decoder(cfg).to(device="cuda", dtype=size.dtype)
    prompt = torch.randint(1, cfg.vocab_size, (b, size.prompt_len), device="cuda")
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=size.dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    lines = [f"# Decoder step profile: {torch.cuda.get_device_name()}", "",
             f"torch {torch.__version__}; d_model {cfg.d_model}, {h} heads of {d}, {cfg.n_layers} layers, "
             f"{str(size.dtype).split('.')[-1]}; train batch {b} x {s} (causal, no padding); generation: batch {b}, "
             f"prompt {size.prompt_len}; FASTATTN_AUTOTUNE={os.environ.get('FASTATTN_AUTOTUNE', '1')}.", "",
             "Train step: forward + backward + AdamW, bench_models.py's step and timer (do_bench median). "
             "host ms: the host's time to issue one step from an idle GPU; GPU ms: kernel time per step "
             "(profiler); GPU idle: 1 - GPU ms / step ms (host work, syncs, launch gaps). syncs: CUDA sync "
             "calls per step (profiler) / syncs torch's sync debug mode reports.", ""]
    summary = ["| backend | attn fwd ms | attn fwd+bwd ms | train step ms | host ms | GPU ms | GPU idle "
               "| syncs/step | launches/step | token ms eager | token ms graphed | syncs/token | launches/token |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    details = []
    for name in args.backends.split(","):
        status = fastattn.available_backends().get(name)
        if status is None or not status.available:
            summary.append(f"| {name} | unavailable: {getattr(status, 'reason', 'unknown')} ||||||||||||")
            continue

        def attn_fwd(name=name):
            return fastattn.attention(q, k, v, causal=True, backend=name)

        def attn_fwd_bwd(name=name):
            q.grad = k.grad = v.grad = None
            fastattn.attention(q, k, v, causal=True, backend=name).backward(dout)

        model = set_attn_backend(copy.deepcopy(base), name).train()
        step = train_step(model, forward, torch.optim.AdamW(model.parameters(), lr=1e-4))

        t_fwd, t_attn = cuda_ms(attn_fwd), cuda_ms(attn_fwd_bwd)
        t_step = time_ms(step, device="cuda", rep_ms=300)
        st = step_anatomy(step)

        model.eval()
        with torch.no_grad():
            cache = model.new_cache(b, size.prompt_len + 64)
            model(prompt, cache=cache)
            tok = prompt[:, -1:].clone()
            lengths, count = cache.seqlens.clone(), cache.length

            def token(model=model, cache=cache, tok=tok):
                return model(tok, cache=cache)

            def rewind(cache=cache):  # keep the cache from filling: each timed token at the same length
                cache.seqlens.copy_(lengths)
                cache.length = count

            def token_eager():
                rewind()
                return token()

            t_tok = cuda_ms(token_eager)
            tk = step_anatomy(token_eager)
            from fastattn.models.generation import graphed_step
            rewind()
            replay = graphed_step(lambda t: token(tok=t)[:, -1], cache, tok)

            def token_graphed(replay=replay):
                rewind()
                return replay(tok)

            t_graph = cuda_ms(token_graphed)
        summary.append(f"| {name} | {t_fwd:.3f} | {t_attn:.3f} | {t_step:.2f} | {st['host_ms']:.2f} | "
                       f"{st['device_ms']:.2f} | {max(0.0, 1 - st['device_ms'] / t_step):.0%} | "
                       f"{st['syncs']:g} / {st['sync_warnings']} | {st['launches']:.0f} | {t_tok:.3f} | "
                       f"{t_graph:.3f} | {tk['syncs']:g} / {tk['sync_warnings']} | {tk['launches']:.0f} |")
        print(summary[-1], flush=True)
        first = [f"First sync the debug mode reported in a {what}: `{a['first_sync']}`"
                 for what, a in (("step", st), ("token", tk)) if a["first_sync"]]
        details += [f"## {name}: one train step, top kernels by GPU time", "", kernels_table(st), "", *first, "",
                    f"## {name}: one train step, top 20 host ops by self CPU time", "", "```", st["host_table"],
                    "```", "", f"## {name}: one generated token (eager), top 20 host ops", "", "```",
                    tk["host_table"], "```", ""]
        del model, step, cache, replay
        torch.cuda.empty_cache()
    text = "\n".join(lines + summary + [""] + details) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
