"""The fit's metric (converter/metric.py): each embedding dimension weighted by the model's Fisher information."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import SCREEN_TEXT, tiny_config

from carvq import format as fmt
from carvq import reference


def _anisotropic(V=3000, n=32, seed=5):
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((V, n)).astype(np.float32)
    w = 1.0 / (1.0 + rng.permutation(V)) ** 1.1
    scale = np.sqrt(np.exp(rng.normal(0, 1.2, n))).astype(np.float32)  # weights spread over ~50x, like SmolLM2's
    return M, w, scale


@pytest.mark.parametrize("rank", [0, 2])
def test_a_scaled_fit_scaled_back_decodes_as_the_fit_divided(rank):
    """unscale() maps the codebooks, hot ones and the adaptor's output included, so that every
    row decodes as the scaled fit's row divided by the scale (up to float rounding: F32 here)."""
    from carvq.converter import metric, train
    from carvq.converter.config import Config

    M, w, scale = _anisotropic()
    Ms = M.copy()
    metric.scale_rows(Ms, scale)
    assert np.allclose(Ms, M * scale)
    cfg = Config(group_size=8, levels=2, codebook_type="F32", hot_rows=200, hot_levels=2, hot_bpw=0.0,
                 adaptor_rank=rank, adaptor_hidden=8 if rank else 0, sigma0_type="F32", mlp_type="F32")
    t = train.compress(Ms, w, cfg, 1, 0, progress=False).tensors
    assert (t.down_w is not None) == bool(rank)
    ids = np.arange(M.shape[0])
    scaled = reference.decode(t, ids)
    metric.unscale(t, 1.0 / scale)
    np.testing.assert_allclose(reference.decode(t, ids), scaled / scale, rtol=1e-5, atol=1e-6)


def test_the_fit_in_a_metric_has_less_error_in_that_metric():
    from carvq.converter import metric, train
    from carvq.converter.config import Config

    M, w, scale = _anisotropic()
    cfg = Config(group_size=8, levels=2, codebook_type="F32")
    ids = np.arange(M.shape[0])

    def error_in_metric(t):
        d = (reference.decode(t, ids) - M) * scale
        return float(((d * d).sum(1) * w).sum())

    uniform = train.compress(M.copy(), w, cfg, 1, 0, progress=False).tensors
    Ms = M.copy()
    metric.scale_rows(Ms, scale)
    fitted = train.compress(Ms, w, cfg, 1, 0, progress=False).tensors
    metric.unscale(fitted, 1.0 / scale)
    assert error_in_metric(fitted) < 0.9 * error_in_metric(uniform)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    path = tmp_path_factory.mktemp("metric") / "calibration.txt"
    path.write_text(SCREEN_TEXT * 2)
    return path


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma3: the embedding layer's sqrt(n) scale
def test_fisher_diagonal_of_the_tiny_model(arch, tiny_gguf):
    import torch

    from carvq.converter import metric

    seqs = [torch.arange(2, 40), torch.arange(5, 60), torch.tensor([1, 2])]  # a too-short one is skipped
    sens = metric.fisher_diagonal(tiny_gguf(arch), seqs, seed=0, progress=False)
    diag, positions = sens.diagonal, sens.positions
    assert positions == (38 - 2) + (55 - 2)  # neither the last position (no label) nor the first (BOS)
    assert diag.ndim == 1 and np.isfinite(diag).all() and (diag > 0).all()
    # by token: the positions of each input token, and their ||g||^2, sum to the whole
    assert sens.token_count.sum() == positions and sens.token_count[3] == 1 and sens.token_count[10] == 2 and sens.token_count[1] == 0
    assert np.isclose(sens.token_energy.sum(), diag.sum() * positions)
    factor = metric.token_factor(sens, power=1.0, prior=8.0)
    assert factor[1] == 1.0 and (factor > 0).all() and metric.token_factor(sens, power=0.0) is None
    m = metric.from_model(tiny_gguf(arch), seqs, "test", 0, False, diag.shape[0])
    assert m.scale.dtype == np.float32 and np.isclose((m.scale ** 2).mean(), 1.0, rtol=1e-5)
    assert "Fisher information" in m.how
    with pytest.raises(Exception, match="dimensions"):
        metric.from_model(tiny_gguf(arch), seqs, "test", 0, False, diag.shape[0] + 8)


