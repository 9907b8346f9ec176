#!/usr/bin/env bash
# GPU check: install + build fastattn._C (no network), CUDA smoke run, GPU tests, host overhead per
# call vs SDPA, decode benchmark, score-modifier benchmark, HF Llama step (if transformers is
# installed), ring attention's compute on one GPU and across GPUs (2+), quick kernel benchmark, model benchmark, a
# compute-sanitizer pass; summary table last.
#
#   tools/gpu_check.sh OUTDIR            (BUDGET_S=520 by default: the whole script, in seconds)
#   SKIP_BENCH=1 tools/gpu_check.sh OUTDIR   (verification only: build, smoke, tests, sanitizer)
#   STAGES="smoke tests host decode models profile" TESTS="tests/test_x.py ..." tools/gpu_check.sh OUTDIR
#       (only the named stages, of: smoke tests host decode smods hf ringc ring sweep bench models profile
#        sanitizer; sweep is not in the default list: benchmarks/config_sweep.py, SWEEP_S cap, default 300;
#        TESTS replaces the test files; MODELS_AUTOTUNE=1 lets the model stages autotune;
#        SMODS_S / HF_S / BENCH_S: the score-mods / HF / bench stages' caps in seconds, default 120 / 150 /
#        150; SMODS_ARGS adds score_mods.py options (e.g. "--seqlens 8192 --windows 512,2048");
#        MODELS_ARGS adds bench_models.py options, e.g. "--models decoder --backends torch,triton")
#
# Through the device tool (run's timeout_s=600; 15 device minutes a session hold one such run and a
# short rerun), one of:
#   STAGES="smoke tests" BUDGET_S=580                     (the whole suite: ~300 s of 16 workers)
#   STAGES="smoke tests smods hf" TESTS="tests/test_score_mods.py tests/test_hf_integration.py" \
#     SMODS_S=240 HF_S=150 BUDGET_S=580                   (issue 23: modifiers and the HF step)
#   STAGES="smoke sweep bench" SWEEP_S=360 BUDGET_S=580   (issue 24: the config sweep, the quick grid)
#
# For a fresh GPU machine that already has torch and triton. Each stage gets what is left of the
# budget minus what the wanted later stages need (their caps, at most the stage's fixed share), so the
# script ends on time even when a stage is cut short. results.tgz is rewritten after every stage, so a
# run killed from outside keeps what finished. BUDGET_S is held under MAX_S (default 580: the device
# tool kills a command at 600 s). Writes into OUTDIR (at most 8 files: what a device run sends back;
# host.md, bench.log, models.log and profile.md only when their stage is named):
#   check.log     install + build log, nvidia-smi, versions
#   smoke.log     the CUDA kernels run once in a process of their own (a fault cannot hide elsewhere)
#   pytest.log    the test suite on the GPU, one line per test (-v), new-work tests first, slowest 30
#   host.md       host microseconds per call, fastattn layer by layer vs SDPA (benchmarks/host_overhead.py)
#   bench.log     kernel benchmark progress (benchmarks/run.py --grid quick)
#   models.log    model benchmark progress (benchmarks/bench_models.py)
#   profile.md    the decoder's train step and generated token profiled, torch vs triton (tools/profile_model_step.py)
#   summary.md    the short table printed last (with the decode table: GB/s, % of copy, vs SDPA and
#                 the prefill kernel, from benchmarks/decode.py)
#   results.tgz   bench.json/md + PNG plots, models.json/md, decode.json + log, score_mods.json/md + log,
#                 hf_llama.json/md + log, ring_compute.json/md + log, ring.json/md + log, sweep/ + log,
#                 sanitizer.log (summary.md also shows the score-modifier tables)
set -uo pipefail
OUT=${1:?usage: tools/gpu_check.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # absolute: the script changes directory
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET=${BUDGET_S:-520}
MAX=${MAX_S:-580}
if [ "$BUDGET" -gt "$MAX" ]; then echo "BUDGET_S=$BUDGET is over MAX_S=$MAX: using $MAX"; BUDGET=$MAX; fi
export PYTHONUNBUFFERED=1  # a stage killed at its timeout still leaves its log
WORK=$(mktemp -d)
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
# left RESERVE: seconds of budget left after keeping RESERVE for the later stages (>= 0).
left() { local l=$(( BUDGET - ($(date +%s) - t0) - $1 )); echo $(( l > 0 ? l : 0 )); }
[ "${SKIP_BENCH:-0}" = 1 ] && STAGES=${STAGES:-smoke tests sanitizer}
STAGES=" ${STAGES:-smoke tests host decode smods hf ringc ring bench models profile sanitizer} "
want() { [[ "$STAGES" == *" $1 "* ]]; }
ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -1)
# The most seconds each stage after the tests may take (its cap; 0 where it will not run here).
cap_of() {
  case $1 in
    host|decode|ringc) echo 90 ;;
    ring) [ "$ngpu" -ge 2 ] && echo 90 || echo 0 ;;
    smods) echo "${SMODS_S:-120}" ;;
    hf) echo "${HF_S:-150}" ;;
    sweep) echo "${SWEEP_S:-300}" ;;
    bench) echo "${BENCH_S:-150}" ;;
    profile) echo 120 ;;
    models) echo "${MODELS_S:-110}" ;;
    sanitizer) [ -n "$SAN" ] && echo 60 || echo 0 ;;
    *) echo 0 ;;
  esac
}
# reserve STAGE SHARE: what STAGE leaves for the wanted stages after it: their caps plus 10 s for the
# summary, at most SHARE (the later stages then shrink to what is left, as the default list needs).
ORDER="tests host decode smods hf ringc ring sweep bench models profile sanitizer"
reserve() {
  local s after=0 r=10
  for s in $ORDER; do
    [ "$after" = 1 ] && want "$s" && r=$(( r + $(cap_of "$s") ))
    [ "$s" = "$1" ] && after=1
  done
  echo $(( r < $2 ? r : $2 ))
}
# pack: results.tgz from what the finished stages wrote (after every stage: a kill keeps them; written
# aside and renamed, so a kill while packing keeps the last whole archive).
pack() { tar -czf "$OUT/.results.tgz.part" -C "$WORK" . 2>/dev/null && mv -f "$OUT/.results.tgz.part" "$OUT/results.tgz"; }
MODELS_TUNE=$([ "${MODELS_AUTOTUNE:-0}" = 1 ] && echo 1 || echo 0)

