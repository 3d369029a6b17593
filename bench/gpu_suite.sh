#!/usr/bin/env bash
# The one prepared GPU run (an H200 here): build and install the project, run the GPU benchmarks
# (results first: they are the scarcest evidence), the GPU tests for every backend, and the demo
# on the GPU. Writes <date>-<gpu>.{md,json} into $RESULTS_DIR (default bench/results; $OUT when
# run through the device tool) after every benchmark section, and prints the table last.
# About 5 minutes on an H200; every phase has its own time limit so one hang cannot lose the rest.
#
#   bash bench/gpu_suite.sh
#   SUITE_SKIP="smoke demo" bash bench/gpu_suite.sh   # phases: install bench tests parity smoke demo
#   FLOWMATCH_COMMIT=<hash> bash bench/gpu_suite.sh      # recorded in the results (no .git there)
set -uo pipefail
cd "$(dirname "$0")/.."
LOGDIR=${OUT:-/tmp/flowmatch_gpu_suite}
RESULTS=${RESULTS_DIR:-${OUT:-bench/results}}
SKIP=" ${SUITE_SKIP:-smoke} "
mkdir -p "$RESULTS" "$LOGDIR"
export PYTHONUNBUFFERED=1
export FLOWMATCH_TEST_SEED=${FLOWMATCH_TEST_SEED:-$RANDOM}
PY=${PYTHON:-python3}
t0=$(date +%s)
FAILED=""
phase() { echo; echo "=== [$(( $(date +%s) - t0 ))s] $*"; }
want() { [[ "$SKIP" != *" $1 "* ]]; }
run() {  # run NAME TIMEOUT CMD...: record a failure without stopping the suite
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@"; local rc=$?
  [ $rc -eq 0 ] || { FAILED="$FAILED $name(rc=$rc)"; echo "!!! $name failed (rc=$rc)"; }
}

phase "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
$PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
nvcc --version | tail -1 || true

if want install; then
  phase "build + install: python -m pip install --no-build-isolation --no-deps -e ."
  run install 150 bash -c "$PY -m pip install --no-build-isolation --no-deps -e . > '$LOGDIR/install.log' 2>&1"
  grep -iE "flowmatch_fast:|error|Successfully" "$LOGDIR/install.log" | tail -6
fi
$PY -c "from flowmatch_fast import _cuda_euler as m; print('extension:', m.build_info())" || FAILED="$FAILED extension-import"
$PY -c "import flowmatch_fast as f; print('backends on cuda:', f.available_backends('cuda'))"

if want bench; then
  phase "benchmarks: bench/gpu_bench.py -> $RESULTS"
  run bench 170 $PY bench/gpu_bench.py --out "$RESULTS" --reps "${SUITE_REPS:-100}" --compile "${SUITE_COMPILE:-w1b6}"
fi
XDIST=""; $PY -c "import xdist" 2>/dev/null && XDIST="-n 6"
# The whole suite (default backend: auto = the cuda extension) and the GPU cases again through
# each other backend run side by side (16 cores; correctness, not timing), logs to $LOGDIR.
pids=()
if want tests; then
  phase "tests: whole suite, backend auto (= cuda), seed $FLOWMATCH_TEST_SEED -> $LOGDIR/tests.log"
  ( timeout 170 $PY -m pytest tests -q $XDIST -p no:cacheprovider -rs --durations=5 \
      > "$LOGDIR/tests.log" 2>&1; echo "rc=$?" >> "$LOGDIR/tests.log" ) & pids+=($!)
fi
if want parity; then
  for b in ${SUITE_PARITY_BACKENDS:-triton torch}; do
    phase "GPU cases through backend=$b -> $LOGDIR/parity-$b.log"
    ( FLOWMATCH_FAST_BACKEND=$b timeout 170 $PY -m pytest tests/test_parity.py \
        tests/test_methods.py tests/test_graphs.py tests/test_compile.py tests/test_kernels.py \
        tests/test_alpamayo1_5.py \
        -q -m gpu $XDIST -p no:cacheprovider -rs > "$LOGDIR/parity-$b.log" 2>&1
      echo "rc=$?" >> "$LOGDIR/parity-$b.log" ) & pids+=($!)
  done
fi
for p in "${pids[@]}"; do wait "$p"; done
for f in "$LOGDIR"/tests.log "$LOGDIR"/parity-*.log; do
  [ -f "$f" ] || continue
  phase "$(basename "$f")"; grep -E "FAILED|ERROR|Error|passed|failed|rc=" "$f" | tail -25
  grep -q "^rc=0$" "$f" || FAILED="$FAILED $(basename "$f" .log)"
done
if want demo; then
  phase "demo on the GPU (fast mode, with the captured sampler)"
  run demo 60 $PY -m flowmatch_fast demo --device cuda --fast --out "$LOGDIR/demo_cuda.png"
fi
if want smoke; then
  phase "pytest bench/ on the GPU (each case once, --benchmark-disable)"
  run bench-smoke 150 $PY -m pytest bench -q -m gpu --benchmark-disable -p no:cacheprovider
fi

latest=$(ls -t "$RESULTS"/*.md 2>/dev/null | head -1)
phase "done in $(( $(date +%s) - t0 ))s; failed phases:${FAILED:- none}"
[ -n "$latest" ] && cat "$latest"
[ -z "$FAILED" ]
