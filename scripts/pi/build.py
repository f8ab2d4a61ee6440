"""Raspberry Pi (64-bit Arm) builds and an emulated Pi, on an x86-64 Debian machine.

    python scripts/pi/build.py wheels [--profiles pi4 pi5]   cross-built wheels in dist/pi/<profile>/
    python scripts/pi/build.py root [--suite bookworm]       the arm64 Debian root (cached)
    python scripts/pi/build.py venv --profile pi4            the wheel installed in an emulated venv
    python scripts/pi/build.py all                           all of it (tests/test_pi.py runs the checks)

Needs Debian's g++-aarch64-linux-gnu, qemu-user and debootstrap (scripts/pi.sh installs them).

The arm64 root is made without binfmt_misc and without chroot: `debootstrap --foreign`
downloads and verifies the packages, the debs are unpacked with the host's `dpkg-deb` (no
maintainer scripts run; nothing we use needs them), and every arm64 program runs as
`qemu-aarch64 <program>` with QEMU_LD_PREFIX=<root> and QEMU_CPU=<the profile's core>.
The venv's `bin/python` is a host shell script that starts qemu with argv[0] set to itself,
so Python's sys.executable is that script and subprocesses (pip, `carvq footprint`'s
children, console scripts) run emulated too.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
try:
    from carvq import llama_source  # carvq's cache location
except ImportError:  # not installed: the source tree's copy needs no build
    sys.path.insert(0, str(REPO / "src"))
    from carvq import llama_source

TOOLCHAIN = Path(__file__).resolve().parent / "aarch64-linux-gnu.cmake"
CROSS_TOOLS = {"aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu", "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
               "qemu-aarch64": "qemu-user", "debootstrap": "debootstrap", "dpkg-deb": "dpkg"}


@dataclass(frozen=True)
class Profile:
    name: str
    march: str  # GGML_CPU_ARM_ARCH and the harnesses' -march
    qemu_cpu: str  # the core qemu emulates: an instruction it lacks is SIGILL
    boards: str


PROFILES = {
    "pi4": Profile("pi4", "armv8-a", "cortex-a72", "Raspberry Pi 4, 400, CM4 (Cortex-A72); Pi 3, Zero 2 W (Cortex-A53)"),
    "pi5": Profile("pi5", "armv8.2-a+dotprod+fp16", "cortex-a76", "Raspberry Pi 5, 500, CM5 (Cortex-A76)"),
}
# Debian release -> its Python (Raspberry Pi OS follows Debian: bookworm, then trixie)
SUITES = {"bookworm": "3.11", "trixie": "3.13"}
DEFAULT_SUITE = "bookworm"
ROOT_PACKAGES = ["python3", "python3-venv", "libpython{py}-dev", "ca-certificates"]


class PiError(RuntimeError):
    pass


def cache_dir() -> Path:
    return llama_source.cache_dir() / "pi"


def missing_tools() -> list[str]:
    """Debian packages to install for the cross builds and the emulation (empty when all are there)."""
    return sorted({pkg for tool, pkg in CROSS_TOOLS.items() if shutil.which(tool) is None})


def require_tools() -> None:
    missing = missing_tools()
    if missing:
        raise PiError(f"missing the Arm cross tools; on Debian or Ubuntu: sudo apt install {' '.join(missing)}")


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def debian_mirror() -> str:
    """The machine's own Debian mirror (apt sources), else deb.debian.org."""
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*"))]:
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        for m in re.finditer(r"^(?:deb\s+(?:\[[^\]]*\]\s+)?|URIs:\s*)(\S+)", text, flags=re.M):
            url = m.group(1).rstrip("/")
            if url.endswith("/debian"):
                return url
    return "http://deb.debian.org/debian"


# ---- the arm64 root


def root_dir(suite: str = DEFAULT_SUITE) -> Path:
    return cache_dir() / f"root-{suite}-arm64"


