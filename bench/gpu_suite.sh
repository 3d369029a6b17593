#!/usr/bin/env bash
# The one prepared GPU run (an H200 here): install, measure, test, demo; a run counts only if it
# is green in one go on the commit it names. Phases, in order (GPU timings before the tests, so
# nothing else uses the GPU while it is timed):
#   install   python -m pip install --no-build-isolation --no-deps -e .  (builds the CUDA extension)
#   bench     bench/gpu_bench.py: W1-W5, per-forward graphs, compiled fields, torch.compile, the
#             kernel alone in a graph, kernel count of a W1 replay, memory over 10,000 replays
#   pytest-bench  the pytest-benchmark GPU cases, timed (JSON beside the results)
#   tests     the whole suite (backend auto = the CUDA extension; includes every gpu-marked test:
#             emulation vs device, the Alpamayo 1.5 class, compile composition), in parallel with
#             the gpu-marked tests again through backend=triton and backend=torch
#   demo      the demo on the GPU, beside the tests;  plot  the W1 and W5 plots of the results
# Writes <date>-<gpu>.{md,json} into $RESULTS_DIR (default bench/results; $OUT through the device
# tool), logs into $OUT (or /tmp/flowmatch_gpu_suite), and appends each phase's time and status to
# the .md. Budget: under 8 minutes on an H200 (the 2026-11-28 run took 201 s with one compile; the
# new compiles are capped by --compile-limit); each phase has its own time limit, 576 s in all.
#
#   bash bench/gpu_suite.sh
#   bash bench/gpu_suite.sh --dry-run       # this CPU box: every phase's entry, tiny sizes, no GPU
#   SUITE_SKIP="demo plot" bash bench/gpu_suite.sh
#   FLOWMATCH_COMMIT=<hash> bash bench/gpu_suite.sh   # recorded in the results (no .git there)
#   SUITE_COMPILE="w1b6:all,w5b6:peers" SUITE_COMPILE_LIMIT=90 SUITE_REPS=100  (gpu_bench.py --help)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=${DRY_RUN:-0}
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
if [ "$DRY" = 1 ]; then
  BASE=${TMPDIR:-/tmp}/flowmatch_suite_dry_run
  LOGDIR=${OUT:-$BASE/logs}; RESULTS=${RESULTS_DIR:-$BASE/results}
  rm -rf "$BASE"
else
  LOGDIR=${OUT:-/tmp/flowmatch_gpu_suite}; RESULTS=${RESULTS_DIR:-${OUT:-bench/results}}
fi
SKIP=" ${SUITE_SKIP:-} "
mkdir -p "$RESULTS" "$LOGDIR"
touch "$LOGDIR/.suite-start"  # only results newer than this are this run's
export PYTHONUNBUFFERED=1
export FLOWMATCH_TEST_SEED=${FLOWMATCH_TEST_SEED:-$RANDOM}
if [ -z "${FLOWMATCH_COMMIT:-}" ] && git rev-parse --short HEAD >/dev/null 2>&1; then
  FLOWMATCH_COMMIT=$(git rev-parse --short HEAD)
  git diff --quiet HEAD 2>/dev/null || FLOWMATCH_COMMIT="$FLOWMATCH_COMMIT+uncommitted-changes"
fi
export FLOWMATCH_COMMIT=${FLOWMATCH_COMMIT:-unknown}
t0=$(date +%s)
FAILED=""
TIMES=()
want() { [[ "$SKIP" != *" $1 "* ]]; }
run() {  # run NAME TIMEOUT CMD...: time it, record a failure without stopping the suite
  local name=$1 limit=$2; shift 2
  local start; start=$(date +%s)
  echo; echo "=== [$(( start - t0 ))s] $name (limit ${limit}s): $*"
  timeout "$limit" "$@"; local rc=$?
  TIMES+=("| $name | $(( $(date +%s) - start )) | $([ $rc -eq 0 ] && echo ok || echo "FAILED rc=$rc") |")
  [ $rc -eq 0 ] || { FAILED="$FAILED $name(rc=$rc)"; echo "!!! $name failed (rc=$rc)"; }
  return $rc
}
note() { echo; echo "=== [$(( $(date +%s) - t0 ))s] $*"; TIMES+=("| $1 | - | $2 |"); }

echo "=== flowmatch_fast suite: commit $FLOWMATCH_COMMIT, seed $FLOWMATCH_TEST_SEED, dry run: $DRY"
if [ "$DRY" = 1 ]; then
  BENCH_ARGS=(--dry-run); PYTEST_GPU="-m gpu"; DEMO_ARGS="--device cpu --fast --train-steps 20"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # not installed: import this tree
  note install "skipped in the dry run (it would pip install -e . into this environment)"
