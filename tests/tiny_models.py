"""Tiny, random, offline Hugging Face checkpoints for carvq's tests.

Nothing here touches the network.  Everything is generated on the spot and is
deterministic for a given ``seed`` (byte-identical files):

* :func:`train_tokenizer` trains a small SentencePiece **BPE** model on
  synthetic English-like text (:func:`synthetic_corpus`: random sentences from
  a small hand-made word list plus procedurally generated pseudo-words) and
  writes ``tokenizer.model`` + ``tokenizer.json`` + ``tokenizer_config.json``.
* :func:`make_tiny_checkpoint` builds a random ``llama`` / ``qwen2`` /
  ``gemma3`` (text-only ``Gemma3ForCausalLM``) / ``phi3`` model and saves it
  with ``save_pretrained`` (safetensors) next to that tokenizer.
* :func:`convert_to_gguf` runs the pinned llama.cpp ``convert_hf_to_gguf.py``
  on such a checkpoint.

Why SentencePiece BPE: each of the four converters in the pinned tree takes
the SentencePiece path when ``tokenizer.model`` is present (``llama``:
``_set_vocab_sentencepiece``; ``qwen2``: tries ``_set_vocab_sentencepiece``
first and only falls back to the GPT-2/BPE path -- which needs a known
pre-tokenizer hash that a home-made vocab can never have -- on
``FileNotFoundError``; ``gemma3``: ``_set_vocab_sentencepiece`` when
``tokenizer.model`` exists; ``phi3``: its own SentencePiece reader).
llama.cpp's SPM tokenizer merges by piece score, which is what SentencePiece
BPE stores (score = -merge rank).

Token ids agree exactly between sentencepiece, ``AutoTokenizer`` and
llama.cpp (checked against ``llama-completion --verbose-prompt``; HF and
``llama-perplexity`` perplexities agree to ~1e-6), except for special-token
strings typed into raw text.  Without byte fallback (the default below 512
tokens) only printable ASCII + ``\\n`` + ``\\t`` is supported: llama.cpp
throws on other characters.
"""

from __future__ import annotations

import json
import os
import random
import string
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = [
    "ARCHES",
    "SPECIAL_TOKENS",
    "llama_cpp_dir",
    "synthetic_corpus",
    "train_tokenizer",
    "make_tiny_checkpoint",
    "convert_to_gguf",
]

#: Architectures :func:`make_tiny_checkpoint` can build.
ARCHES = ("llama", "qwen2", "gemma3", "phi3")

#: Where the pinned llama.cpp source tree lives unless ``CARVQ_LLAMA_CPP_DIR`` says otherwise.

#: Special-token ids baked into every tokenizer made here (same for all arches).
SPECIAL_TOKENS = {"unk": (0, "<unk>"), "bos": (1, "<s>"), "eos": (2, "</s>"), "pad": (3, "<pad>")}

# A small hand-made word list.  Sentences are random draws from it (Zipf-ish
# weights so that frequent words get whole-word pieces, rare ones get split).
_WORDS = """
the a an this that some every no one two three many few all each other
cat dog bird fish horse mouse fox bear wolf frog owl child teacher farmer
river stone tree house garden window door road bridge hill field forest
city village market school kitchen table chair lamp book letter paper
light water fire wind rain snow cloud sun moon star night morning evening
red blue green yellow small big old young quick slow quiet loud warm cold
bright dark happy tired gentle strange simple heavy empty
runs walks jumps sleeps reads writes sings finds keeps opens closes carries
builds watches sees hears holds brings takes gives makes helps follows
is was are were will can may must should has had does did
and or but so because while when then before after
in on at under over into from with without near behind across through
very often never always soon again almost only still
hello world model token number code data test value answer question
""".split()

_ONSETS = ["b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
           "br", "cl", "dr", "gr", "pl", "st", "tr", "sh", "ch", "th"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "oo", "ou"]
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng"]


