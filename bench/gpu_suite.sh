#!/usr/bin/env bash
# The one prepared GPU run (an H200 here): install, measure, test, demo; a run counts only if it
# is green in one go on the commit it names. Phases, in order (GPU timings before the tests, so
# nothing else uses the GPU while it is timed):
#   info      nvidia-smi, nvcc (not counted against the run if they fail)
#   install   python -m pip install --no-build-isolation --no-deps -e .  (builds the CUDA extension)
#   env       versions, the backends on cuda, the extension's build info
#   bench     bench/gpu_bench.py: W1-W5, per-forward graphs, compiled fields, torch.compile, the
#             kernel alone in a graph, kernel count of a W1 replay, memory over 10,000 replays,
#             rk4 / guided Euler, the Alpamayo 1.5 class, W6 (an RL rollout: the recipes' SDE
#             loop vs ours eager and captured, and the field's floor; a few seconds)
#   pytest-bench  the pytest-benchmark GPU cases, timed (JSON beside the results)
#   then in parallel: tests (the whole suite, backend auto = the CUDA extension, every gpu-marked
#             test: emulation vs device, the Alpamayo 1.5 class, compile composition); parity
#             (the gpu-marked tests again through backend=triton and backend=torch); the demo on
#             the GPU; the W1 and W5 plots of the results
# Writes <date>-<gpu>.{md,json} into $RESULTS_DIR (default bench/results; $OUT through the device
# tool), logs into $OUT (or /tmp/flowmatch_gpu_suite), and appends each phase's time and status to
# the .md.
#
# Budget: under 8 minutes on an H200, the install included. Each phase has its own time limit
# (the L_* below, seconds); the parallel group counts once, as its one limit:
#   info 10 + install 75 + env 20 + bench 190 + pytest-bench 45 + parallel 135 = 475 s in all.
# What they rest on (the 2026-11-28 H200 run, commit 253bdc8): install 36 s; bench 44 s with one
# 10 s compile, before W5 (2B expert: ~25 s more, estimated, not yet run on a GPU); the bench's
# compiles share --compile-budget 120 s, in the order they come (W1 batch 6's four first, then
# W5 batch 6's two: torch.compile(reduce-overhead) of the original and ours compile=True; each at
# most 60 s; a compile cut off is a row saying so, not a failure; none at W1 batch 1 and 48, whose
# timing stays), so bench ends near 34 + 25 + 120 = 179 s. Tests: 371 took 79 s serially there (slowest
# one test, 53 s, Triton JIT of stage_step on cuda); about 1,400 collected now (the RL class,
# generator lists, compile=True and this round's reliability tests), so with pytest-xdist (when
# importable) the whole suite runs in nproc/2 workers and each parity pass in nproc/6, torch at 2
# threads each (16 cores: 8 + 2 + 2 workers, the demo, the plot). No test needs the GPU to itself:
# CUDA graph capture, the caching allocator (the memory-flat test reads memory_allocated), the
# sync debug mode and the extension's launch counters are all per process, and no test asserts a
# timing.
#
#   bash bench/gpu_suite.sh
#   bash bench/gpu_suite.sh --dry-run       # this CPU box: every phase's entry, tiny sizes, no GPU
#   SUITE_SKIP="demo plot" bash bench/gpu_suite.sh
#   FLOWMATCH_COMMIT=<hash> bash bench/gpu_suite.sh   # recorded in the results (no .git there)
#   SUITE_COMPILE="w1b6:all,w5b6:ours" SUITE_COMPILE_LIMIT=60 SUITE_COMPILE_BUDGET=120 SUITE_REPS=100
#   (gpu_bench.py --help; a larger compile budget needs a larger L_BENCH, and the sum above)
set -uo pipefail
L_INFO=10 L_INSTALL=75 L_ENV=20 L_BENCH=190 L_PYTEST_BENCH=45 L_PARALLEL=135
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
  echo; echo "=== [$(( start - t0 ))s] $name (limit ${limit}s): $(echo "$*" | head -1)"
  timeout "$limit" "$@"; local rc=$?
  TIMES+=("| $name | $(( $(date +%s) - start )) | $([ $rc -eq 0 ] && echo ok || echo "FAILED rc=$rc") |")
  [ $rc -eq 0 ] || { FAILED="$FAILED $name(rc=$rc)"; echo "!!! $name failed (rc=$rc)"; }
  return $rc
}
note() { echo; echo "=== [$(( $(date +%s) - t0 ))s] $*"; TIMES+=("| $1 | - | $2 |"); }

echo "=== flowmatch_fast suite: commit $FLOWMATCH_COMMIT, seed $FLOWMATCH_TEST_SEED, dry run: $DRY"
VERSIONS="
import sys, torch, flowmatch_fast as f
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', tv)
print('backends on cuda:', f.available_backends('cuda'))
if sys.argv[1:] == ['--extension']:
    from flowmatch_fast import _cuda_euler as m; print('extension:', m.build_info())"
