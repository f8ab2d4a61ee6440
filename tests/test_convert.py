"""The converter on tiny random llama, qwen2 and gemma3 models, from HF and from GGUF."""
from __future__ import annotations

import hashlib
import math
import re

import numpy as np
import pytest

from conftest import TINY_ARCHES, tiny_config

ARCHES = list(TINY_ARCHES)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("source", ["gguf", "hf"])
def test_convert_roundtrip(arch, source, workdir, tiny_hf, tiny_gguf, tiny_carvq):
    import gguf

    from carvq import gguf_io as gio
    from carvq.converter.convert import convert
    from carvq.converter.head import default_head_type
    from carvq.reference import decode_rows

    if source == "gguf":
        out, report = tiny_carvq(arch)
    else:
        out = workdir / f"{arch}.fromhf.carvq.gguf"
        report = convert(tiny_hf(arch), out, tiny_config(arch), iters=2, seed=0, hf_outtype="f32", progress=False)

    reader = gguf.GGUFReader(out)  # any GGUF reader opens it
    assert reader.get_field("general.architecture").contents() == arch
    assert gio.tensor_by_name(reader, "token_embd.weight") is None
    head = gio.tensor_by_name(reader, "output.weight")
    assert head is not None and bool(reader.get_field("carvq.head_copy").contents())

    V = report.n_vocab
    rows = decode_rows(out, np.arange(V))
    assert rows.dtype == np.float32
    source = gio.dequantize(gio.tensor_by_name(gio.open_gguf(tiny_gguf(arch)), gio.EMBD))
    rel = np.linalg.norm(source - rows) / np.linalg.norm(source)
    assert rel == pytest.approx(report.errors.rel_error, rel=1e-6), "the file decodes otherwise than the converter measured"

    carvq_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith("token_embd.carvq."))
    n_weights = V * report.n_embd
    assert reader.get_field("carvq.bpw").contents() == pytest.approx(8 * carvq_bytes / n_weights, rel=1e-6)
    assert reader.get_field("carvq.head_bpw").contents() == pytest.approx(8 * int(head.n_bytes) / n_weights, rel=1e-6)
    # no screen index unless asked for (--screen-index); a tied head's screen correction (format v5),
    # its bytes counted with the screen
    fix_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith("output.carvq."))
    assert reader.get_field("carvq.format_version").contents() == 5 and report.screen_bytes == fix_bytes > 0

    # every other tensor is the source's, byte for byte
    src = gio.open_gguf(tiny_gguf(arch))
    for t in src.tensors:
        if t.name == "token_embd.weight":
            # the tied head: the source embedding at the default head type (Q5_0 for this F32 source)
            assert head.tensor_type.name == report.head_type == default_head_type(t, report.n_embd) == "Q5_0"
            want = gio.dequantize(t)
            assert np.linalg.norm(gio.dequantize(head) - want) <= 0.05 * np.linalg.norm(want)
            continue
        other = gio.tensor_by_name(reader, t.name)
        assert other is not None and other.tensor_type == t.tensor_type
        assert np.array_equal(np.asarray(other.data), np.asarray(t.data)), t.name
    for name, field in src.fields.items():
        if name.startswith("GGUF."):
            continue
        assert reader.get_field(name) is not None, name
        assert reader.get_field(name).contents() == field.contents(), name


def test_determinism(workdir, tiny_gguf):
    from carvq.converter.convert import convert

    paths = []
    for i in range(2):
        out = workdir / f"determinism-{i}.gguf"
        convert(tiny_gguf("llama"), out, tiny_config("llama"), iters=2, seed=7, progress=False)
        paths.append(out)
    assert _sha256(paths[0]) == _sha256(paths[1])


def test_target_bpw_picks_config_under_budget(workdir, tiny_gguf):
    from carvq.converter.config import Config
    from carvq.converter.convert import convert

    out = workdir / "target.gguf"
    report = convert(tiny_gguf("llama"), out, Config(adaptor_rank=0, adaptor_hidden=0), target_bpw=2.5,
                     iters=1, progress=False)
    lookup_bpw = 8 * report.lookup_bytes / (report.n_vocab * report.n_embd)
    assert lookup_bpw <= 2.5
    assert report.notes and "target-bpw" in report.notes[0]


