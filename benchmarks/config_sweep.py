"""Block-config sweep of the Triton prefill kernels: each config against the shipped table and
cuDNN, on one device, in one run (issue 24: "num_stages/num_warps retuned for sm_90").

    python benchmarks/config_sweep.py [--out DIR] [--head-dims 128,64,256] [--seqlens 16384,4096]
        [--kinds fwd,dkdv,dq] [--compiled FILE] [--workers 16] [--budget-s 420]
    python benchmarks/config_sweep.py --smoke     # tiny float16 shapes, a few configs, the interpreter (CPU)

Per case (bf16, 16k tokens: batch = 16384 // S, hidden 2048, causal and not):
- "table": fastattn.attention(backend="triton") as shipped (autotuned from configs.GPU_CANDIDATES),
  forward and backward timed; the configs it chose are recorded;
- "cudnn" and "flash": SDPA forced to its cuDNN / FlashAttention-2 backend, the same two modes;
- each config of the sweep forced on one kernel (configs.forced), the other kernels pinned to the
  table's choice for the case: fwd configs time the forward, dkdv and dq configs the backward
  (benchmarks.measure.mode_callable's "bwd": the forward once, the backward timed).

Which configs: the table's own as their lpt twins (the longest tiles first) and dK/dV's as their
atomic_dq twins (non-deterministic: only ever an opt-in, never the table's), then
configs.sweep_space(kind) (each with and without its streamed tiles through tensor descriptors,
tma; the forward's also warp-specialised, ws), filtered by the compile check's records (--compiled,
from `tools/aot_compile_check.py --configs sweep --json`): fits shared memory, uses wgmma, and spills no
more than the table's worst config of that kernel and head dim (see `eligible`). Without --compiled,
the whole space. Before the timing, --workers processes compile every config on a tiny input of the
same specialisation, so the main process finds them in Triton's cache (compiling ~100 configs per
kernel one after another would take most of a GPU session).

--budget-s is shared out: each case gets an equal share of what is left when it starts (its table and
cuDNN rows first), so the last bar case is not starved by the first one's sweep.

Every run passes the correctness gate first (batch 0, head 0 against the float64 reference under
the tolerance rule; benchmarks.measure.Gate), and each config's whole output (fwd) or dq, dk, dv
(bwd) must then agree with the table's from the same run within a few roundings of the dtype,
every batch and head (a config that skips a head or a tile would pass the gate): a failing config
is flagged and never proposed.
Writes sweep.json and sweep.md after every case: per case and kernel each config's time, vs the
table and vs cuDNN; the table's own config forced again (this run's noise); per kernel the fastest
configs timed again in turn with the table's (their re-timed ratios: the best of ~70 single timings
is biased upward); issue 24's bars (D=128, 16k tokens: fwd >= 1.0x cuDNN, bwd >= 0.9x) met or not,
for the table and for the best deterministic config, swept and re-timed; and per (kernel, head dim)
a proposed candidate list, ordered by the geometric mean of table time / config time over the cases
(atomic_dq twins marked: never the table's).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import use_interpreter_without_gpu  # noqa: E402

use_interpreter_without_gpu()  # before fastattn (and triton) are imported

import torch  # noqa: E402

import fastattn  # noqa: E402
from benchmarks.cases import HIDDEN, TOKENS, Case, make_inputs  # noqa: E402
from benchmarks.common import environment, time_ms  # noqa: E402
from benchmarks.measure import GATE_OK, Gate, _guarded, mode_callable  # noqa: E402
from benchmarks.providers import PROVIDERS  # noqa: E402
from fastattn.flops import attention_flops  # noqa: E402
from fastattn.kernels import configs  # noqa: E402
from fastattn.launchers import plans  # noqa: E402

KINDS = ("fwd", "dkdv", "dq")
MODE = {"fwd": "fwd", "dkdv": "bwd", "dq": "bwd"}  # the mode each kernel's configs are timed in
BASELINES = {"cudnn": "sdpa-cudnn", "flash": "sdpa-flash"}
# Smoke: tiny float16 shapes (tma takes 16-bit inputs) through the interpreter, causal only (48
# keys: a full and a partial tile of 32), two unequal tilings, each kernel's streamed tiles through
# tensor descriptors (the forward's without and with the warp-specialised loop), the longest tiles
# first (lpt), and dK/dV adding dQ with atomics (atomic_dq).
SMOKE_CONFIGS = [configs.BlockConfig(32, 64, 4, 2), configs.BlockConfig(64, 32, 4, 2)]
SMOKE_TMA = {"fwd": [configs.BlockConfig(64, 32, 4, 2, tma=True), configs.BlockConfig(64, 32, 4, 2, tma=True, ws=True),
                     configs.BlockConfig(64, 32, 4, 2, lpt=True)],
             "dkdv": [configs.BlockConfig(32, 64, 4, 2, tma=True), configs.BlockConfig(32, 64, 4, 2, lpt=True),
                      configs.BlockConfig(32, 64, 4, 2, atomic_dq=True)],
             "dq": [configs.BlockConfig(64, 32, 4, 2, tma=True), configs.BlockConfig(64, 32, 4, 2, lpt=True)]}
# The compile check this script was prepared with (sm_90, Triton 3.6, bf16, specialised as the runtime
# specialises a call): --compiled's default.
COMPILED = Path(__file__).parent / "results" / "2026-12-05-cpu-specialized-compile" / "aot_sweep_bf16_sm90.json"


def cases(head_dims, seqlens, dtype: str, smoke: bool) -> list[Case]:
    """The head dims in the order given, then the longest sequences, causal before not."""
    tokens, hidden = (48, 32) if smoke else (TOKENS, HIDDEN)
    return [Case(max(1, tokens // s), s, s, hidden // d, hidden // d, d, kind="self", causal=c, dtype=dtype)
            for d in head_dims for s in sorted(seqlens, reverse=True) for c in ((True,) if smoke else (True, False))]


def eligible(records: list[dict], kind: str, head_dim: int) -> list[configs.BlockConfig]:
    """The sweep configs worth timing for one kernel and head dim, from the compile check's records
    (any causal flag: a config is kept if it passes for every one compiled): they fit shared memory,
    use wgmma (a ws config: and Triton did warp-specialise it), and spill no more than the table's
    worst config (or 0 if none of it spills). The table's own configs are always kept, and timed
    first as their lpt twins (the longest tiles first: the same kernel but for its grid order, so the
    same compile records) and dK/dV's as their atomic_dq twins (dQ added by dK/dV with atomics, no dQ
    kernel: compiled in benchmarks/results/2026-12-05-cpu-lpt/), each against the table in the same
    case (dkdv configs time the whole backward)."""
    table = configs.GPU_CANDIDATES[kind][configs.head_dim_bucket(head_dim)]
    mine = [r for r in records if r["kind"] == kind and r["head_dim"] == head_dim and r["variant"] == "dense"]
    spill_of: dict = {}
    for r in mine:  # the worst over the causal flags compiled
        cfg = configs.BlockConfig(*r["config"])
        ok = r["fits"] and r["mma"].startswith("wgmma") and r["spill"] >= 0 and (not cfg.ws or "+ws" in r["mma"])
        prev = spill_of.get(cfg, 0)
        spill_of[cfg] = None if not ok or prev is None else max(prev, r["spill"])
    limit = max([spill_of.get(c) or 0 for c in table], default=0)
    twins = [dataclasses.replace(c, lpt=True) for c in table]
    if kind == "dkdv" and head_dim <= 128:  # at D=256 they spill 0.2-3.7 KB or exceed shared memory
        twins += [dataclasses.replace(c, atomic_dq=True) for c in table]
    return twins + [c for c in configs.sweep_space(kind)
                    if c in table or (spill_of.get(c) is not None and spill_of[c] <= limit)]


def _attention(causal: bool):
    return lambda q, k, v: fastattn.attention(q, k, v, causal=causal, backend="triton")


def _chosen() -> dict:
    """The configs the table picked for the last case ("fwd", "dkdv", "dq" -> BlockConfig)."""
    return {t["kernel"]: configs.BlockConfig(*t["config"]) for t in plans.tuned_configs() if t["kernel"] in KINDS}


def _time(fn, q, k, v, mode: str, device: str, smoke: bool) -> tuple:
    """(ms, None) or (None, why) for one mode of fn."""
    prepared, why = _guarded(lambda: mode_callable(fn, q, k, v, mode), [])
    if why:
        return None, why
    call, grads = prepared
    reps = (0, 1) if smoke and device == "cpu" else (25, 100)
    return _guarded(lambda: time_ms(call, device=device, grad_to_none=grads, warmup_ms=reps[0], rep_ms=reps[1]), [])


def _measure(fn, q, k, v, mode: str, gate: Gate, device: str, smoke: bool) -> dict:
    """Gate, then time one mode: {"gate", "ms"} or {"gate", "skipped"}."""
    check = gate.check_forward if mode == "fwd" else gate.check_backward
    verdict, why = _guarded(lambda: check(fn, q, k, v), [])
    row = {"gate": verdict or ""}
    if not why:
        row["ms"], why = _time(fn, q, k, v, mode, device, smoke)
    return {**row, "skipped": why} if why else row


def _whole(fn, q, k, v, mode: str, dout) -> list:
    """The whole output (fwd) or dq, dk, dv (bwd, under the cotangent dout) of one call: a config's
    are held against the table's, every batch and head (the gate sees batch 0, head 0 only)."""
    xs = [x.detach().clone().requires_grad_(mode != "fwd") for x in (q, k, v)]
    out = fn(*xs)
    if mode == "fwd":
        return [out.detach()]
    out.backward(dout)
    return [x.grad for x in xs]


