#!/usr/bin/env bash
# The GPU suite: what a session that is lent a GPU runs first, in one go (about 8 minutes on one H100 / H200).
#
#   bash benchmarks/gpu_suite.sh              # run every step
#   bash benchmarks/gpu_suite.sh --dry-run    # print the steps and their time limits, run nothing
#   bash benchmarks/gpu_suite.sh --only bench_train_tok,bench_sample_ar    # a subset, by step name
#
# Steps: the extension build (only if semanticist_fast._C is missing or has no CUDA kernels), the kernel tests on
# CUDA (no TRITON_INTERPRET), the GPU-only paths no CPU test reaches (the CUDA-graph replay; the export on CUDA
# against eager and the CompiledSampler's graphed path against its ungraphed one; issue 28's gpu_* checks: one
# cudart, the ZeRO step's syncs, flash under compile, bf16 sampling, DALI built once, a graphed bf16 export),
# bench_kernels, bench_train (tokenizer-L and AR-L: optimised vs plain eager, MFU), plan_check (`semanticist-fast
# plan` against bench_train's memory and speed), bench_sample (AR-L), and the DALI
# bench if benchmarks/bench_data.py exists. A step that fails or runs past its limit is logged and the suite goes
# on; the summary at the end lists each step's status and time, the store gets a `gpu_suite` record of each step's
# pass / fail (benchmarks/suite_record.py), and the exit status is 1 if any step failed.
#
# Results: every benchmark appends to benchmarks/results/history.jsonl; with $OUT set (the device runner's
# output folder) each record is appended to $OUT/history-new.jsonl too, and the logs and the summary go to
# $OUT/gpu_suite/. Back on the dev machine: python benchmarks/store.py import <that>/history-new.jsonl, then
# python benchmarks/report.py.
set -u
cd "$(dirname "$0")/.."

DRY_RUN=0
ONLY=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --only) ONLY="${2:-}"; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

PY="${PYTHON:-python}"
LOGS="${OUT:-benchmarks/results}/gpu_suite"
if [[ -n "${OUT:-}" ]]; then
  export BENCH_RESULTS_COPY="$OUT/history-new.jsonl"
fi
BUDGET_S="${GPU_SUITE_BUDGET_S:-540}"  # the whole suite (one device call is at most 600 s); a step never gets more than what is left of it
# The device machine runs a copy of the working tree, which may carry uncommitted edits: the records still note the
# commit and mark themselves dirty (benchmarks/common.py), so the store can tell them apart.
export BENCH_ALLOW_DIRTY="${BENCH_ALLOW_DIRTY:-1}"
START=$(date +%s)
NAMES=()
STATUS=()
SECONDS_TAKEN=()

# step NAME LIMIT_SECONDS COMMAND...: runs COMMAND with a time limit, logs it, records the outcome.
step() {
  local name="$1" limit="$2"
  shift 2
  if [[ -n "$ONLY" && ",$ONLY," != *",$name,"* ]]; then
    return 0
  fi
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  (( limit > left )) && limit=$left
  if [[ $DRY_RUN -eq 1 ]]; then
    printf '%-20s limit %4ss  %s\n' "$name" "$limit" "$*"
    return 0
  fi
  NAMES+=("$name")
  if (( limit < 10 )); then
    STATUS+=("skipped (suite budget spent)")
    SECONDS_TAKEN+=(0)
    mkdir -p "$LOGS"
    step_row "$name" "skipped (suite budget spent)" 0 "$limit"
    return 0
  fi
  mkdir -p "$LOGS"
  echo "=== $name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  tail -n 15 "$LOGS/$name.log"
  if [[ $rc -eq 0 ]]; then
    STATUS+=("ok")
  elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
    STATUS+=("TIMEOUT after ${limit}s")
  else
    STATUS+=("FAILED (exit $rc)")
  fi
  SECONDS_TAKEN+=("$took")
  step_row "$name" "${STATUS[-1]}" "$took" "$limit"
}

# steps.tsv: each step's name, status, seconds and limit, for the store's gpu_suite record.
step_row() {
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$LOGS/steps.tsv"
}

if [[ $DRY_RUN -eq 0 ]]; then
  mkdir -p "$LOGS"
  rm -f "$LOGS/steps.tsv"
  {
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    git rev-parse --short HEAD 2>/dev/null || echo "no git"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "no nvidia-smi"
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" 2>&1
  } | tee "$LOGS/environment.txt"
fi

