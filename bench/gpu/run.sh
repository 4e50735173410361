#!/usr/bin/env bash
# The one prepared GPU run: build for sm_90, the CUDA tests (stop at the first failure),
# compute-sanitizer over a short workload, the GPU benchmarks with their peers; every figure
# into OUT_DIR as CSV (device, versions, date, shape on each row) plus summary.md.
#
#   bash bench/gpu/run.sh OUT_DIR             # an H200 machine: about 8 minutes in all
#   bash bench/gpu/run.sh --dry-run OUT_DIR   # the CPU, tiny shapes, no build (CI runs it)
#
# Optional wheels (trl, mergekit, liger-kernel; no registry on the GPU machine) are installed
# from bench/gpu/wheels/*.whl with --no-index --no-deps when that (git-ignored) folder has any.
# Each step has a time limit inside an overall budget, and a failed step does not stop the
# later ones (a broken kernel's benchmark still says something), except a failed build.
# Afterwards: copy OUT_DIR/summary.md and figures.csv to bench/results/ (see its README).
set -uo pipefail
cd "$(dirname "$0")/../.."

dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
[ $# -eq 1 ] || { echo "usage: bash bench/gpu/run.sh [--dry-run] OUT_DIR" >&2; exit 2; }
out=$1
mkdir -p "$out/raw" || exit 2
log="$out/raw/run.log"
: > "$log"
echo "step,status,seconds,detail" > "$out/raw/steps.csv"
budget=$([ $dry = 1 ] && echo 240 || echo 470)  # seconds for every step together
deadline=$((SECONDS + budget))
failed=0

# step NAME LIMIT_S CMD...: runs CMD with its output in the log, within LIMIT_S and the budget.
step() {
  local name=$1 limit=$2 t0=$SECONDS rc status detail=""
  shift 2
  local left=$((deadline - SECONDS))
  [ "$limit" -le "$left" ] || limit=$left
  if [ "$limit" -lt 5 ]; then
    echo "$name,skipped,0,no time left in the ${budget} s budget" >> "$out/raw/steps.csv"
    echo "== $name: skipped (budget spent)" | tee -a "$log"
    failed=1
    return 1
  fi
  echo "== $name (limit ${limit} s): $*" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timeout; detail="past ${limit} s" ;;
    *) status=failed; detail="exit $rc"; ;;
  esac
  [ $rc = 0 ] || failed=1
  echo "$name,$status,$((SECONDS - t0)),$detail" >> "$out/raw/steps.csv"
  echo "== $name: $status in $((SECONDS - t0)) s" | tee -a "$log"
  return $rc
}

if [ $dry = 1 ]; then
  device=cpu
  export CUDA_VISIBLE_DEVICES=""  # the dry run must not touch a GPU even where there is one
else
  device=cuda
fi

shopt -s nullglob
wheels=(bench/gpu/wheels/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
  step wheels 60 python -m pip install --no-index --no-deps "${wheels[@]}"
fi

if [ $dry = 0 ]; then
  step build 180 env MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 python setup.py build_ext --inplace &&
    step build-check 30 python -c "import dafast, sys; b = dafast.build_info(); print(b); \
sys.exit(0 if 'cuda' in b.get('backends', []) else 'dafast was built without CUDA')"
  if [ $? != 0 ]; then
    python bench/gpu/figures.py report "$out"
    echo "run.sh: the build failed; see $log" >&2
    exit 1
  fi
  step tests 110 python -m pytest -m cuda -x -q -p no:cacheprovider --junitxml="$out/raw/tests.xml" tests
else  # no GPU: the selection must still collect
  step tests 60 python -m pytest -m cuda --collect-only -q -p no:cacheprovider tests
fi

sanitizer=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer 2>/dev/null || true)
if [ $dry = 1 ]; then
  step sanitize-workload 30 python bench/gpu/sanitize.py --device cpu
elif [ -n "$sanitizer" ]; then
  # Only dafast's kernels are instrumented (cuBLAS under memcheck would take minutes).
  step memcheck 60 "$sanitizer" --tool memcheck --kernel-name kns=dafast --error-exitcode 9 \
    --print-limit 20 python bench/gpu/sanitize.py
  step racecheck 40 "$sanitizer" --tool racecheck --kernel-name kns=dafast --error-exitcode 9 \
    --print-limit 20 python bench/gpu/sanitize.py --only reductions
else
  echo "memcheck,skipped,0,compute-sanitizer not found" >> "$out/raw/steps.csv"
fi

# bench/'s own files at their GPU shapes (Llama-3.1-8B; peers PEFT, TRL's chunked kernel,
# Liger-Kernel): in the dry run one small case, still timed so that its JSON is converted.
if [ $dry = 1 ]; then
  step bench 60 python -m pytest -q -p no:cacheprovider bench/test_lora_linear.py \
    -k "layer and fp32 and 576x576" --benchmark-json="$out/raw/bench.json"
else
  step bench 120 python -m pytest -q -p no:cacheprovider bench/test_lora_linear.py -k "layer or loss_step" \
    bench/test_linear_logprobs.py --benchmark-json="$out/raw/bench.json"
fi
step steps 100 python bench/gpu/steps.py "$out/raw/figures_steps.csv" \
  $([ $dry = 1 ] && echo --dry-run)

python bench/gpu/figures.py report "$out" >> "$log" 2>&1 || failed=1
echo "run.sh: $([ $failed = 0 ] && echo 'every step ok' || echo 'some steps failed') ($device," \
  "$SECONDS s); summary: $out/summary.md"
exit $failed