def test_head_type_source_keeps_the_head_exact(workdir, tiny_gguf):
    from carvq import gguf_io as gio
    from carvq.converter.config import Config
    from carvq.converter.convert import convert

    out = workdir / "head-copy.gguf"
    report = convert(tiny_gguf("qwen2"), out, Config(adaptor_rank=0, adaptor_hidden=0), head_type="F32", iters=1,
                     progress=False)
    src_embd = gio.tensor_by_name(gio.open_gguf(tiny_gguf("qwen2")), gio.EMBD)
    head = gio.tensor_by_name(gio.open_gguf(out), gio.HEAD)
    assert report.head_type == "F32" and np.array_equal(np.asarray(head.data), np.asarray(src_embd.data))


def test_hot_budget_arithmetic():
    from carvq.converter import config as cfgmod
    from carvq.converter.config import Config

    V, n = 49152, 576
    cfg = Config(hot_levels=4)
    assert cfgmod.hot_row_bytes(cfg, n) == 4 + 72 * 4 // 2
    assert cfgmod.hot_codebook_bytes(cfg, n) == 72 * 4 * 16 * 8 * 2
    got = cfgmod.with_hot_budget(cfg, V, n, 0.08)
    spent = got.hot_rows * 148 + 72 * 4 * 16 * 8 * 2
    assert spent <= 0.08 * V * n / 8 < spent + 148  # as many rows as fit, no more
    assert cfgmod.with_hot_budget(cfg, V, n, 0.001).hot_rows == 0  # does not even pay for the codebooks
    assert cfgmod.with_hot_budget(cfg, 10, n, 1000.0).hot_rows == 10  # never more rows than tokens
    parts = cfgmod.part_bytes(got, V, n)
    assert parts["hot"] == spent


def test_target_bpw_fills_the_budget_with_hot_rows(workdir, tiny_gguf):
    """--target-bpw with a hot budget: the levels chosen, then what they leave goes to hot rows."""
    from carvq import format as fmt
    from carvq import gguf_io as gio
    from carvq.converter.config import Config
    from carvq.converter.convert import convert

    out = workdir / "target-hot.gguf"
    # a tiny vocabulary: the hot codebooks alone cost bits per weight, so give a large budget
    report = convert(tiny_gguf("llama"), out, Config(adaptor_rank=0, adaptor_hidden=0, hot_bpw=2.0, hot_levels=2),
                     target_bpw=6.0, iters=1, progress=False)
    lookup_bpw = 8 * report.lookup_bytes / (report.n_vocab * report.n_embd)
    assert lookup_bpw <= 6.0
    assert report.config.hot_rows > 0 and any("hot rows" in note for note in report.notes)
    lo = fmt.read_layout(gio.open_gguf(out))
    assert (lo.hot_rows, lo.hot_levels) == (report.config.hot_rows, report.config.hot_levels)
    assert abs(gio.field_value(gio.open_gguf(out), fmt.Key.BPW) - lookup_bpw) < 1e-4


@pytest.mark.parametrize("V, n", [(49152, 576), (262144, 640)])  # SmolLM2, Gemma-3
def test_target_bpw_picks_the_points_the_quality_bench_measured(V, n):
    """At the bench's budgets, --target-bpw chooses the operating points bench/quality.py scored."""
    from carvq.converter.config import Config
    from carvq.converter.search import measured_point

    got = {t: measured_point(Config(), V, n, t) for t in (1.1, 1.6, 2.1, 3.0, 4.0)}
    assert {t: (c.group_size, c.levels, c.hot_levels) for t, c in got.items()} == {
        1.1: (8, 2, 2), 1.6: (8, 3, 2), 2.1: (8, 4, 2), 3.0: (8, 5, 4), 4.0: (8, 7, 4)}
    assert all(c.hot_rows > 0 for c in got.values())
    assert measured_point(Config(adaptor_rank=4, adaptor_hidden=64), V, n, 1.6) is None  # the proxy search's
    assert measured_point(Config(), V, 580, 1.6) is None  # 580 is not a multiple of 8


def test_inspect_lists_tensors_and_totals(tiny_carvq, capsys):
    from carvq.cli import main
    from carvq.converter import screen_fix

    out, report = tiny_carvq("llama")
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "token_embd.carvq.codes" in text and "I8" in text
    assert "CARVQ format 5" in text and "head copy" in text and "hot rows: 24 tokens with 2 more levels" in text
    assert f"screen correction (output.carvq.fix*, format v5): rank {screen_fix.RANK}" in text
    assert f"{report.n_vocab} x {report.n_embd}" in text


