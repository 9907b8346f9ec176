"""The score-modifier benchmark: what bias, ALiBi, a sliding window, softcap and sinks cost.

    python benchmarks/score_mods.py [--out DIR] [--seqlens 2048,8192] [--windows 128,512,2048,4096]
                                    [--flex-seqlens 8192] [--flex-windows 512]
    python benchmarks/score_mods.py --smoke      # tiny float32 shapes through the Triton interpreter (CPU)

On a GPU, bf16, D=128, hidden 2048 (16 heads), 16k tokens per batch (batch = 16384 // S), causal and
not, each case is timed for fastattn.attention(backend="triton") without a modifier and with each
one, forward and forward+backward, in one run on one device (benchmarks.common: do_bench medians,
the matmul ceiling measured first):

- sliding window: (w, 0) causal, (w, w) not, for each w < S, against no window (full). TFLOPS count
  only the keys a query sees (fastattn.flops with the window), so "TFLOPS vs none" near 1 means the
  time falls in proportion to the window (key tiles outside it are skipped);
- ALiBi, softcap, sinks vs none: forward (and fwd+bwd) TFLOPS ratio, modified / unmodified; on a
  GPU also "softcap tanh.approx": the softcap through the hardware's tanh.approx.f32
  (FASTATTN_SOFTCAP_TANH=approx while its rows run; not the default until measured and checked);
- bias (1, H, S, S) requiring grad, fwd+bwd: fastattn vs PyTorch SDPA given the same float mask
  (attn_mask; with causal the mask is folded into the bias once, untimed), and vs no bias;
- each modifier, fwd and fwd+bwd, vs FlexAttention given the same modifier as score_mod / block
  mask (benchmarks/flex_mods.py; compiled on a GPU): the windows in --flex-windows, at the sequence
  lengths in --flex-seqlens. Each (case, modifier) is a compile of its own (fwd and bwd), so
  FlexAttention runs in a pass of its own, after fastattn's and SDPA's rows of its cases and before
  the other cases' (its "none" last: it feeds no bar).

Bars (issue 23, checked on a GPU only): ALiBi, softcap and window forward TFLOPS within 10% of the
unmodified kernel's (ratio >= 0.9), fwd+bwd within 15% (>= 0.85); bias fwd+bwd >= 2x SDPA with the
float mask; every modifier, fwd and fwd+bwd, >= 1.0x FlexAttention (its time / fastattn's).

A correctness gate runs first for every row: (batch 0, head 0) and (last batch element, last head),
the last 256 queries over all keys (bottom-right positions keep their place) of the benchmarked
call's output, and for fwd+bwd of its dq, dk, dv, dbias, dsinks under a cotangent that is zero
elsewhere, against the float64 reference
(fastattn.reference with the same modifiers) under the tests' tolerance rule (fastattn.testing).
A row that fails is still timed but flagged: no ratios, no bars (a bar check whose ratio cannot be
formed is listed as "not measured" with the reason). Writes score_mods.json and score_mods.md into
--out after every variant (partial runs survive). Exit status 1 when a fastattn row fails the gate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import use_interpreter_without_gpu  # noqa: E402

use_interpreter_without_gpu()  # before fastattn (and triton) are imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastattn  # noqa: E402
from benchmarks import flex_mods  # noqa: E402
from benchmarks.cases import HIDDEN, TOKENS, Case, make_inputs  # noqa: E402
from benchmarks.common import _wall_clock_median, environment, measure_ceilings, peak_memory_mib, time_ms  # noqa: E402
from benchmarks.measure import GATE_OK, Gate, _guarded, mode_callable  # noqa: E402
from benchmarks.providers import flex_unavailable  # noqa: E402
from fastattn import reference, semantics, testing  # noqa: E402
from fastattn.flops import attention_flops, mean_visible_keys  # noqa: E402
from fastattn.launchers import plans  # noqa: E402

MODES = ("fwd", "fwd_bwd")
LEARNED = ("bias", "sinks")  # modifiers with a gradient: leaves requiring grad in fwd_bwd
GATE_QUERIES = 256  # the gate's slices: the last queries of two (batch, head) pairs, over all keys
SOFTCAP = 5.0  # small enough to bend N(0, 1) logits, so the gate sees a kernel that ignores it
BAR_RATIO, BAR_RATIO_BWD, BAR_VS_SDPA, BAR_VS_FLEX = 0.9, 0.85, 2.0, 1.0
BUDGET_SKIP = "time budget spent"
APPROX = "softcap tanh.approx"  # the softcap with FASTATTN_SOFTCAP_TANH=approx (GPU only)
BIAS_KERNEL = "bias dbias-kernel"  # the bias with FASTATTN_BIAS_GRAD=kernel (its gradient summed in the kernel)
# Variants that run with an environment switch set, and the variant whose SDPA / FlexAttention rows they
# are compared with (those providers take the same modifier either way).
SWITCHED = {APPROX: ("FASTATTN_SOFTCAP_TANH", "approx", "softcap"),
            BIAS_KERNEL: ("FASTATTN_BIAS_GRAD", "kernel", "bias")}
# On a GPU the narrowest window also runs tuned (FASTATTN_AUTOTUNE=1 while its rows run, launch plans
# dropped on the way in and out): the run's other rows take the table's first config, and whether a
# narrow window wants other tiles is what its bar asks (its tuning bucket follows its width).
TUNED = " tuned"


@dataclass(frozen=True)
class Variant:
    """One modifier setting; name "none" is the unmodified kernel every other row is compared with."""

    name: str
    window: int | None = None  # the sliding window's size w: (w, 0) causal, (w, w) not

    def window_arg(self, causal: bool) -> tuple[int, int] | None:
        return None if self.window is None else (self.window, 0 if causal else self.window)

    def mods(self, case: Case, device: str, gen: torch.Generator) -> dict:
        """fastattn.attention's keyword arguments for this modifier (fresh random values)."""
        h, s = case.heads_q, case.seqlen_q
        if self.name == "alibi":  # the ALiBi paper's slopes: 2^(-8 (h + 1) / H)
            return {"alibi_slopes": torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)], device=device)}
        if self.name in ("softcap", APPROX):
            return {"softcap": SOFTCAP}
        if self.name == "sinks":
            return {"sinks": torch.randn(h, device=device, generator=gen)}
        if self.name in ("bias", BIAS_KERNEL):
            return {"bias": torch.randn(1, h, s, s, device=device, generator=gen).to(case.torch_dtype)}
        if self.window is not None:
            return {"window": self.window_arg(case.causal)}
        return {}