{
  stamp "install (builds fastattn._C: nvcc, sm_90a only here to halve the build)"
  FASTATTN_CUDA_ARCHS=${FASTATTN_CUDA_ARCHS:-90a} timeout "$(left 380)" \
    $PY -m pip install -v --no-deps --no-build-isolation -e . 2>&1 | grep -E "fastattn setup|error|warning|Successfully" | tail -40
  if ! (cd /tmp && $PY -c "import fastattn.kernels") 2>/dev/null; then
    echo "editable install did not map kernels/ -> fastattn.kernels; falling back to PYTHONPATH + a link"
    ln -sfn ../kernels fastattn/kernels
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  stamp "installed"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  $PY -m pip list 2>/dev/null | grep -i -E "^(torch|triton|transformers|pytest|pytest-xdist|pytest-timeout|numpy) "
  $PY -V; nproc
  $PY -c "import fastattn; [print(s) for s in fastattn.available_backends().values()]"
} > "$OUT/check.log" 2>&1
stamp "install done"

# The CUDA kernels once, alone: pytest's workers then skip their own smoke run.
smoke_rc=-
if want smoke; then
  timeout 90 $PY tests/test_cuda_attention.py > "$OUT/smoke.log" 2>&1
  smoke_rc=$?
  [ "$smoke_rc" = 0 ] && export FASTATTN_CUDA_SMOKE=ok
  stamp "cuda smoke rc=$smoke_rc"
fi

# Tests on the GPU, 16 workers, one pytest run (no worker waits for a stage to end): the files that
# have never run on a GPU first, then the rest; the 30 slowest tests listed at the end (for planning).
# SKIP_BENCH=1 (a verification run): the tests may use the whole budget but the sanitizer's share.
workers=$(( $(nproc) > 16 ? 16 : $(nproc) ))
FIRST="tests/test_large_offsets.py tests/test_bad_inputs.py tests/test_fuzz.py tests/test_torch_flash_impl.py tests/test_ring_attention.py tests/test_score_mods.py tests/test_t5.py tests/test_flash_api.py tests/test_hf_integration.py \
tests/test_decode.py tests/test_models.py tests/test_launch_plans.py tests/test_ops.py \
tests/test_triton_attention.py tests/test_padding_varlen.py tests/test_cuda_attention.py"
REST=$(ls tests/test_*.py | grep -v -F -x -f <(tr ' ' '\n' <<< "$FIRST"))
test_rc=-
if want tests; then
  timeout "$(left "$(reserve tests 270)")" $PY -m pytest -v -rfE --durations=30 -m "not slow" -n "$workers" --timeout 150 \
    -p no:cacheprovider ${TESTS:-$FIRST $REST} > "$OUT/pytest.log" 2>&1
  test_rc=$?
  stamp "tests rc=$test_rc: $(tail -1 "$OUT/pytest.log")"
