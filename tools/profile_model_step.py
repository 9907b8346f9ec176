"""Where a model training step's time goes, per attention backend (GPU): the whole step, the
attention calls alone, and a profiler table of the step.

    python tools/profile_model_step.py [--layers 8] [--batch 8] [--seqlen 1024]
"""

from __future__ import annotations

import argparse
import copy

import torch
import triton.testing

import fastattn
from fastattn.models import Decoder, ModelConfig, set_attn_backend


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=1024)
    args = ap.parse_args()
    cfg = ModelConfig.preset("base", n_layers=args.layers)
    torch.manual_seed(0)
    base = Decoder(cfg).cuda().bfloat16()
    tokens = torch.randint(1, cfg.vocab_size, (args.batch, args.seqlen), device="cuda")
    b, s, h, d = args.batch, args.seqlen, cfg.n_heads, cfg.head_dim
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    backends = [n for n, st in fastattn.available_backends().items() if st.available]
    for name in backends:
        attn = lambda: fastattn.attention(q, k, v, causal=True, backend=name).backward(dout)
        fwd = lambda: fastattn.attention(q, k, v, causal=True, backend=name)
        model = set_attn_backend(copy.deepcopy(base), name)
        step = lambda model=model: model(tokens).float().square().mean().backward()
        t_fwd = triton.testing.do_bench(fwd, grad_to_none=[q, k, v])
        t_attn = triton.testing.do_bench(attn, grad_to_none=[q, k, v])
        t_step = triton.testing.do_bench(step)
        print(f"{name:<10} attention fwd {t_fwd:.3f} ms, fwd+bwd {t_attn:.3f} ms (x{2 * args.layers} calls per step "
              f"= {t_attn * args.layers:.2f} ms); step {t_step:.2f} ms", flush=True)
        if name in ("torch", "triton"):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60))
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=60))
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
