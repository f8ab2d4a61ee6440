"""The pinned llama.cpp source tree: fetched from PyPI by package name, verified, cached.

carvq never commits llama.cpp. Its source is the `vendor/llama.cpp` of the
llama-cpp-python sdist below, fetched with pip, checked against a fixed sha256 and
unpacked once into the user cache. Standard library only: CMake runs this file as a
script before anything else is installed.

    python carvq/llama_source.py          # prints the path of the unpacked tree
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
SDIST = "llama_cpp_python-0.3.36.tar.gz"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
COMMIT = "0c1e57098"
VENDOR_DIR = "llama_cpp_python-0.3.36/vendor/llama.cpp"


def cache_dir() -> Path:
    root = os.environ.get("CARVQ_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "carvq")
    return Path(root)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(dest_dir: Path) -> Path:
    """pip download of the sdist alone. --no-build-isolation keeps pip from building
    cmake from source just to read the sdist's metadata."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    sdist = dest_dir / SDIST
    if not sdist.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-build-isolation",
               "--no-binary", PACKAGE, f"{PACKAGE}=={VERSION}", "-d", str(dest_dir)]
        subprocess.run(cmd, check=True, stdout=sys.stderr)
    digest = _sha256(sdist)
    if digest != SHA256:
        sdist.unlink()
        raise SystemExit(f"carvq: {SDIST} has sha256 {digest}, expected {SHA256}; deleted it")
    return sdist


def source_tree() -> Path:
    """Path of the pristine, unpacked llama.cpp tree (fetching it when absent)."""
    override = os.environ.get("CARVQ_LLAMA_CPP_DIR")
    if override:
        return Path(override)
    tree = cache_dir() / f"llama.cpp-{COMMIT}"
    if (tree / "CMakeLists.txt").exists():
        return tree
    sdist = _download(cache_dir() / "downloads")
    staging = Path(tempfile.mkdtemp(prefix="llama.cpp-", dir=cache_dir()))
    try:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(VENDOR_DIR + "/")]
            tar.extractall(staging, members=members, filter="data")
        unpacked = staging / VENDOR_DIR
        # The sdist's vendor/llama.cpp/.git is a gitlink into a repo that is not there.
        git_link = unpacked / ".git"
        if git_link.is_file():
            git_link.unlink()
        os.replace(unpacked, tree)  # atomic: a half-unpacked tree is never visible
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tree


if __name__ == "__main__":
    print(source_tree())
