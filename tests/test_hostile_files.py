"""Every reader refuses every file of the hostile corpus (tests/hostile_corpus.py) with one clear
line and a non-zero exit (issue 12, items 8 and 9): the Python reader, the patched llama.cpp
loader (through the runtime, and llama-completion, which must not crash), `carvq inspect` and
`carvq eval`."""
from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from carvq import format as fmt
from carvq.errors import CarvqError

from hostile_corpus import make


@pytest.fixture(scope="module")
def corpus(workdir, tiny_carvq) -> dict[Path, str]:
    good, _ = tiny_carvq("llama", screen=True)  # adaptor, hot rows and a screen index (format v3)
    out = workdir / "hostile"
    manifest = make(good, out)
    return {out / name: fragment for name, fragment in manifest.items()}


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "carvq.cli", *map(str, args)], capture_output=True, text=True,
                          errors="replace", timeout=120)


def _one_clear_line(proc, fragment: str) -> str | None:
    """None when the run failed the way it should, else what was wrong."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    if proc.returncode != 1:
        return f"exit code {proc.returncode}: {lines[-3:]}"
    if "Traceback" in proc.stderr or len(lines) != 1 or not lines[0].startswith("carvq: error:"):
        return f"not one carvq: error line: {lines[-5:]}"
    if not _mentions(lines[0], fragment):
        return f"{fragment!r} not in {lines[0]!r}"
    return None


def _mentions(message: str, fragment: str) -> bool:
    return any(f in message for f in fragment.split("|"))


def _each(corpus, run) -> None:
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(corpus, pool.map(lambda item: run(*item), corpus.items())))
    bad = {p.name: why for p, why in results.items() if why}
    assert not bad, json.dumps(bad, indent=1)


def test_the_corpus_is_complete(corpus):
    assert len(corpus) >= 30


def test_python_reader(corpus):
    def run(path, fragment):
        from carvq import gguf_io as gio

        try:
            fmt.read_tensors(gio.open_gguf(path))
        except CarvqError as exc:
            return None if _mentions(str(exc), fragment) else f"{fragment!r} not in {exc}"
        except Exception as exc:  # noqa: BLE001 - any other exception is the failure under test
            return f"{type(exc).__name__}: {exc}"
        return "accepted"

    _each(corpus, run)


def test_llama_loader_through_the_runtime(corpus):
    _each(corpus, lambda path, fragment: _one_clear_line(_cli("generate", path, "-p", "the", "-n", "1"), fragment))


def test_llama_tool_does_not_crash(corpus):
    from carvq.runtime import tool_path

    def run(path, fragment):
        proc = subprocess.run([str(tool_path("llama-completion")), "-m", str(path), "-p", "the", "-n", "1", "-no-cnv",
                               "--no-warmup", "-c", "64"], capture_output=True, text=True, errors="replace", timeout=120)
        return None if 0 < proc.returncode < 128 else f"exit code {proc.returncode}: {proc.stderr[-300:]}"

    _each(corpus, run)


def test_inspect(corpus):
    _each(corpus, lambda path, fragment: _one_clear_line(_cli("inspect", path), fragment))


def test_eval(corpus, workdir):
    text = workdir / "hostile-eval.txt"
    text.write_text("the history of the city begins with a river and a bridge. " * 40)
    _each(corpus, lambda path, fragment: _one_clear_line(_cli("eval", path, "--text", text, "--ctx", "64"), fragment))
