#!/usr/bin/env bash
# Raspberry Pi on an x86-64 Debian/Ubuntu machine, in one command (docs/raspberry-pi.md):
# cross-builds the Pi 4 and Pi 5 wheels (dist/pi/<profile>/), builds an arm64 Debian root
# (debootstrap, cached under ~/.cache/carvq/pi), installs each wheel there with pip and runs
# the emulated checks under qemu-user on each profile's core (tests/test_pi.py and the NEON
# harnesses). Needs root once, for apt and debootstrap.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
. scripts/python-env.sh
export CARVQ_REQUIRE_PI=1  # fail, never skip, when the cross tools are missing
exec "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_pi.py \
    tests/test_c_decoder.py::test_harness_neon_under_qemu tests/test_screen.py::test_scan_check_neon_under_qemu "$@"
