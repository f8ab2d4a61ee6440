"""The coded head (format v8, docs/FORMAT.md "Coded head"): a tied model's head is the lookup's
own rows, with no output.weight in the file. The patched llama.cpp computes its logits from the
codes: dense (every row decoded) they are the NumPy reference's rows times the hidden states;
screened, the candidates are the reference's top-k and their logits the dense ones."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import check_screened_candidates, rewrite_gguf

TEXT_IDS = [1, 5, 17, 42, 99, 200, 7, 3, 250, 11, 64, 128, 300, 2, 19, 33]


@pytest.fixture(scope="module")
def coded(tiny_gguf, workdir):
    """arch -> (path, report): the tiny tied model in hot tiers (a hot map, the screen
    correction) with --head-type codes."""
    from carvq import gguf_io as gio
    from carvq.converter import config as cfgmod
    from carvq.converter.config import Config
    from carvq.converter.convert import convert

    cache = {}

    def get(arch: str):
        if arch not in cache:
            out = workdir / f"{arch}.coded.carvq.gguf"
            cfg = Config(group_size=8, levels=4, codebook_type="F32", hot_rows=24, hot_levels=2, hot_bpw=0.0)
            n, V = (int(x) for x in gio.tensor_by_name(gio.open_gguf(tiny_gguf(arch)), gio.EMBD).shape[:2])
            report = convert(tiny_gguf(arch), out, cfg, iters=1, seed=0, progress=False, head_type="codes",
                             trim_to=cfgmod.bpw(cfg, V, n) - 0.6, tier_floor=2)
            cache[arch] = (out, report)
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_dense_logits_are_the_reference_rows(arch, coded):
    from carvq import format as fmt
    from carvq import gguf_io as gio
    from carvq import reference
    from carvq.runtime.model import Model

    path, report = coded(arch)
    reader = gio.open_gguf(path)
    assert gio.tensor_by_name(reader, gio.HEAD) is None and not report.head_copied and report.head_type == "codes"
    t = fmt.read_tensors(path)
    assert t.head_codes and len(t.layout.tier_rows) > 1 and t.screen_fix is not None
    assert gio.field_value(reader, fmt.Key.VERSION) == fmt.HEAD_CODES_FORMAT_VERSION
    with Model(path, n_ctx=64, head="dense") as m:
        logits = m.logits(TEXT_IDS)
        hidden = m.hidden_states(TEXT_IDS)
    want = hidden @ reference.decode_all(path).T
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # batches of 3 outputs: the dense op sums every row's tables (generation's path) instead of
    # decoding rows; the hidden states of 3-token batches, which round a little differently
    with Model(path, n_ctx=64, n_batch=3, head="dense") as m:
        few = m.logits(TEXT_IDS)
        want = m.hidden_states(TEXT_IDS) @ reference.decode_all(path).T
    np.testing.assert_allclose(few, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_screened_candidates_are_exact(arch, coded):
    """k of V rows exact (the tables' sums of the codes), chosen by the scan of the same codes."""
    from carvq.runtime.model import Model

    path, _ = coded(arch)
    check_screened_candidates(path, TEXT_IDS, k=24, max_others_exact=10**9)
    with Model(path, n_ctx=64, head="dense") as m:
        dense = m.logits(TEXT_IDS)
    with Model(path, n_ctx=64, head="screened", screen_k=dense.shape[1]) as m:
        every = m.logits(TEXT_IDS)
    np.testing.assert_allclose(every, dense, rtol=1e-5, atol=1e-5 * np.abs(dense).max())


def test_generation_tools_run(coded):
    from carvq.runtime import tool_path

    path, _ = coded("llama")
    proc = subprocess.run([str(tool_path("llama-bench")), "-m", str(path), "-p", "8", "-n", "8", "-r", "1"],
                          capture_output=True, text=True, errors="replace", timeout=300)
    assert proc.returncode == 0 and "tg8" in proc.stdout, proc.stderr[-2000:]


def _load(path):
    """Load through the runtime in a child process (a crash there cannot take pytest down)."""
    return subprocess.run([sys.executable, "-m", "carvq.cli", "generate", str(path), "-p", "the", "-n", "2"],
                          capture_output=True, text=True, errors="replace", timeout=120)


def _llama_load(path):
    """The patched loader itself, past the Python reader: llama-completion on the file."""
    from carvq.runtime import tool_path

    return subprocess.run([str(tool_path("llama-completion")), "-m", str(path), "-p", "the", "-n", "1", "-no-cnv",
                           "--no-warmup", "-c", "64"], capture_output=True, text=True, errors="replace", timeout=120)


@pytest.mark.parametrize("case, needle", [
    ("version-7", "needs carvq.format_version 8"),
    ("with-output-weight", "has an output.weight too"),
    ("with-head-copy", "are both true"),
])
def test_bad_coded_head_is_refused(case, needle, coded, tiny_gguf, workdir):
    """One readable message from both readers, never a wrong head."""
    from carvq import format as fmt
    from carvq import gguf_io as gio

    path, _ = coded("llama")
    bad = workdir / f"coded-{case}.gguf"
    if case == "version-7":
        rewrite_gguf(path, bad, version=7)
    elif case == "with-head-copy":
        import gguf

        reader = gio.open_gguf(path)
        writer = gguf.GGUFWriter(None, "llama")
        gio.copy_fields(reader, writer, skip={fmt.Key.HEAD_COPY})
        writer.add_bool(fmt.Key.HEAD_COPY, True)
        for t in reader.tensors:
            gio.add_source_tensor(writer, t)
        gio.write_gguf(writer, bad, progress=False)
    else:  # the source's embedding as an output.weight beside the coded head
        import gguf

        reader = gio.open_gguf(path)
        embd = gio.tensor_by_name(gio.open_gguf(tiny_gguf("llama")), gio.EMBD)
        writer = gguf.GGUFWriter(None, "llama")
        gio.copy_fields(reader, writer, skip=set())
        for t in reader.tensors:
            gio.add_source_tensor(writer, t)
        writer.add_tensor(gio.HEAD, np.asarray(embd.data, np.float32))
        gio.write_gguf(writer, bad, progress=False)
    with pytest.raises(Exception, match=needle):
        fmt.read_tensors(bad)
    proc = _load(bad)
    assert proc.returncode == 1 and "carvq: error:" in proc.stderr and needle in proc.stderr, proc.stderr[-2000:]
    # the C loader refuses it on its own (llama-bench does not go through the Python reader)
    proc = _llama_load(bad)
    assert 0 < proc.returncode < 128 and needle in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-2000:]


