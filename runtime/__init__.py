"""carvq runtime: cffi bindings to the patched libllama, chat, footprint. No torch needed."""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent

# How a tied CARVQ model computes its logits (docs/SCREEN.md): the patched llama.cpp reads the
# mode from CARVQ_HEAD, the number of exact candidates from CARVQ_SCREEN_K.
HEADS = ("auto", "screened", "dense")


def tool_path(name: str) -> Path:
    """Path of a bundled llama.cpp tool (llama-cli, llama-server, llama-perplexity, ...)."""
    return PACKAGE_DIR / "bin" / name


def library_dir() -> Path:
    return PACKAGE_DIR / "lib"


def __getattr__(name):
    if name == "Model":
        from carvq.runtime.model import Model

        return Model
    raise AttributeError(name)