fi

# Host time per call (real launches, tiny kernels: host-bound), fastattn's layers vs SDPA.
host_rc=-
if want host && [ "$(left "$(reserve host 220)")" -gt 60 ]; then
  timeout 90 $PY benchmarks/host_overhead.py --iters 50 --rounds 10 --out "$WORK/host" > "$WORK/host.log" 2>&1
  host_rc=$?
  cp "$WORK/host/host_overhead.md" "$OUT/host.md" 2>/dev/null
  stamp "host overhead rc=$host_rc"
  pack
fi

# Decode benchmark (never run on a GPU before: the split-KV kernel, contiguous and paged), autotuned.
decode_rc=-
if want decode && [ "$(left "$(reserve decode 175)")" -gt 20 ]; then
  db=$(left "$(reserve decode 175)"); db=$(( db > 90 ? 90 : db ))
  timeout "$db" $PY benchmarks/decode.py --grid quick --out "$WORK/decode" > "$WORK/decode.log" 2>&1
  decode_rc=$?
  [ -f "$WORK/decode/decode.md" ] || tail -40 "$WORK/decode.log" > "$WORK/decode.md"
  stamp "decode rc=$decode_rc"
  pack
fi

# Score-modifier benchmark (bias, ALiBi, window, softcap, sinks vs none; bias vs SDPA's float mask; then
# FlexAttention with each modifier, compiled: its own pass, last), untuned configs (autotuning each
# modifier's kernels would not fit here); its tables are rewritten after every case.
smods_rc=-
if want smods && [ "$(left "$(reserve smods 190)")" -gt 45 ]; then
  sb=$(left "$(reserve smods 190)"); cap=${SMODS_S:-120}; sb=$(( sb > cap ? cap : sb ))
  FASTATTN_AUTOTUNE=0 timeout "$sb" $PY benchmarks/score_mods.py --budget-s $(( sb - 25 )) --out "$WORK/score_mods" ${SMODS_ARGS:-} \
    > "$WORK/score_mods.log" 2>&1
  smods_rc=$?
  [ -f "$WORK/score_mods/score_mods.md" ] || tail -40 "$WORK/score_mods.log" > "$WORK/score_mods.md"
  stamp "score mods rc=$smods_rc"
  pack
fi

# Hugging Face training steps (Llama GQA, Mistral windowed), attn_implementation fastattn vs sdpa (and
# flash_attention_2 where installed): only where transformers is installed (the GPU image has 5.17).
hf_rc=-
if want hf && [ "$(left "$(reserve hf 160)")" -gt 40 ] \
   && $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('transformers') is None)"; then
  hb=$(left "$(reserve hf 160)"); cap=${HF_S:-150}; hb=$(( hb > cap ? cap : hb ))
  timeout "$hb" $PY benchmarks/hf_llama.py --out "$WORK/hf_llama" > "$WORK/hf_llama.log" 2>&1
  hf_rc=$?
  stamp "hf llama rc=$hf_rc"
  pack
fi

# The ring's compute per rank on one GPU (one rank of 8, transfers replaced: merges + smaller blocks vs
# the same work as one call and vs 1/8 of one-GPU attention), 128k tokens.
rc_rc=-
if want ringc && [ "$(left "$(reserve ringc 150)")" -gt 30 ]; then
  cb=$(left "$(reserve ringc 150)"); cb=$(( cb > 90 ? 90 : cb ))
  timeout "$cb" $PY benchmarks/ring_compute.py --world 8 --seqlens 131072 --calls 3 --out "$WORK/ring_compute" \
    > "$WORK/ring_compute.log" 2>&1
  rc_rc=$?
  stamp "ring compute rc=$rc_rc"
  pack
fi

# Ring attention across GPUs (benchmarks/ring.py under torchrun): only on a machine with 2+ GPUs.
ring_rc=-
if want ring && [ "$ngpu" -ge 2 ] && [ "$(left "$(reserve ring 140)")" -gt 40 ]; then
  rb=$(left "$(reserve ring 140)"); rb=$(( rb > 90 ? 90 : rb ))
  timeout "$rb" $PY -m torch.distributed.run --nproc-per-node "$ngpu" benchmarks/ring.py --seqlens 32768,131072 \
    --out "$WORK/ring" > "$WORK/ring.log" 2>&1
  ring_rc=$?
  stamp "ring ($ngpu GPUs) rc=$ring_rc"
  pack
fi