def llama_cpp_dir() -> Path:
    """The pinned llama.cpp source tree (``$CARVQ_LLAMA_CPP_DIR`` or the default cache path)."""
    from carvq.llama_source import source_tree  # honours $CARVQ_LLAMA_CPP_DIR, fetches when absent

    return source_tree()


def _pseudo_word(rng: random.Random) -> str:
    n_syl = rng.choice([1, 2, 2, 3])
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n_syl))


def synthetic_corpus(vocab_size: int = 320, seed: int = 0) -> list[str]:
    """Random English-like sentences, enough of them (and varied enough) for a BPE vocab of ``vocab_size``."""
    rng = random.Random(seed)
    n_pseudo = max(16, vocab_size // 2)
    pseudo = sorted({_pseudo_word(rng) for _ in range(n_pseudo)})
    words = _WORDS + pseudo
    weights = [1.0 / (i + 1) ** 0.8 for i in range(len(words))]
    n_lines = max(2000, 6 * vocab_size)
    lines = []
    for _ in range(n_lines):
        n = rng.randint(3, 14)
        ws = rng.choices(words, weights=weights, k=n)
        if rng.random() < 0.15:
            ws.insert(rng.randrange(len(ws) + 1), str(rng.randint(0, 2000)))
        if rng.random() < 0.2 and len(ws) > 4:
            k = rng.randrange(1, len(ws) - 1)
            ws[k] = ws[k] + ","
        s = " ".join(ws)
        s = s[0].upper() + s[1:] + rng.choice([".", ".", ".", "!", "?"])
        if rng.random() < 0.05:
            s = '"' + s + '"'
        r = rng.random()
        if r < 0.08 and lines:  # paragraphs: newline / blank line / tab separated
            s = lines.pop() + rng.choice(["\n", "\n\n", "\t"]) + s
        elif r < 0.1:
            s = "  " + s  # indentation: runs of spaces
        lines.append(s)
    # Every printable ASCII character must become a piece (character_coverage=1.0).
    printable = "".join(c for c in string.printable if c.isprintable() and c != " ")
    lines += [printable, " ".join(printable)] * 3
    return lines


def train_tokenizer(
    out_dir: Path,
    vocab_size: int = 320,
    seed: int = 0,
    *,
    byte_fallback: bool | None = None,
    control_symbols: Sequence[str] = (),
    add_dummy_prefix: bool = True,
) -> None:
    """Train a SentencePiece BPE tokenizer and write it to ``out_dir``.

    Writes ``tokenizer.model`` (read by llama.cpp's converter) plus
    ``tokenizer.json`` / ``tokenizer_config.json`` (``LlamaTokenizer``, read by
    ``AutoTokenizer``).  Ids 0..3 are ``<unk> <s> </s> <pad>``; BOS is added,
    EOS is not.

    Normalization is ``identity`` (no NFKC, no whitespace collapsing) so that
    sentencepiece, the transformers tokenizer and llama.cpp's SPM tokenizer
    give the same ids; ``\\n`` and ``\\t`` are ordinary pieces.

    ``byte_fallback`` (default: only when ``vocab_size >= 512``) adds the 256
    ``<0xNN>`` pieces, so any UTF-8 text tokenizes.  Without it, text must stay
    within printable ASCII + ``\\n`` + ``\\t``: other characters become
    ``<unk>`` in sentencepiece, are silently dropped by the transformers
    tokenizer, and make llama.cpp's SPM tokenizer throw (it looks up a
    ``<0xNN>`` piece that does not exist).  ``vocab_size`` must be at least
    ~110 (~370 with byte fallback).

    ``control_symbols`` become extra special (CONTROL) pieces right after
    ``<pad>`` (ids 4, 5, ...), e.g. ``("<|endoftext|>", "<|end|>")``.

    ``add_dummy_prefix=False`` (Gemma style) stops sentencepiece from
    prepending "▁" to the text; the transformers tokenizer then gets
    ``add_prefix_space=False`` to match.
    """
    import io

    import sentencepiece as spm

    if byte_fallback is None:
        byte_fallback = vocab_size >= 512
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(synthetic_corpus(vocab_size, seed)),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=byte_fallback,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix,
        unk_id=SPECIAL_TOKENS["unk"][0], unk_piece=SPECIAL_TOKENS["unk"][1],
        bos_id=SPECIAL_TOKENS["bos"][0], bos_piece=SPECIAL_TOKENS["bos"][1],
        eos_id=SPECIAL_TOKENS["eos"][0], eos_piece=SPECIAL_TOKENS["eos"][1],
        pad_id=SPECIAL_TOKENS["pad"][0], pad_piece=SPECIAL_TOKENS["pad"][1],
        control_symbols=list(control_symbols),
        num_threads=1,
        minloglevel=2,
    )
    (out_dir / "tokenizer.model").write_bytes(buf.getvalue())

    # transformers 5 tokenizers are `tokenizers`-backed only.  LlamaTokenizer
    # converts tokenizer.model (vocab + merges) on load; save_pretrained then
    # writes tokenizer.json + tokenizer_config.json (but no longer
    # tokenizer.model, hence the explicit write above).
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(
        str(out_dir),
        unk_token=SPECIAL_TOKENS["unk"][1],
        bos_token=SPECIAL_TOKENS["bos"][1],
        eos_token=SPECIAL_TOKENS["eos"][1],
        pad_token=SPECIAL_TOKENS["pad"][1],
        add_bos_token=True,
        add_eos_token=False,
    )
    if len(tok) != vocab_size:
        raise RuntimeError(f"tokenizer has {len(tok)} tokens, expected {vocab_size}")
    tok.save_pretrained(str(out_dir))
    _make_tokenizer_json_spm_exact(out_dir, add_dummy_prefix=add_dummy_prefix, byte_fallback=byte_fallback)


