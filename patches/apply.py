"""Make the patched llama.cpp tree: pristine tree + patches/src/* + patches/*.patch in order.

The result is synced into DEST file by file, touching only files whose content changed,
so that after a patch edit ninja rebuilds only what the patch touches, not the world.
A hunk that does not apply stops the build with the patch's name and git's message.

    python patches/apply.py --source PRISTINE --dest BUILD/llama.cpp
"""
from __future__ import annotations

import argparse
import filecmp
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Our own sources, copied into the tree before patching (tree path -> our path).
OWN_SOURCES = {f"src/{name}": HERE / "src" / name for name in ("carvq.c", "carvq.h", "carvq-screen.c", "carvq-screen.h",
                                                                "llama-carvq.h", "llama-carvq.cpp")}


STOCK = False  # --stock: the pristine tree, for comparisons against unpatched llama.cpp


def series() -> list[Path]:
    return [] if STOCK else sorted(HERE.glob("*.patch"))


def own_sources() -> dict[str, Path]:
    return {} if STOCK else OWN_SOURCES


def fingerprint(source: Path) -> str:
    h = hashlib.sha256(f"{source.resolve()} stock={STOCK}".encode())
    for path in [*series(), *own_sources().values(), Path(__file__)]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def build_staging(source: Path, staging: Path) -> None:
    shutil.copytree(source, staging, symlinks=True)
    for rel, ours in own_sources().items():
        shutil.copyfile(ours, staging / rel)
    for patch in series():
        proc = subprocess.run(["git", "apply", "--verbose", "-p1", str(patch)], cwd=staging,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"carvq: patch {patch.name} does not apply to {source}:\n{proc.stderr.strip()}")


def sync(staging: Path, dest: Path) -> int:
    """Copy changed files only; delete files that the staging tree no longer has."""
    changed = 0
    seen = set()
    for root, dirs, files in os.walk(staging):
        rel_root = Path(root).relative_to(staging)
        (dest / rel_root).mkdir(parents=True, exist_ok=True)
        for name in files:
            rel = rel_root / name
            seen.add(rel)
            src, dst = staging / rel, dest / rel
            if dst.is_file() and not dst.is_symlink() and filecmp.cmp(src, dst, shallow=False):
                continue
            if dst.exists() or dst.is_symlink():
                dst.unlink()
            shutil.copy2(src, dst, follow_symlinks=False)
            os.utime(dst)  # newer than any object built from the old content
            changed += 1
    for root, _, files in os.walk(dest):
        for name in files:
            rel = Path(root).relative_to(dest) / name
            if rel not in seen and rel.parts[0] != ".carvq-stamp":
                (dest / rel).unlink()
                changed += 1
    return changed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--source", required=True, type=Path)
    ap.add_argument("--dest", required=True, type=Path)
    ap.add_argument("--stock", action="store_true", help="no patches: the pristine tree")
    args = ap.parse_args()
    global STOCK
    STOCK = args.stock
    stamp = args.dest / ".carvq-stamp"
    want = fingerprint(args.source)
    if stamp.is_file() and stamp.read_text() == want:
        return
    with tempfile.TemporaryDirectory(prefix="carvq-patch-") as tmp:
        staging = Path(tmp) / "tree"
        build_staging(args.source, staging)
        args.dest.mkdir(parents=True, exist_ok=True)
        changed = sync(staging, args.dest)
    stamp.write_text(want)
    print(f"carvq: {len(series())} patch(es) applied, {changed} file(s) updated in {args.dest}")


if __name__ == "__main__":
    main()