def test_conversion_in_the_fisher_metric(tiny_gguf, workdir, calibration):
    """The tiny llama converted in the Fisher metric: on the calibration text, on the documents the
    model writes (no text), and alike for every dimension where there is no text at all. The file
    is an ordinary CARVQ file: llama.cpp decodes it bit for bit as the reference."""
    from carvq.converter.convert import convert
    from carvq.errors import CarvqError
    from carvq.reference import decode_rows
    from carvq.runtime.model import Model

    cfg = tiny_config("llama")
    outs = {}
    for name, kw in {"uniform": dict(fit_metric="uniform", calibration=calibration),
                     "text": dict(fit_metric="fisher", calibration=calibration),
                     "self": dict(fit_metric="fisher"),
                     "none": dict(fit_metric="fisher", prior="tokenizer")}.items():
        outs[name] = workdir / f"metric-{name}.gguf"
        report = convert(tiny_gguf("llama"), outs[name], cfg, iters=1, seed=0, progress=False, force=True, **kw)
        notes = " ".join(report.notes)
        if name == "text":
            assert "Fisher information" in notes and "calibration sequences" in notes, notes
        elif name == "self":
            assert "self-written sequences" in notes, notes
        elif name == "none":
            assert "every dimension weighted alike" in notes, notes
        else:
            assert "Fisher" not in notes and "alike" not in notes, notes
    plain, weighted = (fmt.read_tensors(outs[k]) for k in ("uniform", "text"))
    assert plain.layout == weighted.layout
    assert not np.array_equal(plain.codebooks, weighted.codebooks)
    ids = np.arange(0, weighted.layout.n_vocab, 3)
    with Model(outs["text"], n_ctx=64) as model:
        np.testing.assert_allclose(model.embedding_rows(ids.tolist()), decode_rows(outs["text"], ids), rtol=1e-4,
                                   atol=1e-6)
    with pytest.raises(CarvqError, match="--metric"):
        convert(tiny_gguf("llama"), workdir / "bad.gguf", cfg, progress=False, fit_metric="euclid")
    assert not (workdir / "bad.gguf").exists()


def test_the_cli_fits_in_the_fisher_metric_by_default():
    from carvq.cli import build_parser

    args = build_parser().parse_args(["convert", "in.gguf", "-o", "out.gguf"])
    assert args.metric == "fisher"
    assert build_parser().parse_args(["convert", "in.gguf", "-o", "o.gguf", "--metric", "uniform"]).metric == "uniform"


def test_without_memory_for_the_model_the_fit_is_uniform(tiny_gguf, workdir, calibration, monkeypatch):
    """Where the float32 model would not fit in the memory available, the conversion goes on in
    the uniform metric and says why."""
    from carvq.converter.convert import convert
    from carvq.runtime import model as model_mod

    monkeypatch.setattr(model_mod, "_available_memory", lambda: 1024)  # the tiny model needs about a MB
    report = convert(tiny_gguf("llama"), workdir / "metric-nomem.gguf", tiny_config("llama"), iters=1, seed=0,
                     progress=False, force=True, calibration=calibration, fit_metric="fisher")
    note = next(n for n in report.notes if "alike" in n)
    assert "GiB are available" in note, note


def test_the_metric_is_the_same_for_the_same_seed(tiny_gguf):
    """--seed's promise (the same file for the same input and seed) holds through the model run."""
    import torch

    from carvq.converter import metric

    seqs = [torch.arange(2, 60), torch.arange(7, 90)]
    n = metric.fisher_diagonal(tiny_gguf("llama"), seqs[:1], 0, False).diagonal.shape[0]
    a, b, c = (metric.from_model(tiny_gguf("llama"), seqs, "test", seed, False, n).scale for seed in (1, 1, 2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
