#!/usr/bin/env bash
# One command for a GPU machine (issue 17): the CUDA kernel tests, the compile report with the registers and
# spills the driver reports, and the kernel benchmark at the target shape, in under 8 minutes, into one folder.
#
#   bash scripts/gpu_check.sh              # GPU machine (torch 2.11 / triton 3.6, offline): the real check
#   bash scripts/gpu_check.sh --dry-run    # CPU machine: the same stages on tiny shapes (Triton interpreter,
#                                          # torch paths, sm_90 builds without a driver); proves the script
#   options: --out DIR (default: $OUT if set, else runs/gpu_check/<mode>-<time>)
#   environment: PYTHON (default python3), FCTRAIN_GIT_SHA (recorded when the tree has no .git),
#                GPU_CHECK_BUDGET_S (whole run; default 470 s on a GPU: 8 minutes with room to bundle the logs,
#                1800 s for the dry run on a shared 2-core CPU, where it takes 30-60 s when quiet),
#                GPU_CHECK_CAPS (the stages' limits, below)
#
# Stages, in order, each under `timeout` with its own cap and never past the overall budget (a stage that
# hangs is killed with all its children and the next one runs; one without time left is "skipped"):
#   env             versions, device, driver, git sha, file fingerprint; stops the run if torch sees no GPU
#                   (GPU mode) or the kernels do not import under this torch/triton
#   wheels          liger-kernel and cut-cross-entropy from benchmarks/wheels, `pip --isolated --no-index`
#                   into a scratch folder put on PYTHONPATH
#   compile         benchmarks/gpu_compile.py: GPU: every kernel x config x dtype for the device's own target,
#                   loaded through the driver (driver_registers, driver_spill_bytes); dry run: the default
#                   bf16 tile of each kernel for sm_90 with ptxas
#   tests           tests/test_logprob_entropy.py + tests/test_grpo_loss.py (CUDA shapes on a GPU) with
#                   FCTRAIN_AUTOTUNE=0: one tile per kernel, so that compiling fits the budget
#   tests_autotune  the bf16 Triton float64-reference test at the largest CUDA shape with autotuning on (the
#                   tiles the benchmark times)
#   bench_fwd_bwd   benchmarks/bench_kernels.py forward+backward at N=16384, H=4096, V=151936 (every provider
#   bench_fwd       but torch.compile), then forward only; a tiny CPU shape in the dry run
#
# Output: at most 8 files, flat, so a device tool's $OUT brings all of it back: summary.md (read this),
# env.json, compile.csv, kernels_fwd_bwd.csv, kernels_fwd.csv, logs.tar.gz (every stage's full log).
# Exit status 0 only if every stage passed. benchmarks/README.md says how to commit the results.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

MODE=gpu
OUT_DIR=${OUT:-}
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) MODE=dry-run ;;
    --out) OUT_DIR=${2:?--out needs a folder}; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || { echo "gpu_check: no python at '$PY' (set PYTHON)" >&2; exit 2; }

# What each stage runs: GPU mode, then the dry run's tiny versions.
PYTEST=("$PY" -m pytest -v -rfE -p no:cacheprovider)  # -v: a run cut off by its limit still names what passed
KERNEL_TESTS=(tests/test_logprob_entropy.py tests/test_grpo_loss.py)
BENCH=("$PY" benchmarks/bench_kernels.py --no-plot)
if [ "$MODE" = gpu ]; then
  COMPILE_ARGS=(--targets native --driver)
  TEST_SELECT=()
  # dtype1 = bf16, shape3 = (4096, 2048, 151936): the specialisation (multiples of 16) the benchmark launches
  AUTOTUNE_SELECT=(-k "test_matches_float64_reference and dtype1 and triton and shape3")
  BENCH_ARGS=(--device cuda --plan target
              --providers lm-head-matmul,fctrain-triton,fctrain-triton-atomic,fctrain-torch,naive-eager,liger-grpo,liger-flce,cce)
  CAPS=(60 90 120 150 90 150 90)
else
  COMPILE_ARGS=(--kernels fwd,bwd --dtypes bf16 --targets sm_90 --configs 0)
  TEST_SELECT=(-k "test_ignored_rows_get_no_gradient or test_zero_advantages_give_zero_policy_gradient or (test_parity_with_liger and dapo)")
  AUTOTUNE_SELECT=(-k "test_matches_float64_reference and dtype1 and triton and shape1")
  BENCH_ARGS=(--device cpu --shapes 256,32,512 --providers lm-head-matmul,fctrain-torch,naive-eager,liger-grpo
              --min-reps 1 --min-time 0 --no-isolate)
  CAPS=(600 600 600 600 600 600 600)  # generous: on a busy shared 2-core machine even `import torch` can take minutes
