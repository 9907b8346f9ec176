"""Reports from a run's result document (the dict written as bench.json): console tables, the
Markdown report and the short summary tools/gpu_check.sh prints. Everything here reads the
document, so a saved bench.json can be re-rendered:

    python -m benchmarks.report bench.json            # the Markdown report
    python -m benchmarks.report bench.json --summary  # gpu_check's summary table
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

SCHEMA = 2  # bench.json layout; 1 was the old bench_attention.py's
# The baselines every fastattn number is compared with in the headline tables.
KEY_BASELINES = ("sdpa-flash", "sdpa-cudnn", "flex")
SHORT = {"sdpa-flash": "flash", "sdpa-cudnn": "cuDNN", "sdpa-efficient": "efficient", "sdpa-math": "math",
         "flex": "flex", "naive": "naive", "fastattn-triton": "triton", "fastattn-cuda": "cuda"}


def document(*, environment: dict, ceilings: dict, grid: str, modes, providers: dict, measurements: list[dict],
             padding: list[dict] | None = None, notes: list[str] | None = None) -> dict:
    """The result document: everything needed to re-render or compare a run."""
    return {"schema": SCHEMA, "environment": environment, "ceilings": ceilings, "grid": grid, "modes": list(modes),
            "providers": providers, "measurements": measurements, "padding": padding or [], "notes": notes or []}


def write_json(doc: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def _num(x: float | None) -> str:
    """3 significant figures (CPU runs are in GFLOPS territory; GPU ones in hundreds of TFLOPS)."""
    if x is None:
        return "-"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _by_case(measurements: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for m in measurements:
        groups[m["case"]["label"]].append(m)
    return groups


def _ranked(m: dict) -> bool:
    return m["ms"] is not None and m["gate"] == "ok"


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
               ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()
    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def measurement_rows(measurements: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The long table: one row per provider and mode (skips show their reason)."""
    header = ["case", "provider", "mode", "ms", "TFLOPS", "% matmul", "peak MiB"] + \
             [f"vs {SHORT[b]}" for b in KEY_BASELINES] + ["gate / skipped"]
    rows = []
    for m in measurements:
        c = m["case"]
        if m["ms"] is None:
            note = m["skipped"] if not m["gate"] else f"gate {m['gate']}; not timed: {m['skipped']}"
            rows.append([c["label"], m["provider"], m["mode"], "", "", "", "", *[""] * len(KEY_BASELINES),
                         f"skipped: {note}"])
            continue
        gate = m["gate"] if m["gate"] == "ok" else f"FLAGGED (not ranked): {m['gate']}"
        rows.append([c["label"], m["provider"], m["mode"], f"{m['ms']:.3f}", _num(m["tflops"]),
                     f"{m['pct_of_matmul']:.0f}%", _num(m["peak_mib"]),
                     *[_ratio(m["ratios"].get(b)) for b in KEY_BASELINES], gate])
    return header, rows


def console_case(measurements: list[dict]) -> str:
    """One case's rows as a fixed-width table (printed as the run goes); a provider skipped for the
    same reason in every mode gets one row, mode "all"."""
    header, rows = measurement_rows(measurements)
    rows = [r[1:] for r in rows]
    collapsed = []
    for r in rows:
        same = [x for x in rows if x[0] == r[0]]
        if all(x[2] == "" and x[-1] == r[-1] for x in same) and len(same) > 1:
            if not any(c[0] == r[0] for c in collapsed):
                collapsed.append([r[0], "all", *r[2:]])
            continue
        collapsed.append(r)
    return "\n".join(_table(header[1:], collapsed, markdown=False))