NEEDS_BUILD=$("$PY" -c "from semanticist_fast.kernels import extension as e; print(0 if e.BUILT_WITH_CUDA else 1)" \
  2>/dev/null || echo 1)
if [[ "$NEEDS_BUILD" == "1" ]]; then
  step build_extension 150 env SEMANTICIST_WITH_CUDA=1 MAX_JOBS=16 "$PY" setup.py build_ext --inplace
fi
# The kernel tests on CUDA: Triton compiled for real, the C++/CUDA ops, the CUDA sources' compile check.
step kernel_tests 75 env -u TRITON_INTERPRET "$PY" -m pytest -q -x tests/test_kernels.py tests/test_cuda_compile.py
# The GPU-only paths (tests/test_export.py, skipped on CPU): the CUDA-graph replay; the tiny models exported on
# CUDA against eager, and the CompiledSampler's graphed path against its ungraphed one.
step cuda_graph_replay 30 "$PY" -m pytest -q -x tests/test_export.py -k graphed_call_replays
step export_cuda 120 "$PY" -m pytest -q -x tests/test_export.py -k "cuda_export_reproduces or graphed_path_equals"
# Issue 28's GPU-only checks (tests/test_gpu_paths.py etc.; each skips on a CPU): one libcudart in the process, no
# host sync from our ZeRO step, flash-attn under a fullgraph compile (head dims 64 and 72), bf16 sampling against
# fp32, the DALI nvJPEG pipeline built once, and a bf16 CUDA export replayed from CUDA graphs (run last: it compiles).
GPU_PATHS=(env -u TRITON_INTERPRET "$PY" -m pytest -q -s -rs)
step gpu_one_cudart 40 "${GPU_PATHS[@]}" tests/test_cuda_compile.py -k one_cuda_runtime
step gpu_zero_no_sync 60 "${GPU_PATHS[@]}" tests/test_gpu_paths.py -k zero_step_adds_no_host_sync
step gpu_flash_compile 60 "${GPU_PATHS[@]}" tests/test_gpu_paths.py -k flash_dispatch_under_fullgraph
step gpu_bf16_sampling 45 "${GPU_PATHS[@]}" tests/test_gpu_paths.py -k bf16_sampling_tracks_fp32
step gpu_dali_built_once 45 "${GPU_PATHS[@]}" tests/test_dali.py -k "built_once and cuda"
step bench_kernels 60 "$PY" benchmarks/bench_kernels.py --compiled-reference
step bench_train_tok 120 "$PY" benchmarks/bench_train.py --preset tokenizer-L --batch 64
step bench_train_ar 90 "$PY" benchmarks/bench_train.py --preset ar-L --batch 256
# The planner beside what bench_train just measured (peak memory, images/s): a plan_check record.
step plan_check 60 "$PY" benchmarks/plan_check.py
step bench_sample_ar 75 "$PY" benchmarks/bench_sample.py --size L --batch 64 --bf16 --head-steps 250 --repeats 2
if [[ -f benchmarks/bench_data.py ]]; then
  step bench_data 90 "$PY" benchmarks/bench_data.py --device cuda --preset tokenizer-L --images 1024 --workers 8 --train-batch 64
elif [[ $DRY_RUN -eq 1 ]]; then
  echo "(bench_data: benchmarks/bench_data.py does not exist here; skipped)"
fi

step gpu_export_graphs 150 "${GPU_PATHS[@]}" tests/test_gpu_paths.py -k bf16_export_replays_from_cuda_graphs

[[ $DRY_RUN -eq 1 ]] && exit 0
FAILED=0
{
  echo "GPU suite: $(( $(date +%s) - START )) s in all (budget ${BUDGET_S} s)"
  for i in "${!NAMES[@]}"; do
    printf '  %-20s %-32s %5ss\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECONDS_TAKEN[$i]}"
    [[ "${STATUS[$i]}" == ok ]] || FAILED=1
  done
  echo "logs: $LOGS; results: benchmarks/results/history.jsonl${BENCH_RESULTS_COPY:+ and $BENCH_RESULTS_COPY}"
} | tee "$LOGS/summary.txt"
# The summary ran in a pipeline (a subshell): read the outcome back from the statuses.
for s in "${STATUS[@]}"; do [[ "$s" == ok ]] || FAILED=1; done
if [[ -s "$LOGS/steps.tsv" ]]; then
  "$PY" benchmarks/suite_record.py "$LOGS/steps.tsv" || echo "could not write the gpu_suite record" >&2
fi
exit $FAILED
