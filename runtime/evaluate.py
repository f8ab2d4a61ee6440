"""`carvq eval`: perplexity and KL divergence on real text, through the patched llama-perplexity.

With a reference model, llama-perplexity first saves the reference's logits
(--kl-divergence-base), then scores the model against them (--kl-divergence): mean and
99th-percentile KLD of the token distributions and the top-1 agreement ("Same top p").
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from carvq.errors import CarvqError
from carvq.runtime import tool_path


@dataclass
class EvalResult:
    model: str
    text: str
    ctx: int
    chunks: int
    ppl: float
    ppl_err: float
    reference: str | None = None
    ref_ppl: float | None = None
    kld_mean: float | None = None
    kld_p99: float | None = None
    kld_max: float | None = None
    top1: float | None = None  # fraction of tokens whose argmax matches the reference
    seconds: float = 0.0

    @property
    def delta_ppl(self) -> float | None:
        return None if self.ref_ppl is None else self.ppl - self.ref_ppl

    def as_dict(self) -> dict:
        return {**asdict(self), "delta_ppl": self.delta_ppl}

    def table(self) -> str:
        rows = [("model", self.model), ("text", f"{self.text} ({self.chunks} chunks of {self.ctx} tokens)"),
                ("perplexity", f"{self.ppl:.4f} ± {self.ppl_err:.4f}")]
        if self.reference:
            rows += [("reference", self.reference), ("reference perplexity", f"{self.ref_ppl:.4f}"),
                     ("delta perplexity", f"{self.delta_ppl:+.4f}"), ("mean KLD", f"{self.kld_mean:.6f}"),
                     ("99% KLD", f"{self.kld_p99:.6f}"), ("max KLD", f"{self.kld_max:.6f}"),
                     ("top-1 agreement", f"{100 * self.top1:.2f} %")]
        rows.append(("time", f"{self.seconds:.1f} s"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


_FLOAT = r"([-+]?[0-9.]+(?:e[-+]?\d+)?)"


def _run(args: list[str], desc: str, progress: bool) -> str:
    """Run llama-perplexity, advancing a progress bar per chunk; its whole output. (Its last
    result lines are never lost: patch 0005 drains llama.cpp's logger at exit; 70 of 70
    runs checked when the retry this replaced was removed.)"""
    from tqdm import tqdm

    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = b""
    bar = tqdm(desc=desc, unit="chunk", disable=not progress, leave=False)
    done = 0
    while True:
        block = os.read(proc.stdout.fileno(), 8192)
        if not block:
            break
        out += block
        text = out.decode("utf-8", "replace")
        if bar.total is None:
            m = re.search(r"calculating perplexity over (\d+) chunks", text) or re.search(r"over (\d+) chunks", text)
            if m:
                bar.total = int(m.group(1))
        count = len(re.findall(r"\[(\d+)\]" + _FLOAT, text)) or len(re.findall(r"^\s*(\d+)\s+[0-9.]+\s+±", text, re.M))
        if count > done:
            bar.update(count - done)
            done = count
    proc.wait()
    bar.close()
    text = out.decode("utf-8", "replace")
    if proc.returncode != 0:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        raise CarvqError(f"llama-perplexity failed: {lines[-1] if lines else proc.returncode}")
    return text


def _check_length(model: Path, text: Path, ctx: int) -> None:
    """llama-perplexity needs two contexts of tokens; say so before running it (it exits
    0 without a result otherwise)."""
    from carvq.runtime.model import Model

    content = text.read_text(encoding="utf-8", errors="replace")
    with Model(model, vocab_only=True) as vocab:
        n_tokens = len(vocab.tokenize(content))
    if n_tokens < 2 * ctx:
        raise CarvqError(f"{text}: too short: {n_tokens} tokens, and a context of {ctx} needs at least {2 * ctx}")


def _grab(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    if not m:
        raise CarvqError(f"unexpected llama-perplexity output (no match for {pattern!r})")
    return float(m.group(1))


def parse_ppl(out: str) -> tuple[float, float]:
    """Perplexity and its error from a plain llama-perplexity run's output."""
    return (_grab(r"Final estimate: PPL = " + _FLOAT, out),
            _grab(r"Final estimate: PPL = [0-9.]+ \+/- " + _FLOAT, out))