def test_inspect_a_stock_file_estimates_the_conversion(tiny_gguf, workdir):
    """On a stock GGUF, inspect tells what the default conversion would save, before converting."""
    import re

    from carvq.converter.config import Config
    from carvq.converter.convert import convert
    from carvq.inspection import inspect_text

    src = tiny_gguf("llama")
    text = inspect_text(src)
    assert "the output head is tied to it" in text and "Q5_0 head copy" in text
    est = float(re.search(r"file about ([0-9.]+) MiB instead of", text).group(1))
    out = workdir / "estimate-check.carvq.gguf"
    convert(src, out, Config(), iters=1, progress=False, force=True)
    assert abs(est - out.stat().st_size / 2**20) <= 0.01 * out.stat().st_size / 2**20 + 0.005


def test_dense_variant_keeps_the_tied_head(tiny_gguf, workdir):
    """bench/simulate.py's variants change only the lookup: a tied source gains a byte copy of its head."""
    from carvq import gguf_io as gio
    from carvq.dense import write_dense_embedding

    src = gio.open_gguf(tiny_gguf("llama"))
    embd = gio.tensor_by_name(src, "token_embd.weight")
    matrix = gio.dequantize(embd) * 0.5
    out = workdir / "dense-keephead.gguf"
    write_dense_embedding(src, out, matrix, keep_head=True)
    reader = gio.open_gguf(out)
    assert np.array_equal(np.asarray(gio.tensor_by_name(reader, "output.weight").data), np.asarray(embd.data))
    assert np.array_equal(gio.dequantize(gio.tensor_by_name(reader, "token_embd.weight")), matrix)


def test_calibration_weights_add_a_prior_of_equal_mass():
    from carvq.converter.frequency import from_counts

    counts = np.array([0, 5, 0, 95])
    prior = np.array([1.0, 41.0, 21.0, 1.0])  # 1 + pseudo-counts, as prior_from_gguf makes them
    w = from_counts(counts, prior)
    assert np.allclose(w - (counts + 1), (prior - 1) * counts.sum() / (prior - 1).sum())
    assert np.allclose(from_counts(counts), counts + 1)


def test_hot_rows_do_not_steer_the_shared_codebooks():
    """The shared levels see a hot row as no heavier than the heaviest row that is not hot."""
    import torch

    from carvq.converter.config import Config
    from carvq.converter.train import _base_weights, hot_row_ids

    w = torch.tensor([5.0, 100.0, 1.0, 50.0, 7.0])
    cfg = Config(hot_rows=2, hot_levels=2)
    assert list(hot_row_ids(w, 2)) == [1, 3]
    assert _base_weights(w, cfg).tolist() == [5.0, 7.0, 1.0, 7.0, 7.0]
    assert _base_weights(w, Config(hot_rows=0, hot_bpw=0)).tolist() == w.tolist()


def test_explicit_hot_rows_win_over_the_budget():
    from carvq.converter.config import Config

    assert Config(hot_rows=24, hot_levels=2).resolve_hot(1000, 64).hot_rows == 24  # default hot_bpw ignored
    assert Config(hot_rows=5000, hot_levels=2).resolve_hot(1000, 64).hot_rows == 1000  # clamped to V
    assert Config(hot_rows=0, hot_bpw=0).resolve_hot(1000, 64).hot_rows == 0


def test_special_tokens_weigh_as_the_heaviest(tiny_gguf):
    from carvq import gguf_io as gio
    from carvq.converter.frequency import prior_from_gguf, special_token_ids, with_special_tokens

    reader = gio.open_gguf(tiny_gguf("llama"))
    V = len(gio.field_value(reader, "tokenizer.ggml.token_type"))
    named = {int(gio.field_value(reader, k)) for k in reader.fields
             if k.startswith("tokenizer.ggml.") and k.endswith("_token_id")}
    assert named and set(special_token_ids(reader, V).tolist()) >= named
    prior, _ = prior_from_gguf(reader, V)
    w = with_special_tokens(prior, reader, V)
    special = np.zeros(V, bool)
    special[special_token_ids(reader, V)] = True
    assert np.all(w[special] == prior.max())
    assert np.array_equal(w[~special], prior[~special])


class _Field:
    def __init__(self, value):
        self.value = value

    def contents(self):
        return self.value