def build_root(suite: str = DEFAULT_SUITE) -> Path:
    """A minimal arm64 Debian root with Python, its venv module and headers. Cached: a root
    that finished has a stamp file; an unfinished one is removed and made again."""
    if suite not in SUITES:
        raise PiError(f"unknown suite {suite!r}; one of {', '.join(SUITES)}")
    require_tools()
    root = root_dir(suite)
    stamp = root / ".carvq-root-done"
    if stamp.exists():
        return root
    if os.geteuid() != 0:
        raise PiError("debootstrap needs root (it unpacks files owned by root): run as root or with sudo")
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    py = SUITES[suite]
    include = ",".join(p.format(py=py) for p in ROOT_PACKAGES)
    _run(["debootstrap", "--arch=arm64", "--foreign", "--variant=minbase", f"--include={include}", suite, root,
          debian_mirror()])
    # the second stage without chroot: unpack every downloaded package (first stage did the required ones)
    debs = sorted((root / "var" / "cache" / "apt" / "archives").glob("*.deb"))
    if not debs:
        raise PiError(f"debootstrap left no packages in {root}/var/cache/apt/archives")
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    for deb in debs:
        deb.unlink()  # 100+ MB the root no longer needs
    python = root / "usr" / "bin" / f"python{py}"
    if not python.exists():
        raise PiError(f"the {suite} root has no {python.name}")
    # the dynamic loader's cache, so that arm64 programs find their libraries without qemu's help
    _run(["qemu-aarch64", root / "sbin" / "ldconfig", "-r", root], env=_qemu_env(root, "cortex-a72"))
    stamp.write_text(f"{suite} {debian_mirror()}\n")
    return root


def root_python(root: Path) -> Path:
    found = sorted(p for p in (root / "usr" / "bin").glob("python3.*") if re.fullmatch(r"python3\.\d+", p.name))
    if not found:
        raise PiError(f"no python3.X in {root}/usr/bin")
    return found[-1]


def _qemu_env(root: Path, cpu: str) -> dict:
    return dict(os.environ, QEMU_LD_PREFIX=str(root), QEMU_CPU=cpu)


# ---- the wheels


def wheel_dir(profile: str) -> Path:
    return REPO / "dist" / "pi" / profile


def build_wheel(profile: str, root: Path, python: str = sys.executable) -> Path:
    """carvq's wheel for one Pi profile, cross-built by pip + scikit-build-core with the
    aarch64 toolchain: the patched libllama, the tools and the cffi module (abi3)."""
    require_tools()
    prof = PROFILES[profile]
    py = root_python(root)
    include = _python_include(root, py.name)
    out = wheel_dir(profile)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    defines = {
        "CMAKE_TOOLCHAIN_FILE": TOOLCHAIN,
        "GGML_NATIVE": "OFF",
        "GGML_CPU_ARM_ARCH": prof.march,
        # no libgomp on the board needed: ggml's own thread pool
        "GGML_OPENMP": "OFF",
        "Python3_INCLUDE_DIR": include,
    }
    # the tag names the target (the stable ABI, as pyproject's wheel.py-api), not this machine
    cmd = [python, "-m", "pip", "wheel", REPO, "--no-deps", "-w", out, "-C", f"build-dir=build/pi-{profile}",
           "-C", "wheel.tags=cp310-abi3-linux_aarch64"]
    for k, v in defines.items():
        cmd += ["-C", f"cmake.define.{k}={v}"]
    _run(cmd)
    wheels = list(out.glob("carvq-*-linux_aarch64.whl"))
    if len(wheels) != 1:
        raise PiError(f"expected one carvq-*-linux_aarch64.whl in {out}, found {[w.name for w in out.iterdir()]}")
    _check_wheel_arch(wheels[0])
    return wheels[0]


