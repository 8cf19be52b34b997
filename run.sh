#!/usr/bin/env bash
# README command 1: the main job. Sets itself up, then runs the failure drill on
# the built-in tiny MoE (extra arguments go to `vllm-elastic-ft drill`).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/vllm-elastic-ft drill "$@"