def _make_tokenizer_json_spm_exact(out_dir: Path, *, add_dummy_prefix: bool, byte_fallback: bool) -> None:
    """Rewrite tokenizer.json so that it tokenizes exactly like sentencepiece / llama.cpp.

    LlamaTokenizer (transformers 5) rebuilds its pipeline in ``__init__`` with a
    ``Metaspace(prepend_scheme="first")`` pre-tokenizer, which differs from
    sentencepiece and llama.cpp's SPM tokenizer when the text starts with a
    space ("  two": HF ``▁ ▁two``, spm/llama.cpp ``▁ ▁ ▁two``) and after special
    tokens (llama.cpp re-adds the space prefix after each one).  We write the
    classic "legacy" SPM pipeline instead -- normalizer ``Prepend("▁")`` +
    ``Replace(" ", "▁")``, no pre-tokenizer -- and declare
    ``tokenizer_class: TokenizersBackend`` so that ``AutoTokenizer`` loads
    tokenizer.json as is instead of rebuilding it.
    """
    tj_path = out_dir / "tokenizer.json"
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    normalizers: list[dict[str, Any]] = []
    if add_dummy_prefix:
        normalizers.append({"type": "Prepend", "prepend": "\u2581"})
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"})
    tj["normalizer"] = {"type": "Sequence", "normalizers": normalizers}
    tj["pre_tokenizer"] = None
    tj["model"]["unk_token"] = SPECIAL_TOKENS["unk"][1]
    tj["model"]["fuse_unk"] = True
    tj["model"]["byte_fallback"] = byte_fallback
    decoders: list[dict[str, Any]] = [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    tj["decoder"] = {"type": "Sequence", "decoders": decoders}
    tj_path.write_text(json.dumps(tj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    for key in ("add_prefix_space", "use_default_system_prompt", "legacy", "is_local", "local_files_only"):
        cfg.pop(key, None)
    cfg["tokenizer_class"] = "TokenizersBackend"
    cfg["add_bos_token"] = True
    cfg["add_eos_token"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


_REMOTE_TOKENIZER_PY = """\
# Written by carvq's tests/tiny_models.py.  Only used when AutoTokenizer is
# called with trust_remote_code=True; it is the plain tokenizer.json loader.
from transformers import TokenizersBackend


class TinyTokenizer(TokenizersBackend):
    pass
"""


def _pin_tokenizer_class(out_dir: Path) -> None:
    """Make ``AutoTokenizer`` honour ``tokenizer_class`` for model types that transformers 5 overrides.

    transformers 5.x lists ``qwen2`` (and ``phi3``) in
    ``MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS``: for ``qwen2``,
    ``AutoTokenizer`` ignores the declared class and builds ``Qwen2Tokenizer``
    (byte-level BPE, GPT-2 regex) from our vocab/merges, which mangles a
    SentencePiece vocab (spaces are dropped: "the cat" -> ["th", "e", "c",
    "at"]).  An ``auto_map`` entry makes ``AutoTokenizer`` skip that override:
    without ``trust_remote_code`` it then falls through to ``tokenizer_class``
    (TokenizersBackend); with it, it loads the few-line module above, which is
    TokenizersBackend too.  (phi3 maps to the generic TokenizersBackend, which
    is what we want anyway.)
    """
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["auto_map"] = {"AutoTokenizer": [None, "tokenization_tiny.TinyTokenizer"]}
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "tokenization_tiny.py").write_text(_REMOTE_TOKENIZER_PY, encoding="utf-8")


# ---------------------------------------------------------------------------
# models


# llama.cpp (llama-vocab.cpp) special-cases any model whose general.name
# contains "phi3"/"phi-3" and looks up "<unk>", "<s>", "</s>" and
# "<|endoftext|>" with unordered_map::at -> "error loading model vocabulary:
# unordered_map::at" if one is missing.  general.name comes from the checkpoint
# directory name, so phi3 checkpoints always carry Phi-3's <|endoftext|> and
# <|end|> (EOT) tokens.
_CONTROL_SYMBOLS: dict[str, tuple[str, ...]] = {"phi3": ("<|endoftext|>", "<|end|>")}


def _config(arch: str, *, vocab_size: int, hidden: int, layers: int, tied: bool) -> Any:
    import transformers as tf

    if hidden % 16:
        raise ValueError("hidden must be a multiple of 16 (head_dim 16)")
    n_heads = hidden // 16
    n_kv = n_heads // 2 if n_heads % 2 == 0 else n_heads
    ids = dict(
        bos_token_id=SPECIAL_TOKENS["bos"][0],
        eos_token_id=SPECIAL_TOKENS["eos"][0],
        pad_token_id=SPECIAL_TOKENS["pad"][0],
    )
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        **ids,
    )
    if arch == "llama":
        cfg = tf.LlamaConfig(**common, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        cfg.architectures = ["LlamaForCausalLM"]
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**common, rms_norm_eps=1e-6, use_sliding_window=False,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
        cfg.architectures = ["Qwen2ForCausalLM"]
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=64,
                                  rms_norm_eps=1e-6)
        cfg.architectures = ["Gemma3ForCausalLM"]
    elif arch == "phi3":
        cfg = tf.Phi3Config(**common, original_max_position_embeddings=512, rms_norm_eps=1e-5,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        cfg.architectures = ["Phi3ForCausalLM"]
    else:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHES}")
    return cfg


def _realistic_embedding(gen: Any, vocab: int, hidden: int) -> Any:
    """Random embedding rows with some structure: a shared mean direction, a
    low-rank component, isotropic noise, and log-normal per-row norms."""
    import torch

    rank = max(2, hidden // 4)
    mean = torch.randn(hidden, generator=gen) * 0.01
    basis = torch.randn(rank, hidden, generator=gen) / rank ** 0.5
    coef = torch.randn(vocab, rank, generator=gen) * torch.linspace(1.0, 0.2, rank)
    e = coef @ basis + 0.5 * torch.randn(vocab, hidden, generator=gen)
    e = e / e.norm(dim=1, keepdim=True)
    norms = torch.exp(torch.randn(vocab, 1, generator=gen) * 0.25) * 0.02 * hidden ** 0.5
    return e * norms + mean


def _randomize(model: Any, arch: str, seed: int) -> None:
    """Overwrite every parameter from one seeded generator (independent of transformers' init code)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p is emb:
                continue
            if p.ndim == 1:
                if name.endswith("norm.weight") or "layernorm" in name or "_norm" in name:
                    # Gemma3RMSNorm computes x * (1 + w): keep the effective gain ~1.
                    base = 0.0 if arch == "gemma3" else 1.0
                    p.copy_(base + 0.05 * torch.randn(p.shape, generator=gen))
                else:  # biases (qwen2 q/k/v)
                    p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        emb.copy_(_realistic_embedding(gen, emb.shape[0], emb.shape[1]))


def make_tiny_checkpoint(
    arch: str,
    out_dir: Path,
    *,
    tied: bool = True,
    vocab_size: int = 320,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
) -> Path:
    """Build a random ``arch`` causal LM + tokenizer and ``save_pretrained`` it (safetensors) into ``out_dir``.

    ``arch`` is one of :data:`ARCHES`.  ``hidden`` must be a multiple of 16
    (head_dim is 16; ``hidden // 16`` query heads, half as many KV heads).
    ``tied=True`` ties ``lm_head`` to the embeddings (no ``lm_head.weight`` in
    the safetensors, no ``output.weight`` in the GGUF).  Returns ``out_dir``.
    """
    import torch
    import transformers as tf

    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHES}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_tokenizer(
        out_dir,
        vocab_size=vocab_size,
        seed=seed,
        control_symbols=_CONTROL_SYMBOLS.get(arch, ()),
        # The gemma3 converter always writes tokenizer.ggml.add_space_prefix =
        # False (Gemma's own tokenizer has no dummy prefix), so train ours the
        # same way or llama.cpp and transformers disagree on the first word.
        add_dummy_prefix=(arch != "gemma3"),
    )
    if arch == "qwen2":
        _pin_tokenizer_class(out_dir)

    cfg = _config(arch, vocab_size=vocab_size, hidden=hidden, layers=layers, tied=tied)
    cls = {
        "llama": tf.LlamaForCausalLM,
        "qwen2": tf.Qwen2ForCausalLM,
        "gemma3": tf.Gemma3ForCausalLM,
        "phi3": tf.Phi3ForCausalLM,
    }[arch]
    with torch.random.fork_rng(devices=[]):  # don't disturb the caller's global RNG
        torch.manual_seed(seed)
        model = cls(cfg).to(torch.float32).eval()
    _randomize(model, arch, seed)
    model.save_pretrained(str(out_dir))
    return out_dir


# ---------------------------------------------------------------------------
# conversion


def convert_to_gguf(
    model_dir: Path,
    outfile: Path,
    *,
    outtype: str = "f32",
    tree: Path | None = None,
    timeout: float = 300,
) -> Path:
    """Run the pinned ``convert_hf_to_gguf.py`` on ``model_dir``; returns ``outfile``.

    Equivalent to ``python <tree>/convert_hf_to_gguf.py <model_dir> --outfile <outfile> --outtype f32``.
    Raises ``RuntimeError`` with the converter's output if it fails.
    """
    tree = Path(tree) if tree is not None else llama_cpp_dir()
    cmd = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(model_dir),
           "--outfile", str(outfile), "--outtype", outtype]
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # the tree's own gguf-py, not a pip-installed gguf
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0 or not Path(outfile).is_file():
        raise RuntimeError(
            f"convert_hf_to_gguf failed (rc={proc.returncode}): {' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
        )
    return Path(outfile)