# Block-config sweep (issue 24): every compile-checked config of each prefill kernel vs the shipped table
# and SDPA cuDNN, D=128 first; only when named in STAGES (it wants minutes of its own).
sweep_rc=-
# SWEEP_ARGS: config_sweep.py options (default: D=128 only, the bars' head dim).
if want sweep && [ "$(left "$(reserve sweep 250)")" -gt 60 ]; then
  wb=$(left "$(reserve sweep 250)"); cap=${SWEEP_S:-300}; wb=$(( wb > cap ? cap : wb ))
  timeout "$wb" $PY benchmarks/config_sweep.py --budget-s $(( wb - 30 )) --out "$WORK/sweep" ${SWEEP_ARGS:---head-dims 128} \
    > "$WORK/sweep.log" 2>&1
  sweep_rc=$?
  stamp "sweep rc=$sweep_rc"
  pack
fi

# Kernel benchmark with autotuning on (as a user gets it): the quick grid under a time budget.
bench_rc=-
if want bench && [ "$(left "$(reserve bench 130)")" -gt 30 ]; then  # (timeout 0 would mean no limit)
  bb=$(left "$(reserve bench 130)"); cap=${BENCH_S:-150}; bb=$(( bb > cap ? cap : bb ))
  # The cases get all but 45 s (ceilings, padding, plots, report): the quick grid took 92 s on an H100.
  timeout "$bb" $PY benchmarks/run.py --grid quick --budget-s $(( bb > 90 ? bb - 45 : 20 )) --out "$WORK/bench" \
    > "$OUT/bench.log" 2>&1
  bench_rc=$?
  stamp "bench rc=$bench_rc"
  pack
fi

# Model benchmark (untuned Triton configs: autotuning every model shape would not fit here).
models_rc=-
if want models && [ "$(left "$(reserve models 45)")" -gt 30 ]; then
  mb=$(left "$(reserve models 45)"); mb=$(( mb > ${MODELS_S:-110} ? ${MODELS_S:-110} : mb ))
  FASTATTN_AUTOTUNE=$MODELS_TUNE timeout "$mb" $PY benchmarks/bench_models.py --out "$WORK/models" ${MODELS_ARGS:-} \
    > "$OUT/models.log" 2>&1
  models_rc=$?
  stamp "models rc=$models_rc"
  pack
fi

# Where the decoder's step and generated token spend their time, torch vs triton (profiler tables).
profile_rc=-
if want profile && [ "$(left "$(reserve profile 30)")" -gt 30 ]; then
  pb=$(left "$(reserve profile 30)"); pb=$(( pb > 120 ? 120 : pb ))
  timeout "$pb" $PY tools/profile_model_step.py --out "$WORK/profile" $([ "$MODELS_TUNE" = 1 ] && echo --autotune) \
    > "$WORK/profile.log" 2>&1
  profile_rc=$?
  cp "$WORK/profile/profile.md" "$OUT/profile.md" 2>/dev/null || tail -60 "$WORK/profile.log" > "$OUT/profile.md"
  stamp "profile rc=$profile_rc"
  pack
fi

# compute-sanitizer memcheck on a few small CUDA-kernel calls (fwd + bwd, padded head dim, mask).
san_rc=-
if want sanitizer && [ -n "$SAN" ] && [ "$(left "$(reserve sanitizer 15)")" -gt 20 ]; then
  timeout "$(left "$(reserve sanitizer 15)")" "$SAN" --tool memcheck --error-exitcode 9 $PY - > "$WORK/sanitizer.log" 2>&1 <<'PYEOF'
import torch, fastattn
g = torch.Generator().manual_seed(0)
for (b, sq, sk, h, hk, d, causal) in [(2, 130, 70, 2, 1, 40, True), (1, 65, 130, 2, 2, 128, False)]:
    q = torch.randn(b, sq, h, d, generator=g).cuda().half().requires_grad_()
    k = torch.randn(b, sk, hk, d, generator=g).cuda().half().requires_grad_()
    v = torch.randn(b, sk, hk, d, generator=g).cuda().half().requires_grad_()
    mask = (torch.rand(b, sk, generator=g) < 0.7).cuda()
    out = fastattn.attention(q, k, v, causal=causal, key_padding_mask=mask, backend="cuda")
    out.float().sum().backward()
