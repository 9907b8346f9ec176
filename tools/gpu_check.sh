#!/usr/bin/env bash
# GPU check: install (no network), self-check, GPU tests, quick benchmark; summary table last.
#
#   tools/gpu_check.sh OUTDIR
#
# For a fresh GPU machine that already has torch and triton. Writes into OUTDIR:
#   check.log     install log tail, nvidia-smi, `python -m fastattn check`
#   pytest.log    the test suite on the GPU (bf16 and the `gpu` tests included)
#   bench.log     benchmark progress (and the autotuner's choices)
#   bench.json    every measurement with device, versions and measured ceilings
#   bench.md      the same as a Markdown table
#   summary.md    the short table printed last
# Budget: under 8 minutes on an H100 (each stage has its own timeout).
set -uo pipefail
OUT=${1:?usage: tools/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }

{
  stamp "install"
  $PY -m pip install --no-deps --no-build-isolation -e . 2>&1 | tail -3
  if ! (cd /tmp && $PY -c "import fastattn.kernels") 2>/dev/null; then
    echo "editable install did not map kernels/ -> fastattn.kernels; falling back to PYTHONPATH + a link"
    ln -sfn ../kernels fastattn/kernels
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/check.log" 2>&1

# Tests: the whole suite on the GPU. Many small kernels to compile: spread them over the cores.
workers=$(( $(nproc) > 16 ? 16 : $(nproc) ))
timeout 240 $PY -m pytest -q -m "not slow" -n "$workers" --timeout 150 -p no:cacheprovider tests/ > "$OUT/pytest.log" 2>&1
test_rc=$?
stamp "tests rc=$test_rc: $(tail -1 "$OUT/pytest.log")"

# Self-check after the tests, on the tests' (untuned) configs: their compiled kernels are cached by
# then, so this takes seconds instead of compiling every case's autotune candidates.
FASTATTN_AUTOTUNE=0 timeout 200 $PY -m fastattn check >> "$OUT/check.log" 2>&1
check_rc=$?
stamp "self-check rc=$check_rc"

# Quick benchmark with autotuning on (as a user gets it); print the autotuner's picks.
# SKIP_BENCH=1 skips it (a rerun that only re-verifies correctness).
bench_rc=0
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  TRITON_PRINT_AUTOTUNING=1 timeout 270 $PY benchmarks/bench_attention.py --quick --out "$OUT" > "$OUT/bench.log" 2>&1
  bench_rc=$?
  stamp "bench rc=$bench_rc"
fi

{
  echo "## gpu_check summary ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(( $(date +%s) - t0 ))s)"
  echo
  echo "| stage | exit | result |"
  echo "|---|---|---|"
  echo "| self-check | $check_rc | $(grep -E "all checks passed|SOME CHECKS FAILED" "$OUT/check.log" | tail -1) |"
  echo "| tests | $test_rc | $(tail -1 "$OUT/pytest.log") |"
  if [ "${SKIP_BENCH:-0}" = 1 ]; then echo "| bench | - | skipped (SKIP_BENCH=1) |"
  else echo "| bench | $bench_rc | $(grep -c 'TFLOPS (' "$OUT/bench.log") cases timed |"; fi
  echo
  if [ -f "$OUT/bench.json" ]; then
    $PY - "$OUT/bench.json" <<'PYEOF'
import json, sys
d = json.load(open(sys.argv[1]))
print("| case | mode | fastattn TFLOPS | % matmul | vs flash | vs cuDNN |")
print("|---|---|---|---|---|---|")
for r in d["results"]:
    if r["provider"] == "fastattn-triton" and r["ms"]:
        c = r["case"]
        label = f"Sq{c['seqlen_q']} Sk{c['seqlen_k']} D{c['head_dim']} {'causal' if c['causal'] else 'full'} {c['dtype'][:4]}"
        f = r["ratios"].get("sdpa-flash"); cu = r["ratios"].get("sdpa-cudnn")
        print(f"| {label} | {r['mode']} | {r['tflops']:.0f} | {r['pct_of_matmul']:.0f}% | "
              f"{f'{f:.2f}x' if f else '-'} | {f'{cu:.2f}x' if cu else '-'} |")
if d.get("padding"):
    r0 = d["padding"][0]
    print(f"\nCost of padding, B{r0['batch']} S{r0['seqlen']} {r0['fill']:.0%} real tokens (time vs the unpadded batch):\n")
    print("| variant | mode | ms | vs dense |")
    print("|---|---|---|---|")
    for r in d["padding"]:
        print(f"| {r['variant']} | {r['mode']} | {r['ms']:.3f} | {r['ratio_to_dense']:.2f}x |")
PYEOF
  fi
} > "$OUT/summary.md"
cat "$OUT/summary.md"
[ "$check_rc" = 0 ] && [ "$test_rc" = 0 ] && [ "$bench_rc" = 0 ]
