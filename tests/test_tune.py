"""End-to-end tuning of the codebooks (`carvq convert --tune-steps`, converter/tune.py)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import SCREEN_TEXT, tiny_config


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    path = tmp_path_factory.mktemp("tune") / "calibration.txt"
    path.write_text(SCREEN_TEXT * 2)
    return path


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # llama: hot rows and an adaptor; gemma3: the sqrt(n) scale
def test_lookup_module_decodes_like_the_reference(arch, tiny_carvq):
    import torch

    from carvq import format as fmt
    from carvq import gguf_io as gio
    from carvq import reference
    from carvq.converter.tune import Lookup

    tensors = fmt.read_tensors(gio.open_gguf(tiny_carvq(arch)[0]))
    ids = np.arange(tensors.layout.n_vocab)
    with torch.no_grad():
        got = Lookup(tensors)(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(got, reference.decode(tensors, ids), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_the_frozen_model_reads_inputs_as_its_embedding_layer_does(arch, tiny_gguf):
    """tune() feeds decoded rows times embed_scale as inputs_embeds: that must be what the model
    computes from token ids, or the tuning would fit another model than llama.cpp runs."""
    import torch

    from carvq.converter.torch_model import load_frozen

    model = load_frozen(tiny_gguf(arch), progress=False)
    embed = model.get_input_embeddings()
    ids = torch.arange(16).unsqueeze(0)
    rows = embed.weight[ids[0]] * float(getattr(embed, "embed_scale", 1.0))
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=rows.unsqueeze(0)).logits, model(input_ids=ids).logits)


def test_tuning_lowers_the_held_out_kl_and_keeps_the_codes(workdir, tiny_gguf, calibration):
    from carvq import format as fmt
    from carvq import gguf_io as gio
    from carvq.converter.convert import convert

    outs = {}
    for steps in (0, 40):
        outs[steps] = workdir / f"tune-{steps}.gguf"
        report = convert(tiny_gguf("llama"), outs[steps], tiny_config("llama"), iters=2, seed=3, progress=False,
                         calibration=calibration, tune_steps=steps, force=True)
    note = next(n for n in report.notes if n.startswith("tuned 40 steps"))
    before, after = map(float, re.search(r"held-out sequences ([\d.]+) -> ([\d.]+)", note).groups())
    assert after < 0.9 * before, note
    plain, tuned = (fmt.read_tensors(gio.open_gguf(outs[s])) for s in (0, 40))
    assert np.array_equal(plain.codes, tuned.codes) and np.array_equal(plain.hot_codes, tuned.hot_codes)
    assert np.array_equal(plain.sigma0, tuned.sigma0)  # the adaptor stays
    assert not np.array_equal(plain.codebooks, tuned.codebooks)
    assert not np.array_equal(plain.hot_codebooks, tuned.hot_codebooks)
    assert "tuned 40 steps" in report.format()


def test_tuning_without_text_trains_on_what_the_model_writes(tiny_gguf, workdir, tmp_path):
    """No calibration text: the codebooks are tuned on the documents the model wrote for its
    prior; with the tokenizer's prior there are none, and that is a clear error."""
    from carvq.converter.convert import TUNE_DOCUMENTS, convert
    from carvq.errors import CarvqError

    out = workdir / "tune-self.gguf"
    report = convert(tiny_gguf("llama"), out, tiny_config("llama"), iters=2, seed=3, progress=False, tune_steps=8,
                     force=True)
    note = next(n for n in report.notes if n.startswith("tuned 8 steps"))
    assert "self-written sequences" in note and f"{TUNE_DOCUMENTS} documents it wrote" in report.weights_from
    before, after = map(float, re.search(r"held-out sequences ([\d.]+) -> ([\d.]+)", note).groups())
    assert after <= before
    with pytest.raises(CarvqError, match="--tune-steps needs --calibration"):
        convert(tiny_gguf("llama"), tmp_path / "out.gguf", tiny_config("llama"), progress=False, tune_steps=5,
                prior="tokenizer")
    assert not (tmp_path / "out.gguf").exists()


def test_too_short_calibration_text_is_a_clear_error(tiny_gguf, tmp_path):
    from carvq.converter.convert import convert
    from carvq.errors import CarvqError

    text = tmp_path / "short.txt"
    text.write_text("the cat sat on the mat.\n")
    with pytest.raises(CarvqError, match="--tune-steps needs at least"):
        convert(tiny_gguf("llama"), tmp_path / "out.gguf", tiny_config("llama"), progress=False, tune_steps=5,
                calibration=text)
    assert not (tmp_path / "out.gguf").exists()
