# Sourced by setup.sh, demo.sh and test.sh: choose the Python that carvq installs into.
#   - already in a venv or conda environment: that one;
#   - otherwise: the project venv .venv (created on first use). Debian 12+, Ubuntu 23.04+
#     and Raspberry Pi OS refuse `pip install` into the system Python (PEP 668), and a
#     venv keeps carvq's torch and llama.cpp apart from the system's packages anyway.
# $PYTHON picks the interpreter (default python3). Afterwards `python` and `carvq` are on PATH.
carvq_python=${PYTHON:-python3}
if ! command -v "$carvq_python" >/dev/null 2>&1; then
    echo "carvq: $carvq_python not found; install Python 3.10 or newer" >&2
    exit 1
fi
if ! "$carvq_python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
    echo "carvq: $("$carvq_python" --version 2>&1) is too old; carvq needs Python 3.10 or newer" >&2
    exit 1
fi
if "$carvq_python" -c 'import os, sys; sys.exit(0 if sys.prefix != sys.base_prefix or os.path.isdir(os.path.join(sys.prefix, "conda-meta")) else 1)'; then
    carvq_env=$("$carvq_python" -c 'import sys; print(sys.prefix)')
else
    carvq_env="$PWD/.venv"
    if [ ! -x "$carvq_env/bin/python" ]; then
        printf '\n== creating the project venv %s (not in a venv or conda environment)\n' "$carvq_env"
        if ! "$carvq_python" -m venv "$carvq_env"; then
            rm -rf "$carvq_env"
            echo "carvq: could not create a venv; on Debian, Ubuntu or Raspberry Pi OS: sudo apt install python3-venv" >&2
            exit 1
        fi
    fi
    carvq_python="$carvq_env/bin/python"
fi
# the environment's scripts (carvq, pytest) first on PATH, as `activate` would do
export PATH="$carvq_env/bin:$PATH" VIRTUAL_ENV="$carvq_env"
PY="$carvq_python"
