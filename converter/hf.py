"""Hugging Face checkpoint -> GGUF, through the pinned llama.cpp's own convert_hf_to_gguf.py.

carvq does not reimplement HF-to-GGUF conversion: it runs llama.cpp's script from the
pinned tree (which imports the tree's gguf-py), then treats the result as a GGUF input.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from carvq.errors import CarvqError
from carvq.llama_source import source_tree


def is_hf_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists()


def convert_hf(model_dir: Path, out_file: Path, outtype: str = "auto") -> None:
    script = source_tree() / "convert_hf_to_gguf.py"
    cmd = [sys.executable, str(script), str(model_dir), "--outfile", str(out_file), "--outtype", outtype]
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # the script must use the tree's gguf-py
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not out_file.exists():
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        raise CarvqError(f"{model_dir}: llama.cpp's convert_hf_to_gguf.py failed: {last}")
