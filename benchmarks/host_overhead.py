"""Host time per attention call: fastattn against PyTorch SDPA, layer by layer.

    python benchmarks/host_overhead.py [--out DIR] [--iters N] [--rounds R]

What a model feels besides the kernels: the Python and dispatcher work of every call, which decides
whether a step is host-bound. For each path (dense causal, key-padding mask, packed varlen; and,
forward only, dense causal with grad mode off and a decode step) it times forward, backward and
forward+backward at four depths of fastattn's stack, each including the ones below it:

    api       fastattn.attention / attention_varlen / attention_with_kvcache: validation, backend
              choice, autograd, launch
    autograd  fastattn.ops.padded_attention / varlen_attention: the autograd Function, launchers
    launcher  the launcher functions alone (outputs, arguments, plan lookup), no autograd
    launch    the kernel launches alone, arguments prepared (plan.launch)

and SDPA (``torch.nn.functional.scaled_dot_product_attention``; with a boolean mask for the padded
path, none for varlen) on the same machine in the same run. Each number is microseconds per call,
the fastest of R batches of N calls with every variant taking turns (backward = forward+backward
minus forward).

On a machine without a GPU the Triton launches are STUBBED (replaced by no-ops, so "launch" is 0)
and SDPA runs its CPU kernels on tiny tensors (B=1, S=16, H=2, D=16: compute well under a
microsecond per FLOP-heavy step); the table says so. On a GPU everything is real: small shapes keep
the kernels short, so the host is the bottleneck and wall time per call is host time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, use_interpreter_without_gpu  # noqa: E402

use_interpreter_without_gpu()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastattn  # noqa: E402
from fastattn import validation  # noqa: E402
from fastattn.launchers import decode as decode_launcher  # noqa: E402
from fastattn.launchers import plans  # noqa: E402
from fastattn.launchers import triton_attention as launcher  # noqa: E402
from fastattn.launchers.key_bounds import key_bounds  # noqa: E402
from fastattn.modifiers import ScoreMods  # noqa: E402
from fastattn.ops import padded_attention, varlen_attention  # noqa: E402

LAYERS = ("api", "autograd", "launcher", "launch")


def stub_launches() -> None:
    """CPU: make every Triton launch a no-op (plans are still built and looked up), and skip the
    host checks of cu_seqlens / cache lengths, which run for CPU tensors only (a GPU call skips
    them: reading device values would sync)."""
    plans.Plan.launch = lambda self, grid, args, stream=None: None
    plans._jit_launch = lambda kernel, grid, args, constexprs, config: None
    validation.value_checks = fastattn.api.value_checks = lambda device: False


def per_call_us(fns: dict, iters: int, rounds: int, sync) -> dict[str, float]:
    """Microseconds per call of each fn: the fastest of `rounds` batches of `iters` calls, the fns
    taking turns within a round. On a shared machine interference only ever adds time, so the
    minimum over many short batches is the stable estimate of the work itself."""
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        for _ in range(max(20, iters)):
            fn()
    sync()
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            sync()
            best[name] = min(best[name], (time.perf_counter() - t0) / iters * 1e6)
    return best


class AttentionPath:
    """One attention path: its inputs and a callable per layer returning (out, backward-able)."""

    def __init__(self, name, layers, sdpa):
        self.name, self.layers, self.sdpa = name, layers, sdpa


def build_paths(device, dtype, b, s, h, d):
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()

    q, k, v = leaf(b, s, h, d), leaf(b, s, h, d), leaf(b, s, h, d)
    dout = torch.randn(b, s, h, d, generator=g).to(device, dtype)
    scale = d ** -0.5
    mask = torch.ones(b, s, dtype=torch.bool, device=device)
    mask[:, -s // 4:] = False  # a quarter of the keys are padding
    bounds = key_bounds(mask)
    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))  # SDPA's (B, H, S, D)
    dout_t = dout.transpose(1, 2)
    attn_mask = mask[:, None, None, :]

    def launcher_pair(kpm, kvb, causal):
        def fwd():
            return launcher.forward(q, k, v, kpm, kvb, causal, scale)

        def bwd(saved):
            out, lse = saved
            return launcher.backward(dout, q, k, v, out, lse, None, kpm, kvb, causal, scale)

        return fwd, bwd

    dense = AttentionPath("dense causal", {
        "api": lambda: fastattn.attention(q, k, v, causal=True, backend="triton"),
        "autograd": lambda: padded_attention(q, k, v, None, True, scale, False, "triton"),
        "launcher": launcher_pair(None, None, True),
    }, lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True))
    padded = AttentionPath("key-padding mask", {
        "api": lambda: fastattn.attention(q, k, v, key_padding_mask=mask, backend="triton"),
        "autograd": lambda: padded_attention(q, k, v, mask, False, scale, False, "triton"),
        "launcher": launcher_pair(mask, bounds, False),
    }, lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask))
    # Packed: the same tokens as b sequences of s.
    qp, kp, vp = (x.detach().reshape(b * s, h, d).requires_grad_() for x in (q, k, v))
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=device)
    dout_p = dout.reshape(b * s, h, d)

    def varlen_fwd():
        return launcher.forward_varlen(qp, kp, vp, cu, cu, s, s, True, scale)

    def varlen_bwd(saved):
        out, lse = saved
        return launcher.backward_varlen(dout_p, qp, kp, vp, out, lse, None, cu, cu, s, s, True, scale)

    # Score modifiers: a learnable bias (1, H, S, S), a window and sinks (all on the modified kernels'
    # path, dbias and dsinks included); SDPA's counterpart takes the same bias as a float mask.
    bias = leaf(1, h, s, s)
    sinks = torch.zeros(h, device=device).requires_grad_()
    window = (s // 2, 0)
    mods = ScoreMods(bias, None, window, 0.0, sinks)
    bias_t = bias.detach().clone().requires_grad_()

    def mods_fwd():
        return launcher.forward(q, k, v, None, None, True, scale, bias, None, sinks, *window, 0.0)

    def mods_bwd(saved):
        out, lse = saved
        return launcher.backward(dout, q, k, v, out, lse, None, None, None, True, scale, bias, None, sinks, *window,
                                 0.0, True)

    modified = AttentionPath("bias + window + sinks", {
        "api": lambda: fastattn.attention(q, k, v, causal=True, bias=bias, window=window, sinks=sinks,
                                          backend="triton"),
        "autograd": lambda: padded_attention(q, k, v, None, True, scale, False, "triton", mods),
        "launcher": (mods_fwd, mods_bwd),
    }, lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias_t))
    varlen = AttentionPath("varlen causal", {
        "api": lambda: fastattn.attention_varlen(qp, kp, vp, cu, cu, s, s, causal=True, backend="triton"),
        "autograd": lambda: varlen_attention(qp, kp, vp, cu, cu, s, s, True, scale, False),
        "launcher": (varlen_fwd, varlen_bwd),
    }, None)
    # Inference (no dout: timed with grad mode off): the same calls, which then need no autograd.
    fwd_only = {**dense.layers, "launcher": (dense.layers["launcher"][0], None)}
    inference = AttentionPath("dense causal, no grad", fwd_only, dense.sdpa)
    return [dense, padded, modified, varlen, inference], {"dense causal": (dout, dout_t),
                                                          "key-padding mask": (dout, dout_t),
                                               "bias + window + sinks": (dout, dout_t),
                                               "varlen causal": (dout_p, None)}


def decode_path(device, dtype, b, s, h, d):
    """One decode step (inference: forward only): a new token appended to a contiguous KV cache of
    4s positions (s cached) and attended over; SDPA's counterpart writes the token into its cache
    by slicing, then attends over the filled part."""
    g = torch.Generator().manual_seed(1)
    cap, hkv = 4 * s, max(1, h // 2)
    q = torch.randn(b, 1, h, d, generator=g).to(device, dtype)
    k = torch.randn(b, 1, hkv, d, generator=g).to(device, dtype)
    k_cache = torch.randn(b, cap, hkv, d, generator=g).to(device, dtype)
    v_cache = k_cache.clone()
    lens = torch.full((b,), s, dtype=torch.int32, device=device)
    qt = q.transpose(1, 2)

    def sdpa():
        k_cache[:, s:s + 1] = k
        v_cache[:, s:s + 1] = k
        kt, vt = k_cache[:, :s + 1].transpose(1, 2), v_cache[:, :s + 1].transpose(1, 2)
        return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

    def launched():
        return decode_launcher.attend(q, k_cache, v_cache, k, k, lens, None, True, d ** -0.5, 0)

    with torch.no_grad():
        return AttentionPath("decode step", {
            "api": lambda: fastattn.attention_with_kvcache(q, k_cache, v_cache, k, k, cache_seqlens=lens,
                                                           backend="triton"),
            "launcher": (launched, None),
        }, sdpa)


def launch_only(fwd, bwd):
    """(forward launches, backward launches) with everything prepared: the launches one launcher
    forward and backward make, recorded and replayed."""
    saved = fwd()  # plans built
    if bwd is not None:
        bwd(saved)
    recorded = []
    real = plans.Plan.launch
    plans.Plan.launch = lambda self, grid, args, stream=None: recorded.append((self, grid, args, stream))
    try:
        saved = fwd()
        n_fwd = len(recorded)
        if bwd is not None:
            bwd(saved)
    finally:
        plans.Plan.launch = real

    def replay(calls):
        def go():
            for plan, grid, args, stream in calls:
                plan.launch(grid, args, stream)
        return go

    return replay(recorded[:n_fwd]), replay(recorded[n_fwd:])


def measure(paths, douts, iters, rounds, sync):
    rows = []
    for path in paths:
        dout, dout_t = douts.get(path.name, (None, None))  # None: an inference path, forward only
        fns = {}
        for layer in ("api", "autograd"):
            fn = path.layers.get(layer)
            if fn is None:
                continue
            fns[f"{layer} fwd"] = fn
            if dout is not None:
                fns[f"{layer} fwd+bwd"] = lambda fn=fn: fn().backward(dout)
        fwd, bwd = path.layers["launcher"]
        fns["launcher fwd"] = fwd
        lf, lb = launch_only(fwd, bwd)
        fns["launch fwd"] = lf
        if bwd is not None:
            fns["launcher fwd+bwd"] = lambda: bwd(fwd())
            fns["launch fwd+bwd"] = lambda: (lf(), lb())
        if path.sdpa is not None:
            fns["sdpa fwd"] = path.sdpa
            if dout_t is not None:
                fns["sdpa fwd+bwd"] = lambda: path.sdpa().backward(dout_t)
        with torch.set_grad_enabled(dout is not None):
            row = {"path": path.name, **per_call_us(fns, iters, rounds, sync)}
        for who in (*LAYERS, "sdpa"):
            if f"{who} fwd+bwd" in row:
                row[f"{who} bwd"] = row[f"{who} fwd+bwd"] - row[f"{who} fwd"]
        rows.append(row)
        print(f"{path.name}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items() if k != "path"), flush=True)
    return rows


def markdown(rows, env, stubbed: bool, shape) -> str:
    b, s, h, d = shape
    lines = [f"# Host time per call: fastattn vs SDPA ({env.get('device', env.get('device_type'))})", ""]
    if stubbed:
        lines += ["**CPU, Triton launches STUBBED** (no-ops; and the host checks of cu_seqlens and cache "
                  "lengths skipped, as for GPU tensors): fastattn's numbers are all host work above the "
                  "kernel launch; SDPA runs its real CPU kernels on tiny tensors "
                  f"(B={b}, S={s}, H={h}, D={d}), so its numbers include a little compute.", ""]
    else:
        lines += [f"GPU, real launches, B={b} S={s} H={h} D={d} (host-bound: tiny kernels).", ""]
    lines += ["Microseconds per call (fastest batch). Each layer includes the ones below it.", "",
              "| path | pass | api | autograd | launcher | launch | SDPA | api / SDPA |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for p in ("fwd", "bwd", "fwd+bwd"):
            if f"api {p}" not in r:
                continue  # the decode step has no backward
            cells = [f"{r[f'{w} {p}']:.1f}" if f"{w} {p}" in r else "-" for w in (*LAYERS, "sdpa")]
            ratio = f"{r[f'api {p}'] / r[f'sdpa {p}']:.2f}x" if f"sdpa {p}" in r else "-"
            lines.append(f"| {r['path']} | {p} | " + " | ".join(cells) + f" | {ratio} |")
    lines += ["", "Layer costs (differences): validation + backend choice = api - autograd; autograd.Function "
              "= autograd - launcher; outputs, arguments, plan lookup = launcher - launch."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".benchmarks/host_overhead")
    ap.add_argument("--iters", type=int, default=200, help="calls per timed batch")
    ap.add_argument("--rounds", type=int, default=30, help="timed batches per measurement (the fastest counts)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda:
        device, dtype, shape = "cuda", torch.bfloat16, (1, 128, 4, 64)
        sync = torch.cuda.synchronize
    else:
        stub_launches()
        device, dtype, shape = "cpu", torch.float32, (1, 16, 2, 16)
        sync = lambda: None
    paths, douts = build_paths(device, dtype, *shape)
    paths.append(decode_path(device, dtype, *shape))
    env = {**environment(), "timer": "wall clock per call, the fastest of the rounds' batches"}
    rows = measure(paths, douts, args.iters, args.rounds, sync)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stubbed = not cuda
    result = {"environment": env, "launches_stubbed": stubbed, "shape_bshd": shape, "dtype": str(dtype),
              "iters": args.iters, "rounds": args.rounds, "rows": rows}
    (out / "host_overhead.json").write_text(json.dumps(result, indent=1))
    md = markdown(rows, env, stubbed, shape)
    (out / "host_overhead.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
