"""The runtime (chat, generate, footprint, bench) must not need torch or transformers: a
Raspberry Pi user installs only numpy, cffi and gguf-py. The emulated Pi tests prove it on
arm64; this checks the same in-process here, where torch is installed, by refusing its import."""
from __future__ import annotations

import subprocess
import sys

CODE = """
import builtins
real = builtins.__import__
def refuse(name, *args, **kwargs):
    if name.split('.')[0] in ('torch', 'transformers', 'sentencepiece', 'safetensors'):
        raise ImportError('the runtime imported ' + name)
    return real(name, *args, **kwargs)
builtins.__import__ = refuse
from carvq.cli import build_parser
from carvq.runtime.model import Model
from carvq.runtime.footprint import footprint
for argv in (['chat', 'm.gguf'], ['generate', 'm.gguf', '-p', 'x'], ['footprint', 'm.gguf'], ['inspect', 'm.gguf']):
    build_parser().parse_args(argv)
print('ok')
"""


def test_runtime_and_cli_parser_import_without_torch():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, errors="replace", timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