def test_converter_refuses_a_coded_head_for_an_untied_model(workdir):
    from carvq.converter.convert import convert
    from carvq.errors import CarvqError
    from conftest import tiny_config
    from tiny_models import make_tiny_checkpoint

    hf = make_tiny_checkpoint("qwen2", workdir / "hf-qwen2-untied-coded", tied=False, seed=3)
    out = workdir / "untied-coded.carvq.gguf"
    with pytest.raises(CarvqError, match="an untied head"):
        convert(hf, out, tiny_config("qwen2"), iters=1, hf_outtype="f32", progress=False, head_type="codes")
    assert not out.exists()


def test_tied_default_is_the_coded_head(tiny_gguf, workdir):
    """`carvq convert` with no shape option: a tied model gets the coded head at 3.0 bpw (lookup
    and head together); any shape option keeps the head copy beside the lookup."""
    from carvq import format as fmt
    from carvq import gguf_io as gio
    from conftest import run_cli

    out = workdir / "tied-default.carvq.gguf"
    proc = run_cli("convert", tiny_gguf("llama"), "-o", out, "--force", "--prior", "tokenizer")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the default is the coded head at 3 bpw" in proc.stdout, proc.stdout[-3000:]
    reader = gio.open_gguf(out)
    assert gio.field_value(reader, fmt.Key.HEAD_CODES) and gio.tensor_by_name(reader, gio.HEAD) is None
    assert fmt.read_tensors(out).head_codes  # the reader's own check of a coded head
    assert not fmt.read_layout(reader).adaptor_rank
    assert 2.5 < float(gio.field_value(reader, fmt.Key.BPW)) <= 3.0  # lookup and head together

    shaped = workdir / "tied-shaped.carvq.gguf"
    proc = run_cli("convert", tiny_gguf("llama"), "-o", shaped, "--force", "--prior", "tokenizer", "--levels", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    reader = gio.open_gguf(shaped)
    assert not gio.field_value(reader, fmt.Key.HEAD_CODES, False) and gio.tensor_by_name(reader, gio.HEAD) is not None


@pytest.mark.parametrize("argv, default", [
    ([], True),
    (["--prior", "tokenizer", "--seed", "3", "--calibration", "t.txt", "--tune-steps", "4"], True),  # not shape
    (["--target-bpw", "3.0"], False),
    (["--head-type", "codes"], False),
    (["--levels", "4"], False),
    (["--no-tiers"], False),
    (["--transform", "pca"], False),
    (["--hot-rows", "10"], False),
])
def test_shape_options_decide_the_default(argv, default):
    from carvq.cli import _shape_left_to_default, build_parser

    assert _shape_left_to_default(build_parser().parse_args(["convert", "in.gguf", "-o", "o.gguf", *argv])) == default
