#!/usr/bin/env bash
# One command for a GPU machine (issues 17, 31): the target-shape benchmark of the default kernels against the
# matmul floor and Liger, then correctness at that shape, the other CUDA kernel tests, the autotuned and atomic
# variants, and the compile report with the registers and spills the driver reports: in under 8 minutes, into
# one folder. Most valuable first: a run cut short keeps the stages that finished.
#
#   bash scripts/gpu_check.sh              # GPU machine (torch 2.11 / triton 3.6, offline): the real check
#   bash scripts/gpu_check.sh --dry-run    # CPU machine: the same stages on tiny shapes (Triton interpreter,
#                                          # torch paths, sm_90 builds without a driver); proves the script
#                                          # and checks that the GPU plan's caps fit its budget
#   options: --out DIR (default: $OUT if set, else runs/gpu_check/<mode>-<time>)
#   environment: PYTHON (default python3), FCTRAIN_GIT_SHA (recorded when the tree has no .git),
#                GPU_CHECK_BUDGET_S (whole run; default 470 s on a GPU: 8 minutes with room to bundle the logs,
#                1800 s for the dry run on a shared 2-core CPU, where it takes 1-3 minutes when quiet),
#                GPU_CHECK_CAPS (the stages' limits, below)
#
# It runs on what the machine has and installs nothing into it (no `pip install .[gpu]`: that extra would keep
# torch and triton, but the machine has no network): the repository goes on PYTHONPATH, the two peers' wheels
# into a scratch folder. env.json and summary.md list what is absent and so not measured (vLLM, flash-attn,
# torch.compile, the N/H/V sweeps, fp32 builds).
#
# Stages, in order, each under `timeout` with its own cap (GPU caps in brackets, 440 s in all; set from the first H200 run's times) and never past the
# overall budget (a stage that hangs is killed with all its children and the next one runs; one without time
# left is "skipped"):
#   env           [30] versions, device, driver, git sha, file fingerprint, what is skipped; stops the run if
#                      torch sees no GPU (GPU mode), pytest or ptxas is missing, or the kernels do not import
#   wheels        [30] liger-kernel and cut-cross-entropy from benchmarks/wheels, `pip --isolated --no-index`
#                      into a scratch folder put on PYTHONPATH
#   bench_target [100] benchmarks/bench_kernels.py forward+backward at N=16384, H=4096, V=151936: the default
#                      Triton path (fctrain-triton: forward + chunked backward) against the lm-head-matmul floor,
#                      Liger (GRPO, FLCE) and Cut Cross-Entropy; FCTRAIN_AUTOTUNE=0 (the default tile: two
#                      kernel builds, not eight)
#   tests_target  [45] the bf16 float64-reference test at the largest CUDA shape (4096, 2048, 151936), default
#                      backward, FCTRAIN_AUTOTUNE=0
#   tests        [150] the rest of tests/test_logprob_entropy.py + tests/test_grpo_loss.py on CUDA shapes
#                      (splits, autotune hook, spec, atomic backward, ...) with FCTRAIN_AUTOTUNE=0
#   bench_tuned   [55] the same target shape with autotuning on: fctrain-triton and fctrain-triton-atomic,
#                      forward+backward and forward only, beside the floor
#   compile       [30] benchmarks/gpu_compile.py: every bf16 tile of the three kernels for the device's own
#                      target, 16 builds in parallel, loaded through the driver (driver_registers,
#                      driver_spill_bytes); dry run: the default bf16 tile of fwd and dz for sm_90 with ptxas
#
# Output: at most 8 files, flat, so a device tool's $OUT brings all of it back: summary.md (read this),
# env.json, kernels_target.csv, kernels_tuned.csv, compile.csv, logs.tar.gz (every stage's full log).
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
STAGES=(env wheels bench_target tests_target tests bench_tuned compile)
GPU_CAPS=(30 30 100 45 150 55 30)
GPU_BUDGET=470
RESERVE=10  # seconds kept for the summary and the log bundle
if [ "$MODE" = gpu ]; then
  COMPILE_ARGS=(--targets native --driver --dtypes bf16 --jobs 16)
  # dtype1 = bf16, shape3 = (4096, 2048, 151936); "triton and not atomic": the default path (2 seeds). The other
  # shape3 cases (fp32, the atomic and torch backwards: float64 references of 311M-element weights) are left out.
  TARGET_SELECT=(-k "test_matches_float64_reference and dtype1 and shape3 and triton and not atomic")
  TEST_SELECT=(-k "not shape3")
  BENCH_TARGET=(--device cuda --plan target --modes fwd+bwd
                --providers lm-head-matmul,fctrain-triton,liger-grpo,liger-flce,cce)
  BENCH_TUNED=(--device cuda --plan target --modes fwd+bwd,fwd --ops grpo --entropy on
               --providers lm-head-matmul,fctrain-triton,fctrain-triton-atomic)
  CAPS=("${GPU_CAPS[@]}")