def variants(case: Case, windows, approx: bool = False, bias_kernel: bool = False,
             tuned_window: bool = False) -> list[Variant]:
    """Most wanted first: the unmodified kernel, the bars' modifiers (approx: the softcap through
    tanh.approx.f32 too; bias_kernel: the bias with its gradient summed in the kernel too), then the
    window sweep (w < S) (tuned_window: and the narrowest window again, tuned)."""
    names = (("none", "alibi", "softcap") + ((APPROX,) if approx else ()) + ("sinks", "bias")
             + ((BIAS_KERNEL,) if bias_kernel else ()))
    sweep = [w for w in windows if w < case.seqlen_q]
    tuned = [Variant(f"window {min(sweep)}{TUNED}", min(sweep))] if tuned_window and sweep else []
    return [Variant(name) for name in names] + [Variant(f"window {w}", w) for w in sweep] + tuned


@contextlib.contextmanager
def switched(variant: Variant):
    """A SWITCHED variant's environment switch set while its rows run (forward and backward alike: the
    launchers read it per call), as it was otherwise."""
    tuned = variant.name.endswith(TUNED)
    if variant.name not in SWITCHED and not tuned:
        yield
        return
    name, value, _ = SWITCHED[variant.name] if not tuned else ("FASTATTN_AUTOTUNE", "1", None)
    before = os.environ.get(name)
    os.environ[name] = value
    if tuned:  # (plans built untuned would be found again: they are keyed on the call, not on tuning)
        plans.clear()
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before
        if tuned:
            plans.clear()


def compared_as(variant: str) -> str:
    """The variant whose SDPA and FlexAttention rows a fastattn row is compared with."""
    if variant.endswith(TUNED):
        return variant[:-len(TUNED)]
    return SWITCHED[variant][2] if variant in SWITCHED else variant


