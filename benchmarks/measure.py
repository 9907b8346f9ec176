"""One case, every provider: the correctness gate first, then peak memory and time per mode.

The gate: each provider runs on the case's full inputs; batch element 0, query head 0 of its
output (and, for the backward modes, of dq/dk/dv under a cotangent that is zero elsewhere) is
compared with the float64 reference under docs/design.md's tolerance rule (fastattn.testing). With
the cotangent zero outside that slice, KV head 0's gradients get nothing from the other query
heads of its group (dS = P * (dP - delta) = 0 there), so the slice's gradients are the slice's
own. A provider that fails the gate is still timed but flagged: it gets no ratios and is not
ranked or plotted.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch

from benchmarks.cases import Case, make_inputs
from benchmarks.common import peak_memory_mib, time_ms
from benchmarks.providers import Provider, why_not
from fastattn import reference, testing

GATE_OK = "ok"


@dataclass
class Timing:
    warmup_ms: float = 25  # do_bench's: milliseconds of running, not a number of calls
    rep_ms: float = 100
    case_cap_s: float | None = None  # time for one case, all providers (compilation included)


@dataclass
class Measurement:
    case: Case
    provider: str
    mode: str  # "fwd", "bwd", "fwd_bwd"
    device_type: str  # "cuda" or "cpu": CPU times are CPU times
    role: str = "baseline"  # the provider's: "fastattn", "baseline" or "oracle"
    ms: float | None = None
    tflops: float | None = None
    pct_of_matmul: float | None = None
    intensity: float | None = None  # FLOP per byte of least memory traffic (the roofline's x)
    peak_mib: float | None = None  # extra device memory at the peak of one call
    gate: str = ""  # GATE_OK, "FAIL ...", or "" when the provider never ran
    skipped: str = ""  # why it was not timed
    ratios: dict = field(default_factory=dict)  # other provider -> its time / this time (> 1: this is faster)

    @property
    def ranked(self) -> bool:
        """Timed and correct: the rows that take part in ratios and plots."""
        return self.ms is not None and self.gate == GATE_OK

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "case"}
        return {"case": self.case.as_dict(), **d}


def describe(exc: BaseException, caught: list | None = None) -> str:
    """One line for a failure: the exception's first line, plus the warnings it came with (SDPA
    says why a forced backend cannot run only in warnings)."""
    text = str(exc).strip().splitlines()
    msg = f"{type(exc).__name__}: {text[0] if text else ''}"
    notes = []
    for w in caught or ():
        line = (str(w.message).strip().splitlines() or [""])[0]
        # Keep SDPA's "... kernel not used because ..." kind; drop unrelated deprecation chatter.
        if "attention" in line.lower() or "kernel" in line.lower():
            if line not in notes:
                notes.append(line)
    if notes:
        msg += " [" + "; ".join(notes[:3]) + "]"
    return msg[:400]


def mode_callable(fn, q, k, v, mode: str):
    """What a timer calls for one mode, on fresh leaf copies of q, k, v: (call, grad_to_none).
    bwd times only the backward: the forward runs once here and its graph is kept."""
    needs_grad = mode != "fwd"
    xs = [x.detach().clone().requires_grad_(needs_grad) for x in (q, k, v)]
    if mode == "fwd":
        return (lambda: fn(*xs)), None
    out = fn(*xs)
    dout = torch.randn_like(out)  # fresh, not zeros
    if mode == "bwd":
        return (lambda: out.backward(dout, retain_graph=True)), xs
    if mode == "fwd_bwd":
        del out
        return (lambda: fn(*xs).backward(dout)), xs
    raise ValueError(f"unknown mode {mode!r}")


class Gate:
    """The float64 reference of one case's (batch 0, query head 0) slice, computed once per case,
    and the verdicts for each provider's forward and backward."""

    def __init__(self, case: Case, q, k, v, mask, *, grads: bool, generator=None):
        self.causal = case.causal
        self.mask0 = None if mask is None else mask[:1]
        sl = [x[:1, :, :1].detach() for x in (q, k, v)]  # (1, S, 1, D): KV head 0 serves query head 0
        self.dout = None
        if grads:
            self.dout = torch.randn((1, case.seqlen_q, 1, case.head_dim), device=q.device, generator=generator)
        self.ref, self.ref_grads = self._reference(sl, torch.float64)
        self.naive, self.naive_grads = self._reference(sl, q.dtype)

    def _reference(self, sl, dtype):
        """out [, (dq, dk, dv)] of the naive reference on the slice, computed in `dtype`."""
        grads = self.dout is not None
        xs = [x.to(dtype).requires_grad_(grads) for x in sl]
        out = reference.attention(*xs, causal=self.causal, key_padding_mask=self.mask0)
        if not grads:
            return out, None
        out.backward(self.dout.to(dtype))
        return out.detach(), [x.grad for x in xs]

    def check_forward(self, fn, q, k, v) -> str:
        # Called as the fwd timing calls it (grad mode on, inputs without grad): a compiled
        # provider compiles once for both.
        out = fn(q, k, v)
        return self._verdict([testing.compare("out", out[:1, :, :1], self.naive, self.ref, testing.OUT_FACTOR)])

    def check_backward(self, fn, q, k, v) -> str:
        xs = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
        out = fn(*xs)
        dout = torch.zeros_like(out)
        dout[:1, :, :1] = self.dout.to(out.dtype)
        out.backward(dout)
        scale = testing.magnitude(*self.ref_grads)  # dq, dk, dv are coupled through dS
        return self._verdict([testing.compare(name, x.grad[:1, :, :1], naive, ref, testing.GRAD_FACTOR, scale)
                              for name, x, naive, ref in zip(("dq", "dk", "dv"), xs, self.naive_grads,
                                                             self.ref_grads)])

    @staticmethod
    def _verdict(comparisons) -> str:
        bad = [c for c in comparisons if not c.ok]
        return GATE_OK if not bad else "FAIL " + ", ".join(f"{c.name} {c.error:.2e} > {c.tolerance:.2e}" for c in bad)