else
  COMPILE_ARGS=(--kernels fwd,dz --dtypes bf16 --targets sm_90 --configs 0 --jobs 2)
  TARGET_SELECT=(-k "test_matches_float64_reference and dtype1 and triton and shape1 and not atomic")
  TEST_SELECT=(-k "test_ignored_rows_get_no_gradient or test_zero_advantages_give_zero_policy_gradient or (test_parity_with_liger and dapo)")
  BENCH_TARGET=(--device cpu --shapes 256,32,512 --modes fwd+bwd --providers lm-head-matmul,fctrain-torch,liger-grpo
                --min-reps 1 --min-time 0 --no-isolate)
  BENCH_TUNED=(--device cpu --shapes 256,32,512 --modes fwd --providers lm-head-matmul,fctrain-torch,naive-eager
               --min-reps 1 --min-time 0 --no-isolate)
  CAPS=(600 600 600 600 600 600 600)  # generous: on a busy shared 2-core machine even `import torch` can take minutes
fi
# GPU_CHECK_CAPS="env wheels bench_target tests_target tests bench_tuned compile" in seconds overrides the caps
# (0 skips a stage), e.g. to rerun only the benchmarks: GPU_CHECK_CAPS="30 30 300 0 0 120 0"
[ -n "${GPU_CHECK_CAPS:-}" ] && read -ra CAPS <<<"$GPU_CHECK_CAPS"
if [ "${#CAPS[@]}" != 7 ] || [[ ! "${CAPS[*]}" =~ ^[0-9\ ]+$ ]]; then
  echo "gpu_check: GPU_CHECK_CAPS wants 7 whole numbers of seconds, got '${GPU_CHECK_CAPS:-}'" >&2
  exit 2
fi
# The GPU plan must fit its budget whatever mode runs: the dry run is where this is checked before device time.
GPU_PLAN_S=$(( $(IFS=+; echo "${GPU_CAPS[*]}") + RESERVE ))
if [ "$GPU_PLAN_S" -gt "$GPU_BUDGET" ]; then
  echo "gpu_check: the GPU stages' caps (${GPU_CAPS[*]}) plus $RESERVE s exceed the $GPU_BUDGET s budget" >&2
  exit 2
fi

OUT_DIR=${OUT_DIR:-runs/gpu_check/$MODE-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
if [ -n "$(ls -A "$OUT_DIR")" ]; then echo "gpu_check: $OUT_DIR is not empty" >&2; exit 2; fi

BUDGET=${GPU_CHECK_BUDGET_S:-$([ "$MODE" = gpu ] && echo "$GPU_BUDGET" || echo 1800)}
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
echo "[gpu_check] GPU plan: $(for i in "${!STAGES[@]}"; do printf '%s %s s, ' "${STAGES[$i]}" "${GPU_CAPS[$i]}"; done)reserve $RESERVE s = $GPU_PLAN_S of $GPU_BUDGET s"
stage env "${CAPS[0]}" "$PY" scripts/gpu_check.py env --mode "$MODE" --out "$OUT_DIR/env.json" || finish
stage wheels "${CAPS[1]}" "$PY" scripts/gpu_check.py wheels --site "$WORK/site"
stage bench_target "${CAPS[2]}" env FCTRAIN_AUTOTUNE=0 "${BENCH[@]}" "${BENCH_TARGET[@]}" --out "$OUT_DIR/kernels_target.csv"
stage tests_target "${CAPS[3]}" env FCTRAIN_AUTOTUNE=0 "${PYTEST[@]}" tests/test_logprob_entropy.py "${TARGET_SELECT[@]}"
stage tests "${CAPS[4]}" env FCTRAIN_AUTOTUNE=0 "${PYTEST[@]}" "${KERNEL_TESTS[@]}" "${TEST_SELECT[@]}"
stage bench_tuned "${CAPS[5]}" "${BENCH[@]}" "${BENCH_TUNED[@]}" --out "$OUT_DIR/kernels_tuned.csv"
stage compile "${CAPS[6]}" "$PY" benchmarks/gpu_compile.py "${COMPILE_ARGS[@]}" --out "$OUT_DIR/compile.csv"
finish