fi
# GPU_CHECK_CAPS="env wheels compile tests tests_autotune bench_fwd_bwd bench_fwd" in seconds overrides the caps
# (0 skips a stage), e.g. to rerun only the benchmark: GPU_CHECK_CAPS="60 90 0 0 0 300 90"
[ -n "${GPU_CHECK_CAPS:-}" ] && read -ra CAPS <<<"$GPU_CHECK_CAPS"
if [ "${#CAPS[@]}" != 7 ] || [[ ! "${CAPS[*]}" =~ ^[0-9\ ]+$ ]]; then
  echo "gpu_check: GPU_CHECK_CAPS wants 7 whole numbers of seconds, got '${GPU_CHECK_CAPS:-}'" >&2
  exit 2
fi

OUT_DIR=${OUT_DIR:-runs/gpu_check/$MODE-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
if [ -n "$(ls -A "$OUT_DIR")" ]; then echo "gpu_check: $OUT_DIR is not empty" >&2; exit 2; fi

BUDGET=${GPU_CHECK_BUDGET_S:-$([ "$MODE" = gpu ] && echo 470 || echo 1800)}
RESERVE=10  # seconds kept for the summary and the log bundle
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOGS=$WORK/logs
mkdir -p "$LOGS"
export PYTHONPATH=$WORK/site:$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export FCTRAIN_GIT_SHA=${FCTRAIN_GIT_SHA:-$(git rev-parse --short=12 HEAD 2>/dev/null || true)}
unset TRITON_INTERPRET  # each tool decides: pytest's conftest and bench_kernels set it on CPU only
FAILED=0

# stage NAME CAP_S COMMAND...: run COMMAND under timeout (min of CAP_S and the budget left), log to
# LOGS/NAME.log, append "name, status, seconds, limit, command" to LOGS/stages.tsv, refresh summary.md.
stage() {
  local name=$1 cap=$2 left limit status start rc
  shift 2
  left=$((BUDGET - RESERVE - SECONDS))
  limit=$((cap < left ? cap : left))
  start=$SECONDS
  if [ "$limit" -lt 5 ]; then
    status=skipped
    echo "skipped: limit $cap s (GPU_CHECK_CAPS), $left s left of the $BUDGET s budget" >"$LOGS/$name.log"
  else
    timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    case $rc in
      0) status=ok ;;
      124|137) status=timeout ;;
      *) status="failed (exit $rc)" ;;
    esac
  fi
  [ "$status" = ok ] || FAILED=1
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" $((SECONDS - start)) "$limit" "$*" >>"$LOGS/stages.tsv"
  echo "[gpu_check] $(printf '%-15s' "$name") $status after $((SECONDS - start)) s (limit $limit s)"
  "$PY" scripts/gpu_check.py summary --out "$OUT_DIR" --logs "$LOGS" || true
  [ "$status" = ok ]
}

finish() {
  "$PY" scripts/gpu_check.py summary --out "$OUT_DIR" --logs "$LOGS" || true
  tar -czf "$OUT_DIR/logs.tar.gz" -C "$WORK" logs
  rm -rf "$WORK"
  echo "[gpu_check] $MODE finished in $SECONDS s -> $OUT_DIR: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
  [ "$FAILED" = 0 ] && echo "[gpu_check] all stages ok" || echo "[gpu_check] some stages did not pass: see summary.md"
  exit "$FAILED"
}

echo "[gpu_check] $MODE run, budget $BUDGET s, output $OUT_DIR"
stage env "${CAPS[0]}" "$PY" scripts/gpu_check.py env --mode "$MODE" --out "$OUT_DIR/env.json" || finish
stage wheels "${CAPS[1]}" "$PY" scripts/gpu_check.py wheels --site "$WORK/site"
stage compile "${CAPS[2]}" "$PY" benchmarks/gpu_compile.py "${COMPILE_ARGS[@]}" --out "$OUT_DIR/compile.csv"
stage tests "${CAPS[3]}" env FCTRAIN_AUTOTUNE=0 "${PYTEST[@]}" "${KERNEL_TESTS[@]}" "${TEST_SELECT[@]}"
stage tests_autotune "${CAPS[4]}" "${PYTEST[@]}" tests/test_logprob_entropy.py "${AUTOTUNE_SELECT[@]}"
stage bench_fwd_bwd "${CAPS[5]}" "${BENCH[@]}" "${BENCH_ARGS[@]}" --modes fwd+bwd --out "$OUT_DIR/kernels_fwd_bwd.csv"
stage bench_fwd "${CAPS[6]}" "${BENCH[@]}" "${BENCH_ARGS[@]}" --modes fwd --out "$OUT_DIR/kernels_fwd.csv"
finish
