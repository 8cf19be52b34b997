#!/usr/bin/env bash
# README command 2: the tests. Sets itself up, then runs pytest (extra
# arguments go to pytest, e.g. `./test.sh -m "not e2e"` for the fast suite).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/python -m pytest -v -ra "$@"