if [ "$DRY" = 1 ]; then
  BENCH_ARGS=(--dry-run); PYTEST_GPU="-m gpu"; DEMO_ARGS="--device cpu --fast --train-steps 20"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # not installed: import this tree
  note install "skipped in the dry run (it would pip install -e . into this environment)"
  run env "$L_ENV" $PY -c "$VERSIONS"
else
  timeout "$L_INFO" bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem \
    --format=csv; nvcc --version | tail -1" || true
  BENCH_ARGS=(--reps "${SUITE_REPS:-100}" --compile-limit "${SUITE_COMPILE_LIMIT:-60}"
              --compile-budget "${SUITE_COMPILE_BUDGET:-120}")
  [ -n "${SUITE_COMPILE+set}" ] && BENCH_ARGS+=(--compile "$SUITE_COMPILE")
  PYTEST_GPU=""; DEMO_ARGS="--device cuda --fast"
  if want install; then
    run install "$L_INSTALL" bash -c "$PY -m pip install --no-build-isolation --no-deps -e . > '$LOGDIR/install.log' 2>&1"
    grep -iE "flowmatch_fast:|error|Successfully" "$LOGDIR/install.log" | tail -6
  fi
  run env "$L_ENV" $PY -c "$VERSIONS" --extension
fi

if want bench; then
  run bench "$L_BENCH" $PY bench/gpu_bench.py --out "$RESULTS" "${BENCH_ARGS[@]}"
fi
stem=$(find "$RESULTS" -maxdepth 1 -name "*.json" ! -name "*pytest-benchmark*" -newer "$LOGDIR/.suite-start" | head -1)
stem=${stem%.json}
if want pytest-bench; then
  if [ "$DRY" = 1 ]; then  # the GPU cases skip here: this checks they collect and skip cleanly
    run pytest-bench "$L_PYTEST_BENCH" $PY -m pytest bench -q -m gpu --benchmark-disable -p no:cacheprovider
  else
    run pytest-bench "$L_PYTEST_BENCH" $PY -m pytest bench -q -m gpu -p no:cacheprovider \
      --benchmark-json="${stem:-$RESULTS/run}-pytest-benchmark.json"
  fi
fi

# The parallel group: every job starts now and has L_PARALLEL seconds. pytest-xdist workers
# where it is importable and there are cores for at least 2 per run (see the header).
CORES=$(nproc 2>/dev/null || echo 1)
XDIST_TESTS=""; XDIST_PARITY=""
if $PY -c "import xdist" 2>/dev/null; then
  [ $(( CORES / 2 )) -ge 2 ] && XDIST_TESTS="-n $(( CORES / 2 ))"
  [ $(( CORES / 6 )) -ge 2 ] && XDIST_PARITY="-n $(( CORES / 6 ))"
  [ -n "$XDIST_TESTS" ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # not 16 per worker
fi
pids=(); names=()
job() {  # job NAME CMD...: one job of the parallel group, its output and rc in $LOGDIR/NAME.log
  local name=$1; shift
  ( s=$(date +%s); timeout "$L_PARALLEL" "$@" > "$LOGDIR/$name.log" 2>&1
    echo "rc=$? seconds=$(( $(date +%s) - s ))" >> "$LOGDIR/$name.log" ) & pids+=($!); names+=("$name")
}
if want tests; then  # in the dry run only the gpu-marked cases (they skip): CI runs the rest
  job tests $PY -m pytest tests -q $PYTEST_GPU $XDIST_TESTS -p no:cacheprovider -rs --durations=5
fi
if want parity; then
  for b in ${SUITE_PARITY_BACKENDS:-triton torch}; do
    job "parity-$b" env FLOWMATCH_FAST_BACKEND="$b" $PY -m pytest tests -q -m gpu $XDIST_PARITY \
      -p no:cacheprovider -rs
  done
fi
if want demo; then  # small on the GPU, and its timings are not quoted: beside the tests
  job demo $PY -m flowmatch_fast demo $DEMO_ARGS --no-progress --out "$LOGDIR/demo.png"
fi
if want plot && [ -n "$stem" ]; then  # reads the bench's results only
  job plot $PY bench/plot.py "$stem.json"
fi
start=$(date +%s)
[ ${#pids[@]} -gt 0 ] && echo && echo "=== [$(( start - t0 ))s] ${names[*]} in parallel (limit ${L_PARALLEL}s) -> $LOGDIR: tests ${XDIST_TESTS:-serial}, parity ${XDIST_PARITY:-serial}"
for p in "${pids[@]}"; do wait "$p"; done
for name in "${names[@]}"; do
  f="$LOGDIR/$name.log"
  echo "--- $name"; grep -E "FAILED|ERROR|passed|failed|skipped|bitwise|png$|^rc=" "$f" | tail -25
  ok=ok; grep -q "^rc=0 " "$f" || { ok=FAILED; FAILED="$FAILED $name"; }
  TIMES+=("| $name | $(sed -n 's/^rc=.* seconds=//p' "$f") (parallel) | $ok: $(grep -E "passed|failed|skipped|bitwise|png$" "$f" | tail -1) |")
done

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
