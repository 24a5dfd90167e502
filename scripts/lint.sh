#!/usr/bin/env bash
# The lint: ruff (check and format) over every Python tree of the repository, and mypy strict
# over the packages pyproject.toml lists (pyfiq, the harness, the benchmarks). Run after
# scripts/install.sh; scripts/test.sh and CI's lint job both run this file.
set -euo pipefail
cd "$(dirname "$0")/.."

TREES=(pyfiq harness benchmarks tests scripts examples)
.venv/bin/ruff check "${TREES[@]}"
.venv/bin/ruff format --check "${TREES[@]}"
.venv/bin/mypy
