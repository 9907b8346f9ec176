"""The attention benchmark: fastattn against every baseline, on the same device, in one run.

    python benchmarks/run.py                  # GPU: the quick grid (tools/gpu_check.sh); no GPU: the CPU mode
    python benchmarks/run.py --grid full      # the whole grid (GPU; ~8 min on an H100)
    python benchmarks/run.py --grid cpu       # tiny sizes: interpreter correctness gate, CPU timings

Measures this device's ceilings first (matmul, copy), then for each case runs every provider
(fastattn-triton, fastattn-cuda, SDPA flash/cuDNN/efficient/math, compiled FlexAttention, the naive
reference): a correctness gate against the float64 reference, then peak memory and median time
per mode. Providers that cannot run a case are reported with the reason. Writes into --out:
bench.json (device, versions, ceilings, every measurement), bench.md (the report), PNG plots
(with matplotlib). Cases run most important first under a time budget (--budget-s); cases left
when it is spent are reported as skipped. Exit status 1 if a fastattn provider fails the gate.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import use_interpreter_without_gpu  # noqa: E402

use_interpreter_without_gpu()  # before fastattn (and triton) are imported

import torch  # noqa: E402

from benchmarks import cases, plots, report  # noqa: E402
from benchmarks.common import environment, measure_ceilings  # noqa: E402
from benchmarks.measure import Measurement, Timing, run_case  # noqa: E402
from benchmarks.providers import PROVIDERS  # noqa: E402
from fastattn.flops import MODES  # noqa: E402

# Per grid: default modes, providers, timer settings, the time cap of one case and the budget of all
# cases (seconds). gpu_check's bench stage gives quick --budget-s (its stage time less 45 s for the
# ceilings, the padding measurement and the report); a case never runs past what is left of the budget
# (or its cap), and the padding measurement only runs with budget left. quick leaves out FlexAttention
# (a compile per shape and mask, tens of seconds each; the full grid has it). full: about 8 minutes in
# all; it cannot time every case in that (autotuning and compiling alone take minutes), so it runs the
# most wanted first and reports the rest as skipped; --dtypes/--head-dims run the others in a second
# command. do_bench's warm-up/rep are milliseconds of running, so long cases get few repetitions.
SETTINGS = {
    "quick": {"modes": "fwd,bwd", "timing": Timing(25, 100, case_cap_s=90), "budget_s": 190,
              # the bar's pair first (Triton vs cuDNN): past a case's time cap the last providers go
              "providers": ["fastattn-triton", "sdpa-cudnn"]
              + [p for p in PROVIDERS if p not in ("fastattn-triton", "sdpa-cudnn", "flex")]},
    "full": {"modes": "fwd,bwd,fwd_bwd", "timing": Timing(10, 40, case_cap_s=90), "budget_s": 380,
             "providers": list(PROVIDERS)},
    "cpu": {"modes": "fwd,bwd,fwd_bwd", "timing": Timing(5, 50, case_cap_s=60), "budget_s": 150,
            "providers": list(PROVIDERS)},
}


def select(grid: list, dtypes: str | None, head_dims: str | None, kinds: str | None) -> list:
    """The grid's cases with the given dtypes / head dims / kinds (comma-separated; None: all)."""
    def keep(value, wanted):
        return wanted is None or str(value) in wanted.split(",")
    return [c for c in grid if keep(c.dtype, dtypes) and keep(c.head_dim, head_dims) and keep(c.kind, kinds)]


def provider_status(device_type: str) -> dict:
    out = {}
    for name, p in PROVIDERS.items():
        reason = p.unavailable()
        out[name] = {"available": reason is None, "reason": reason or "", "role": p.role,
                     "description": p.description, "timing": p.timing_skip(device_type) or "timed"}
    return out


def budget_skips(case, providers, modes, device_type: str, budget_s: float) -> list[Measurement]:
    reason = f"time budget of {budget_s:.0f} s used up before this case (raise --budget-s)"
    return [Measurement(case, p.name, m, device_type, p.role, skipped=reason) for p in providers for m in modes]


