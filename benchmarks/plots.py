"""PNG plots of a run: TFLOPS vs seq len per provider, and a roofline-style chart of every kernel
against the ceilings measured in the same run. matplotlib is optional: without it the plots are
skipped with a message. The data preparation (what gets plotted) needs no matplotlib.

Only ranked measurements are plotted: timed, and correct under the gate.
"""

from __future__ import annotations

import os
from collections import defaultdict


def _ranked(m: dict) -> bool:
    return m["ms"] is not None and m["gate"] == "ok"


def tflops_series(measurements: list[dict]) -> dict[tuple, dict[str, list[tuple[int, float]]]]:
    """Standard-grid ("self") rows as {(dtype, head_dim, causal, mode): {provider: [(seqlen, TFLOPS), ...]}},
    each series sorted by seq len: one panel per key, one line per provider."""
    panels: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for m in measurements:
        c = m["case"]
        if c["kind"] == "self" and _ranked(m):
            key = (c["dtype"], c["head_dim"], c["causal"], m["mode"])
            panels[key][m["provider"]].append((c["seqlen_q"], m["tflops"]))
    return {key: {p: sorted(pts) for p, pts in series.items()} for key, series in panels.items()}


def roofline_points(measurements: list[dict]) -> list[dict]:
    """One point per ranked measurement: x = FLOP per byte of least memory traffic, y = TFLOPS."""
    return [{"provider": m["provider"], "mode": m["mode"], "case": m["case"]["label"],
             "intensity": m["intensity"], "tflops": m["tflops"]}
            for m in measurements if _ranked(m) and m.get("intensity")]


def roofline_ceiling(ceilings: dict, x_min: float, x_max: float, n: int = 64) -> list[tuple[float, float]]:
    """The roof: min(matmul TFLOPS, copy bandwidth * intensity) on a log-spaced x range.
    GB/s * FLOP/byte = GFLOP/s, hence the / 1000 for TFLOPS."""
    ratio = (x_max / x_min) ** (1 / (n - 1))
    xs = [x_min * ratio**i for i in range(n)]
    return [(x, min(ceilings["matmul_tflops"], ceilings["copy_gbps"] * x / 1000)) for x in xs]


def render(doc: dict, out_dir: str) -> tuple[list[str], str | None]:
    """Write the PNGs into out_dir. Returns (file names written, why plots were skipped or None)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return [], "matplotlib is not installed: plots skipped (pip install matplotlib, then rerun or re-render)"
    written = []
    unit = "TFLOPS" + (" (CPU)" if doc["environment"]["device_type"] != "cuda" else "")
    series = tflops_series(doc["measurements"])
    for dtype in sorted({k[0] for k in series}):
        keys = sorted(k for k in series if k[0] == dtype)
        cols = sorted({(k[1], k[2]) for k in keys})
        modes = [m for m in ("fwd", "bwd", "fwd_bwd") if any(k[3] == m for k in keys)]
        fig, axes = plt.subplots(len(modes), len(cols), figsize=(3.6 * len(cols), 3 * len(modes)), squeeze=False)
        for i, mode in enumerate(modes):
            for j, (d, causal) in enumerate(cols):
                ax = axes[i][j]
                for provider, pts in series.get((dtype, d, causal, mode), {}).items():
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
                ax.set_xscale("log", base=2)
                ax.set_title(f"{mode}, D={d}, {'causal' if causal else 'full'}", fontsize=9)
                ax.set_xlabel("seq len (16k tokens per batch)", fontsize=8)
                ax.set_ylabel(unit, fontsize=8)
                ax.grid(True, alpha=0.3)
        handles, labels = {}, {}
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        labels = list(handles)
        fig.legend([handles[lab] for lab in labels], labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
        fig.suptitle(f"{doc['environment']['device']}, {dtype}", fontsize=10)
        fig.tight_layout(rect=(0, 0.06, 1, 0.96))
        name = f"tflops_{dtype}.png"
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        written.append(name)

    points = roofline_points(doc["measurements"])
    if points:
        c = doc["ceilings"]
        ridge = c["matmul_tflops"] * 1000 / c["copy_gbps"]
        xs = [p["intensity"] for p in points] + [ridge]
        roof = roofline_ceiling(c, min(xs) / 2, max(xs) * 2)
        fig, ax = plt.subplots(figsize=(8.5, 5))
        ax.plot([r[0] for r in roof], [r[1] for r in roof], color="black", lw=1.5,
                label=f"measured roof: {c['matmul_tflops']:.3g} TFLOPS, {c['copy_gbps']:.0f} GB/s")
        # Colour = provider, marker = mode; two small legends instead of one entry per pair.
        from matplotlib.lines import Line2D

        markers = {"fwd": "o", "bwd": "s", "fwd_bwd": "^"}
        colours = {p: f"C{i}" for i, p in enumerate(dict.fromkeys(p["provider"] for p in points))}
        for p in points:
            ax.scatter(p["intensity"], p["tflops"], marker=markers[p["mode"]], color=colours[p["provider"]], s=18,
                       alpha=0.8)
        roof_legend = ax.legend(loc="lower right", fontsize=7)
        ax.add_artist(roof_legend)
        ax.legend(handles=[Line2D([], [], color=c, marker="o", ls="", label=p) for p, c in colours.items()]
                  + [Line2D([], [], color="black", mfc="none", marker=m, ls="", label=mode)
                     for mode, m in markers.items() if any(p["mode"] == mode for p in points)],
                  loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}")  # 600, not 6 x 10^2
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel("arithmetic intensity (FLOP per byte of least memory traffic)")
        ax.set_ylabel(unit)
        ax.set_title(f"Roofline, {doc['environment']['device']}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "roofline.png"), dpi=110)
        plt.close(fig)
        written.append("roofline.png")
    return written, None
