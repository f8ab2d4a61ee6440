#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what it needs, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
# run from tests/: the repo root's carvq/ source folder must not shadow the installed package
cd tests && exec pytest -q -p no:cacheprovider "$@"
