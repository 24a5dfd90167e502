#!/usr/bin/env bash
# The documentation site (mkdocs.yml, pages in docs/): `bash scripts/docs.sh` builds it into
# site/ with warnings as errors (a broken link, anchor or API reference fails), as the test
# suite does; `bash scripts/docs.sh serve` serves it on http://127.0.0.1:8000 and rebuilds on
# each change. Needs the docs extra (installed with .[test] by scripts/install.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# Material prints a notice about its successor on every build; it is not a warning of ours.
export NO_MKDOCS_2_WARNING=1
if [ "${1:-build}" = "serve" ]; then
  shift
  exec .venv/bin/python -m mkdocs serve "$@"
fi
exec .venv/bin/python -m mkdocs build --strict "$@"