def _agrees(mine: list, table: list) -> str:
    """"ok", or which tensor differs from the table's by more than a few roundings of its dtype
    (two correct configs differ only in summation order; one that skips a head or a tile does not)."""
    for name, a, b in zip(("out",) if len(mine) == 1 else ("dq", "dk", "dv"), mine, table):
        bound = 8 * torch.finfo(b.dtype).eps * (b.float().abs().max().item() + 1)
        diff = (a.float() - b.float()).abs().max().item()
        if not diff <= bound:  # (NaN too)
            return f"FAIL {name} vs the table's, every batch and head: max diff {diff:.3g} > {bound:.3g}"
    return "ok"


def _precompile_one(task) -> tuple:
    """Worker: compile one (kind, config) for a case by running it once on a tiny input of the same
    specialisation (every size and stride a multiple of 16); errors come back as text."""
    kind, cfg, d, causal, dtype = task
    try:
        case = Case(1, 256, 256, HIDDEN // d, HIDDEN // d, d, kind="self", causal=causal, dtype=dtype)
        q, k, v, _ = make_inputs(case, "cuda", torch.Generator(device="cuda").manual_seed(0))
        with configs.forced(**{kind: configs.BlockConfig(*cfg)}):
            xs = [x.requires_grad_(kind != "fwd") for x in (q, k, v)]
            out = _attention(causal)(*xs)
            if kind != "fwd":
                out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        return task, None
    except Exception as e:  # reported, and the main process meets the same error when it runs the config
        return task, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def precompile(tasks: list, workers: int, deadline: float) -> tuple[dict, int]:
    """Compile the tasks in `workers` spawned processes (Triton's on-disk cache is shared), stopping
    at the deadline: ({task: error}, tasks finished)."""
    if workers <= 0 or not tasks:
        return {}, 0
    saved = os.environ.get("FASTATTN_AUTOTUNE")
    os.environ["FASTATTN_AUTOTUNE"] = "0"  # the workers build one config each (spawned: they inherit this)
    errors, done = {}, 0
    try:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:  # leaving it terminates the workers
            results = pool.imap_unordered(_precompile_one, tasks)
            while done < len(tasks):
                try:
                    task, err = results.next(timeout=max(1.0, deadline - time.monotonic()))
                except multiprocessing.TimeoutError:
                    break  # the budget is spent: what is not compiled compiles when (if) it runs
                done += 1
                if err:
                    errors[task] = err
    finally:
        if saved is None:
            os.environ.pop("FASTATTN_AUTOTUNE")
        else:
            os.environ["FASTATTN_AUTOTUNE"] = saved
    return errors, done


def run_case(case: Case, sweep: dict, device: str, smoke: bool, deadline: float) -> dict:
    """Every row of one case: the table, the baselines, then each kernel's sweep."""
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, _ = make_inputs(case, device, gen)
    gate = Gate(case, q, k, v, None, grads=True, generator=gen)
    flops = {m: attention_flops(case.batch, case.heads_q, case.seqlen_q, case.seqlen_k, case.head_dim,
                                causal=case.causal, mode=m) for m in ("fwd", "bwd")}
    rows = []
    plans.clear()
    for mode in ("fwd", "bwd"):
        rows.append({"who": "table", "mode": mode, **_measure(_attention(case.causal), q, k, v, mode, gate, device,
                                                               smoke)})
    chosen = _chosen()
    dout = torch.randn(q.shape, device=device, generator=gen).to(q.dtype)
    table_whole = {m: _guarded(lambda m=m: _whole(_attention(case.causal), q, k, v, m, dout), [])[0]
                   for m in ("fwd", "bwd")}
    for name in BASELINES:
        for mode in ("fwd", "bwd"):
            row, why = _with_baseline(name, case, device,
                                      lambda fn, mode=mode: _measure(fn, q, k, v, mode, gate, device, smoke))
            rows.append({"who": name, "mode": mode, **(row or {"gate": "", "skipped": why})})
    # The sweep stops early enough to leave the re-timing of its winners its share of the case's time.
    sweep_end = deadline - (0 if smoke else min(RETIME_RESERVE_S, 0.2 * max(0.0, deadline - time.monotonic())))
    for kind in sweep:
        for cfg in sweep[kind]:
            row = {"who": kind, "config": cfg.as_list(),
                   "mode": MODE[kind], "is_table_choice": chosen.get(kind) == cfg}
            if time.monotonic() > sweep_end:
                rows.append({**row, "gate": "", "skipped": "time budget spent"})
                continue
            plans.clear()  # the launchers' plans are cached by call signature, not by forced config
            with configs.forced(**{**chosen, kind: cfg}):
                row.update(_measure(_attention(case.causal), q, k, v, MODE[kind], gate, device, smoke))
                if row["gate"] == GATE_OK and table_whole[MODE[kind]] is not None:
                    mine, why = _guarded(lambda: _whole(_attention(case.causal), q, k, v, MODE[kind], dout), [])
                    row["whole"] = why or _agrees(mine, table_whole[MODE[kind]])
            ran = _chosen().get(kind)
            if ran != cfg:  # e.g. tma turned into pointer loads for these inputs: not this config's time
                row["ran"] = ran.as_list() if ran else None
            rows.append(row)
    for r in rows:
        if "ms" in r:
            r["tflops"] = flops[r["mode"]] / r["ms"] * 1e-9
    _ratios(rows)
    retimed = retime(case, rows, chosen, q, k, v, device, smoke, deadline)
    return {"case": case.as_dict(), "label": case.label, "table_choice": {k: c.as_list() for k, c in chosen.items()},
            "rows": rows, "retimed": retimed}


RETIME_TOP, RETIME_ROUNDS, RETIME_RESERVE_S = 3, 3, 20.0


def retime(case: Case, rows: list[dict], chosen: dict, q, k, v, device: str, smoke: bool, deadline: float) -> list:
    """The winner's curse: the fastest of ~70 configs timed once each is biased upward by the noise.
    Per kernel, the RETIME_TOP fastest other ranked configs (already gated and checked whole), the
    table's own and cuDNN (where its row ran) are timed again, in turn, RETIME_ROUNDS whole rounds
    (1 and 2 in the smoke run; no round starts past the deadline): a row per config, the table's
    included, with its median, vs_table (the table's median / its) and vs_cudnn (cuDNN's / its)."""
    top, rounds = (1, 2) if smoke else (RETIME_TOP, RETIME_ROUNDS)
    with_cudnn = any(r["who"] == "cudnn" and _ranked(r) for r in rows)
    out = []
    for kind in KINDS:
        ranked = sorted((r for r in rows if r["who"] == kind and _ranked(r) and not r.get("is_table_choice")),
                        key=lambda r: r["ms"])[:top]
        if not ranked or kind not in chosen:
            continue
        configs_ = [chosen[kind]] + [configs.BlockConfig(*r["config"]) for r in ranked]
        contenders = configs_ + (["cudnn"] if with_cudnn else [])
        times: dict = {c: [] for c in contenders}
        errors: dict = {}
        for _ in range(rounds):
            if time.monotonic() > deadline:
                break
            for c in contenders:
                if c in errors:
                    continue
                if c == "cudnn":
                    timed, why = _with_baseline("cudnn", case, device,
                                                lambda fn: _time(fn, q, k, v, MODE[kind], device, smoke))
                    ms, why = timed if timed else (None, why)
                else:
                    plans.clear()
                    with configs.forced(**{**chosen, kind: c}):
                        ms, why = _time(_attention(case.causal), q, k, v, MODE[kind], device, smoke)
                if why:
                    errors[c] = why
                else:
                    times[c].append(ms)
        table, cudnn = _median(times[chosen[kind]]), _median(times.get("cudnn", []))
        for cfg in configs_:
            ms = _median(times[cfg])
            row = {"who": kind, "config": cfg.as_list(), "mode": MODE[kind], "rounds": len(times[cfg]),
                   "is_table_choice": cfg == chosen[kind], "ms": ms, "table_ms": table, "cudnn_ms": cudnn}
            if cfg in errors or chosen[kind] in errors:
                row["skipped"] = errors.get(cfg) or f"the table's config: {errors[chosen[kind]]}"
            elif ms is None or table is None:
                row["skipped"] = "time budget spent"
            else:
                row["vs_table"] = table / ms
                if cudnn is not None:
                    row["vs_cudnn"] = cudnn / ms
            out.append(row)
    return out


def _with_baseline(name: str, case: Case, device: str, use) -> tuple:
    """(use(fn), None) with fn the BASELINES provider's call, inside its context (SDPA forced to one
    backend), or (None, why it cannot run)."""
    p = PROVIDERS[BASELINES[name]]
    reason = p.unavailable() or p.unsupported(case, device)
    if reason:
        return None, reason
    with p.context():
        fn, why = _guarded(lambda: p.build(case, None, device), [])
        return (None, why) if why else (use(fn), None)


def _median(xs: list) -> float | None:
    return statistics.median(xs) if xs else None


def _ranked(r: dict) -> bool:
    """Timed, correct (its gate, and its whole output against the table's), and the config it names
    is the one that ran."""
    return "ms" in r and r["gate"] == GATE_OK and r.get("whole", "ok") == "ok" and "ran" not in r


def _ratios(rows: list[dict]) -> None:
    """vs_table = the table's time / this (> 1: faster than shipped); vs_cudnn = cuDNN's time / this."""
    base = {(r["who"], r["mode"]): r["ms"] for r in rows if r["who"] in ("table", *BASELINES) and _ranked(r)}
    for r in rows:
        if not _ranked(r):
            continue
        if ("table", r["mode"]) in base:
            r["vs_table"] = base["table", r["mode"]] / r["ms"]
        if ("cudnn", r["mode"]) in base:
            r["vs_cudnn"] = base["cudnn", r["mode"]] / r["ms"]


def proposals(doc: dict) -> dict:
    """Per "kind D<head dim>": the configs that passed the gate and were timed in every case of that
    head dim, ordered by the geometric mean of vs_table (best first)."""
    by: dict = {}
    for c in doc["cases"]:
        for r in c["rows"]:
            if r["who"] in KINDS:
                by.setdefault((r["who"], c["case"]["head_dim"]), {}).setdefault(tuple(r["config"]), []).append(
                    r.get("vs_table") if _ranked(r) else None)
    out = {}
    for (kind, d), per_cfg in by.items():
        complete = {cfg: v for cfg, v in per_cfg.items() if None not in v}
        ranked = sorted(complete, key=lambda cfg: -math.fsum(map(math.log, complete[cfg])) / len(complete[cfg]))
        out[f"{kind} D{d}"] = [{"config": list(cfg), "geomean_vs_table": math.exp(
            math.fsum(map(math.log, complete[cfg])) / len(complete[cfg])), "cases": len(complete[cfg])}
            for cfg in ranked]
    return out


BAR_HEAD_DIM, BAR_TOKENS, BAR_FWD, BAR_BWD = 128, 16384, 1.0, 0.9  # issue 24's bars: vs SDPA's cuDNN backend


def _is_atomic(config: list) -> bool:
    return configs.BlockConfig(*config).atomic_dq


def _fmt(x, spec: str, suffix: str = "") -> str:
    return "-" if x is None else format(x, spec) + suffix


def markdown(doc: dict) -> str:
    env = doc["environment"]
    lines = [f"# Triton prefill block-config sweep: {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}. vs table = the shipped table's "
             "(autotuned) time / this config's; vs cuDNN = SDPA cuDNN's time / this (> 1: faster). fwd configs time "
             "the forward; dkdv / dq configs the backward, the other kernels pinned to the table's choice.", ""]
    if doc["smoke"]:
        lines += ["**Smoke run** (tiny float16 shapes, Triton interpreter): the gate means something, the times do "
                  "not.", ""]
    if doc.get("skipped_cases"):
        lines += [f"Not run (time budget spent): {', '.join(doc['skipped_cases'])}", ""]
    if doc.get("precompile_errors"):
        lines += [f"Precompile errors ({len(doc['precompile_errors'])}): " + "; ".join(doc["precompile_errors"][:5]),
                  ""]
    lines += ["## Shipped table vs SDPA backends", "",
              "| case | mode | table ms | table TFLOPS | cuDNN ms | table vs cuDNN | FA2 ms | table's configs |",
              "|---|---|---|---|---|---|---|---|"]
    for c in doc["cases"]:
        get = {(r["who"], r["mode"]): r for r in c["rows"]}
        for mode in ("fwd", "bwd"):
            t, cu, fa = get.get(("table", mode), {}), get.get(("cudnn", mode), {}), get.get(("flash", mode), {})
            lines.append(f"| {c['label']} | {mode} | {_fmt(t.get('ms'), '.3f')} | {_fmt(t.get('tflops'), '.0f')} | "
                         f"{_fmt(cu.get('ms'), '.3f') if 'ms' in cu else cu.get('skipped', '-')[:60]} | "
                         f"{_fmt(t.get('vs_cudnn'), '.2f', 'x')} | {_fmt(fa.get('ms'), '.3f')} | "
                         f"{c['table_choice'] if mode == 'fwd' else ''} |")
    lines += ["", "## Best config per case and kernel", "",
              "| case | kernel | best config | ms | TFLOPS | vs table | vs cuDNN | configs timed / gated out |",
              "|---|---|---|---|---|---|---|---|"]
    for c in doc["cases"]:
        for kind in KINDS:
            mine = [r for r in c["rows"] if r["who"] == kind]
            ok = [r for r in mine if _ranked(r)]
            if not mine:
                continue
            best = min(ok, key=lambda r: r["ms"]) if ok else {}
            failed = sum(1 for r in mine if r["gate"] not in (GATE_OK, "") or r.get("whole", "ok") != "ok")
            lines.append(f"| {c['label']} | {kind} | {best.get('config', '-')} | {_fmt(best.get('ms'), '.3f')} | "
                         f"{_fmt(best.get('tflops'), '.0f')} | {_fmt(best.get('vs_table'), '.2f', 'x')} | "
                         f"{_fmt(best.get('vs_cudnn'), '.2f', 'x')} | {len(ok)} / {failed} |")
    lines += ["", "## Top configs re-timed (the winner's curse: the best of many single timings is biased up)", "",
              f"Per case and kernel, the {RETIME_TOP} fastest other ranked configs, the table's own and cuDNN, "
              f"timed again in turn for {RETIME_ROUNDS} rounds; medians. Adopt a config on its re-timed ratio, not "
              "its sweep ratio.", "",
              "| case | kernel | config | rounds | ms | table ms | cuDNN ms | vs table re-timed | "
              "vs table in the sweep | vs cuDNN re-timed |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in doc["cases"]:
        swept = {(r["who"], tuple(r["config"])): r.get("vs_table") for r in c["rows"] if "config" in r}
        for r in c.get("retimed", []):
            mark = ((" [atomic_dq]" if _is_atomic(r["config"]) else "")
                    + (" (table)" if r.get("is_table_choice") else ""))
            lines.append(f"| {c['label']} | {r['who']} | {r['config']}{mark} | {r['rounds']} | "
                         f"{_fmt(r.get('ms'), '.3f')} | {_fmt(r.get('table_ms'), '.3f')} | "
                         f"{_fmt(r.get('cudnn_ms'), '.3f')} | "
                         f"{_fmt(r.get('vs_table'), '.3f', 'x') if 'skipped' not in r else r['skipped'][:60]} | "
                         f"{_fmt(swept.get((r['who'], tuple(r['config']))), '.3f', 'x')} | "
                         f"{_fmt(r.get('vs_cudnn'), '.2f', 'x')} |")
    lines += ["", "The table's own config forced again (its vs table shows this run's noise): "
              + ("; ".join(f"{c['label']} {r['who']} {_fmt(r.get('vs_table'), '.3f', 'x')}" for c in doc["cases"]
                           for r in c["rows"] if r.get("is_table_choice")) or "none timed")]
    lines += ["", f"## Bars (issue 24): D={BAR_HEAD_DIM}, {BAR_TOKENS} tokens, causal and not: fwd >= "
              f"{BAR_FWD}x cuDNN, bwd >= {BAR_BWD}x", "",
              "| case | mode | table vs cuDNN | | best config vs cuDNN (sweep) | | best config vs cuDNN (re-timed) | |",
              "|---|---|---|---|---|---|---|---|"]
    for c in doc["cases"]:
        case = c["case"]
        if case["head_dim"] != BAR_HEAD_DIM or case["batch"] * case["seqlen_q"] != BAR_TOKENS:
            continue
        for mode, bar in (("fwd", BAR_FWD), ("bwd", BAR_BWD)):
            table = next((r for r in c["rows"] if r["who"] == "table" and r["mode"] == mode), {})
            # The best deterministic config of the kernels timed in this mode (atomic_dq is opt-in only).
            def best(rows):
                return max((r["vs_cudnn"] for r in rows if r["who"] in KINDS and MODE[r["who"]] == mode
                            and "vs_cudnn" in r and not _is_atomic(r["config"])), default=None)
            swept, retimed = best(r for r in c["rows"] if _ranked(r)), best(c.get("retimed", []))
            verdict = lambda x: "not measured" if x is None else "met" if x >= bar else "MISSED"  # noqa: E731
            lines.append(f"| {c['label']} | {mode} | {_fmt(table.get('vs_cudnn'), '.2f', 'x')} | "
                         f"{verdict(table.get('vs_cudnn'))} | {_fmt(swept, '.2f', 'x')} | {verdict(swept)} | "
                         f"{_fmt(retimed, '.2f', 'x')} | {verdict(retimed)} |")
    lines += ["", "## Proposed candidates (geometric mean of vs table over the cases, best first; "
              "[atomic_dq]: non-deterministic, an opt-in only, never the table's)", ""]
    for key, ranked in doc["proposals"].items():
        top = ", ".join(f"{p['config']}{' [atomic_dq]' if _is_atomic(p['config']) else ''} "
                        f"{p['geomean_vs_table']:.2f}x" for p in ranked[:5])
        lines.append(f"- {key}: {top or 'none complete'}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: tuple(int(x) for x in s.split(",") if x)  # noqa: E731
    ap.add_argument("--out", type=Path, default=Path(".benchmarks/config_sweep"))
    ap.add_argument("--smoke", action="store_true", help="tiny float16 shapes on the CPU (the default without a GPU)")
    ap.add_argument("--head-dims", type=ints, default=(128, 64, 256))
    ap.add_argument("--seqlens", type=ints, default=(16384, 4096))
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--compiled", type=lambda x: Path(x) if x else None,
                    default=COMPILED if COMPILED.exists() else None,
                    help="aot_compile_check --configs sweep --json output ('' = the whole space)")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="precompile processes (GPU)")
    ap.add_argument("--budget-s", type=float, default=420, help="no new config past this many seconds")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    smoke = args.smoke or not cuda
    kinds = [k for k in args.kinds.split(",") if k]
    if set(kinds) - set(KINDS):
        ap.error(f"--kinds: choose from {KINDS}")
    records = json.loads(args.compiled.read_text())["records"] if args.compiled else None
    head_dims, seqlens = ((16,), (48,)) if smoke else (args.head_dims, args.seqlens)
    dtype = "float16" if smoke else "bfloat16"

    def sweep_for(d: int) -> dict:
        if smoke:
            return {kind: SMOKE_CONFIGS + SMOKE_TMA[kind] for kind in kinds}
        return {kind: eligible(records, kind, d) if records is not None else configs.sweep_space(kind)
                for kind in kinds}
    deadline = time.monotonic() + args.budget_s
    doc = {"environment": environment(device), "smoke": smoke, "compiled": str(args.compiled or ""), "cases": [],
           "precompile_errors": [], "proposals": {}, "skipped_cases": []}
    args.out.mkdir(parents=True, exist_ok=True)

    def save():  # after every step: partial runs survive
        (args.out / "sweep.json").write_text(json.dumps(doc, indent=1, default=str))
        (args.out / "sweep.md").write_text(markdown(doc))
    save()
    remaining = sum(len(cases((d,), seqlens, dtype, smoke)) for d in head_dims)
    for d in head_dims:  # each head dim's configs compiled just before its cases
        if cuda and not smoke and time.monotonic() < deadline:
            t = time.monotonic()
            tasks = [(kind, tuple(c.as_list()), d, causal, dtype)
                     for kind, cfgs in sweep_for(d).items() for c in cfgs for causal in (True, False)]
            # At most 60% of what is left: the timing needs the rest (uncompiled configs compile as they run).
            errors, done = precompile(tasks, args.workers, t + 0.6 * (deadline - t))
            doc["precompile_errors"] += [f"{task}: {e}" for task, e in errors.items()]
            print(f"precompiled {done} of {len(tasks)} D={d} kernels in {time.monotonic() - t:.0f} s "
                  f"({len(errors)} errors)", flush=True)
        for case in cases((d,), seqlens, dtype, smoke):
            if time.monotonic() > deadline:
                doc["skipped_cases"].append(case.label)
                remaining -= 1
                save()
                continue
            # An equal share of what is left per case: every case (the non-causal bar case too) gets its
            # table and cuDNN rows and part of the sweep, rather than the first case taking it all.
            share = time.monotonic() + (deadline - time.monotonic()) / remaining
            remaining -= 1
            result = run_case(case, sweep_for(d), device, smoke, share)
            doc["cases"].append(result)
            doc["proposals"] = proposals(doc)
            save()
            for r in result["rows"]:
                print(f"{case.label:<40} {r['who']:<6} {str(r.get('config', '')):<16} {r['mode']:<4} "
                      + (f"{r['ms']:9.3f} ms" if "ms" in r else r.get("skipped", "")) + f"  gate {r['gate'] or '-'}",
                      flush=True)
    print(markdown(doc))
    failed = [r for c in doc["cases"] for r in c["rows"] if r["who"] == "table" and r["gate"] != GATE_OK]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