class _Reader:
    """What special_token_ids reads of a gguf-py reader."""

    def __init__(self, **fields):
        self.fields = {k.replace("__", "."): _Field(v) for k, v in fields.items()}

    def get_field(self, key):
        return self.fields.get(key)


def test_special_tokens_are_the_named_and_the_templated_ones():
    """Not every control token: unused ones (Gemma-3 has 6 249) stay at their weight."""
    from carvq.converter.frequency import special_token_ids

    tokens = ["<pad>", "<bos>", "<unused0>", "<unused1>", "<turn>", "hello", "<tool>"]
    types = [3, 3, 3, 3, 3, 1, 4]
    reader = _Reader(tokenizer__ggml__tokens=tokens, tokenizer__ggml__token_type=types,
                     tokenizer__ggml__bos_token_id=1, tokenizer__ggml__padding_token_id=0,
                     tokenizer__ggml__eos_token_id=99,  # out of range: ignored
                     tokenizer__chat_template="{{ '<turn>' + message + '<tool>' }} hello")
    assert special_token_ids(reader, len(tokens)).tolist() == [0, 1, 4, 6]  # "hello" is ordinary text
    del reader.fields["tokenizer.chat_template"]
    assert special_token_ids(reader, len(tokens)).tolist() == [0, 1]


def test_calibration_counts_use_the_models_own_tokenizer(tiny_gguf, tmp_path):
    """Counts are llama.cpp's token ids of the text, the ids the model sees at inference."""
    from carvq import gguf_io as gio
    from carvq.converter.convert import _calibration_tokens
    from carvq.runtime.model import Model

    src = tiny_gguf("llama")
    V = int(gio.tensor_by_name(gio.open_gguf(src), gio.EMBD).shape[1])
    text = tmp_path / "calibration.txt"
    text.write_text("the cat sat on the mat, and the dog did not.\n" * 40, encoding="utf-8")
    got, _ = _calibration_tokens(src, text, V)
    counts, total = np.bincount(got, minlength=V), got.size
    with Model(src, vocab_only=True) as vocab:
        ids = vocab.tokenize(text.read_text(encoding="utf-8"), add_special=False)
    assert total == len(ids) > 0
    assert np.array_equal(counts, np.bincount(ids, minlength=V))


def test_softmax_sum_by_row_blocks():
    from carvq.converter.model_prior import softmax_sum

    z = np.random.default_rng(0).normal(scale=30.0, size=(70, 11)).astype(np.float32)
    e = np.exp(z.astype(np.float64) - z.max(axis=1, keepdims=True))
    want = (e / e.sum(axis=1, keepdims=True)).sum(axis=0)
    assert np.allclose(softmax_sum(z, rows=8), want) and np.allclose(softmax_sum(z, rows=1000), want)
    assert softmax_sum(z).sum() == pytest.approx(70.0)


def test_model_prior_is_the_models_own_next_token_distribution(tiny_gguf):
    """p is a distribution over the vocabulary, fixed by the seed, and starts each document where
    the model's training documents start: BOS, or EOS for a model that adds no BOS (qwen2)."""
    from carvq.converter import model_prior
    from carvq.runtime.model import Model

    for arch in ("llama", "qwen2"):
        mp = model_prior.predicted_unigram(tiny_gguf(arch), seed=3, progress=False)
        again = model_prior.predicted_unigram(tiny_gguf(arch), seed=3, progress=False)
        p = mp.p
        assert np.array_equal(p, again.p) and p.min() >= 0 and p.sum() == pytest.approx(1.0)
        assert f"{model_prior.DOCUMENTS} documents it wrote" in mp.how
        assert len(mp.documents) == model_prior.DOCUMENTS and mp.documents == again.documents
        with Model(tiny_gguf(arch), vocab_only=True) as m:
            start, bos = model_prior.document_start(m), m.tokenize("", add_special=True)
            assert start == (bos or [int(m.metadata()["tokenizer.ggml.eos_token_id"])]) == mp.start