# Decoding with lengths past the cache and page indices outside it (not checked on the host for CUDA
# tensors): the kernels must clamp/skip, never touch memory outside the cache.
kc = torch.randn(6, 16, 2, 64, generator=g).cuda().half()
table = torch.tensor([[0, 5, 9], [-1, 2, 3]], dtype=torch.int32).cuda()
lens = torch.tensor([40, 100], dtype=torch.int32).cuda()
q, kn = torch.randn(2, 1, 4, 64, generator=g).cuda().half(), torch.randn(2, 1, 2, 64, generator=g).cuda().half()
for splits in (1, 3):
    fastattn.attention_with_kvcache(q, kc, kc.clone(), kn, kn, cache_seqlens=lens, block_table=table,
                                    num_splits=splits, backend="triton")
    fastattn.attention_with_kvcache(q, kc[:2, :, :, :], kc[:2].clone(), kn, kn, cache_seqlens=lens,
                                    num_splits=splits, backend="triton")
torch.cuda.synchronize()
print("sanitizer run done")
PYEOF
  san_rc=$?
  stamp "sanitizer rc=$san_rc: $(grep -E 'ERROR SUMMARY' "$WORK/sanitizer.log" | tail -1)"
  pack
fi

{
  echo "## gpu_check summary ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(( $(date +%s) - t0 ))s)"
  echo
  echo "| stage | exit | result |"
  echo "|---|---|---|"
  echo "| cuda build | - | $(grep -E 'fastattn setup' "$OUT/check.log" | tail -1) |"
  echo "| cuda smoke | $smoke_rc | $(tail -1 "$OUT/smoke.log" 2>/dev/null) |"
  echo "| tests | $test_rc | $(grep -E '(passed|failed|error)' "$OUT/pytest.log" 2>/dev/null | grep -E '^=+ ' | tail -1) |"
  echo "| host overhead | $host_rc | $(grep -E '^\| dense causal \| fwd\+bwd' "$OUT/host.md" 2>/dev/null) |"
  echo "| decode | $decode_rc | $(grep -E 'failed the gate' "$WORK/decode.log" 2>/dev/null | tail -1) |"
  echo "| score mods | $smods_rc | $(grep -E 'failed the gate' "$WORK/score_mods.log" 2>/dev/null | tail -1); \
$(grep -E 'bar checks met' "$WORK/score_mods/score_mods.md" 2>/dev/null | tail -1) |"
  echo "| hf models | $hf_rc | $(grep -E 'fastattn vs sdpa' "$WORK/hf_llama/hf_llama.md" 2>/dev/null | tr '\n' ';') |"
  echo "| ring compute (1 GPU) | $rc_rc | $(grep -c '"gate": "ok"' "$WORK/ring_compute.log" 2>/dev/null) gated rows |"
  echo "| ring | $ring_rc | $ngpu GPUs; $(grep -c '"ring gate": "ok"' "$WORK/ring.log" 2>/dev/null) gated rows |"
  echo "| config sweep | $sweep_rc | $(grep -E '^precompiled' "$WORK/sweep.log" 2>/dev/null) |"
  echo "| bench | $bench_rc | $(grep -E '^[0-9]+ timings' "$OUT/bench.log" 2>/dev/null | tail -1) |"
  echo "| models | $models_rc | $(grep -c 'train step' "$OUT/models.log" 2>/dev/null) rows |"
  echo "| profile | $profile_rc | $(grep -c -E '^\| (torch|triton|cuda) \| [0-9]' "$OUT/profile.md" 2>/dev/null) backends profiled |"
  echo "| direct-launch fallbacks | - | $(grep -c 'directly failed its check' "$OUT/pytest.log" 2>/dev/null) warnings in pytest.log (0 expected) |"
  echo "| sanitizer | $san_rc | $(grep -E 'ERROR SUMMARY' "$WORK/sanitizer.log" 2>/dev/null | tail -1) |"
  echo
  grep -E "FAILED|ERROR" "$OUT/pytest.log" 2>/dev/null | head -30
  echo
  [ -f "$WORK/bench/bench.json" ] && $PY -m benchmarks.report "$WORK/bench/bench.json" --summary
  cat "$WORK/decode/decode.md" "$WORK/decode.md" 2>/dev/null
  cat "$WORK/score_mods/score_mods.md" "$WORK/score_mods.md" "$WORK/hf_llama/hf_llama.md" 2>/dev/null
  cat "$WORK/ring_compute/ring_compute.md" "$WORK/ring/ring.md" "$WORK/sweep/sweep.md" 2>/dev/null
  [ -f "$WORK/models/models.md" ] && cat "$WORK/models/models.md"
  [ -f "$OUT/host.md" ] && cat "$OUT/host.md"
} > "$OUT/summary.md" 2>&1
cp "$OUT/summary.md" "$WORK/"
pack
cat "$OUT/summary.md"
[[ "$smoke_rc" =~ ^(0|-)$ ]] && [[ "$test_rc" =~ ^(0|-)$ ]]
