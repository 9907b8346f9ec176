"""Where the decoder's time goes, per attention backend (GPU): one training step and one generated
token, timed and profiled (torch.profiler: the top host ops, syncs, copies, kernel launches).

    python tools/profile_model_step.py [--out DIR] [--backends torch,triton] [--autotune]

The model, batch and prompt are benchmarks/bench_models.py's "gpu" size (the numbers it reports
are for the same step). Per backend it prints and writes into DIR/profile.md:
- attention alone at the step's shape: fwd and fwd+bwd ms (CUDA events; host time per call is
  benchmarks/host_overhead.py's);
- the train step (fwd + bwd, no optimizer): ms, and the profiler's top host ops by self CPU time;
- one generated token (the cached decode step, eager and replayed from a CUDA graph): ms, and the
  top host ops of the eager step;
- host-sync and copy counts per step (cudaStreamSynchronize / cudaDeviceSynchronize /
  cudaMemcpy(Async) calls, as the profiler records them).
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

SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
COPY_OPS = ("cudaMemcpyAsync", "cudaMemcpy")
LAUNCH_OPS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


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


def profile(fn, calls: int = 3):
    """(top host ops table, {op: calls per fn()} for syncs/copies/launches)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    counts = {}
    for e in averages:
        if e.key in SYNC_OPS + COPY_OPS + LAUNCH_OPS:
            counts[e.key] = e.count / calls
    table = averages.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=70)
    return table, counts


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
    from benchmarks.bench_models import SIZES, workloads
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
             f"prompt {size.prompt_len}; FASTATTN_AUTOTUNE={os.environ.get('FASTATTN_AUTOTUNE', '1')}.", ""]
    summary = ["| backend | attn fwd ms | attn fwd+bwd ms | train step ms (fwd+bwd) "
               "| token ms eager | token ms graphed | syncs/step | copies/step | launches/step "
               "| syncs/token | launches/token |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    details = []
    for name in args.backends.split(","):
        status = fastattn.available_backends().get(name)
        if status is None or not status.available:
            summary.append(f"| {name} | unavailable: {getattr(status, 'reason', 'unknown')} ||||||||||")
            continue

        def attn_fwd(name=name):
            return fastattn.attention(q, k, v, causal=True, backend=name)

        def attn_fwd_bwd(name=name):
            q.grad = k.grad = v.grad = None
            fastattn.attention(q, k, v, causal=True, backend=name).backward(dout)

        model = set_attn_backend(copy.deepcopy(base), name)

        def step(model=model):
            model.zero_grad(set_to_none=True)
            forward(model).float().square().mean().backward()

        t_fwd, t_attn = cuda_ms(attn_fwd), cuda_ms(attn_fwd_bwd)
        t_step = cuda_ms(step, reps=10)
        step_table, step_counts = profile(step)

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
            tok_table, tok_counts = profile(token_eager)
            from fastattn.models.generation import graphed_step
            rewind()
            replay = graphed_step(lambda t: token(tok=t)[:, -1], cache, tok)

            def token_graphed(replay=replay):
                rewind()
                return replay(tok)

            t_graph = cuda_ms(token_graphed)
        c = lambda counts, keys: f"{sum(counts.get(k_, 0) for k_ in keys):.0f}"  # noqa: E731
        summary.append(f"| {name} | {t_fwd:.3f} | {t_attn:.3f} | {t_step:.2f} | {t_tok:.3f} | "
                       f"{t_graph:.3f} | {c(step_counts, SYNC_OPS)} | {c(step_counts, COPY_OPS)} | "
                       f"{c(step_counts, LAUNCH_OPS)} | {c(tok_counts, SYNC_OPS)} | {c(tok_counts, LAUNCH_OPS)} |")
        print(summary[-1], flush=True)
        details += [f"## {name}: one train step (fwd + bwd), top 20 host ops by self CPU time", "", "```",
                    step_table, "```", "", f"## {name}: one generated token (eager), top 20 host ops", "", "```",
                    tok_table, "```", ""]
        del model, cache, replay
        torch.cuda.empty_cache()
    text = "\n".join(lines + summary + [""] + details) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