def run(args) -> int:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    grid = args.grid or ("quick" if cuda else "cpu")
    if grid != "cpu" and not cuda:
        print(f"--grid {grid} needs a CUDA GPU; without one run the CPU mode (--grid cpu, the default here)")
        return 2
    settings = SETTINGS[grid]
    modes = (args.modes or settings["modes"]).split(",")
    if not set(modes) <= set(MODES):
        print(f"--modes must be a comma-separated subset of {','.join(MODES)}, got {args.modes!r}")
        return 2
    budget_s = args.budget_s if args.budget_s is not None else settings["budget_s"]
    names = args.providers.split(",") if args.providers else settings["providers"]
    unknown = set(names) - set(PROVIDERS)
    if unknown:
        print(f"unknown providers {sorted(unknown)}; known: {', '.join(PROVIDERS)}")
        return 2
    providers = [PROVIDERS[n] for n in names]
    selected = select(cases.GRIDS[grid](), args.dtypes, args.head_dims, args.kinds)
    if not selected:
        print(f"no case of grid {grid!r} matches --dtypes/--head-dims/--kinds")
        return 2
    os.makedirs(args.out, exist_ok=True)
    if not cuda:
        # Two busy cores: a second intra-op thread that gets descheduled stalls every op for a
        # scheduler quantum (seen: 4-8 ms jumps); one thread gives steadier CPU medians.
        torch.set_num_threads(1)

    env = environment(device)
    ceilings = measure_ceilings(device)
    status = provider_status(torch.device(device).type)
    print(f"{env['device']}: {ceilings['matmul']} matmul {ceilings['matmul_tflops']:.3g} TFLOPS, "
          f"copy {ceilings['copy_gbps']:.0f} GB/s" + ("  [CPU timings: not GPU numbers]" if not cuda else ""))
    for name, st in status.items():
        if not st["available"] and name in names:
            print(f"  {name}: unavailable: {st['reason']}")
    notes = [] if cuda else ["CPU run: times are CPU wall-clock medians at tiny sizes; fastattn-triton ran through "
                             "the Triton interpreter for the correctness gate only."]

    def save(measurements, padding=()):
        doc = report.document(environment=env, ceilings=ceilings, grid=grid, modes=modes, providers=status,
                              measurements=[m.as_dict() for m in measurements], padding=list(padding), notes=notes)
        report.write_json(doc, os.path.join(args.out, "bench.json"))  # after every case: partial runs survive
        return doc

    t_start = time.monotonic()
    measurements: list[Measurement] = []
    generator = torch.Generator(device=device).manual_seed(args.seed)
    for case in selected:
        t0 = time.monotonic()
        if t0 - t_start > budget_s:
            rows = budget_skips(case, providers, modes, torch.device(device).type, budget_s)
        else:  # a case stops where the budget does (15 s at least: a started case gets its first rows)
            timing = settings["timing"]
            left = max(budget_s - (t0 - t_start), 15.0)
            timing = dataclasses.replace(timing, case_cap_s=min(timing.case_cap_s or left, left))
            rows = run_case(case, providers, modes, device=device, ceilings=ceilings, timing=timing,
                            generator=generator)
        measurements += rows
        print(f"\n{case.label}  [{time.monotonic() - t0:.1f}s]", flush=True)
        if any(r.ms is not None or r.gate for r in rows):
            print(report.console_case([r.as_dict() for r in rows]), flush=True)
        else:
            print(f"  not run: {rows[0].skipped}" if rows else "  no providers", flush=True)
        save(measurements)

    padding = []
    spent = time.monotonic() - t_start > budget_s
    if args.padding and cuda and spent:
        notes.append(f"Cost of padding: not measured (the time budget of {budget_s:.0f} s was spent on the cases).")
    elif args.padding and cuda and "fastattn-triton" in names and status["fastattn-triton"]["available"]:
        from benchmarks.padding_cost import padding_cost

        try:
            padding = padding_cost(device=device)
        except Exception as e:  # the measurements above are still worth their report
            notes.append(f"Cost of padding: failed: {type(e).__name__}: {str(e).strip()[:200]}")
        for r in padding:
            print(f"padding {r['variant']:<6} {r['mode']}: {r['ms']:.3f} ms = {r['ratio_to_dense']:.2f}x dense "
                  f"(B{r['batch']} S{r['seqlen']} {r['fill']:.0%} real)", flush=True)
    elif args.padding and not cuda:
        notes.append("Cost of padding: not measured without a GPU (interpreter times mean nothing).")
    doc = save(measurements, padding)

    written, why_not = plots.render(doc, args.out) if args.plots else ([], "plots skipped (--no-plots)")
    if why_not:
        print(why_not)
        doc["notes"].append(why_not)
        report.write_json(doc, os.path.join(args.out, "bench.json"))
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(report.markdown(doc, written))
    failed = [m for m in measurements if m.gate.startswith("FAIL")]
    timed = sum(m.ms is not None for m in measurements)
    over = len({m.case for m in measurements if m.skipped.startswith("time budget")})
    print(f"\n{timed} timings, {len(failed)} rows failed the correctness gate"
          + (f", {over} cases skipped: time budget of {budget_s:.0f} s spent" if over else "")
          + "".join(f"\n  FAIL {m.provider} {m.mode} {m.case.label}: {m.gate}" for m in failed)
          + f"\nwrote {', '.join(['bench.json', 'bench.md', *written])} to {args.out} "
            f"in {time.monotonic() - t_start:.0f}s")
    return 1 if any(m.role == "fastattn" for m in failed) else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", choices=sorted(cases.GRIDS), help="quick (GPU default), full (GPU) or cpu")
    ap.add_argument("--out", default=".benchmarks/latest",
                    help="output folder (default: git-ignored; commit GPU runs under benchmarks/results/)")
    ap.add_argument("--modes", help="comma-separated subset of fwd,bwd,fwd_bwd (default: per grid)")
    ap.add_argument("--providers", help=f"comma-separated subset of {','.join(PROVIDERS)}")
    ap.add_argument("--budget-s", type=float, help="seconds for the cases; later cases are reported as skipped")
    ap.add_argument("--dtypes", help="only these dtypes, e.g. float16")
    ap.add_argument("--head-dims", help="only these head dims, e.g. 64,128")
    ap.add_argument("--kinds", help="only these kinds of case: self (the standard grid), cross, gqa, padded, decode")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    ap.add_argument("--no-plots", dest="plots", action="store_false")
    ap.add_argument("--no-padding", dest="padding", action="store_false", help="skip the cost-of-padding rows")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)  # run() may pin one thread on the CPU


if __name__ == "__main__":
    sys.exit(main())
