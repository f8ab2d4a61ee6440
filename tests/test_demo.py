"""The README's first command, scripts/demo.sh, end to end in the Python running the tests
(CI: a venv made fresh for the run): install, convert SmolLM2, show the savings, chat."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_shrinks_the_file_and_chats():
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], capture_output=True, text=True, errors="replace",
                          env=env, timeout=3600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    m = re.search(r"^file: ([0-9.]+) MiB -> ([0-9.]+) MiB", proc.stdout, re.M)
    assert m, proc.stdout[-3000:]
    assert float(m.group(2)) < float(m.group(1)), m.group(0)
    chat = proc.stdout.split("== carvq chat", 1)[-1]
    assert "Paris" in chat, chat[-2000:]
