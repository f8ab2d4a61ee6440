"""The screened output head inside the patched llama.cpp (docs/SCREEN.md) on tiny models:
its candidates are exactly the NumPy reference's top-k, their logits are the dense head's,
and with every row a candidate it is the dense head."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import check_screened_candidates, run_cli

TEXT_IDS = [1, 5, 17, 42, 99, 200, 7, 3, 250, 11, 64, 128, 300, 2, 19, 33]


def _logits(path, head, k=None, **kw):
    from carvq.runtime.model import Model

    with Model(path, n_ctx=64, head=head, screen_k=k, **kw) as m:
        return m.logits(TEXT_IDS)


@pytest.mark.parametrize("arch,own_index", [("llama", True), ("gemma3", True), ("llama", False), ("gemma3", False)])
def test_candidates_are_the_reference_top_k(arch, own_index, tiny_carvq):
    """k of V rows exact: which ones is decided by the scan, checked against src/carvq/screen.py,
    with the head's own index (format v3: projection, then its tables) and with the lookup's codes."""
    path, report = tiny_carvq(arch, screen=own_index)
    from carvq import format as fmt

    assert (fmt.read_tensors(path).screen is not None) == own_index
    check_screened_candidates(path, TEXT_IDS, k=24)


def test_an_untied_head_is_screened_with_its_own_index(workdir):
    """An untied model's head is a matrix of its own: the converter fits the screen index to the
    source's output.weight, and the screen ranks by it (the lookup's codes could not)."""
    from carvq import format as fmt
    from carvq import gguf_io as gio
    from carvq import screen
    from carvq.converter.convert import convert
    from carvq.runtime.model import Model
    from conftest import SCREEN_TEXT, tiny_config
    from tiny_models import make_tiny_checkpoint

    hf = make_tiny_checkpoint("qwen2", workdir / "hf-qwen2-untied", tied=False, seed=3)
    out = workdir / "qwen2-untied.carvq.gguf"
    text = workdir / "untied-calibration.txt"
    text.write_text(SCREEN_TEXT)
    report = convert(hf, out, tiny_config("qwen2"), iters=1, hf_outtype="f32", progress=False, screen=True,
                     calibration=text)
    assert not report.head_copied and report.screen_bytes > 0
    t = fmt.read_tensors(out)
    assert t.screen is not None
    check_screened_candidates(out, TEXT_IDS, k=24)
    # the index approximates this head, not the embedding
    head = gio.dequantize(gio.tensor_by_name(gio.open_gguf(out), gio.HEAD))
    with Model(out, n_ctx=64, head="dense") as m:
        hidden = m.hidden_states(TEXT_IDS)
    ix = t.screen.rvq
    for p in range(4):
        tb = screen.tables(ix.layout, ix.codebooks, ix.hot_codebooks, screen.project(t.screen.projection, hidden[p]))
        approx = screen.scores(ix.layout, ix.codes, tb, ix.hot_ids, ix.hot_codes) * tb.scale + tb.bias
        assert np.corrcoef(approx, head @ hidden[p])[0, 1] > 0.5


# the whole text, then windows of 4 tokens: one scan each, enough for the cache to age its rows'
# histories (LLAMA_CARVQ_HEAD_CACHE_AGE_SCANS) and evict by them
_CACHE_PROBE = ("import sys, numpy as np; from carvq.runtime.model import Model\n"
                "ids = [int(t) for t in sys.argv[4:]]\n"
                "with Model(sys.argv[1], n_ctx=64, head='screened', screen_k=int(sys.argv[2]), verbose=True) as m:\n"
                "    np.save(sys.argv[3], np.concatenate([m.logits(ids)] + [m.logits(ids[i:i + 4]) for i in range(len(ids) - 3)]))")


def _logits_with_cache(path, k, out, cache_mib: str | None):
    import os

    env = dict(os.environ)
    env.pop("CARVQ_HEAD_CACHE_MIB", None)
    if cache_mib is not None:
        env["CARVQ_HEAD_CACHE_MIB"] = cache_mib  # read when the model loads
    proc = subprocess.run([sys.executable, "-c", _CACHE_PROBE, str(path), str(k), str(out), *map(str, TEXT_IDS)],
                          capture_output=True, text=True, errors="replace", timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return np.load(out), proc.stderr


def test_head_rows_read_through_the_cache_are_the_mapped_rows(tiny_carvq, workdir):
    """The screened head reads its exact rows with pread into a bounded cache (docs/SCREEN.md):
    the logits equal those read through the mapping, with a cache that holds every row and with
    one of 3 rows, where candidates are evicted and read into the thread's scratch, and one of 2 x k
    rows, where rows stay and leave by how often they were candidates."""
    from carvq import gguf_io as gio

    path, report = tiny_carvq("llama")
    row_bytes = gio.tensor_by_name(gio.open_gguf(path), gio.HEAD).n_bytes / report.n_vocab
    k = 24
    mapped, log = _logits_with_cache(path, k, workdir / "mapped.npy", "0")
    assert "read with pread" not in log
    for mib in (None, repr(3.5 * row_bytes / 2**20), repr((2 * k + 0.5) * row_bytes / 2**20)):
        cached, log = _logits_with_cache(path, k, workdir / "cached.npy", mib)
        assert "exact rows read with pread" in log, log[-2000:]
        assert np.array_equal(cached, mapped), f"CARVQ_HEAD_CACHE_MIB={mib}"


def test_screened_logits_do_not_depend_on_the_thread_count(tiny_carvq):
    """The threads split the scan by work and deal the candidates out in runs (docs/SCREEN.md):
    any number of threads, more than the work has blocks or runs included, gives the same bits."""
    path, _ = tiny_carvq("gemma3")
    one = _logits(path, "screened", 40, n_threads=1)
    for n_threads in (2, 3, 7):
        assert np.array_equal(_logits(path, "screened", 40, n_threads=n_threads), one), n_threads


def test_every_row_a_candidate_is_the_dense_head(tiny_carvq):
    path, report = tiny_carvq("phi3")
    dense = _logits(path, "dense")
    screened = _logits(path, "screened", report.n_vocab)
    assert np.allclose(screened, dense, rtol=1e-5, atol=1e-5 * np.abs(dense).max())


def test_auto_screens_generation_only(tiny_carvq):
    """auto: many outputs (prompt logits) take the dense head; generation is greedy-identical."""
    from carvq.runtime.model import Model

    path, report = tiny_carvq("llama")
    assert np.array_equal(_logits(path, "auto"), _logits(path, "dense"))  # 16 outputs > 4: dense
    outs = {}
    for head in ("dense", "auto"):
        with Model(path, n_ctx=128, head=head) as m:  # default k >= V here: every row exact
            outs[head] = "".join(m.generate("the cat sat", max_tokens=24, temperature=0))
    assert outs["auto"] == outs["dense"] and outs["dense"]


def test_bad_head_options(tiny_carvq):
    from carvq.errors import CarvqError
    from carvq.runtime.model import Model

    path, _ = tiny_carvq("llama")
    with pytest.raises(CarvqError, match="head"):
        Model(path, head="fast")
    with pytest.raises(CarvqError, match="screen_k"):
        Model(path, screen_k=0)
    proc = run_cli("generate", path, "-p", "the", "-n", "2", "--head", "nope")
    assert proc.returncode == 2 and "--head" in proc.stderr


def test_bad_screen_k_from_the_environment_is_a_warning(tiny_carvq):
    """llama.cpp tools read CARVQ_SCREEN_K: a bad value warns and falls back to the default."""
    path, _ = tiny_carvq("qwen2")
    code = ("import sys, numpy as np; from carvq.runtime.model import Model\n"
            "m = Model(sys.argv[1], n_ctx=64, head='screened', verbose=True)\n"
            "import os; os.environ['CARVQ_SCREEN_K'] = 'lots'; m._head_env['CARVQ_SCREEN_K'] = 'lots'\n"
            "print(m.logits([1, 2, 3]).shape)")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, errors="replace",
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CARVQ_SCREEN_K=lots is not a positive integer" in proc.stderr
