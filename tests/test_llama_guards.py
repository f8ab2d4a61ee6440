"""llama.cpp around a CARVQ model (issue 12, items 1-3): what would read the missing dense
token_embd is refused with a message, the rest works, and the head copy stays lazily mapped."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np

from carvq import format as fmt
from hostile_corpus import rewrite


def tool(name: str) -> Path:
    from carvq.runtime import tool_path

    return tool_path(name)


def complete(model: Path, *extra, timeout=180) -> subprocess.CompletedProcess:
    """llama-completion, greedy, 4 tokens, no chat template."""
    return subprocess.run([str(tool("llama-completion")), "-m", str(model), "-p", "the", "-n", "4", "--temp", "0",
                           "-no-cnv", "-c", "64", "-t", "2", "--no-warmup", *map(str, extra)],
                          capture_output=True, text=True, errors="replace", timeout=timeout)


def _write_lora(path: Path, base: Path, targets: dict[str, tuple[int, int]], rank=2):
    """A LoRA adapter GGUF for `base`: name -> (n_in, n_out) of each adapted weight."""
    import gguf

    from carvq import gguf_io as gio

    arch = gio.field_value(gio.open_gguf(base), "general.architecture")
    w = gguf.GGUFWriter(None, arch)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(rank))
    rng = np.random.default_rng(0)
    for name, (n_in, n_out) in targets.items():
        # ggml shapes: lora_a {n_in, r}, lora_b {r, n_out} (numpy shapes reversed)
        w.add_tensor(f"{name}.lora_a", (rng.standard_normal((rank, n_in)) * 0.01).astype(np.float32))
        w.add_tensor(f"{name}.lora_b", (rng.standard_normal((n_out, rank)) * 0.01).astype(np.float32))
    gio.write_gguf(w, path, progress=False)


def _shape(path: Path, name: str) -> tuple[int, int]:
    from carvq import gguf_io as gio

    t = gio.tensor_by_name(gio.open_gguf(path), name)
    return int(t.shape[0]), int(t.shape[1])


def test_lora_beside_a_carvq_embedding_runs(tiny_carvq, tmp_path):
    """Before patch 0007 the embedding LoRA loop dereferenced the null tok_embd at the first decode."""
    path, _ = tiny_carvq("llama")
    lora = tmp_path / "q-lora.gguf"
    _write_lora(lora, path, {"blk.0.attn_q.weight": _shape(path, "blk.0.attn_q.weight")})
    proc = complete(path, "--lora", lora)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_lora_on_the_carvq_embedding_is_refused(tiny_carvq, tmp_path):
    path, _ = tiny_carvq("llama")
    n_embd, n_vocab = _shape(path, "output.weight")
    lora = tmp_path / "embd-lora.gguf"
    # an embedding LoRA is stored transposed: lora_a {r, V}, lora_b {n, r} (llm_build_inp_embd)
    import gguf

    from carvq import gguf_io as gio

    w = gguf.GGUFWriter(None, "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 2.0)
    w.add_tensor("token_embd.weight.lora_a", np.zeros((n_vocab, 2), np.float32))
    w.add_tensor("token_embd.weight.lora_b", np.zeros((2, n_embd), np.float32))
    gio.write_gguf(w, lora, progress=False)
    proc = complete(path, "--lora", lora)
    assert proc.returncode != 0
    assert "adapts the input embedding" in proc.stderr, proc.stderr[-3000:]
    assert "Segmentation" not in proc.stderr and proc.returncode > 0


def test_architecture_outside_the_allow_list_is_refused(tiny_carvq, tiny_gguf, tmp_path):
    """mistral3 builds the same tensors as llama, so it would load; its CARVQ file must not.
    The same rename of the stock file still loads (the control)."""
    path, _ = tiny_carvq("llama")
    bad = tmp_path / "mistral3.carvq.gguf"
    rewrite(path, bad, arch="mistral3")
    proc = complete(bad)
    assert proc.returncode != 0
    assert "architecture 'mistral3' is not supported" in proc.stderr, proc.stderr[-3000:]
    control = tmp_path / "mistral3.gguf"
    rewrite(tiny_gguf("llama"), control, arch="mistral3")
    proc = complete(control)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_allow_list_is_one_list():
    """The C loader's CARVQ_ARCHITECTURES and the converter's list are the same text."""
    header = (Path(__file__).resolve().parents[1] / "patches" / "src" / "carvq.h").read_text()
    archs = re.search(r'#define CARVQ_ARCHITECTURES "([^"]*)"', header).group(1).split()
    assert tuple(archs) == fmt.ARCHITECTURES


def test_head_copy_is_mapped_lazily(tiny_carvq):
    """The head copy is kept out of the mmap prefetch: only the rows the screen picks become resident."""
    path, _ = tiny_carvq("llama")
    proc = complete(path, "-v")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"tensor output\.weight .*lazy read enabled", proc.stderr), proc.stderr[-3000:]


def test_override_to_a_non_host_buffer_is_refused_or_kept_on_cpu(tiny_carvq):
    """-ot moving CARVQ tensors elsewhere: on a CPU-only build the only other buffers are the CPU's
    own (host) ones, so the model still runs and decodes the same tokens; a GPU build refuses
    (checked on a GPU machine, docs/RESULTS.md)."""
    path, _ = tiny_carvq("llama")
    base = complete(path)
    moved = complete(path, "-ot", r"token_embd\.carvq\..*=CPU")
    assert base.returncode == 0 and moved.returncode == 0, moved.stderr[-3000:]
    assert moved.stdout == base.stdout


def _write_eagle3_draft(path: Path, target: Path, own_embedding: bool) -> None:
    """A random one-layer EAGLE3 draft for `target` (its tokenizer, its width). Without a
    token_embd.weight of its own it borrows the target's through ctx_other, as EAGLE3 drafts of
    most models do."""
    import gguf

    from carvq import gguf_io as gio

    reader = gio.open_gguf(target)
    arch = gio.field_value(reader, "general.architecture")
    n = int(gio.field_value(reader, f"{arch}.embedding_length"))
    n_head = int(gio.field_value(reader, f"{arch}.attention.head_count"))
    n_head_kv = int(gio.field_value(reader, f"{arch}.attention.head_count_kv", n_head))
    n_vocab = len(gio.field_value(reader, "tokenizer.ggml.tokens"))
    head_dim, n_ff = n // n_head, 2 * n
    w = gguf.GGUFWriter(None, "eagle3")
    gio.copy_fields(reader, w, skip={k for k in reader.fields if not k.startswith("tokenizer.")})
    for key, value in {"context_length": 256, "embedding_length": n, "block_count": 1, "feed_forward_length": n_ff,
                       "attention.head_count": n_head, "attention.head_count_kv": n_head_kv,
                       "target_hidden_size": n}.items():
        w.add_uint32(f"eagle3.{key}", value)
    w.add_float32("eagle3.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_array("eagle3.target_layers", [0, 1, 1])
    rng = np.random.default_rng(0)

    def add(name: str, *shape: int) -> None:  # ggml order {ne0, ne1}; numpy takes it reversed
        w.add_tensor(name, (rng.standard_normal(tuple(reversed(shape))) * 0.02).astype(np.float32))

    add("fc.weight", 3 * n, n)
    add("output_norm.weight", n)
    if own_embedding:
        add("token_embd.weight", n, n_vocab)
        add("output.weight", n, n_vocab)
    for name, *shape in [("attn_norm", n), ("attn_norm_2", n), ("attn_q", 2 * n, head_dim * n_head),
                         ("attn_k", 2 * n, head_dim * n_head_kv), ("attn_v", 2 * n, head_dim * n_head_kv),
                         ("attn_output", head_dim * n_head, n), ("ffn_norm", n), ("ffn_gate", n, n_ff),
                         ("ffn_down", n_ff, n), ("ffn_up", n, n_ff)]:
        add(f"blk.0.{name}.weight", *shape)
    gio.write_gguf(w, path, progress=False)


_DRAFT_CONTEXT = r"""
import sys
from carvq.runtime._llama_cffi import ffi, lib
lib.llama_backend_init()
def load(path):
    model = lib.llama_model_load_from_file(path.encode(), lib.llama_model_default_params())
    assert model != ffi.NULL, "cannot load " + path
    return model