def pivot(measurements: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The headline table: one row per case and mode, TFLOPS per provider, and each fastattn
    provider's ratio to the key baselines. Flagged (failed-gate) numbers are marked, skips are "-"."""
    present = [p for p in dict.fromkeys(m["provider"] for m in measurements)
               if any(x["provider"] == p and x["ms"] is not None for x in measurements)]
    mine = [p for p in present if any(m["provider"] == p and m["role"] == "fastattn" for m in measurements)]
    header = ["case", "mode"] + [SHORT.get(p, p) for p in present] + \
             [f"{SHORT.get(p, p)} vs {SHORT[b]}" for p in mine for b in KEY_BASELINES if b in present]
    rows = []
    for label, ms in _by_case(measurements).items():
        for mode in dict.fromkeys(m["mode"] for m in ms):
            cell = {m["provider"]: m for m in ms if m["mode"] == mode}
            if not any(c["ms"] is not None for c in cell.values()):
                continue
            row = [label, mode]
            for p in present:
                m = cell.get(p)
                row.append("-" if m is None or m["ms"] is None else
                           _num(m["tflops"]) + ("" if m["gate"] == "ok" else " (FAIL)"))
            for p in mine:
                for b in KEY_BASELINES:
                    if b in present:
                        row.append(_ratio(cell[p]["ratios"].get(b)) if p in cell else "-")
            rows.append(row)
    return header, rows


def skipped_summary(measurements: list[dict]) -> list[str]:
    """Why providers did not run, one line per reason: which providers, how many (case, mode) rows."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for m in measurements:
        if m["ms"] is None:
            groups[(m["skipped"], m["gate"])].append(m)
    lines = []
    for (reason, gate), ms in groups.items():
        who = ", ".join(dict.fromkeys(m["provider"] for m in ms))
        first = f"{ms[0]['case']['label']} {ms[0]['mode']}"
        example = first + (f" and {len(ms) - 1} more" if len(ms) > 1 else "")
        checked = f" (correctness gate: {gate})" if gate else ""
        lines.append(f"- **{who}** ({len(ms)} rows, e.g. {example}): {reason}{checked}")
    return lines


def _padding_table(padding: list[dict]) -> list[str]:
    return _table(["variant", "mode", "ms", "vs dense"],
                  [[r["variant"], r["mode"], f"{r['ms']:.3f}", f"{r['ratio_to_dense']:.2f}x"] for r in padding],
                  markdown=True)


def _ceiling_text(doc: dict) -> str:
    c = doc["ceilings"]
    return (f"{c['matmul']} matmul **{_num(c['matmul_tflops'])} TFLOPS**, device copy ({c['copy']}) "
            f"**{c['copy_gbps']:.0f} GB/s** (read + write)")


def markdown(doc: dict, plots: list[str] | None = None) -> str:
    env = doc["environment"]
    cpu = env["device_type"] != "cuda"
    ms = doc["measurements"]
    out = [f"# fastattn attention benchmark: {env['device']}", ""]
    if cpu:
        out += ["**CPU run.** Times are CPU wall-clock medians of the torch providers at tiny sizes; the Triton "
                "kernels ran through the interpreter for the correctness gate only. These are not GPU numbers.", ""]
    out += [f"Grid `{doc['grid']}`, modes {', '.join(doc['modes'])}. torch {env['torch']}, triton {env['triton']}, "
            f"CUDA {env['cuda'] or '-'}, Python {env['python']}, fastattn commit {env.get('git_commit')}, "
            f"{env['time_utc']} UTC.", "",
            f"Ceilings measured at the start of this run on this device: {_ceiling_text(doc)}.", "",
            "Method: TFLOPS = useful FLOPs (`fastattn.flops`: forward 4·B·Hq·Sq·Sk_avg·D with Sk_avg the mean "
            "number of keys a query sees; backward 2.5x, fwd+bwd 3.5x) / median time "
            f"({env['timer']}; fresh random inputs). Ratios are the other provider's time / fastattn's time in this "
            "run (> 1: fastattn faster). Before timing, each provider's output (and gradients for bwd) on batch 0, "
            "head 0 is checked against the float64 reference under the tests' tolerance rule; a provider that "
            "fails is flagged (FAIL) and left out of ratios and plots. Peak MiB is the extra device memory one "
            "call allocates at its peak.", ""]
    out += ["## Providers", ""]
    out += _table(["provider", "runs here", "timed", "what"],
                  [[name, "yes" if p["available"] else f"no: {p['reason']}", p["timing"] if p["available"] else "",
                    p["description"]] for name, p in doc["providers"].items()], markdown=True)
    header, rows = pivot(ms)
    out += ["", "## TFLOPS" + (" (CPU)" if cpu else ""), ""] + (_table(header, rows, markdown=True) if rows else
                                                               ["No provider was timed."])
    if plots:
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    skipped = skipped_summary(ms)
    if skipped:
        out += ["", "## Not measured, and why", ""] + skipped
    if doc["padding"]:
        out += ["", "## Cost of padding (fastattn-triton; time relative to the unpadded batch)", ""]
        out += _padding_table(doc["padding"])
    if doc["notes"]:
        out += ["", "## Notes", ""] + [f"- {n}" for n in doc["notes"]]
    header, rows = measurement_rows([m for m in ms if m["ms"] is not None])
    out += ["", "## Every measurement", ""] + _table(header, rows, markdown=True)
    return "\n".join(out) + "\n"


def summary(doc: dict) -> str:
    """tools/gpu_check.sh's table: each fastattn row with its TFLOPS, % of the matmul ceiling and ratios."""
    ms = [m for m in doc["measurements"] if m["role"] == "fastattn" and m["ms"] is not None]
    bases = [b for b in KEY_BASELINES if any(m["provider"] == b and m["ms"] is not None for m in doc["measurements"])]
    header = ["case", "provider", "mode", "TFLOPS", "% matmul", *[f"vs {SHORT[b]}" for b in bases], "gate"]
    rows = [[m["case"]["label"], m["provider"], m["mode"], _num(m["tflops"]), f"{m['pct_of_matmul']:.0f}%",
             *[_ratio(m["ratios"].get(b)) for b in bases], m["gate"]] for m in ms]
    failed = sum(1 for m in doc["measurements"] if m["gate"].startswith("FAIL"))
    out = [f"Ceilings: {_ceiling_text(doc)}. {len(ms)} fastattn timings, {failed} rows failed the gate.", ""]
    out += _table(header, rows, markdown=True)
    if doc["padding"]:
        r0 = doc["padding"][0]
        out += ["", f"Cost of padding, B{r0['batch']} S{r0['seqlen']} {r0['fill']:.0%} real tokens "
                    "(time vs the unpadded batch):", ""]
        out += _padding_table(doc["padding"])
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", help="a bench.json written by benchmarks/run.py")
    ap.add_argument("--summary", action="store_true", help="the short fastattn table (tools/gpu_check.sh)")
    args = ap.parse_args(argv)
    with open(args.json) as f:
        doc = json.load(f)
    if doc.get("schema") != SCHEMA:
        print(f"{args.json}: schema {doc.get('schema')}, expected {SCHEMA} (written by another version)")
        return 1
    sys.stdout.write(summary(doc) if args.summary else markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
