#!/usr/bin/env bash
# The test command: prepares everything it needs on a fresh machine, then lints, type-checks
# and runs the suite. Extra arguments go to pytest (e.g. scripts/test.sh -k fencing).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "redis-server not found: installing it with apt-get" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis-server is required by the test suite (the tests start their own servers)." >&2
    echo "Install it first, e.g. 'sudo apt-get install redis-server' or 'brew install redis'." >&2
    exit 1
  fi
fi

# The dashboard's browser tests drive a real headless Chromium through Playwright (installed
# with .[test]); they use the system's browser, never a downloaded one, and are never skipped.
if [ -z "${PYFIQ_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "chromium not found: installing it with apt-get" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "chromium is required by the dashboard's browser tests." >&2
    echo "Install it first, e.g. 'sudo apt-get install chromium', or set PYFIQ_CHROMIUM to a Chromium or Chrome binary." >&2
    exit 1
  fi
fi

# The Django integration's commit and rollback tests run on a private PostgreSQL server the
# suite starts (initdb + pg_ctl on a free port), never on one already running.
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "PostgreSQL not found: installing it with apt-get" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "PostgreSQL (initdb, pg_ctl) is required by the Django integration's tests." >&2
    echo "Install it first, e.g. 'sudo apt-get install postgresql' or 'brew install postgresql'." >&2
    exit 1
  fi
fi

bash scripts/install.sh
bash scripts/lint.sh
exec .venv/bin/python -m pytest "$@"
