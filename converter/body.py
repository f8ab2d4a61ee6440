"""`--body-type`: the transformer body quantized by the bundled llama-quantize, which the
patch series teaches to pass the CARVQ tensors through untouched."""
from __future__ import annotations

import subprocess
from pathlib import Path

from carvq import gguf_io as gio
from carvq.errors import CarvqError


def quantize_body(src: Path, out: Path, body_type: str, keep_head: bool) -> None:
    """Quantize every tensor of `src` but the CARVQ ones into `out` (atomically);
    keep_head leaves output.weight as it is (a head copy the converter chose)."""
    from carvq.runtime import tool_path

    binary = tool_path("llama-quantize")
    if not binary.exists():
        raise CarvqError(f"--body-type needs the bundled llama-quantize, not found at {binary}")
    with gio.atomic_output(out) as tmp:
        cmd = [str(binary), *(["--leave-output-tensor"] if keep_head else []), str(src), str(tmp), body_type]
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            raise CarvqError(f"llama-quantize {body_type} failed: {lines[-1] if lines else proc.returncode}")