cp = lib.llama_context_default_params()
cp.n_ctx = 256
target = lib.llama_init_from_model(load(sys.argv[1]), cp)
assert target != ffi.NULL
cp.ctx_other = target
draft = lib.llama_init_from_model(load(sys.argv[2]), cp)
print("draft context:", "refused" if draft == ffi.NULL else "made")
"""


def test_draft_borrowing_a_carvq_embedding_is_refused(tiny_carvq, tiny_gguf, tmp_path):
    """An EAGLE3 draft without an embedding of its own would read the target's token_embd through
    ctx_other, which a CARVQ target does not have (patch 0007). The same draft beside the stock
    target, and a draft with its own embedding beside the CARVQ target, are the controls."""
    import sys

    carvq_target, _ = tiny_carvq("llama")
    borrowing, owning = tmp_path / "eagle3.gguf", tmp_path / "eagle3-own-embd.gguf"
    _write_eagle3_draft(borrowing, carvq_target, own_embedding=False)
    _write_eagle3_draft(owning, carvq_target, own_embedding=True)

    def run(target: Path, draft: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _DRAFT_CONTEXT, str(target), str(draft)], capture_output=True,
                              text=True, errors="replace", timeout=120)

    refused = run(carvq_target, borrowing)
    assert refused.returncode == 0, refused.stderr[-3000:]
    assert "draft context: refused" in refused.stdout
    assert "input embedding is CARVQ-compressed, so this eagle3 draft cannot borrow it" in refused.stderr
    for target, draft in ((tiny_gguf("llama"), borrowing), (carvq_target, owning)):
        control = run(target, draft)
        assert control.returncode == 0 and "draft context: made" in control.stdout, (draft.name, control.stderr[-3000:])