def parse_kld(out: str) -> dict[str, float]:
    """The results of a --kl-divergence run: the model's perplexity and its error, the base's
    perplexity as that run recomputes it from the saved logits, and the KL divergence (mean,
    99th percentile, maximum) and top-1 agreement against the base."""
    return dict(
        base_ppl=_grab(r"Mean PPL\(base\)\s*:\s*" + _FLOAT, out),
        ppl=_grab(r"Mean PPL\(Q\)\s*:\s*" + _FLOAT, out), ppl_err=_grab(r"Mean PPL\(Q\)\s*:\s*[0-9.]+\s*±\s*" + _FLOAT, out),
        kld_mean=_grab(r"Mean\s+KLD:\s*" + _FLOAT, out), kld_p99=_grab(r"99\.0%\s+KLD:\s*" + _FLOAT, out),
        kld_max=_grab(r"Maximum KLD:\s*" + _FLOAT, out), top1=_grab(r"Same top p:\s*" + _FLOAT, out) / 100.0)


def _check_carvq(path: Path) -> None:
    """A CARVQ file is read through the Python reader first: one line naming what is wrong,
    the same as every other carvq command gives, rather than llama-perplexity's log."""
    from carvq import format as fmt
    from carvq import gguf_io as gio

    reader = gio.open_gguf(path)
    if fmt.is_carvq(reader):
        fmt.read_tensors(reader)


def evaluate(model, text, reference=None, *, ctx: int = 512, chunks: int | None = None,
             threads: int | None = None, progress: bool = True, base_logits: Path | None = None) -> EvalResult:
    """Perplexity of `model` on `text`; with `reference`, KL divergence against it.
    base_logits: where to keep the reference's logits so that later calls with the same
    reference, text, ctx and chunks skip the reference run (its perplexity is kept beside
    it in a .json); by default they go to a temporary file."""
    model, text = Path(model), Path(text)
    for path in (model, text, *( [Path(reference)] if reference else [])):
        if not path.is_file():
            raise CarvqError(f"{path}: no such file")
    for path in (model, *([Path(reference)] if reference else [])):
        _check_carvq(path)
    _check_length(model, text, ctx)
    binary = tool_path("llama-perplexity")
    common = ["-f", str(text), "-c", str(ctx), "-b", str(max(ctx, 512)), "-t", str(threads or os.cpu_count() or 1)]
    if chunks:
        common += ["--chunks", str(chunks)]
    start = time.perf_counter()
    if reference is None:
        out = _run([str(binary), "-m", str(model), *common], "perplexity", progress)
        ppl, err = parse_ppl(out)
        n = len(re.findall(r"\[(\d+)\]", out))
        return EvalResult(str(model), str(text), ctx, n, ppl, err, seconds=time.perf_counter() - start)
    with tempfile.TemporaryDirectory(prefix="carvq-eval-") as tmp:
        base = Path(base_logits) if base_logits else Path(tmp) / "reference-logits.bin"
        ref_ppl = _reference_logits(binary, Path(reference), common, base, progress)
        out = _run([str(binary), "-m", str(model), *common, "--kl-divergence-base", str(base), "--kl-divergence"],
                   "model vs reference", progress)
    n = len(re.findall(r"^\s*\d+\s+[0-9.]+\s+±", out, re.M))
    stats = parse_kld(out)
    del stats["base_ppl"]  # the reference's own run measured ref_ppl
    return EvalResult(str(model), str(text), ctx, n, reference=str(reference), ref_ppl=ref_ppl, **stats,
                      seconds=time.perf_counter() - start)


def _reference_logits(binary: Path, reference: Path, common: list[str], base: Path, progress: bool) -> float:
    """Write the reference's logits to `base` unless a run with the same settings already
    did; the reference perplexity."""
    stamp = base.with_name(base.name + ".json")
    key = {"reference": str(reference.resolve()), "size": reference.stat().st_size,
           "mtime_ns": reference.stat().st_mtime_ns, "args": common}
    if base.is_file() and stamp.is_file():
        saved = json.loads(stamp.read_text())
        if saved.get("key") == key:
            return float(saved["ppl"])
    stamp.unlink(missing_ok=True)
    out = _run([str(binary), "-m", str(reference), *common, "--kl-divergence-base", str(base)],
               "reference", progress)
    ppl, _ = parse_ppl(out)
    stamp.write_text(json.dumps({"key": key, "ppl": ppl}))
    return ppl


def to_json(result: EvalResult) -> str:
    return json.dumps(result.as_dict(), indent=2)
