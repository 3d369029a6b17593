#!/usr/bin/env bash
# The one prepared GPU run (an H200 here): build and install the project, run the GPU tests for
# every backend, run the GPU benchmarks, write bench/results/<date>-<gpu>.{md,json}, print the
# table last. Designed to finish in ~5 minutes; every phase has its own time limit so that one
# hang cannot lose the rest. Logs and results are also copied to $OUT when it is set.
#
#   bash bench/gpu_suite.sh            # everything
#   SUITE_SKIP="tests" bash bench/gpu_suite.sh   # skip phases: install tests parity bench smoke demo
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS_DIR:-bench/results}
LOGDIR=${OUT:-/tmp/flowmatch_gpu_suite}
SKIP=" ${SUITE_SKIP:-} "
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
  phase "build + install: pip install --no-build-isolation --no-deps -e ."
  run install 240 bash -c "$PY -m pip install --no-build-isolation --no-deps -e . > '$LOGDIR/install.log' 2>&1"
  grep -E "flowmatch_fast|nvcc|cuda|Successfully|error" "$LOGDIR/install.log" | tail -8
fi
$PY -c "from flowmatch_fast import _cuda_euler as m; print('extension:', m.build_info())" || FAILED="$FAILED extension-import"
$PY -c "import flowmatch_fast as f; print('backends on cuda:', f.available_backends('cuda'))"

XDIST=""; $PY -c "import xdist" 2>/dev/null && XDIST="-n 8"
if want tests; then
  phase "tests: whole suite, default backend (auto = cuda extension), seed $FLOWMATCH_TEST_SEED"
  run tests 240 $PY -m pytest tests -q $XDIST -p no:cacheprovider -rs --durations=5
fi
if want parity; then
  for b in torch triton cuda; do
    phase "parity + methods + graphs on CUDA tensors through backend=$b"
    FLOWMATCH_FAST_BACKEND=$b run "parity-$b" 150 $PY -m pytest tests/test_parity.py \
      tests/test_methods.py tests/test_graphs.py -q -m gpu $XDIST -p no:cacheprovider
  done
fi
if want bench; then
  phase "benchmarks: bench/gpu_bench.py"
  run bench 300 $PY bench/gpu_bench.py --out "$RESULTS" --reps 100 --compile "${SUITE_COMPILE:-w1b6}"
fi
if want smoke; then
  phase "pytest bench/ on the GPU (each case once, --benchmark-disable)"
  run bench-smoke 150 $PY -m pytest bench -q -m gpu --benchmark-disable -p no:cacheprovider
fi
if want demo; then
  phase "demo on the GPU (fast mode, with the captured sampler)"
  run demo 120 $PY -m flowmatch_fast demo --device cuda --fast --out "$LOGDIR/demo_cuda.png"
fi

latest=$(ls -t "$RESULTS"/*.md 2>/dev/null | head -1)
[ -n "$latest" ] && cp "$latest" "${latest%.md}.json" "$LOGDIR/" 2>/dev/null
phase "done in $(( $(date +%s) - t0 ))s; failed phases:${FAILED:- none}"
[ -n "$latest" ] && cat "$latest"
[ -z "$FAILED" ]