@dataclass(frozen=True)
class Provider:
    """This script's contenders (benchmarks.providers' take no modifiers): fn(q, k, v, **mods) -> out
    in FlashAttention's layout; prepare(case, mods) -> the mods this provider gets (once, untimed)."""

    name: str
    fn: object
    prepare: object = None


def _fastattn(causal: bool):
    return partial(fastattn.attention, causal=causal, backend="triton")


def _sdpa_prepare(case: Case, mods: dict) -> dict:
    """The float mask SDPA gets: the bias, with the causal mask folded in (-inf above the diagonal)."""
    bias = mods["bias"]
    if case.causal:
        vis = semantics.visible_keys(case.seqlen_q, case.seqlen_k, causal=True, device=bias.device)
        bias = bias + semantics.bool_to_bias(vis, bias.dtype)
    return {"bias": bias}


def _sdpa(q, k, v, *, bias):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias)
    return out.transpose(1, 2)  # (B, H, S, D) -> (B, S, H, D)


def providers(case: Case, variant: Variant, flex_pass: bool) -> list[Provider]:
    """First pass: fastattn, and SDPA with the float mask for the bias. Second: FlexAttention."""
    if flex_pass:
        return [Provider("flex", flex_mods.call, flex_mods.prepare)] if flex_unavailable() is None else []
    found = [Provider("fastattn", _fastattn(case.causal))]
    if variant.name == "bias":
        found.append(Provider("sdpa", _sdpa, _sdpa_prepare))
    return found


def with_grads(mods: dict, grads: bool) -> dict:
    """The learned modifiers as fresh leaves (requiring grad when `grads`), the others as they are."""
    return {k: v.detach().requires_grad_(grads) if k in LEARNED else v for k, v in mods.items()}


class ModGate:
    """The float64 reference of one (case, variant) on two slices, the last m queries over all keys of
    (batch 0, head 0) and of the last batch element's last head, and the verdicts on a provider's full
    call there (the tolerance rule; measure.Gate's verdict). Two heads: a kernel that reads head 0's
    ALiBi slope, sink or bias rows for every head, or skips later heads or batch elements, fails. The
    backward check's cotangent is zero outside the slices, so each slice's dq, dk, dv (MHA: key head
    h serves query head h only), dbias rows and dsinks[h] are its own (the heads differ)."""

    def __init__(self, case: Case, q, k, v, mods: dict, gen: torch.Generator):
        if case.heads_q != case.heads_kv:
            raise ValueError("ModGate checks MHA cases (one key head per query head)")
        self.m = min(GATE_QUERIES, case.seqlen_q)
        self.causal = case.causal
        self.slices = [(0, 0)] + ([(case.batch - 1, case.heads_q - 1)] if case.heads_q > 1 else [])
        self.parts = []
        for b, h in self.slices:
            sl = [q[b:b + 1, -self.m:, h:h + 1], k[b:b + 1, :, h:h + 1], v[b:b + 1, :, h:h + 1]]
            part = {"sl": sl, "mods": self._slice(mods, b, h),
                    "dout": torch.randn(1, self.m, 1, case.head_dim, device=q.device, generator=gen)}
            part["ref"], part["naive"] = self._reference(part, torch.float64), self._reference(part, q.dtype)
            self.parts.append(part)

    def _slice(self, mods: dict, b: int, h: int) -> dict:
        sliced = dict(mods)
        if "bias" in mods:
            bias = mods["bias"]  # (1 or B, H, Sq, Sk) -> (1, 1, m, Sk)
            sliced["bias"] = bias[(b if bias.shape[0] > 1 else 0):][:1, h:h + 1, -self.m:, :]
        for name in ("alibi_slopes", "sinks"):
            if name in mods:
                sliced[name] = mods[name][h:h + 1]
        return sliced

    def _reference(self, part: dict, dtype):
        """(out, {name: grad}) of the naive reference on one slice in `dtype`."""
        xs = [x.detach().to(dtype).requires_grad_(True) for x in part["sl"]]
        mods = {k: v.detach().to(dtype).requires_grad_(True) if k in LEARNED else v for k, v in part["mods"].items()}
        out = reference.attention(*xs, causal=self.causal, **mods)
        out.backward(part["dout"].to(dtype))
        grads = {f"d{n}": x.grad for n, x in zip("qkv", xs)}
        grads.update({f"d{n}": mods[n].grad for n in LEARNED if n in mods})
        return out.detach(), grads

    def _out(self, out):
        return [testing.compare(f"out[b{b},h{h}]", out[b:b + 1, -self.m:, h:h + 1], part["naive"][0], part["ref"][0],
                                testing.OUT_FACTOR) for (b, h), part in zip(self.slices, self.parts)]

    def check_forward(self, fn, q, k, v, mods) -> str:
        return Gate._verdict(self._out(fn(q, k, v, **with_grads(mods, False))))

    def check_backward(self, fn, q, k, v, mods) -> str:
        xs = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
        leaves = with_grads(mods, True)
        out = fn(*xs, **leaves)
        dout = torch.zeros_like(out)
        for (b, h), part in zip(self.slices, self.parts):
            dout[b:b + 1, -self.m:, h:h + 1] = part["dout"].to(out.dtype)
        out.backward(dout)
        results = self._out(out.detach())
        for (b, h), part in zip(self.slices, self.parts):
            got = {"dq": xs[0].grad[b:b + 1, -self.m:, h:h + 1], "dk": xs[1].grad[b:b + 1, :, h:h + 1],
                   "dv": xs[2].grad[b:b + 1, :, h:h + 1]}
            if "bias" in leaves:
                grad = leaves["bias"].grad
                got["dbias"] = grad[(b if grad.shape[0] > 1 else 0):][:1, h:h + 1, -self.m:, :]
            if "sinks" in leaves:
                got["dsinks"] = leaves["sinks"].grad[h:h + 1]
            ref, naive = part["ref"][1], part["naive"][1]
            scale = testing.magnitude(ref["dq"], ref["dk"], ref["dv"])  # coupled through dS
            for name, x in got.items():  # dbias and dsinks on their own scale, as the tests do
                s = scale if name in ("dq", "dk", "dv") else testing.magnitude(ref[name])
                results.append(testing.compare(f"{name}[b{b},h{h}]", x, naive[name], ref[name], testing.GRAD_FACTOR, s))
        return Gate._verdict(results)


