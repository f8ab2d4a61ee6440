"""The converter at LLaMA-3.2-1B's embedding shape (128256 x 2048), on a synthetic model: its
peak memory stays within 3x the F32 embedding (issue 14), whatever the model's size. The model
is tied, so `carvq convert` with no flags makes its default for a tied model: the coded head at
3.0 bpw (6 + 4 levels, the beam search and the polish through up to 10 levels a row).

The model is random (one small block beside the embedding), since no such real model is
available offline; memory and time do not depend on the values. Time is printed (rows/s),
not asserted: speed belongs to benchmarks (bench/convert.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

V, N = 128256, 2048  # LLaMA-3.2-1B
F32_BYTES = V * N * 4


def _synthetic_llama(path: Path) -> None:
    """A GGUF the converter accepts: llama metadata, an F16 token_embd of the full shape (tied:
    no output.weight) and one block of small tensors."""
    import gguf

    from carvq import gguf_io as gio

    w = gguf.GGUFWriter(None, "llama")
    w.add_uint32("llama.embedding_length", N)
    w.add_uint32("llama.block_count", 1)
    w.add_uint32("llama.feed_forward_length", 64)
    w.add_uint32("llama.attention.head_count", 16)
    rng = np.random.default_rng(0)
    embd = np.empty((V, N), np.float16)
    for a in range(0, V, 16384):  # rows with unequal scales, as real embeddings have
        rows = rng.standard_normal((min(V, a + 16384) - a, N), np.float32)
        embd[a : a + 16384] = rows * rng.uniform(0.01, 0.05, (rows.shape[0], 1)).astype(np.float32)
    w.add_tensor("token_embd.weight", embd)
    w.add_tensor("output_norm.weight", np.ones(N, np.float32))
    w.add_tensor("blk.0.ffn_up.weight", rng.standard_normal((64, N), np.float32).astype(np.float16))
    gio.write_gguf(w, path, progress=False)


def test_llama_1b_shape_converts_within_3x_the_f32_embedding(tmp_path):
    src, out = tmp_path / "synthetic-1b.gguf", tmp_path / "synthetic-1b.carvq.gguf"
    _synthetic_llama(src)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "carvq.cli", "convert", str(src), "-o", str(out), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr.read()  # -q: a few lines at most, so the pipe never fills
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (ru_maxrss, KiB)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, stderr[-3000:]
    peak = usage.ru_maxrss * 1024
    print(f"\n{V}x{N}: peak RSS {peak / 2**20:.0f} MiB = {peak / F32_BYTES:.2f}x the F32 embedding "
          f"({F32_BYTES / 2**20:.0f} MiB); {seconds:.0f} s, {V / seconds:,.0f} rows/s")
    assert peak <= 3 * F32_BYTES, f"peak RSS {peak / F32_BYTES:.2f}x the F32 embedding"

    from carvq import format as fmt
    from carvq import gguf_io as gio

    layout = fmt.read_layout(gio.open_gguf(out))
    assert (layout.n_vocab, layout.n_embd) == (V, N)
