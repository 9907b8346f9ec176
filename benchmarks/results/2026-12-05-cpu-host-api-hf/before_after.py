"""Host time per call, before and after, in one process: fastattn.api (and, with --hf,
fastattn.integrations.transformers) as they were at --before, loaded from git beside the working
tree's (the rest of the package is shared), Triton launches stubbed on a CPU.

    python benchmarks/results/2026-12-05-cpu-host-api-hf/before_after.py --before 3c3af5b [--hf]

"auto" is given CUDA's order (Triton first), as a GPU call takes it. Each number is a call's thread
CPU time (time.thread_time_ns: other processes share the machine's cores), per batch of --iters
calls, before and after taking turns in alternating order; the table gives the median and the
minimum over --rounds batches.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.append(str(ROOT))  # appended: the repository's kernels/ must not shadow the PyPI package transformers imports
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from benchmarks.host_overhead import stub_launches  # noqa: E402


def load_old(path: str, commit: str, name: str) -> types.ModuleType:
    src = subprocess.check_output(["git", "-C", str(ROOT), "show", f"{commit}:{path}"], text=True)
    mod = types.ModuleType(name)
    mod.__file__ = f"<{commit}:{path}>"
    sys.modules[name] = mod
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)
    return mod


def per_call_us(fns: dict, iters: int, rounds: int) -> dict[str, tuple[float, float]]:
    for fn in fns.values():
        for _ in range(300):
            fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            fn = fns[name]
            t0 = time.thread_time_ns()
            for _ in range(iters):
                fn()
            times[name].append((time.thread_time_ns() - t0) / iters / 1e3)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def _no_grad(fn, *args, **kwargs):
    with torch.no_grad():
        return fn(*args, **kwargs)


def api_cases(old_api, new_api, b=1, s=16, h=2, d=16):
    q, k, v = (torch.randn(b, s, h, d, requires_grad=True) for _ in range(3))
    dout = torch.randn(b, s, h, d)
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[:, -s // 4:] = False
    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
    cases = {}
    for tag, m in (("before", old_api), ("after", new_api)):
        cases[("dense causal fwd", tag)] = lambda m=m: m.attention(q, k, v, causal=True)
        cases[("dense causal fwd+bwd", tag)] = lambda m=m: m.attention(q, k, v, causal=True).backward(dout)
        cases[("key-padding fwd", tag)] = lambda m=m: m.attention(q, k, v, key_padding_mask=mask)
        cases[("dense causal, no grad fwd", tag)] = lambda m=m: _no_grad(m.attention, q, k, v, causal=True)
        cases[("SDPA drop-in causal fwd", tag)] = lambda m=m: m.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    return cases


def hf_cases(old_hf, new_hf, b=1, s=16, h=2, d=16):
    import transformers
    from transformers.models.llama.modeling_llama import LlamaAttention

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=h * d, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=h, num_key_value_heads=h)
    module = LlamaAttention(cfg, layer_idx=0)
    base = [torch.randn(b, s, h, d, requires_grad=True) for _ in range(3)]
    q, k, v = (x.transpose(1, 2) for x in base)  # what a Llama layer passes: (B, H, S, D) views
    dout = torch.randn(b, s, h, d)
    pos = torch.arange(s)[None]
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[:, :s // 4] = False  # left padding
    from transformers import masking_utils as mu

    mask4d = mu.sdpa_mask(batch_size=b, q_length=s, kv_length=s, mask_function=mu.causal_mask_function,
                          attention_mask=mask, allow_is_causal_skip=False)  # what a padded Llama batch gets
    cases = {}
    for tag, m in (("before", old_hf), ("after", new_hf)):
        registered = m._with_backend("auto")  # what register() registers: the function a model calls

        def unpadded(f=registered):  # as LlamaAttention calls it (training: dropout 0.0)
            return f(module, q, k, v, None, dropout=0.0, scaling=d ** -0.5, position_ids=pos, use_cache=False)[0]

        def padded(f=registered):
            return f(module, q, k, v, mask4d, dropout=0.0, scaling=d ** -0.5, position_ids=pos, use_cache=False)[0]
        cases[("HF Llama, no mask fwd", tag)] = unpadded
        cases[("HF Llama, no mask fwd+bwd", tag)] = lambda f=unpadded: f().backward(dout)
        cases[("HF Llama, padded fwd", tag)] = padded
        cases[("HF Llama, padded fwd+bwd", tag)] = lambda f=padded: f().backward(dout)
    return cases


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="the commit whose modules are 'before'")
    ap.add_argument("--hf", action="store_true", help="time the transformers integration (else fastattn.api)")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=60)
    args = ap.parse_args()
    stub_launches()
    from fastattn import backends

    backends.AUTO["cpu"] = backends.AUTO["cuda"]  # "auto" as for CUDA tensors: Triton first
    if args.hf:
        from fastattn.integrations import transformers as new_hf

        cases = hf_cases(load_old("fastattn/integrations/transformers.py", args.before, "old_hf"), new_hf)
    else:
        from fastattn import api as new_api

        cases = api_cases(load_old("fastattn/api.py", args.before, "old_api"), new_api)
    fns = {f"{what} | {tag}": fn for (what, tag), fn in cases.items()}
    times = per_call_us(fns, args.iters, args.rounds)
    head = subprocess.check_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], text=True).strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD"]).returncode != 0
    after = head + (" + uncommitted changes" if dirty else "")
    print(f"before = {args.before}, after = {after}; torch {torch.__version__}; {os.cpu_count()} CPUs; launches "
          f"stubbed; {args.rounds} batches of {args.iters} calls")
    print("\n| call | before median (min) | after median (min) | saved per call (median) |\n|---|---|---|---|")
    for what in dict.fromkeys(w for w, _ in cases):
        (b_med, b_min), (a_med, a_min) = times[f"{what} | before"], times[f"{what} | after"]
        print(f"| {what} | {b_med:.1f} ({b_min:.1f}) | {a_med:.1f} ({a_min:.1f}) | {b_med - a_med:.1f} us |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
