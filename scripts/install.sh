#!/usr/bin/env bash
# Installs what the tests, the lint and the scenario runner need into .venv (made with
# $PYTHON, default python3, if missing): pyfiq with its test extra, and the harness
# distribution (harness/: the scenario runner and the process helpers the tests share).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]" -e ./harness