def _python_include(root: Path, name: str) -> Path:
    """The root's Python headers in one folder: Debian's pyconfig.h only includes the
    multiarch one (<aarch64-linux-gnu/python3.X/pyconfig.h>), which is put in its place."""
    src = root / "usr" / "include" / name
    arch_config = root / "usr" / "include" / "aarch64-linux-gnu" / name / "pyconfig.h"
    if not (src / "Python.h").exists() or not arch_config.exists():
        raise PiError(f"{src}: the root lacks the Python headers (lib{name}-dev)")
    staged = cache_dir() / f"include-{root.name}" / name
    if not staged.exists():
        tmp = staged.with_name(staged.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        shutil.copy2(arch_config, tmp / "pyconfig.h")
        tmp.rename(staged)
    return staged


def _check_wheel_arch(wheel: Path) -> None:
    """Every ELF file in the wheel is AArch64 (e_machine 183): a host object that slipped in
    would only fail on the board."""
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            with z.open(info) as f:
                head = f.read(20)
            if head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") != 183:
                raise PiError(f"{wheel.name}: {info.filename} is not an AArch64 binary")


# ---- the emulated venv


def dependency_wheels(wheel: Path, py_version: str) -> Path:
    """carvq's runtime dependencies as aarch64 wheels from PyPI, downloaded on this machine
    (pip under emulation would resolve them 20x slower)."""
    out = cache_dir() / f"wheels-cp{py_version.replace('.', '')}"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "-d", out, "--only-binary=:all:", "--python-version", py_version,
           "--implementation", "cp"]
    for plat in ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64", "linux_aarch64"):
        cmd += ["--platform", plat]
    _run([*cmd, wheel])
    (out / wheel.name).unlink(missing_ok=True)  # the carvq wheel itself comes from dist/pi
    return out


LAUNCHER = """#!/bin/sh
# arm64 Python under qemu-user (scripts/pi/build.py): argv[0] is this script, so that
# sys.executable, and every subprocess of it, comes back here
export QEMU_LD_PREFIX='{root}'
export QEMU_CPU="${{CARVQ_QEMU_CPU:-{cpu}}}"
exec qemu-aarch64 -0 "$0" '{python}' "$@"
"""


def venv_dir(profile: str) -> Path:
    return cache_dir() / f"venv-{profile}"


def make_venv(profile: str, root: Path, wheel: Path) -> Path:
    """A fresh venv inside the emulated Pi with the wheel installed the way a Pi user does:
    `python3 -m venv`, then pip install (from the wheel and the downloaded aarch64 wheels)."""
    prof = PROFILES[profile]
    py = root_python(root)
    venv = venv_dir(profile)
    shutil.rmtree(venv, ignore_errors=True)
    env = _qemu_env(root, prof.qemu_cpu)
    _run(["qemu-aarch64", py, "-m", "venv", "--without-pip", venv], env=env)
    # replace the interpreter links with the launcher (a link to an arm64 binary cannot be exec'd here)
    for link in (venv / "bin").glob("python*"):
        link.unlink()
        link.write_text(LAUNCHER.format(root=root, cpu=prof.qemu_cpu, python=py))
        link.chmod(0o755)
    vpy = venv / "bin" / "python"
    _run([vpy, "-m", "ensurepip", "--default-pip"])
    deps = dependency_wheels(wheel, py.name[6:])
    _run([vpy, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index", "--find-links", deps, wheel])
    return venv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["wheels", "root", "venv", "all"])
    ap.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=list(PROFILES))
    ap.add_argument("--suite", default=DEFAULT_SUITE, choices=list(SUITES))
    args = ap.parse_args()
    try:
        root = build_root(args.suite)
        print(f"arm64 root: {root}")
        if args.what == "root":
            return
        for profile in args.profiles:
            wheel = build_wheel(profile, root)
            print(f"{profile} wheel: {wheel}")
            if args.what in ("venv", "all"):
                print(f"{profile} venv: {make_venv(profile, root, wheel)}")
    except (PiError, subprocess.CalledProcessError) as e:
        sys.exit(f"carvq pi: error: {e}")


if __name__ == "__main__":
    main()
