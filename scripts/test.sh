#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what it needs, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
. scripts/python-env.sh
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