else
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
  nvcc --version | tail -1 || true
  BENCH_ARGS=(--reps "${SUITE_REPS:-100}" --compile-limit "${SUITE_COMPILE_LIMIT:-90}")
  [ -n "${SUITE_COMPILE+set}" ] && BENCH_ARGS+=(--compile "$SUITE_COMPILE")
  PYTEST_GPU=""; DEMO_ARGS="--device cuda --fast"
  if want install; then
    run install 120 bash -c "$PY -m pip install --no-build-isolation --no-deps -e . > '$LOGDIR/install.log' 2>&1"
    grep -iE "flowmatch_fast:|error|Successfully" "$LOGDIR/install.log" | tail -6
  fi
  run extension 30 $PY -c "from flowmatch_fast import _cuda_euler as m; print('extension:', m.build_info())"
fi
$PY -c "
import sys, torch, flowmatch_fast as f
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', tv)
print('backends on cuda:', f.available_backends('cuda'))"

if want bench; then
  run bench 330 $PY bench/gpu_bench.py --out "$RESULTS" "${BENCH_ARGS[@]}"
fi
stem=$(find "$RESULTS" -maxdepth 1 -name "*.json" ! -name "*pytest-benchmark*" -newer "$LOGDIR/.suite-start" | head -1)
stem=${stem%.json}
if want pytest-bench; then
  if [ "$DRY" = 1 ]; then  # the GPU cases skip here: this checks they collect and skip cleanly
    run pytest-bench 60 $PY -m pytest bench -q -m gpu --benchmark-disable -p no:cacheprovider
  else
    run pytest-bench 60 $PY -m pytest bench -q -m gpu -p no:cacheprovider \
      --benchmark-json="${stem:-$RESULTS/run}-pytest-benchmark.json"
  fi
fi

XDIST=""; $PY -c "import xdist" 2>/dev/null && XDIST="-n 6"
pids=(); names=()
if want tests; then  # in the dry run only the gpu-marked cases (they skip): CI runs the rest
  ( timeout 150 $PY -m pytest tests -q $PYTEST_GPU $XDIST -p no:cacheprovider -rs --durations=5 \
      > "$LOGDIR/tests.log" 2>&1; echo "rc=$?" >> "$LOGDIR/tests.log" ) & pids+=($!); names+=(tests)
fi
if want parity; then
  for b in ${SUITE_PARITY_BACKENDS:-triton torch}; do
    ( FLOWMATCH_FAST_BACKEND=$b timeout 150 $PY -m pytest tests -q -m gpu $XDIST \
        -p no:cacheprovider -rs > "$LOGDIR/parity-$b.log" 2>&1
      echo "rc=$?" >> "$LOGDIR/parity-$b.log" ) & pids+=($!); names+=(parity-$b)
  done
fi
if want demo; then  # small on the GPU, and its timings are not quoted: beside the tests
  ( timeout 90 $PY -m flowmatch_fast demo $DEMO_ARGS --no-progress --out "$LOGDIR/demo.png" \
      > "$LOGDIR/demo.log" 2>&1; echo "rc=$?" >> "$LOGDIR/demo.log" ) & pids+=($!); names+=(demo)
fi
start=$(date +%s)
[ ${#pids[@]} -gt 0 ] && echo && echo "=== [$(( start - t0 ))s] ${names[*]} in parallel -> $LOGDIR"
for p in "${pids[@]}"; do wait "$p"; done
for name in "${names[@]}"; do
  f="$LOGDIR/$name.log"
  echo "--- $name"; grep -E "FAILED|ERROR|passed|failed|skipped|bitwise|rc=" "$f" | tail -25
  ok=ok; grep -q "^rc=0$" "$f" || { ok=FAILED; FAILED="$FAILED $name"; }
  TIMES+=("| $name | $(( $(date +%s) - start )) (parallel) | $ok: $(grep -E "passed|failed|skipped|bitwise" "$f" | tail -1) |")
done

if want plot && [ -n "$stem" ]; then
  run plot 60 $PY bench/plot.py "$stem.json"
fi

total=$(( $(date +%s) - t0 ))
verdict="green in one go"
[ -n "${SUITE_SKIP:-}" ] && verdict="green, but phases skipped ($SUITE_SKIP): not a full run"
[ -n "$FAILED" ] && verdict="NOT green (failed:$FAILED): this run does not count"
[ "$DRY" = 1 ] && verdict="dry run on CPU ($([ -n "$FAILED" ] && echo "failed:$FAILED" || echo "all phases ran")): no GPU figure"
if [ -n "$stem" ] && [ -f "$stem.md" ]; then
  { echo; echo "## Suite (bench/gpu_suite.sh), commit $FLOWMATCH_COMMIT, seed $FLOWMATCH_TEST_SEED"
    echo; echo "Total ${total} s; $verdict."; echo
    echo "| phase | seconds | status |"; echo "|---|---:|---|"; printf '%s\n' "${TIMES[@]}"
  } >> "$stem.md"
fi
echo; echo "=== done in ${total}s: $verdict"
[ -n "$stem" ] && echo "results: $stem.md"
[ -z "$FAILED" ]