def test_prior_choice_and_fallback(tiny_gguf, workdir, monkeypatch):
    """The default weights come from the model; --prior tokenizer, or a model that cannot write
    text here, takes the tokenizer's Zipf prior (with a note saying why)."""
    from carvq.converter import model_prior
    from carvq.converter.convert import convert
    from carvq.errors import CarvqError

    out = workdir / "prior.gguf"
    report = convert(tiny_gguf("llama"), out, tiny_config("llama"), iters=1, progress=False, force=True)
    assert "own next-token distribution" in report.weights_from
    report = convert(tiny_gguf("llama"), out, tiny_config("llama"), iters=1, progress=False, force=True,
                     prior="tokenizer")
    assert "Zipf prior" in report.weights_from and not any("could not write" in n for n in report.notes)
    with pytest.raises(CarvqError, match="--prior 'words'"):
        convert(tiny_gguf("llama"), out, tiny_config("llama"), progress=False, force=True, prior="words")

    def no_text(*args):
        raise CarvqError("no context")

    monkeypatch.setattr(model_prior, "predicted_unigram", no_text)
    report = convert(tiny_gguf("llama"), out, tiny_config("llama"), iters=1, progress=False, force=True)
    assert "Zipf prior" in report.weights_from and any("could not write text" in n for n in report.notes)


def test_calibration_text_is_cut_between_paragraphs():
    from carvq.converter.frequency import _paragraph_chunks

    text = "".join(f"paragraph {i} " + "word " * (i % 7) + "\n" for i in range(500))
    pieces = list(_paragraph_chunks(text, 200))
    assert "".join(pieces) == text
    assert all(len(p) <= 200 and p.endswith("\n") for p in pieces)
    assert list(_paragraph_chunks("x" * 450, 200)) == ["x" * 200, "x" * 200, "x" * 50]  # no newline: cut anyway


def test_missing_calibration_text_is_a_clear_error(tiny_gguf, tmp_path):
    from carvq.converter.config import Config
    from carvq.converter.convert import convert
    from carvq.errors import CarvqError

    out = tmp_path / "out.gguf"
    with pytest.raises(CarvqError, match="cannot read calibration text"):
        convert(tiny_gguf("llama"), out, Config(), calibration=tmp_path / "missing.txt", progress=False)
    assert not out.exists()


