"""converter/torch_model.py: the source model in PyTorch from its GGUF, in one copy, computes
what transformers' own loader gives; and the Fisher pass's memory policy (converter/metric.py)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from tiny_models import make_tiny_checkpoint

from carvq.errors import CarvqError


def _reference_logits(path, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def untied_llama_gguf(workdir):
    from carvq.converter.hf import convert_hf

    out = workdir / "llama-untied.gguf"
    if not out.exists():
        convert_hf(make_tiny_checkpoint("llama", workdir / "hf-llama-untied", tied=False, seed=2), out, "f32")
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma3", "untied llama"])
def test_the_lean_load_computes_what_transformers_loads(arch, tiny_gguf, untied_llama_gguf):
    import torch

    from carvq.converter import torch_model

    path = untied_llama_gguf if arch == "untied llama" else tiny_gguf(arch)
    model = torch_model.load_frozen(path, progress=False)
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, _reference_logits(path, ids), rtol=1e-5, atol=1e-5)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (arch != "untied llama")
    assert not any(p.requires_grad or p.is_meta for p in model.parameters())
    torch_model.check_head_logits(model, ids[0])  # the Fisher pass's head is the model's


def test_the_bfloat16_pass_measures_the_same_sensitivity(tiny_gguf):
    """Where float32 would pass the memory bound the pass runs in bfloat16: the same dimensions
    stand out."""
    import torch

    from carvq.converter import metric

    seqs = [torch.arange(2, 60), torch.arange(7, 90), torch.arange(30, 120)]
    f32 = metric.fisher_diagonal(tiny_gguf("llama"), seqs, 0, False).diagonal
    bf16 = metric.fisher_diagonal(tiny_gguf("llama"), seqs, 0, False, dtype=torch.bfloat16).diagonal
    assert np.corrcoef(np.log(f32), np.log(bf16))[0, 1] > 0.95


def _reader(V, n, layers, ffn, block_elements):
    """What pass_plan reads of a GGUF, at a real model's shape, without its bytes."""
    tensors = [SimpleNamespace(name="token_embd.weight", shape=(n, V), n_elements=V * n),
               SimpleNamespace(name="blk.all", shape=(block_elements,), n_elements=block_elements)]
    fields = {"general.architecture": "llama", "llama.block_count": layers, "llama.feed_forward_length": ffn}
    return SimpleNamespace(tensors=tensors,
                           get_field=lambda k: SimpleNamespace(contents=lambda: fields[k]) if k in fields else None)


def test_the_pass_runs_in_the_dtype_that_keeps_the_conversion_in_its_bound():
    import torch

    from carvq.converter import metric

    smollm2 = _reader(49152, 576, 30, 1536, 106_000_000)
    gemma3 = _reader(262144, 640, 18, 2048, 100_000_000)
    llama_1b = _reader(128256, 2048, 16, 8192, 973_000_000)
    assert metric.pass_plan(smollm2, 256, available=None, bfloat16_fast=True)[0] == torch.float32
    assert metric.pass_plan(gemma3, 256, available=None, bfloat16_fast=True)[0] == torch.bfloat16  # float32 would peak at its bound
    with pytest.raises(CarvqError, match="bound of 2.9 GiB"):
        metric.pass_plan(llama_1b, 256, available=None, bfloat16_fast=True)  # 2.5 GB of bfloat16 weights alone
    with pytest.raises(CarvqError, match="GiB are available"):
        metric.pass_plan(smollm2, 256, available=2**28, bfloat16_fast=True)


def test_without_fast_bfloat16_the_pass_runs_float32_on_shorter_sequences():
    """On a CPU without bfloat16 units a bfloat16 pass is two orders of magnitude slower (Gemma-3:
    over an hour); there the pass stays in float32 and cuts its sequences to fit the bound."""
    import torch

    from carvq.converter import metric

    smollm2 = _reader(49152, 576, 30, 1536, 106_000_000)
    gemma3 = _reader(262144, 640, 18, 2048, 100_000_000)
    llama_1b = _reader(128256, 2048, 16, 8192, 973_000_000)
    assert metric.pass_plan(gemma3, 256, available=None, bfloat16_fast=True) == (torch.bfloat16, 256)
    dtype, tokens = metric.pass_plan(gemma3, 256, available=None, bfloat16_fast=False)
    assert dtype == torch.float32 and metric.MIN_PASS_TOKENS <= tokens < 256
    assert metric.pass_plan(smollm2, 256, available=None, bfloat16_fast=False) == (torch.float32, 256)
    with pytest.raises(CarvqError, match="even in float32"):
        metric.pass_plan(llama_1b, 256, available=None, bfloat16_fast=False)
    assert isinstance(metric.bfloat16_is_fast(), bool)
