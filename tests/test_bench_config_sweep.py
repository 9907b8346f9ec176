"""benchmarks/config_sweep.py: its smoke run end to end (tiny float16 shapes, forced configs through
the Triton interpreter), and which compiled configs it would time on a GPU."""

import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run; a GPU runs the sweep itself")


def test_config_sweep_smoke(tmp_path):
    from benchmarks import config_sweep

    assert config_sweep.main(["--smoke", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "sweep.json").read_text())
    (case,) = doc["cases"]
    rows = case["rows"]
    for kind in config_sweep.KINDS:  # every forced config ran, passed the float64 gate and was timed
        mine = [r for r in rows if r["who"] == kind]
        assert [r["config"] for r in mine] == [c.as_list() for c in config_sweep.SMOKE_CONFIGS
                                               + config_sweep.SMOKE_TMA[kind]]
        assert all(r["gate"] == "ok" and r["whole"] == "ok" and r["ms"] > 0 and r["vs_table"] > 0 and "ran" not in r
                   for r in mine), mine
        assert len(doc["proposals"][f"{kind} D16"]) == len(mine)
    # A row whose config did not run as named (tma turned into pointer loads) is not ranked.
    (tma_row,) = [r for r in rows if r["who"] == "fwd" and r["config"] == config_sweep.SMOKE_TMA["fwd"][0].as_list()]
    assert not config_sweep._ranked({**tma_row, "ran": [64, 32, 4, 2]})
    assert {r["mode"] for r in rows if r["who"] == "table"} == {"fwd", "bwd"}
    assert all("skipped" in r for r in rows if r["who"] == "cudnn")  # CUDA only
    assert set(case["table_choice"]) == set(config_sweep.KINDS)
    # Each kernel's fastest other config timed again in turn with the table's config: a row for each.
    for kind in config_sweep.KINDS:
        mine = [r for r in case["retimed"] if r["who"] == kind]
        table_row, other = sorted(mine, key=lambda r: not r["is_table_choice"])
        fastest = min((x for x in rows if x["who"] == kind and not x["is_table_choice"]), key=lambda x: x["ms"])
        assert table_row["is_table_choice"] and table_row["config"] == case["table_choice"][kind]
        assert table_row["vs_table"] == 1.0 and other["config"] == fastest["config"]
        for r in (table_row, other):
            assert r["rounds"] == 2 and r["vs_table"] == pytest.approx(r["table_ms"] / r["ms"]), r
            assert r["cudnn_ms"] is None and "vs_cudnn" not in r  # no cuDNN on a CPU
    md = (tmp_path / "sweep.md").read_text()
    assert "Proposed candidates" in md and "## Top configs re-timed" in md


def test_sweep_md_gives_issue_24_bar_verdicts(tmp_path):
    """A D=128, 16k-token case gets a met / MISSED / not measured line per mode, for the table and for
    the best deterministic config (an atomic_dq twin never counts); other cases get none."""
    from benchmarks import config_sweep

    def row(who, mode, vs_cudnn=None, config=None):
        r = {"who": who, "mode": mode, "gate": "ok", "ms": 1.0}
        return {**r, **({"vs_cudnn": vs_cudnn} if vs_cudnn else {}), **({"config": config} if config else {})}
    case = {"head_dim": 128, "batch": 1, "seqlen_q": 16384}
    rows = [row("table", "fwd", 1.02), row("table", "bwd", 0.85), row("fwd", "fwd", 0.97, [128, 64, 8, 3]),
            row("dkdv", "bwd", 0.95, [64, 64, 4, 3, False, False, False, True]),  # atomic_dq: not counted
            row("dkdv", "bwd", 0.91, [64, 64, 4, 3])]
    doc = {"environment": {"device": "x", "torch": "", "triton": "", "cuda": ""}, "smoke": False,
           "cases": [{"case": case, "label": "S16384 D128", "rows": rows, "table_choice": {},
                      "retimed": [{**row("fwd", "fwd", 1.01, [128, 64, 8, 3]), "rounds": 3, "table_ms": 1.1},
                                  {**row("dkdv", "bwd", 0.99, [64, 64, 4, 3, False, False, False, True]),
                                   "rounds": 3, "table_ms": 1.1}]},
                     {"case": {**case, "head_dim": 64}, "label": "S16384 D64", "rows": rows, "table_choice": {}}],
           "proposals": {}}
    md = config_sweep.markdown(doc)
    assert "| S16384 D128 | fwd | 1.02x | met | 0.97x | MISSED | 1.01x | met |" in md
    # The only re-timed dK/dV config is an atomic_dq twin: the re-timed bwd verdict is not measured.
    assert "| S16384 D128 | bwd | 0.85x | MISSED | 0.91x | met | - | not measured |" in md
    assert "| S16384 D64 |" not in md.split("## Bars")[1]


