"""carvq eval on a tiny model: finite perplexity, zero KLD against itself, a clear error for short text."""
from __future__ import annotations

import json
import math
from pathlib import Path

from conftest import run_cli
from tiny_models import synthetic_corpus


def _text(workdir: Path) -> Path:
    path = workdir / "eval-corpus.txt"
    if not path.exists():
        path.write_text("\n".join(synthetic_corpus(seed=11)[:300]))
    return path


def test_eval_perplexity_is_finite(tiny_carvq, workdir):
    path, _ = tiny_carvq("llama")
    proc = run_cli("eval", path, "--text", _text(workdir), "--ctx", "64", "--chunks", "8", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert math.isfinite(result["ppl"]) and result["ppl"] > 1 and result["chunks"] == 8


def test_eval_model_against_itself_has_zero_kld(tiny_gguf, workdir):
    from carvq.runtime.evaluate import evaluate

    model = tiny_gguf("llama")
    result = evaluate(model, _text(workdir), model, ctx=64, chunks=6, progress=False)
    assert result.kld_mean <= 1e-6 and result.kld_p99 <= 1e-6
    assert result.top1 == 1.0 and abs(result.delta_ppl) <= 1e-6 * result.ppl


def test_eval_measures_a_real_difference(tiny_carvq, tiny_gguf, workdir):
    """The CARVQ model against its source: a parser that read zeros would pass the self-test."""
    from carvq.runtime.evaluate import evaluate

    path, _ = tiny_carvq("llama")
    result = evaluate(path, _text(workdir), tiny_gguf("llama"), ctx=64, chunks=6, progress=False)
    assert 0 < result.kld_mean <= result.kld_p99 <= result.kld_max
    assert 0 < result.top1 <= 1 and result.delta_ppl != 0
    assert math.isfinite(result.ref_ppl) and result.ref_ppl > 1


def test_eval_table_against_reference(tiny_carvq, tiny_gguf, workdir):
    path, _ = tiny_carvq("llama")
    proc = run_cli("eval", path, "--text", _text(workdir), "--reference", tiny_gguf("llama"), "--ctx", "64",
                   "--chunks", "4", "-q")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mean KLD" in proc.stdout and "top-1 agreement" in proc.stdout


def test_eval_short_text_is_a_clear_error(tiny_carvq, workdir):
    path, _ = tiny_carvq("llama")
    short = workdir / "short.txt"
    short.write_text("the cat sat")
    proc = run_cli("eval", path, "--text", short, "--ctx", "64")
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("carvq: error:") and "too short" in lines[-1], proc.stderr[-1000:]
