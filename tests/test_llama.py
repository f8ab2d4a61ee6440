"""The patched llama.cpp on CARVQ-GGUFs: exact lookup, unchanged stock behaviour, tools, bad files."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from carvq import format as fmt
from conftest import TINY_ARCHES, llama_server, rewrite_gguf, until_answered
from tiny_models import synthetic_corpus

ARCHES = list(TINY_ARCHES)
IDS = [1, 5, 17, 42, 99, 200, 7, 3, 250, 11, 64, 128, 300, 2, 19]


def tool(name: str) -> Path:
    from carvq.runtime import tool_path

    path = tool_path(name)
    assert path.exists(), f"{name} is not installed at {path}"
    return path


@pytest.fixture(scope="session")
def dense_twin(workdir, tiny_carvq):
    """arch -> the CARVQ model with token_embd.weight = its dense F32 reconstruction."""
    from carvq.dense import write_dense_embedding
    from carvq.reference import decode_all

    cache = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            path, _ = tiny_carvq(arch)
            out = workdir / f"{arch}.dense.gguf"
            write_dense_embedding(path, out, decode_all(path))
            cache[arch] = out
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ARCHES)
def test_lookup_is_exact(arch, tiny_carvq, dense_twin):
    from carvq.runtime.model import Model

    path, report = tiny_carvq(arch)
    # F32 KV cache: an F16 cache rounds K/V, so a 1e-7 input change can flip a rounding
    with Model(path, n_ctx=64, kv_f32=True) as carvq_model, Model(dense_twin(arch), n_ctx=64, kv_f32=True) as dense_model:
        assert carvq_model.is_carvq and not dense_model.is_carvq
        got, want = carvq_model.logits(IDS), dense_model.logits(IDS)
    if report.config.adaptor_rank == 0:
        # RVQ and hot levels decode bit-exactly, so the whole forward pass is the dense one
        assert np.array_equal(got, want), f"{arch}: logits differ without an adaptor"
    else:
        # the adaptor's two matrix products sum in ggml's order, not NumPy's (FORMAT.md)
        rel = np.abs(got - want).max() / np.abs(want).max()
        assert rel <= 1e-4, f"{arch}: relative logit difference {rel:.2e}"


@pytest.mark.parametrize("arch", ARCHES)
def test_embedding_rows_match_reference(arch, tiny_carvq):
    from carvq.reference import decode_rows
    from carvq.runtime.model import Model

    path, report = tiny_carvq(arch)
    want = decode_rows(path, IDS)
    with Model(path, n_ctx=64) as model:
        got = model.embedding_rows(IDS)
    if report.config.adaptor_rank == 0:
        assert np.array_equal(got, want), "the RVQ decode must be bit-exact"
    else:
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_model_api_and_close(tiny_carvq):
    from carvq.errors import CarvqError
    from carvq.runtime.model import Model

    path, report = tiny_carvq("llama")
    model = Model(path, n_ctx=128)
    assert model.n_vocab == report.n_vocab and model.n_embd == report.n_embd
    assert model.size > 0 and model.n_params > 0
    assert model.metadata()["carvq.format_version"] == str(fmt.FIX_FORMAT_VERSION)  # a tied head: the screen correction
    toks = model.tokenize("the cat sat on the mat")
    assert model.detokenize(toks[1:]).strip() == "the cat sat on the mat"
    a = "".join(model.generate("the cat", max_tokens=8, temperature=0))
    b = "".join(model.generate("the cat", max_tokens=8, temperature=0))
    assert a == b  # greedy is deterministic
    sampled = [model.generate("the cat", max_tokens=8, temperature=0.9, top_p=0.9, seed=s) for s in (3, 3, 4)]
    sampled = ["".join(pieces) for pieces in sampled]
    assert sampled[0] == sampled[1] and sampled[0]  # a seed fixes the sample
    model.close()
    with pytest.raises(CarvqError, match="closed"):
        model.tokenize("x")
    model.close()  # idempotent


def _run_text(workdir: Path) -> Path:
    text = workdir / "corpus.txt"
    if not text.exists():
        text.write_text("\n".join(synthetic_corpus(seed=5)[:400]))
    return text


def _perplexity(binary: Path, model: Path, text: Path, extra=()):
    return subprocess.run([str(binary), "-m", str(model), "-f", str(text), "-c", "64", "-b", "64",
                           "--chunks", "4", "-t", "2", *extra], capture_output=True, text=True, errors="replace",
                          timeout=300)


def test_perplexity_tool_on_carvq(tiny_carvq, workdir):
    path, _ = tiny_carvq("gemma3")
    proc = _perplexity(tool("llama-perplexity"), path, _run_text(workdir))
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", proc.stdout + proc.stderr)
    assert m and math.isfinite(float(m.group(1))) and float(m.group(1)) > 1


def test_bench_tool_on_carvq(tiny_carvq):
    path, _ = tiny_carvq("llama")
    proc = subprocess.run([str(tool("llama-bench")), "-m", str(path), "-p", "16", "-n", "8", "-r", "1", "-t", "2", "-o", "json"],
                          capture_output=True, text=True, errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout)
    assert results and all(r["avg_ts"] > 0 for r in results)


def test_server_answers_a_completion(tiny_carvq):
    path, _ = tiny_carvq("qwen2")
    with llama_server(path, "-c", "256") as (url, server):
        body = json.dumps({"prompt": "the cat", "n_predict": 8, "temperature": 0}).encode()

        def complete():
            req = urllib.request.Request(f"{url}/completion", data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read())

        answer = until_answered(server, complete)
        assert isinstance(answer.get("content"), str) and answer.get("tokens_predicted", 0) > 0


def test_quantize_passes_carvq_through(tiny_carvq, workdir):
    """llama-quantize quantizes the body and leaves every CARVQ tensor byte for byte."""
    from carvq import gguf_io as gio

    path, _ = tiny_carvq("llama")
    out = workdir / "llama.carvq.q8.gguf"
    proc = subprocess.run([str(tool("llama-quantize")), "--leave-output-tensor", str(path), str(out), "q8_0", "2"], capture_output=True, text=True, errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    src, dst = gio.open_gguf(path), gio.open_gguf(out)
    for t in src.tensors:
        if t.name.startswith("token_embd.carvq."):
            other = gio.tensor_by_name(dst, t.name)
            assert other.tensor_type == t.tensor_type and np.array_equal(np.asarray(other.data), np.asarray(t.data))
    assert gio.tensor_by_name(dst, "blk.0.ffn_up.weight").tensor_type.name == "Q8_0"


# ---- stock behaviour --------------------------------------------------------------------

def test_stock_model_unchanged(tiny_gguf, workdir, stock_perplexity):
    """The same stock GGUF gives bit-identical logits through the patched and the unpatched build."""
    text = _run_text(workdir)
    saved = []
    for name, binary in (("stock", stock_perplexity), ("patched", tool("llama-perplexity"))):
        out = workdir / f"logits-{name}.bin"
        proc = _perplexity(binary, tiny_gguf("llama"), text, ("--kl-divergence-base", str(out)))
        assert proc.returncode == 0, proc.stderr[-2000:]
        saved.append(out.read_bytes())
    assert len(saved[0]) > 1000 and saved[0] == saved[1]


# ---- bad CARVQ files ---------------------------------------------------------------------

def _load_in_subprocess(path: Path):
    """Load through the runtime in a child process: a crash there cannot take pytest down."""
    return subprocess.run([sys.executable, "-m", "carvq.cli", "generate", str(path), "-p", "the", "-n", "2"],
                          capture_output=True, text=True, errors="replace", timeout=120)


def data_rows(t) -> int:
    return int(t.shape[1])


def test_bad_file_truncated(tiny_carvq, workdir):
    path, _ = tiny_carvq("llama")
    bad = workdir / "truncated.carvq.gguf"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    proc = _load_in_subprocess(bad)
    assert proc.returncode == 1 and "carvq: error:" in proc.stderr, proc.stderr[-2000:]


def test_bad_file_codes_wrong_size(tiny_carvq, workdir):
    path, _ = tiny_carvq("llama")
    bad = workdir / "badcodes.carvq.gguf"
    rewrite_gguf(path, bad, replace={fmt.Tensor.CODES: lambda t: np.ascontiguousarray(
        np.asarray(t.data)[: data_rows(t) - 3]).view(np.int8)})
    proc = _load_in_subprocess(bad)
    assert proc.returncode == 1 and "token_embd.carvq.codes" in proc.stderr, proc.stderr[-2000:]


def test_bad_file_unknown_version(tiny_carvq, workdir):
    path, _ = tiny_carvq("llama")
    bad = workdir / "v99.carvq.gguf"
    rewrite_gguf(path, bad, version=99)
    proc = _load_in_subprocess(bad)
    assert proc.returncode == 1 and "version" in proc.stderr, proc.stderr[-2000:]


def test_version_1_file_still_loads(tiny_carvq, workdir):
    """A version-1 file (no hot keys) is read as version 2 without hot rows: same logits."""
    from carvq.reference import decode_rows
    from carvq.runtime.model import Model

    path, _ = tiny_carvq("qwen2", fix=False)  # the arch converted without hot rows; no screen correction (v5)
    old = workdir / "v1.carvq.gguf"
    rewrite_gguf(path, old, version=1, drop_keys=(fmt.Key.HOT_ROWS, fmt.Key.HOT_LEVELS))
    assert np.array_equal(decode_rows(old, IDS), decode_rows(path, IDS))
    with Model(path, n_ctx=64, kv_f32=True) as new_model, Model(old, n_ctx=64, kv_f32=True) as old_model:
        assert np.array_equal(new_model.logits(IDS), old_model.logits(IDS))


def test_bad_file_hot_ids_unsorted(tiny_carvq, workdir):
    from carvq import gguf_io as gio

    path, _ = tiny_carvq("llama")
    ids = np.asarray(gio.tensor_by_name(gio.open_gguf(path), fmt.Tensor.HOT_IDS).data).copy()
    ids[[0, 1]] = ids[[1, 0]]
    bad = workdir / "hotids.carvq.gguf"
    rewrite_gguf(path, bad, replace={fmt.Tensor.HOT_IDS: lambda t: np.asarray(ids, np.int32)})
    proc = _load_in_subprocess(bad)
    assert proc.returncode == 1 and "hot" in proc.stderr and "increase" in proc.stderr, proc.stderr[-2000:]


def test_convert_with_body_type(tiny_gguf, workdir):
    """carvq convert --body-type quantizes the body with llama-quantize; the lookup stays CARVQ."""
    from carvq import gguf_io as gio
    from carvq.converter.convert import convert
    from carvq.runtime.model import Model

    from conftest import tiny_config

    out = workdir / "llama.carvq.body-q8.gguf"
    report = convert(tiny_gguf("llama"), out, tiny_config("llama"), iters=1, body_type="Q8_0", progress=False)
    reader = gio.open_gguf(out)
    assert gio.tensor_by_name(reader, "blk.0.ffn_up.weight").tensor_type.name == "Q8_0"
    assert gio.tensor_by_name(reader, "output.weight").tensor_type.name == report.head_type == "Q5_0"  # the head is kept
    from carvq.reference import decode_rows

    # the CARVQ tensors passed through llama-quantize untouched: the file decodes as measured
    source = gio.dequantize(gio.tensor_by_name(gio.open_gguf(tiny_gguf("llama")), gio.EMBD))
    rows = decode_rows(reader, np.arange(report.n_vocab))
    assert np.linalg.norm(source - rows) / np.linalg.norm(source) == pytest.approx(report.errors.rel_error, rel=1e-6)
    with Model(out, n_ctx=64) as model:
        assert model.is_carvq and len(model.logits(IDS[:4])) == 4


def test_lookup_bench_runs():
    """The decoder benchmark (bench/lookup.py's engine) runs and reports every measurement."""
    proc = subprocess.run([str(tool("carvq-lookup-bench")), "2048", "512", "8", "3"], capture_output=True, text=True,
                          errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {r["what"] for r in rows} == {"memcpy_f32", "carvq", "get_rows_q8_0", "get_rows_q4_k"}
    assert all(r["rows_per_s"] > 0 for r in rows)