def test_a_config_that_skips_a_head_is_caught_past_the_gate():
    """The gate sees batch 0, head 0; the whole-output check against the table's sees the rest: a
    config that leaves another head at zero (or NaN) is not ranked, one that differs by roundings is."""
    from benchmarks import config_sweep

    g = torch.Generator().manual_seed(0)
    table = [torch.randn(2, 8, 3, 16, generator=g).half()]
    rounded = [(table[0].float() * (1 + 1e-3)).half()]
    skipped = [table[0].clone()]
    skipped[0][1, :, 2] = 0
    assert config_sweep._agrees(rounded, table) == "ok"
    assert config_sweep._agrees(skipped, table).startswith("FAIL out")
    assert config_sweep._agrees([table[0] * float("nan")], table).startswith("FAIL out")
    grads = [torch.randn(2, 8, 3, 16, generator=g) for _ in range(3)]
    assert config_sweep._agrees([grads[0], grads[1] * 0, grads[2]], grads).startswith("FAIL dk")
    row = {"ms": 1.0, "gate": "ok", "whole": config_sweep._agrees(skipped, table)}
    assert not config_sweep._ranked(row) and config_sweep._ranked({**row, "whole": "ok"})


def test_sweep_keeps_configs_that_fit_and_spill_no_more_than_the_table():
    from benchmarks.config_sweep import eligible
    from fastattn.kernels import configs

    table = configs.GPU_CANDIDATES["fwd"][128]
    worst = 300

    def rec(cfg, spill=0, fits=True, mma="wgmma", causal=True):
        return {"kind": "fwd", "head_dim": 128, "causal": causal, "variant": "dense", "fits": fits, "mma": mma,
                "config": cfg.as_list(), "spill": spill}
    space = [c for c in configs.sweep_space("fwd") if c not in table]
    good, spills, big, slow_mma, bad_when_full = space[:5]
    ws_done, ws_not = [c for c in space if c.ws][:2]  # Triton split the loop / compiled it unspecialised
    records = [rec(table[0], worst), *(rec(c) for c in table[1:]), rec(good, worst), rec(spills, worst + 4),
               rec(big, fits=False), rec(slow_mma, mma="mma"), rec(bad_when_full, 0), rec(bad_when_full, worst + 1,
                                                                                          causal=False),
               rec(ws_done, mma="wgmma+tma+ws"), rec(ws_not, mma="wgmma+tma")]
    kept = eligible(records, "fwd", 128)
    lpt = [dataclasses.replace(c, lpt=True) for c in table]  # the table's own, longest tiles first: timed first
    assert kept[:len(table)] == lpt and set(kept[len(table):]) == {*table, good, ws_done}
    # Nothing compiled: the table only (and its lpt twins).
    assert eligible([], "fwd", 128) == lpt + [c for c in configs.sweep_space("fwd") if c in table]
    dkdv = configs.GPU_CANDIDATES["dkdv"][128]  # dK/dV's: also as atomic_dq twins
    assert eligible([], "dkdv", 128) == ([dataclasses.replace(c, lpt=True) for c in dkdv]
                                         + [dataclasses.replace(c, atomic_dq=True) for c in dkdv]
                                         + [c for c in configs.sweep_space("dkdv") if c in dkdv])