def _guarded(call, caught):
    """(result, None) or (None, the reason it failed)."""
    try:
        return call(), None
    except Exception as e:  # a provider that cannot run: reported with the reason, never dropped
        if isinstance(e, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        return None, describe(e, caught)


def run_provider(provider: Provider, case: Case, inputs, gate: Gate, modes, *, device: str, ceilings: dict,
                 timing: Timing) -> list[Measurement]:
    """Gate, then peak memory and time for each mode: one Measurement per mode, skips with reasons."""
    q, k, v, mask = inputs
    dev_type = torch.device(device).type
    rows = [Measurement(case, provider.name, m, dev_type, provider.role) for m in modes]
    reason = why_not(provider, case, dev_type)
    if reason:
        for r in rows:
            r.skipped = reason
        return rows
    with provider.context():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn, reason = _guarded(lambda: provider.build(case, mask, device), caught)
            fwd, reason = (None, reason) if reason else _guarded(lambda: gate.check_forward(fn, q, k, v), caught)
            bwd, bwd_reason = None, reason
            if not reason and any(m != "fwd" for m in modes):
                bwd, bwd_reason = _guarded(lambda: gate.check_backward(fn, q, k, v), caught)
        timing_skip = provider.timing_skip(dev_type)
        for r in rows:
            verdict, reason = (fwd, reason) if r.mode == "fwd" else (_combine(fwd, bwd), bwd_reason)
            r.gate = verdict or ""
            r.skipped = reason or timing_skip or ""
            if not r.skipped:
                _time(r, fn, q, k, v, device=device, ceilings=ceilings, timing=timing)
    return rows


def _combine(fwd: str | None, bwd: str | None) -> str | None:
    if fwd is None or bwd is None:
        return None
    return GATE_OK if fwd == bwd == GATE_OK else "; ".join(v for v in (fwd, bwd) if v != GATE_OK)


def _time(r: Measurement, fn, q, k, v, *, device, ceilings, timing: Timing) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared, reason = _guarded(lambda: mode_callable(fn, q, k, v, r.mode), caught)
        if not reason:
            call, grad_to_none = prepared
            r.peak_mib, reason = _guarded(lambda: peak_memory_mib(call, device), caught)
        if not reason:
            r.ms, reason = _guarded(lambda: time_ms(call, device=device, grad_to_none=grad_to_none,
                                                    warmup_ms=timing.warmup_ms, rep_ms=timing.rep_ms), caught)
    if reason:
        r.skipped = reason
        return
    flops = r.case.flops(r.mode)
    r.tflops = flops / r.ms * 1e-9
    r.pct_of_matmul = 100 * r.tflops / ceilings["matmul_tflops"]
    r.intensity = flops / r.case.bytes(r.mode)


def add_ratios(rows: list[Measurement]) -> None:
    """Each fastattn row's ratio to every other provider measured (and correct) in the same case and
    mode: other time / fastattn time, > 1 when fastattn is faster."""
    for r in rows:
        if not (r.ranked and r.role == "fastattn"):
            continue
        r.ratios = {o.provider: o.ms / r.ms for o in rows
                    if o is not r and o.ranked and o.case == r.case and o.mode == r.mode}


def run_case(case: Case, providers, modes, *, device: str, ceilings: dict, timing: Timing,
             generator=None) -> list[Measurement]:
    """Every provider on one case, on the same fresh random inputs. `generator`: a torch.Generator
    on `device` (or None). Past timing.case_cap_s seconds (compilation and autotuning count) the
    providers not yet run are reported as skipped."""
    t0, cap_s = time.monotonic(), timing.case_cap_s
    inputs = make_inputs(case, device, generator)
    rows: list[Measurement] = []
    gate, gate_error = None, None
    for p in providers:
        if cap_s is not None and time.monotonic() - t0 > cap_s:
            rows += [Measurement(case, p.name, m, torch.device(device).type, p.role,
                                 skipped=f"the case's time cap of {cap_s:.0f} s was spent before this provider")
                     for m in modes]
            continue
        if gate is None and why_not(p, case, torch.device(device).type) is None:
            gate, gate_error = _guarded(lambda: Gate(case, *inputs, grads=any(m != "fwd" for m in modes),
                                                     generator=generator), [])
        if gate_error:
            rows += [Measurement(case, p.name, m, torch.device(device).type, p.role,
                                 skipped=f"the reference for the correctness gate failed: {gate_error}")
                     for m in modes]
            continue
        rows += run_provider(p, case, inputs, gate, modes, device=device, ceilings=ceilings, timing=timing)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    add_ratios(rows)
    return rows
