"""tools/gpu_check.sh's time budget, run on the CPU with stub binaries: GPU time is too short to find a
budget bug there. The stubs log their arguments and return at once; a stub clock (`date +%s`) moves
on by what a stage takes: D_TESTS seconds for the test suite, its whole timeout for a benchmark. So
the timeouts the script passes to each stage are exact."""

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

STUB_PY = """#!/usr/bin/env bash
echo "python $*" >> "$STUBLOG"
# KILL_AT: this stage kills the whole script (as the device tool does at its limit): our parent is the
# timeout stub, whose parent is gpu_check.sh.
if [ -n "${KILL_AT:-}" ] && [[ "$*" == *"$KILL_AT"* ]]; then
  kill -KILL "$(awk '{print $4}' /proc/$PPID/stat)"; exit 1
fi
case "$*" in *" pytest "*) echo $(( $(cat "$CLOCK") + ${D_TESTS:-0} )) > "$CLOCK" ;; esac
out=""; prev=""
for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done
# A stage that writes its results (what results.tgz must keep).
[ -n "$out" ] && mkdir -p "$out" && echo "stub result" > "$out/result.md"
exit 0
"""
STUB_TIMEOUT = """#!/usr/bin/env bash
echo "timeout $1 ${*:2}" >> "$STUBLOG"
# A benchmark stage uses all of its time (the worst case for the stages after it).
case "$*" in *benchmarks/*|*tools/*) echo $(( $(cat "$CLOCK") + $1 )) > "$CLOCK" ;; esac
shift
"$@"
"""
STUB_SMI = """#!/usr/bin/env bash
[ "$1" = -L ] && echo "GPU 0: stub" || echo stub
"""
STUB_DATE = """#!/usr/bin/env bash
[ "$1" = +%s ] && cat "$CLOCK" || /bin/date "$@"
"""
STUB_SANITIZER = """#!/usr/bin/env bash
echo "compute-sanitizer $*" >> "$STUBLOG"
"""


def run_script(tmp_path, out="out", **env):
    """Run gpu_check.sh with the stubs (from tmp_path, OUT given as `out`, relative or not); return
    {stage script: timeout seconds}, the OUT folder and the script's stdout."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {"python": STUB_PY, "timeout": STUB_TIMEOUT, "nvidia-smi": STUB_SMI, "date": STUB_DATE,
             "compute-sanitizer": STUB_SANITIZER}
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log, clock = tmp_path / "stub.log", tmp_path / "clock"
    clock.write_text("1000\n")
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "python"),
                "STUBLOG": str(log), "CLOCK": str(clock), "TMPDIR": str(tmp_path), **env}
    proc = subprocess.run(["bash", str(SCRIPT), out], env=full_env, capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert proc.returncode == (-9 if "KILL_AT" in env else 0), proc.stdout + proc.stderr
    timeouts = {}
    for line in log.read_text().splitlines():
        if line.startswith("timeout "):
            _, seconds, *cmd = line.split()
            what = next((w for w in cmd if w.endswith((".py", "pytest", "pip"))), cmd[-1])
            timeouts[os.path.basename(what)] = int(seconds)
    return timeouts, tmp_path / out, proc.stdout


def test_issue_23_run_gives_each_named_stage_its_cap(tmp_path):
    # Only the named stages are held back for: after 100 s of tests, smods and hf each get their cap
    # (160 s held back after hf for the default list's later stages left hf 80 s), and the budget is
    # held under the device tool's 600 s limit.
    t, out, stdout = run_script(tmp_path, STAGES="smoke tests smods hf", SMODS_S="240", HF_S="150",
                                BUDGET_S="700", D_TESTS="100")
    assert "using 580" in stdout
    assert t["pytest"] == 580 - min(10 + 240 + 150, 270)
    assert t["score_mods.py"] == 240 and t["hf_llama.py"] == 150
    with tarfile.open(out / "results.tgz") as tar:  # packed after each stage and at the end
        names = tar.getnames()
    assert any(n.endswith("score_mods/result.md") for n in names)
    assert any(n.endswith("hf_llama/result.md") for n in names)


def test_a_run_killed_midway_keeps_the_finished_stages(tmp_path):
    # Killed from outside during hf (the device tool's limit): smods' results are already packed.
    # OUT is relative to where the script was started (it changes directory).
    _, out, _ = run_script(tmp_path, out="rel", STAGES="smoke smods hf", KILL_AT="hf_llama.py")
    with tarfile.open(out / "results.tgz") as tar:
        names = tar.getnames()
    assert any(n.endswith("score_mods/result.md") for n in names)
    assert not (out / ".results.tgz.part").exists()


def test_issue_24_run_gives_the_sweep_its_cap(tmp_path):
    t, _, _ = run_script(tmp_path, STAGES="smoke sweep bench", SWEEP_S="360", BUDGET_S="580")
    assert t["config_sweep.py"] == 360 and t["run.py"] == 150


def test_tests_alone_may_use_the_budget(tmp_path):
    t, _, _ = run_script(tmp_path, STAGES="smoke tests", BUDGET_S="580")
    assert t["pytest"] == 580 - 10  # only the summary's margin is kept


def test_a_tail_stage_shrinks_to_what_is_left(tmp_path):
    # Tests that take 300 s leave smods the budget less hf's cap and the summary's 10 s; hf still
    # gets its cap.
    t, _, _ = run_script(tmp_path, STAGES="smoke tests smods hf", SMODS_S="240", HF_S="150",
                         BUDGET_S="580", D_TESTS="300")
    assert t["score_mods.py"] == 580 - 300 - 160 and t["hf_llama.py"] == 150


def test_default_stages_keep_their_fixed_shares(tmp_path):
    # The whole list cannot have every cap: the tests keep 270 s for the rest, which then shrink.
    t, _, _ = run_script(tmp_path)
    assert t["pytest"] == 520 - 270
    assert t["host_overhead.py"] == 90 and t["bench_models.py"] == 110
