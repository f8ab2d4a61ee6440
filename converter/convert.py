"""`carvq convert`: a GGUF or HF checkpoint in, a CARVQ-GGUF out.

Every tensor but token_embd.weight, and every metadata key, is copied byte for byte;
the embedding becomes the CARVQ tensors of docs/FORMAT.md. A tied model gains an
output.weight, since llama.cpp's logits would otherwise read the missing dense embedding.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from carvq import gguf_io as gio
from carvq.errors import CarvqError
from carvq.reference import FORMAT_VERSION
from carvq.converter import config as cfgmod
from carvq.converter import frequency, hf, train
from carvq.converter.config import Config

# Architectures whose llama.cpp graph builds its input with build_inp_embd from token_embd,
# which the patch hooks; others would load but bypass the CARVQ lookup.
SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "phi3")


@dataclass
class Report:
    input: str
    output: str
    arch: str
    n_vocab: int
    n_embd: int
    source_type: str
    config: Config
    weights_from: str
    parts: dict[str, int]
    head_bytes: int
    head_type: str
    head_copied: bool
    rel_error: float
    weighted_rel_error: float
    mean_cos: float
    worst_cos: float
    seconds: float
    rounds: int
    source_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    reconstruction: np.ndarray | None = field(default=None, repr=False)  # (V, n), as decoded from the file

    @property
    def n_weights(self) -> int:
        return self.n_vocab * self.n_embd

    def bpw(self, nbytes: int) -> float:
        return 8.0 * nbytes / self.n_weights

    @property
    def lookup_bytes(self) -> int:
        return sum(self.parts.values())

    def format(self) -> str:
        c = self.config
        rows = [(name, nbytes, self.bpw(nbytes)) for name, nbytes in self.parts.items()]
        rows.append(("lookup total", self.lookup_bytes, self.bpw(self.lookup_bytes)))
        if self.head_copied:
            rows.append((f"head copy ({self.head_type})", self.head_bytes, self.bpw(self.head_bytes)))
            total = self.lookup_bytes + self.head_bytes
            rows.append(("lookup + head copy", total, self.bpw(total)))
        lines = [
            f"carvq convert: {self.input} -> {self.output}",
            f"  model: {self.arch}, embedding {self.n_vocab} x {self.n_embd}, source type {self.source_type} "
            f"({self.source_bytes / 2**20:.2f} MiB, {self.bpw(self.source_bytes):.3f} bpw)",
            f"  config: group size {c.group_size}, levels {c.levels}, codebook {c.codebook_size} ({c.codebook_type}), "
            f"adaptor rank {c.adaptor_rank}, hidden {c.adaptor_hidden}, {c.activation if c.adaptor_rank else 'no adaptor'}, "
            + (f"{c.hot_rows} hot rows with {c.hot_levels} more levels" if c.hot_rows else "no hot rows"),
            f"  token weights: {self.weights_from}",
            "",
            f"  {'part':<26}{'bytes':>14}{'bpw':>9}",
        ]
        lines += [f"  {name:<26}{nbytes:>14,}{b:>9.4f}" for name, nbytes, b in rows]
        lines += [
            "",
            f"  relative error (Frobenius)     {self.rel_error:.4f}",
            f"  relative error (token-weighted) {self.weighted_rel_error:.4f}",
            f"  row cosine similarity          mean {self.mean_cos:.4f}, worst {self.worst_cos:.4f}",
            f"  fit rounds used                {self.rounds}",
            f"  time                           {self.seconds:.1f} s",
        ]
        if self.head_copied:
            lines.append(f"  note: the source ties its output head to the embedding; the head copy costs "
                         f"{self.head_bytes / 2**20:.2f} MiB ({self.bpw(self.head_bytes):.3f} bpw)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and a.exists() and a.samefile(b))
    except OSError:
        return False


def _calibration_counts(gguf_path: Path, calibration: Path, n_vocab: int) -> tuple[np.ndarray, int]:
    """Count the calibration text's tokens with llama.cpp's tokenizer: exactly the ids the
    model will see at inference, and a vocab-only load takes a second where building a
    transformers tokenizer from a GGUF took 26 s on Gemma-3."""
    from carvq.runtime.model import Model

    with Model(gguf_path, vocab_only=True) as vocab:
        return frequency.count_tokens(lambda piece: vocab.tokenize(piece, add_special=False), calibration, n_vocab)


def _token_weights(reader, n_vocab, calibration, gguf_path):
    prior, how = frequency.prior_from_gguf(reader, n_vocab)
    if calibration is None:
        w, desc = prior, how
    else:
        counts, total = _calibration_counts(gguf_path, Path(calibration), n_vocab)
        w = frequency.from_counts(counts, prior)
        desc = f"counts from {calibration} ({total:,} tokens) + 1, plus a {how} of the same mass"
    return frequency.with_special_tokens(w, reader, n_vocab), desc + "; special tokens as heavy as the heaviest"


# The head a tied model gains, unless --head-type says otherwise. Measured (bench/quality.py,
# README): on SmolLM2 a Q5_0 head costs KLD 0.027 for 10 MiB saved, five times less KLD per
# MiB than compressing the embedding; a byte copy of a Q8_0 source makes the file larger
# than the stock one. Q5_0 is also what llama-quantize stores for a Q4_K head at widths
# that are not a multiple of 256.
DEFAULT_HEAD_TYPE = "Q5_0"


def default_head_type(embd, n_embd: int) -> str:
    """DEFAULT_HEAD_TYPE, unless the source embedding is already as small (then a byte copy)
    or the width does not fit its 32-blocks."""
    import gguf

    default = gguf.GGMLQuantizationType[DEFAULT_HEAD_TYPE]
    block, size = gguf.GGML_QUANT_SIZES[default]
    src_block, src_size = gguf.GGML_QUANT_SIZES[embd.tensor_type]
    if n_embd % block or src_size / src_block <= size / block:
        return embd.tensor_type.name
    return DEFAULT_HEAD_TYPE


def _head_tensor(embd, M: np.ndarray, head_type: str):
    """The output.weight to add for a tied model: bytes, type."""
    import gguf

    try:
        qtype = gguf.GGMLQuantizationType[head_type.upper()]
    except KeyError:
        raise CarvqError(f"--head-type {head_type}: not a ggml type name") from None
    if qtype == embd.tensor_type:
        return np.asarray(embd.data), qtype  # byte copy: the head stays exactly as it was
    if qtype == gguf.GGMLQuantizationType.F32:
        return M, qtype
    try:
        return gguf.quants.quantize(M, qtype), qtype
    except (NotImplementedError, gguf.quants.QuantError, AssertionError, ValueError):
        raise CarvqError(f"--head-type {head_type}: gguf-py cannot write this type for a "
                         f"{M.shape[0]}x{M.shape[1]} matrix; use the source type ({embd.tensor_type.name}), F16, Q8_0 or Q4_0") from None


def _write(reader, out: Path, arch: str, fit: train.Fit, cfg: Config, source_type: str,
           head, bpw_lookup: float, bpw_head: float, progress: bool) -> None:
    import gguf

    t = fit.tensors
    writer = gguf.GGUFWriter(None, arch)
    gio.copy_fields(reader, writer, skip=set())
    writer.add_uint32(gio.K_VERSION, FORMAT_VERSION)
    writer.add_uint32(gio.K_GROUP, cfg.group_size)
    writer.add_uint32(gio.K_LEVELS, cfg.levels)
    writer.add_uint32(gio.K_CBSIZE, cfg.codebook_size)
    writer.add_uint32(gio.K_RANK, cfg.adaptor_rank)
    writer.add_uint32(gio.K_HIDDEN, cfg.adaptor_hidden)
    writer.add_string(gio.K_ACT, cfg.activation if cfg.adaptor_rank else "none")
    writer.add_string(gio.K_SRC_TYPE, source_type)
    writer.add_bool(gio.K_HEAD_COPY, head is not None)
    writer.add_float32(gio.K_BPW, bpw_lookup)
    writer.add_float32(gio.K_HEAD_BPW, bpw_head)
    writer.add_uint32(gio.K_HOT_ROWS, cfg.hot_rows)
    writer.add_uint32(gio.K_HOT_LEVELS, cfg.stored_hot_levels)
    for tensor in reader.tensors:
        if tensor.name != gio.EMBD:
            gio.add_source_tensor(writer, tensor)
            continue
        writer.add_tensor(gio.T_CODES, t.codes.view(np.int8))
        writer.add_tensor(gio.T_CODEBOOKS, t.codebooks)
        if cfg.adaptor_rank:
            for name, arr in ((gio.T_SIGMA0, t.sigma0), (gio.T_UP_W, t.up_w), (gio.T_UP_B, t.up_b),
                              (gio.T_DOWN_W, t.down_w), (gio.T_DOWN_B, t.down_b)):
                writer.add_tensor(name, arr)
        if cfg.hot_rows:
            writer.add_tensor(gio.T_HOT_IDS, t.hot_ids)
            writer.add_tensor(gio.T_HOT_CODES, t.hot_codes.view(np.int8))
            writer.add_tensor(gio.T_HOT_CODEBOOKS, t.hot_codebooks)
        if head is not None:
            data, qtype = head
            writer.add_tensor(gio.HEAD, data, raw_dtype=qtype)
    with gio.atomic_output(out) as tmp:
        gio.write_gguf(writer, tmp, progress)


def quantize_body(src: Path, out: Path, body_type: str, keep_head: bool) -> None:
    """Quantize every tensor but the CARVQ ones (which the patched llama-quantize passes
    through) with the bundled llama-quantize."""
    import subprocess

    from carvq.runtime import tool_path

    binary = tool_path("llama-quantize")
    if not binary.exists():
        raise CarvqError(f"--body-type needs the bundled llama-quantize, not found at {binary}")
    with gio.atomic_output(out) as tmp:
        cmd = [str(binary), *(["--leave-output-tensor"] if keep_head else []), str(src), str(tmp), body_type]
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            raise CarvqError(f"llama-quantize {body_type} failed: {lines[-1] if lines else proc.returncode}")


def choose_config(M, w, base: Config, target_bpw: float, seed: int, progress: bool) -> tuple[Config, list[str]]:
    V, n = M.shape
    options = cfgmod.candidates(base, V, n, target_bpw)
    if not options and base.adaptor_rank:
        options = cfgmod.candidates(base.without_adaptor(), V, n, target_bpw)
    if not options:
        floor = cfgmod.bpw(replace(base.without_adaptor(), group_size=max(d for d in range(1, 17) if n % d == 0), levels=1), V, n)
        raise CarvqError(f"--target-bpw {target_bpw}: impossible for a {V}x{n} embedding (the smallest CARVQ is {floor:.3f} bpw)")
    from tqdm import tqdm

    scored = []
    for cfg in tqdm(options, desc="choosing config", disable=not progress, leave=False):
        scored.append((train.proxy_error(M, w, cfg, seed), cfgmod.bpw(cfg, V, n), cfg))
    scored.sort(key=lambda s: (s[0], s[1]))
    notes = [f"--target-bpw {target_bpw}: tried " + ", ".join(
        f"d={c.group_size} L={c.levels} ({b:.3f} bpw, proxy err {e:.4f})" for e, b, c in scored)]
    best = scored[0][2]
    if base.hot_from_budget:
        # what the chosen levels leave of the target goes to more hot rows
        rest = target_bpw - cfgmod.bpw(replace(best, hot_rows=0), V, n)
        best = cfgmod.with_hot_budget(best, V, n, rest)
        notes.append(f"--target-bpw {target_bpw}: the {rest:.3f} bpw the levels leave pay for {best.hot_rows} hot rows")
    return best, notes


def convert(input_path, output_path, base: Config, *, target_bpw: float | None = None, iters: int = 2,
            seed: int = 0, calibration=None, head_type: str | None = None, hf_outtype: str = "auto",
            body_type: str | None = None, progress: bool = True) -> Report:
    start = time.perf_counter()
    src, out = Path(input_path), Path(output_path)
    if not src.exists():
        raise CarvqError(f"{src}: no such file or directory")
    if _same_file(src, out):
        raise CarvqError(f"output {out} is the input; choose another path")
    if target_bpw is not None and target_bpw <= 0:
        raise CarvqError(f"--target-bpw {target_bpw}: must be positive")
    with tempfile.TemporaryDirectory(prefix="carvq-") as tmpdir:
        gguf_path = src
        if src.is_dir():
            if not hf.is_hf_checkpoint(src):
                raise CarvqError(f"{src}: a directory but not a Hugging Face checkpoint (no config.json)")
            gguf_path = Path(tmpdir) / "source.gguf"
            hf.convert_hf(src, gguf_path, hf_outtype)
        reader = gio.open_gguf(gguf_path)
        written = Path(tmpdir) / "carvq.gguf" if body_type else out
        report = _convert_reader(reader, src, written, gguf_path, base, target_bpw, iters, seed,
                                 calibration, head_type, progress, start)
        if body_type:
            quantize_body(written, out, body_type, keep_head=report.head_copied)
            report.output = str(out)
            report.notes.append(f"transformer body quantized to {body_type} by llama-quantize; CARVQ tensors passed through")
        return report


def _convert_reader(reader, src, out, gguf_path, base, target_bpw, iters, seed, calibration,
                    head_type, progress, start) -> Report:
    arch = gio.field_value(reader, "general.architecture")
    if gio.is_carvq(reader):
        raise CarvqError(f"{src}: already a CARVQ-GGUF")
    if arch not in SUPPORTED_ARCHS:
        raise CarvqError(f"{src}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
    embd = gio.tensor_by_name(reader, gio.EMBD)
    if embd is None:
        raise CarvqError(f"{src}: no {gio.EMBD} tensor")
    M = gio.dequantize(embd)
    V, n = M.shape
    w, weights_from = _token_weights(reader, V, calibration, gguf_path)
    notes: list[str] = []
    if target_bpw is not None:
        cfg, notes = choose_config(M, w, base, target_bpw, seed, progress)
    else:
        base.check(n)
        cfg = base.resolve_hot(V, n)
    cfg.check(n)

    fit = train.compress(M, w, cfg, iters, seed, progress)

    head = None
    has_head = gio.tensor_by_name(reader, gio.HEAD) is not None
    if not has_head:
        head = _head_tensor(embd, M, head_type or default_head_type(embd, n))
    head_bytes = int(head[0].nbytes) if head is not None else 0
    parts = cfgmod.part_bytes(cfg, V, n)
    _write(reader, out, arch, fit, cfg, embd.tensor_type.name, head, cfgmod.bpw(cfg, V, n), 8.0 * head_bytes / (V * n),
           progress)

    R = fit.reconstruction
    err = M - R
    row_cos = (M * R).sum(1) / np.maximum(np.linalg.norm(M, axis=1) * np.linalg.norm(R, axis=1), 1e-30)
    wn = w / w.sum()
    return Report(
        input=str(src), output=str(out), arch=arch, n_vocab=V, n_embd=n, source_type=embd.tensor_type.name,
        config=cfg, weights_from=weights_from, parts=parts, head_bytes=head_bytes,
        head_type=(head[1].name if head is not None else "untied"), head_copied=head is not None,
        rel_error=float(np.linalg.norm(err) / max(np.linalg.norm(M), 1e-30)),
        weighted_rel_error=float(np.sqrt(((err**2).sum(1) * wn).sum() / max(((M**2).sum(1) * wn).sum(), 1e-30))),
        mean_cos=float(row_cos.mean()), worst_cos=float(row_cos.min()),
        seconds=time.perf_counter() - start, rounds=fit.rounds, source_bytes=int(embd.n_bytes), notes=notes,
        reconstruction=R,
    )