@dataclass
class Settings:
    seqlens: tuple = (2048, 8192)
    windows: tuple = (128, 512, 2048, 4096)
    flex_seqlens: tuple = (8192,)  # FlexAttention's cases (each modifier there compiles a fwd and a bwd)
    flex_windows: tuple = (512,)  # FlexAttention's window variants, beside the other modifiers

    def flex_cases(self) -> list[Case]:
        return [c for c in self.cases() if c.seqlen_q in self.flex_seqlens]
    head_dim: int = 128
    dtype: str = "bfloat16"
    tokens: int = TOKENS
    hidden: int = HIDDEN
    warmup_ms: float = 25
    rep_ms: float = 100
    budget_s: float | None = None
    smoke: bool = False

    def cases(self) -> list[Case]:
        """The longest sequences first (the bars' most telling cases), causal before not."""
        return [Case(max(1, self.tokens // s), s, s, self.hidden // self.head_dim, self.hidden // self.head_dim,
                     self.head_dim, kind="self", causal=c, dtype=self.dtype)
                for s in sorted(self.seqlens, reverse=True) for c in (True, False)]


# Tiny float32 shapes (the interpreter cannot run bf16 dots): 48 keys = a full and a partial key tile there;
# a batch of 2, so that the bias's gradient is summed over it.
SMOKE = dict(seqlens=(48,), windows=(8,), flex_seqlens=(48,), flex_windows=(8,), head_dim=16, dtype="float32",
             tokens=96, hidden=16, warmup_ms=1, rep_ms=1, smoke=True)


@dataclass
class Run:
    settings: Settings
    device: str
    ceilings: dict
    gen: torch.Generator
    t0: float = field(default_factory=time.monotonic)

    def out_of_time(self) -> bool:
        b = self.settings.budget_s
        return b is not None and time.monotonic() - self.t0 > b


def _row(case: Case, variant: Variant, provider: str, mode: str) -> dict:
    window = variant.window_arg(case.causal)
    keys = mean_visible_keys(case.seqlen_q, case.seqlen_k, case.causal, window)
    return {"case": case.as_dict(), "variant": variant.name, "window": window, "provider": provider, "mode": mode,
            "keys_per_query": keys, "flops": attention_flops(case.batch, case.heads_q, case.seqlen_q, case.seqlen_k,
                                                             case.head_dim, causal=case.causal, mode=mode,
                                                             window=window)}


def run_variant(run: Run, case: Case, variant: Variant, inputs, flex_pass: bool) -> list[dict]:
    """Every provider of one (case, variant) in this pass: the gate, then the time of each mode."""
    q, k, v = inputs
    rows = []
    mods, reason = _guarded(lambda: variant.mods(case, run.device, run.gen), [])
    gate, reason = (None, reason) if reason else _guarded(lambda: ModGate(case, q, k, v, mods, run.gen), [])
    for p in providers(case, variant, flex_pass):
        own, why = (None, reason) if reason else _guarded(lambda: p.prepare(case, mods) if p.prepare else mods, [])
        checks = {"fwd": gate.check_forward, "fwd_bwd": gate.check_backward} if not why else {}
        for mode in MODES:
            row = _row(case, variant, p.name, mode)
            verdict, why_mode = (None, why) if why else _guarded(lambda: checks[mode](p.fn, q, k, v, own), [])
            row["gate"] = verdict or ""
            if why_mode:
                row["skipped"] = why_mode
            else:  # timed even when the gate failed: flagged, never ranked
                _time(run, row, partial(p.fn, **with_grads(own, mode != "fwd")), q, k, v)
            rows.append(row)
        if run.device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _time(run: Run, row: dict, fn, q, k, v) -> None:
    s = run.settings
    prepared, why = _guarded(lambda: mode_callable(fn, q, k, v, row["mode"]), [])
    if not why:
        call, grad_to_none = prepared
        learned = [x for x in fn.keywords.values() if isinstance(x, torch.Tensor) and x.requires_grad]
        grad_to_none = None if grad_to_none is None else [*grad_to_none, *learned]
        if row["mode"] != "fwd":
            row["peak_mib"], why = _guarded(lambda: peak_memory_mib(call, run.device), [])
    if not why and s.smoke and run.device == "cpu":  # one warm-up, one timed call: the interpreter's times mean nothing
        row["ms"], why = _guarded(lambda: _wall_clock_median(call, grad_to_none, 0, 0, min_reps=1), [])
    elif not why:
        row["ms"], why = _guarded(lambda: time_ms(call, device=run.device, grad_to_none=grad_to_none,
                                                  warmup_ms=s.warmup_ms, rep_ms=s.rep_ms), [])
    if why:
        row["skipped"] = why
        return
    row["tflops"] = row["flops"] / row["ms"] * 1e-9
    row["pct_matmul"] = 100 * row["tflops"] / run.ceilings["matmul_tflops"]


def _ranked(r: dict) -> bool:
    return "ms" in r and r["gate"] == GATE_OK


def add_ratios(rows: list[dict]) -> None:
    """fastattn rows: TFLOPS vs the unmodified kernel (same case and mode) and time vs it; the bias
    row: SDPA's time / fastattn's; every row: FlexAttention's time / fastattn's (same case, variant
    and mode). Only between rows that passed the gate."""
    def key(r):
        return r["case"]["label"], r["mode"]
    none = {key(r): r for r in rows if r["variant"] == "none" and r["provider"] == "fastattn" and _ranked(r)}
    sdpa = {key(r): r for r in rows if r["provider"] == "sdpa" and _ranked(r)}
    flex = {(*key(r), r["variant"]): r for r in rows if r["provider"] == "flex" and _ranked(r)}
    for r in rows:
        if r["provider"] != "fastattn" or not _ranked(r):
            continue
        base = none.get(key(r))
        if base is not None:
            r["vs_none"] = r["tflops"] / base["tflops"]
            r["time_vs_none"] = r["ms"] / base["ms"]
            r["keys_vs_none"] = r["keys_per_query"] / base["keys_per_query"]
        if compared_as(r["variant"]) == "bias" and key(r) in sdpa:
            r["vs_sdpa"] = sdpa[key(r)]["ms"] / r["ms"]
        if (*key(r), compared_as(r["variant"])) in flex:
            r["vs_flex"] = flex[(*key(r), compared_as(r["variant"]))]["ms"] / r["ms"]


def bars(rows: list[dict]) -> list[dict]:
    """The issue's bars, one line per check (GPU runs). A check whose ratio could not be formed (a row
    skipped, raised or failed its gate) is listed with value None, ok None and why, not dropped."""
    out = []
    by = {(r["case"]["label"], r["variant"], r["provider"], r["mode"]): r for r in rows}

    def check(r, what, ratio, bar, other):
        value = r.get(ratio)
        entry = {"case": r["case"]["label"], "check": what, "value": value, "bar": bar,
                 "ok": None if value is None else value >= bar}
        if value is None:  # the first of the two rows that is not ranked says why
            o = by.get((r["case"]["label"], other[0], other[1], r["mode"]))
            entry["why"] = next((f"{x['provider']} {x['variant']}: {x.get('skipped') or x['gate'] or 'no time'}"
                                 for x in (r, o) if x is not None and not _ranked(x)),
                                f"no {other[1]} {other[0]} row")
        out.append(entry)
    flex_runs = {(r["case"]["label"], r["variant"]) for r in rows if r["provider"] == "flex"}  # attempted
    for r in rows:
        if r["provider"] != "fastattn":
            continue
        mode = "fwd" if r["mode"] == "fwd" else "fwd+bwd"
        if r["variant"] in ("alibi", "softcap", APPROX) or r["window"]:
            check(r, f"{r['variant']} {mode} TFLOPS / none", "vs_none",
                  BAR_RATIO if r["mode"] == "fwd" else BAR_RATIO_BWD, ("none", "fastattn"))
        if r["mode"] == "fwd_bwd" and compared_as(r["variant"]) == "bias":
            check(r, f"{r['variant']} fwd+bwd: SDPA (float mask) time / fastattn", "vs_sdpa", BAR_VS_SDPA,
                  ("bias", "sdpa"))
        if r["variant"] != "none" and (r["case"]["label"], compared_as(r["variant"])) in flex_runs:
            check(r, f"{r['variant']} {mode}: FlexAttention time / fastattn", "vs_flex", BAR_VS_FLEX,
                  (compared_as(r["variant"]), "flex"))
    return out


def _fmt(r: dict | None, key: str, spec: str, suffix: str = "") -> str:
    return "-" if r is None or r.get(key) is None else format(r[key], spec) + suffix


def markdown(doc: dict) -> str:
    env, ceil = doc["environment"], doc["ceilings"]
    smoke = doc["settings"]["smoke"]
    lines = [f"# Score-modifier benchmark: {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; {env['timer']}; FASTATTN_AUTOTUNE="
             f"{env['fastattn_autotune']}. Matmul ceiling {ceil['matmul_tflops']:.1f} TFLOPS ({ceil['matmul']}, "
             "measured in this run). TFLOPS count only the keys a query sees (causal, window: fastattn.flops); "
             "\"vs none\" = TFLOPS / the unmodified kernel's in the same case and mode (for a window: ~1 means "
             "time in proportion to the window).", ""]
    if smoke:
        where = " through the Triton interpreter on the CPU" if env["device_type"] == "cpu" else ""
        lines += [f"**Smoke run** (tiny float32 shapes{where}): the gate means something, the times do not.", ""]
    by = {(r["case"]["label"], r["variant"], r["provider"], r["mode"]): r for r in doc["rows"]}
    keys = list(dict.fromkeys((r["case"]["label"], r["variant"]) for r in doc["rows"]))
    lines += ["## fastattn (Triton), each modifier vs none", "",
              "| case | modifier | keys/query | fwd ms | fwd TFLOPS | fwd vs none | fwd+bwd ms | fwd+bwd TFLOPS | "
              "fwd+bwd vs none | gate |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, variant in keys:
        f, fb = by.get((label, variant, "fastattn", "fwd")), by.get((label, variant, "fastattn", "fwd_bwd"))
        if f is None:
            continue
        gate = "; ".join(dict.fromkeys(x for x in (f.get("gate"), fb and fb.get("gate"), f.get("skipped"),
                                                   fb and fb.get("skipped")) if x))
        lines.append(f"| {label} | {variant} | {f['keys_per_query']:.0f} | {_fmt(f, 'ms', '.3f')} | "
                     f"{_fmt(f, 'tflops', '.1f')} | {_fmt(f, 'vs_none', '.2f')} | {_fmt(fb, 'ms', '.3f')} | "
                     f"{_fmt(fb, 'tflops', '.1f')} | {_fmt(fb, 'vs_none', '.2f')} | {gate or '-'} |")
    lines += ["", "## Bias (1, H, S, S) requiring grad: fastattn vs SDPA with the same float mask", "",
              f"({BIAS_KERNEL}: FASTATTN_BIAS_GRAD=kernel, the gradient summed over the batch in the kernel; "
              "bias: the default, a float32 (B, H, S, S) buffer summed afterwards.)", "",
              "| case | variant | mode | fastattn ms | SDPA ms | SDPA / fastattn | fastattn bias / no bias (time) | "
              "peak MiB fastattn / SDPA | gates |", "|---|---|---|---|---|---|---|---|---|"]
    for label, variant in keys:
        if compared_as(variant) != "bias":
            continue
        for mode in MODES:
            f, s = by.get((label, variant, "fastattn", mode)), by.get((label, "bias", "sdpa", mode))
            gates = " / ".join((r.get("gate") or r.get("skipped", "-")) if r else "-" for r in (f, s))
            lines.append(f"| {label} | {variant} | {mode} | {_fmt(f, 'ms', '.3f')} | {_fmt(s, 'ms', '.3f')} | "
                         f"{_fmt(f, 'vs_sdpa', '.2f', 'x')} | {_fmt(f, 'time_vs_none', '.2f', 'x')} | "
                         f"{_fmt(f, 'peak_mib', '.0f')} / {_fmt(s, 'peak_mib', '.0f')} | {gates} |")
    lines += ["", "## Each variant vs FlexAttention with the same score_mod / block mask", ""]
    if doc.get("flex", "ok") != "ok":
        lines += [f"FlexAttention did not run: {doc['flex']}", ""]
    lines += [
              "| case | modifier | mode | fastattn ms | FlexAttention ms | Flex / fastattn | gates |",
              "|---|---|---|---|---|---|---|"]
    for label, variant in keys:
        for mode in MODES:
            f, x = by.get((label, variant, "fastattn", mode)), by.get((label, variant, "flex", mode))
            if x is None:
                continue
            gates = " / ".join((r.get("gate") or r.get("skipped", "-")) if r else "-" for r in (f, x))
            lines.append(f"| {label} | {variant} | {mode} | {_fmt(f, 'ms', '.3f')} | {_fmt(x, 'ms', '.3f')} | "
                         f"{_fmt(f, 'vs_flex', '.2f', 'x')} | {gates} |")
    lines += ["", f"## Bars (ALiBi, softcap, window TFLOPS vs none: fwd >= {BAR_RATIO}, fwd+bwd >= {BAR_RATIO_BWD}; "
              f"bias fwd+bwd >= {BAR_VS_SDPA:.0f}x SDPA; every modifier >= {BAR_VS_FLEX:.1f}x FlexAttention)", ""]
    if smoke:
        lines.append("Not judged on a smoke run.")
    else:
        lines += ["| case | check | value | bar | |", "|---|---|---|---|---|"]
        lines += [f"| {b['case']} | {b['check']} | {_fmt(b, 'value', '.2f')} | >= {b['bar']} | "
                  f"{'ok' if b['ok'] else 'MISSED' if b['ok'] is False else 'not measured: ' + b['why']} |"
                  for b in doc["bars"]]
        met, missed = (sum(b["ok"] is v for b in doc["bars"]) for v in (True, False))
        unrun = sum(r.get("skipped") == BUDGET_SKIP for r in doc["rows"])
        lines += ["", f"{met} of {len(doc['bars'])} bar checks met, {missed} missed, "
                  f"{len(doc['bars']) - met - missed} not measured; {unrun} rows not run (time budget spent)."]
    return "\n".join(lines) + "\n"


def run_case(run: Run, doc: dict, case: Case, case_variants: list[Variant], flex_pass: bool, save=None) -> None:
    """One case's rows of one pass into doc, with the ratios and bars brought up to date and, after
    every variant, save() called (a run killed at its timeout keeps the variants that finished)."""
    inputs = make_inputs(case, run.device, run.gen)[:3]
    for variant in case_variants:
        if run.out_of_time():
            rows = [{**_row(case, variant, p.name, m), "gate": "", "skipped": BUDGET_SKIP}
                    for p in providers(case, variant, flex_pass) for m in MODES]
        else:
            with switched(variant):
                rows = run_variant(run, case, variant, inputs, flex_pass)
        doc["rows"] += rows
        for r in rows:
            print(f"{case.label:<40} {variant.name:<12} {r['provider']:<8} {r['mode']:<7} "
                  + (f"{r['ms']:9.3f} ms {r['tflops']:7.1f} TFLOPS" if "ms" in r else r.get("skipped", ""))
                  + f"  gate {r['gate'] or '-'}", flush=True)
        add_ratios(doc["rows"])
        doc["bars"] = [] if run.settings.smoke else bars(doc["rows"])
        if save is not None:
            save()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: tuple(int(x) for x in s.split(",") if x)  # noqa: E731
    ap.add_argument("--out", type=Path, default=Path(".benchmarks/score_mods"))
    ap.add_argument("--smoke", action="store_true", help="tiny float32 shapes on the CPU (the default without a GPU)")
    ap.add_argument("--seqlens", type=ints, default=Settings.seqlens)
    ap.add_argument("--windows", type=ints, default=Settings.windows)
    ap.add_argument("--flex-seqlens", type=ints, default=Settings.flex_seqlens,
                    help="sequence lengths where FlexAttention runs too ('' = none)")
    ap.add_argument("--flex-windows", type=ints, default=Settings.flex_windows)
    ap.add_argument("--budget-s", type=float, default=None, help="start no new case past this many seconds")
    args = ap.parse_args(argv)
    if set(args.flex_seqlens) - set(args.seqlens):
        ap.error(f"--flex-seqlens {args.flex_seqlens} must be among --seqlens {args.seqlens}")
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if args.smoke or not cuda:
        settings = Settings(**SMOKE, budget_s=args.budget_s)
        if not args.smoke:
            print("no CUDA GPU: running the smoke mode (tiny float32 shapes through the Triton interpreter)")
    else:
        settings = Settings(seqlens=args.seqlens, windows=args.windows, flex_seqlens=args.flex_seqlens,
                            flex_windows=args.flex_windows, budget_s=args.budget_s)
    run = Run(settings, device, measure_ceilings(device), torch.Generator(device=device).manual_seed(0))
    doc = {"environment": environment(device), "ceilings": run.ceilings, "settings": settings.__dict__, "rows": []}
    args.out.mkdir(parents=True, exist_ok=True)
    doc["flex"] = flex_unavailable() or "ok"
    # fastattn runs FlexAttention's windows too, where they are its cases' (its ratios need both rows).
    own_windows = settings.windows + tuple(w for w in settings.flex_windows if w not in settings.windows)
    # fastattn on FlexAttention's cases, then FlexAttention there (the bars' pairs, before a budget
    # runs out), then fastattn's other cases.
    flex_cases, cases = settings.flex_cases(), settings.cases()
    passes = [(False, [c for c in cases if c in flex_cases], own_windows), (True, flex_cases, settings.flex_windows),
              (False, [c for c in cases if c not in flex_cases], own_windows)]

    def save():  # after every variant: partial runs survive
        (args.out / "score_mods.json").write_text(json.dumps(doc, indent=2, default=str))
        (args.out / "score_mods.md").write_text(markdown(doc))
    for flex_pass, cases, windows in passes:
        for case in cases:
            approx = cuda and not flex_pass and case.dtype != "float32"  # tanh.approx: 16-bit inputs only
            case_variants = variants(case, windows, approx=approx, bias_kernel=not flex_pass, tuned_window=approx)
            if flex_pass:  # FlexAttention's "none" feeds no bar: last
                case_variants.sort(key=lambda v: v.name == "none")
            run_case(run, doc, case, case_variants, flex_pass, save)
    # A fastattn row fails when its gate fails or it raised (a budget skip is not a failure).
    failed = [r for r in doc["rows"] if r["provider"] == "fastattn" and r.get("skipped") != BUDGET_SKIP
              and r["gate"] != GATE_OK]
    print(markdown(doc))
    print(f"wrote {args.out / 'score_mods.json'} and score_mods.md; {len(failed)} fastattn rows failed the gate "
          "or raised")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
