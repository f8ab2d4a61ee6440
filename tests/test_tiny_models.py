"""Checks for the tiny-checkpoint factory in tests/tiny_models.py.

Each architecture is built once (tied and untied heads alternate over the
four so both cases are covered) and checked for
  (1) transformers: AutoModelForCausalLM / AutoTokenizer load it, and
  (2) the pinned llama.cpp converter turns it into a GGUF that the tree's own
      gguf-py reads, with the expected architecture and token_embd.weight.
The llama.cpp tree comes from $CARVQ_LLAMA_CPP_DIR (default: the carvq cache).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tiny_models import (
    SPECIAL_TOKENS,
    convert_to_gguf,
    llama_cpp_dir,
    make_tiny_checkpoint,
    train_tokenizer,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

VOCAB, HIDDEN = 320, 64
CASES = [  # (arch, tied, HF class, GGUF general.architecture)
    ("llama", True, "LlamaForCausalLM", "llama"),
    ("qwen2", False, "Qwen2ForCausalLM", "qwen2"),
    ("gemma3", True, "Gemma3ForCausalLM", "gemma3"),
    ("phi3", False, "Phi3ForCausalLM", "phi3"),
]
TEXT = "Hello world, the cat runs!\nA  dog\tsleeps near 42 trees."


def _field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


@pytest.mark.parametrize("arch,tied,hf_class,gguf_arch", CASES, ids=[c[0] for c in CASES])
def test_tiny_checkpoint(tmp_path: Path, arch: str, tied: bool, hf_class: str, gguf_arch: str) -> None:
    model_dir = make_tiny_checkpoint(arch, tmp_path / arch, tied=tied, vocab_size=VOCAB, hidden=HIDDEN)
    assert (model_dir / "model.safetensors").is_file()
    assert (model_dir / "tokenizer.model").is_file()

    # (1) transformers round trip
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert type(model).__name__ == hf_class
    assert model.config.vocab_size == VOCAB and model.config.hidden_size == HIDDEN
    emb = model.get_input_embeddings().weight.detach().numpy()
    assert emb.shape == (VOCAB, HIDDEN)
    # random but not degenerate: distinct rows with varied norms
    norms = np.linalg.norm(emb, axis=1)
    assert norms.std() / norms.mean() > 0.05
    assert len(np.unique(emb.round(6), axis=0)) == VOCAB
    head = model.get_output_embeddings().weight
    assert (head.data_ptr() == model.get_input_embeddings().weight.data_ptr()) == tied

    assert len(tok) == VOCAB
    ids = tok(TEXT)["input_ids"]
    assert ids[0] == SPECIAL_TOKENS["bos"][0]
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    assert ids[1:] == sp.encode(TEXT)  # same ids as sentencepiece (and thus llama.cpp)
    assert SPECIAL_TOKENS["unk"][0] not in ids
    assert tok.decode(ids, skip_special_tokens=True) == TEXT
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), VOCAB)
    assert torch.isfinite(logits).all()

    # (2) pinned converter -> GGUF read by the tree's gguf-py
    tree = llama_cpp_dir()
    if not (tree / "convert_hf_to_gguf.py").is_file():
        pytest.skip(f"llama.cpp tree not found at {tree} (set CARVQ_LLAMA_CPP_DIR)")
    out = convert_to_gguf(model_dir, tmp_path / f"{arch}.gguf", outtype="f32", tree=tree)
    import gguf  # the installed gguf is the pinned tree's gguf-py (scripts/setup.sh)

    reader = gguf.GGUFReader(out)
    assert _field(reader, "general.architecture") == gguf_arch
    tensors = {t.name: t for t in reader.tensors}
    te = tensors["token_embd.weight"]
    assert te.tensor_type == gguf.GGMLQuantizationType.F32
    assert tuple(te.data.shape) == (VOCAB, HIDDEN)
    np.testing.assert_array_equal(np.asarray(te.data), emb)
    assert ("output.weight" in tensors) == (not tied)
    if not tied:
        np.testing.assert_array_equal(np.asarray(tensors["output.weight"].data), head.detach().numpy())
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert len(_field(reader, "tokenizer.ggml.tokens")) == VOCAB
    assert _field(reader, "tokenizer.ggml.bos_token_id") == SPECIAL_TOKENS["bos"][0]


def test_train_tokenizer_is_deterministic(tmp_path: Path) -> None:
    train_tokenizer(tmp_path / "a", vocab_size=200, seed=3)
    train_tokenizer(tmp_path / "b", vocab_size=200, seed=3)
    train_tokenizer(tmp_path / "c", vocab_size=200, seed=4)
    a, b, c = ((tmp_path / d / "tokenizer.model").read_bytes() for d in "abc")
    assert a == b
    assert a != c
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "a" / "tokenizer.model"))
    assert sp.vocab_size() == 200
    assert [sp.id_to_piece(i) for i, _ in sorted(SPECIAL_TOKENS.values())] == [p for _, p in sorted(SPECIAL_TOKENS.values())]
