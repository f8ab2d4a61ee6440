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


# config.json "architectures" that convert_hf_to_gguf.py turns into one of format.ARCHITECTURES
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3", "Gemma3ForCausalLM": "gemma3", "Phi3ForCausalLM": "phi3",
}


def check_architecture(model_dir: Path) -> str:
    """Refuse a checkpoint before anything of it runs: its config.json must name an
    architecture carvq supports, and must not ask for code of its own (auto_map, which
    transformers would import with trust_remote_code; carvq never passes that)."""
    import json

    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CarvqError(f"{model_dir}/config.json: not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CarvqError(f"{model_dir}/config.json: not a JSON object")
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in HF_ARCHITECTURES:
        raise CarvqError(f"{model_dir}: architecture {archs!r} is not supported "
                         f"(supported: {', '.join(HF_ARCHITECTURES)})")
    # the model's own code: refused. A tokenizer_config.json auto_map stays inert, because the
    # pinned convert_hf_to_gguf.py passes trust_remote_code=True only for architectures outside
    # HF_ARCHITECTURES (deepseek, minimax, dream, Qwen 1, ...; checked in its conversion/ tree)
    if "auto_map" in config:
        raise CarvqError(f"{model_dir}: config.json asks for the checkpoint's own code (auto_map); "
                         "carvq never runs code from a checkpoint")
    return HF_ARCHITECTURES[archs[0]]


def convert_hf(model_dir: Path, out_file: Path, outtype: str = "auto") -> None:
    check_architecture(model_dir)
    script = source_tree() / "convert_hf_to_gguf.py"
    cmd = [sys.executable, str(script), str(model_dir), "--outfile", str(out_file), "--outtype", outtype]
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # the script must use the tree's gguf-py
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not out_file.exists():
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        raise CarvqError(f"{model_dir}: llama.cpp's convert_hf_to_gguf.py failed: {last}")