def test_export_back_to_a_stock_gguf(tiny_carvq, tiny_gguf, workdir):
    """carvq export writes a plain token_embd.weight: at F32 the decoder's rows bit for bit (a
    file without adaptor), and the exported file loads in the unpatched llama.cpp too."""
    import subprocess
    import sys

    import numpy as np

    from carvq import format as fmt
    from carvq import gguf_io as gio
    from carvq.runtime.model import Model

    path, _ = tiny_carvq("gemma3")  # hot rows, no adaptor: the decode is the exact RVQ
    out = workdir / "exported-f32.gguf"
    proc = subprocess.run([sys.executable, "-m", "carvq.cli", "export", str(path), "-o", str(out),
                           "--embedding-type", "F32", "--force"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    reader = gio.open_gguf(out)
    assert not fmt.is_carvq(reader) and not any(t.name.startswith(fmt.PREFIX) for t in reader.tensors)
    exported = gio.dequantize(gio.tensor_by_name(reader, gio.EMBD))
    with Model(path, n_ctx=64) as m:
        rows = m.embedding_rows(list(range(m.n_vocab)))
    assert np.array_equal(exported.view(np.uint32), rows.view(np.uint32))
    # a quantized export, and the stock build loads it
    q = workdir / "exported-q8.gguf"
    proc = subprocess.run([sys.executable, "-m", "carvq.cli", "export", str(path), "-o", str(q), "--force"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert gio.tensor_by_name(gio.open_gguf(q), gio.EMBD).tensor_type.name in ("F32", "Q8_0")
    proc = subprocess.run([sys.executable, "-m", "carvq.cli", "export", str(path), "-o", str(q), "--embedding-type",
                           "Q6_K", "--force"], capture_output=True, text=True)
    assert proc.returncode == 1 and "one of F32" in proc.stderr


def test_exported_file_runs_on_stock_llama_cpp(tiny_carvq, workdir, stock_perplexity):
    import subprocess

    path, _ = tiny_carvq("llama")
    out = workdir / "exported-stock-check.gguf"
    from carvq.export import export

    export(path, out, "Q8_0", force=True)
    text = workdir / "export-text.txt"
    text.write_text("the history of the city begins with a river and a bridge. " * 40)
    proc = subprocess.run([str(stock_perplexity), "-m", str(out), "-f", str(text), "-c", "64", "-b", "64", "-t", "2"],
                          capture_output=True, text=True, errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the chunks' perplexities, not the final line: unpatched llama.cpp's log thread can lose a
    # tool's last lines at exit (patches/0005 drains it in our build), and here it often does
    chunks = [float(v) for v in re.findall(r"\[\d+\]([0-9.]+),", proc.stdout + proc.stderr)]
    assert chunks and all(math.isfinite(v) and v > 1 for v in chunks), proc.stdout[-2000:]


def test_without_screen_index_and_correction_the_file_is_version_2(tiny_carvq):
    """Without --screen-index and --screen-fix: no output.carvq.* tensor, no carvq.screen.* key,
    format version 2 (what readers of version 2 load), and the screened head screens with the
    lookup's codes."""
    import gguf

    out, report = tiny_carvq("llama", fix=False)
    reader = gguf.GGUFReader(out)
    assert reader.get_field("carvq.format_version").contents() == 2
    assert not [t.name for t in reader.tensors if t.name.startswith("output.carvq.")]
    assert not [k for k in reader.fields if k.startswith("carvq.screen.")]
    assert report.screen_bytes == 0


def test_report_shows_speed_and_peak_memory(tiny_carvq):
    """Issue 14 bounds a conversion's peak RSS at 3x the float32 embedding: the report says both."""
    _, report = tiny_carvq("llama", fix=False)
    text = report.format()
    assert report.peak_rss and report.peak_rss > 0
    assert "rows/s)" in text and "peak memory (RSS)" in text and "x the float32 embedding)" in text


def test_screen_index_file_is_version_3_and_counts_every_byte(tiny_carvq):
    """--screen-index on a tiny model (k >= V: the held-out check keeps it): format version 3,
    carvq.screen.bpw over every output.carvq.* byte, and the choice noted in the report."""
    import gguf

    out, report = tiny_carvq("llama", screen=True)
    reader = gguf.GGUFReader(out)
    assert reader.get_field("carvq.format_version").contents() == 3
    screen_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith("output.carvq."))
    assert screen_bytes == report.screen_bytes > 0
    n_weights = report.n_vocab * report.n_embd
    assert reader.get_field("carvq.screen.bpw").contents() == pytest.approx(8 * screen_bytes / n_weights, rel=1e-6)
    assert any(note.startswith("screen index kept") for note in report.notes)
    assert "head screen (index, correction)" in report.format()


def test_screen_index_metric():
    """The projection maps hidden states to unit covariance up to the ridge: S^(1/2) S^(-1/2) = I,
    and the product h . e is unchanged by the change of metric."""
    from carvq.converter import screen_index

    rng = np.random.default_rng(0)
    H = (rng.standard_normal((500, 12)) * np.logspace(-3, 1, 12)).astype(np.float32)
    sqrt_s, inv_sqrt_s = screen_index.metric(H)
    assert np.allclose(sqrt_s @ inv_sqrt_s, np.eye(12), atol=1e-9)
    e = rng.standard_normal(12)
    assert np.allclose((H @ inv_sqrt_s) @ (sqrt_s @ e), H @ e, rtol=1e-8, atol=1e-10)


def test_screen_index_needs_calibration_text(tiny_gguf, tmp_path):
    """Text the model writes itself misled the index on Gemma-3 (docs/SCREEN.md): refused, clearly."""
    from carvq.converter.convert import convert
    from carvq.errors import CarvqError

    out = tmp_path / "x.carvq.gguf"
    with pytest.raises(CarvqError, match="--screen-index needs --calibration"):
        convert(tiny_gguf("llama"), out, tiny_config("llama"), iters=1, progress=False, screen=True)
    assert not out.exists()


def test_open_gguf_reads_every_field_as_gguf_py_does(tiny_gguf):
    """gguf_io keeps each field's value, not gguf-py's per-element arrays (0.7 GB for Gemma-3's
    vocabulary): names, types and contents stay gguf-py's."""
    import gguf

    from carvq import gguf_io as gio

    path = tiny_gguf("gemma3")
    ours, theirs = gio.open_gguf(path), gguf.GGUFReader(path)
    assert list(ours.fields) == list(theirs.fields)
    for name, field in theirs.fields.items():
        mine = ours.get_field(name)
        assert (mine.name, mine.types, mine.contents()) == (field.name, field.types, field.contents()), name
    tokens = theirs.fields["tokenizer.ggml.tokens"]
    assert ours.get_field("tokenizer.ggml.tokens").contents(5) == tokens.contents(5)
