"""Bad input: one readable line on stderr, non-zero exit, no partial output, input untouched."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from conftest import rewrite_gguf, run_cli, tiny_config


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()



def assert_clean_failure(proc, out: Path, fragment: str):
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("carvq: error:") and fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") or p == out]
    assert leftovers == [], leftovers


def test_missing_file(tmp_path):
    out = tmp_path / "out.gguf"
    assert_clean_failure(run_cli("convert", tmp_path / "nope.gguf", "-o", out, "-q"), out, "no such file")


def test_not_a_gguf(tmp_path):
    src = tmp_path / "text.gguf"
    src.write_text("hello, I am not a model\n")
    out = tmp_path / "out.gguf"
    assert_clean_failure(run_cli("convert", src, "-o", out, "-q"), out, "not a GGUF")


def test_truncated_gguf(tmp_path, tiny_gguf):
    data = tiny_gguf("llama").read_bytes()
    for cut in (len(data) // 2, 200):
        src = tmp_path / f"trunc{cut}.gguf"
        src.write_bytes(data[:cut])
        before = _digest(src)
        out = tmp_path / f"out{cut}.gguf"
        assert_clean_failure(run_cli("convert", src, "-o", out, "-q"), out, "truncated")
        assert _digest(src) == before


def test_no_token_embd(tmp_path, tiny_gguf):
    src = tmp_path / "noembd.gguf"
    rewrite_gguf(tiny_gguf("llama"), src, replace={"token_embd.weight": None})
    out = tmp_path / "out.gguf"
    assert_clean_failure(run_cli("convert", src, "-o", out, "-q"), out, "no token_embd.weight")


def test_unsupported_architecture(tmp_path, tiny_gguf):
    src = tmp_path / "bert.gguf"
    rewrite_gguf(tiny_gguf("llama"), src, arch="bert")
    out = tmp_path / "out.gguf"
    assert_clean_failure(run_cli("convert", src, "-o", out, "-q"), out, "not supported")


def test_impossible_target_bpw(tmp_path, tiny_gguf):
    out = tmp_path / "out.gguf"
    proc = run_cli("convert", tiny_gguf("llama"), "-o", out, "--target-bpw", "0.05", "-q")
    assert_clean_failure(proc, out, "impossible")


def test_impossible_target_bpw_is_refused_before_the_model_runs(tmp_path, tiny_gguf, monkeypatch):
    """The prior's documents and the Fisher pass take half a minute on a real model: a budget no
    configuration meets is refused before them."""
    from carvq.converter import convert as convert_mod
    from carvq.errors import CarvqError

    def no_model_run(*args, **kwargs):
        raise AssertionError("the model ran before the budget was checked")

    monkeypatch.setattr(convert_mod, "_prior", no_model_run)
    out = tmp_path / "out.gguf"
    with pytest.raises(CarvqError, match="impossible"):
        convert_mod.convert(tiny_gguf("llama"), out, tiny_config("llama"), target_bpw=0.05, progress=False,
                            fit_metric="fisher")
    assert not out.exists()


def test_output_equals_input(tmp_path, tiny_gguf):
    src = tmp_path / "same.gguf"
    src.write_bytes(tiny_gguf("llama").read_bytes())
    before = _digest(src)
    proc = run_cli("convert", src, "-o", src, "-q")
    assert proc.returncode != 0 and "is the input" in proc.stderr
    assert _digest(src) == before


def test_output_directory_missing(tmp_path, tiny_gguf):
    out = tmp_path / "no" / "such" / "dir" / "out.gguf"
    proc = run_cli("convert", tiny_gguf("llama"), "-o", out, "-q", "--adaptor-rank", "0", "--iters", "1")
    assert proc.returncode != 0 and "does not exist" in proc.stderr
    assert not out.parent.exists()


def test_write_failure_leaves_nothing(tmp_path, tiny_gguf, monkeypatch):
    """A write that fails midway (disk full) leaves neither the target nor a temp file."""
    import errno

    from carvq import gguf_io as gio
    from carvq.converter.convert import convert
    from carvq.errors import CarvqError

    def failing_write(writer, path, progress):
        Path(path).write_bytes(b"GGUF partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gio, "write_gguf", failing_write)
    src = tiny_gguf("llama")
    before = _digest(src)
    out = tmp_path / "out.gguf"
    with pytest.raises(CarvqError, match="No space left"):
        convert(src, out, tiny_config("qwen2"), iters=1, progress=False)
    assert list(tmp_path.iterdir()) == []
    assert _digest(src) == before


def test_writer_refuses_non_finite_values(tmp_path, tiny_carvq, tiny_gguf):
    """FORMAT.md: writers never store non-finite values (an F16 codebook that overflowed)."""
    import numpy as np

    from carvq import format as fmt
    from carvq import gguf_io as gio
    from carvq.errors import CarvqError

    path, _ = tiny_carvq("gemma3")
    tensors = fmt.read_tensors(path)
    bad = fmt.CarvqTensors(tensors.layout, np.array(tensors.codes), np.array(tensors.codebooks, np.float16),
                           hot_ids=tensors.hot_ids, hot_codes=tensors.hot_codes,
                           hot_codebooks=np.array(tensors.hot_codebooks, np.float16))
    bad.codebooks.flat[3] = np.inf
    out = tmp_path / "nonfinite.gguf"
    with pytest.raises(CarvqError, match="non-finite"):
        fmt.write_model(gio.open_gguf(tiny_gguf("gemma3")), out, "gemma3", bad,
                        fmt.Provenance("F32", True, 1.0, 1.0))
    assert list(tmp_path.iterdir()) == []


def test_out_of_range_token_ids_are_an_error_not_an_abort(tiny_carvq):
    """llama.cpp throws std::out_of_range for a bad id; across the C API that would abort Python."""
    import subprocess
    import sys

    path, _ = tiny_carvq("llama")
    code = ("import sys\nfrom carvq.runtime.model import Model\nfrom carvq.errors import CarvqError\n"
            "m = Model(sys.argv[1], vocab_only=True)\n"
            "for call in (lambda: m.token_bytes(-1), lambda: m.token_bytes(m.n_vocab), lambda: m.detokenize([1, m.n_vocab])):\n"
            "    try:\n        call()\n    except CarvqError as e:\n        print('refused:', e)\n"
            "print(m.detokenize([1, 2]) is not None)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("refused: token id") == 3 and proc.stdout.strip().endswith("True"), proc.stdout


def test_generator_after_close_or_another_call_stops_cleanly(tiny_carvq):
    """A generator left open must not decode into a context that was freed or reset."""
    from carvq.errors import CarvqError
    from carvq.runtime.model import Model

    path, _ = tiny_carvq("llama")
    m = Model(path, n_ctx=128)
    gen = m.generate_tokens(m.tokenize("the cat"), max_tokens=20, temperature=0)
    next(gen)
    m.logits([1, 2, 3])  # another call on the same context
    with pytest.raises(CarvqError, match="another call"):
        next(gen)
    gen = m.generate_tokens(m.tokenize("the cat"), max_tokens=20, temperature=0)
    next(gen)
    m.close()
    with pytest.raises(CarvqError, match="closed"):
        next(gen)


def test_threads_share_one_model_safely(tiny_carvq):
    """cffi releases the GIL in llama_decode: concurrent calls take turns, and each gets the
    answer it would get alone."""
    import threading

    import numpy as np

    from carvq.runtime.model import Model

    path, _ = tiny_carvq("qwen2")
    inputs = [[1, 5, 17, 42], [7, 3, 250, 11, 64], [2, 19, 33], [100, 101, 102, 103, 104, 105]]
    with Model(path, n_ctx=64) as m:
        want = [m.logits(t) for t in inputs]
        got = [None] * 16
        errors = []

        def work(i):
            try:
                got[i] = m.logits(inputs[i % len(inputs)])
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(got))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    for i, g in enumerate(got):
        assert np.array_equal(g, want[i % len(inputs)]), i


def test_llama_save_refuses_a_carvq_model(tiny_carvq, tiny_gguf, tmp_path):
    """llama.cpp's model saver knows token_embd.weight only: for a CARVQ model it must write
    nothing rather than a file without its lookup (patch 0006)."""
    import subprocess
    import sys

    code = ("import sys\nfrom carvq.runtime.model import Model, lib\n"
            "m = Model(sys.argv[1])\nlib.llama_model_save_to_file(m._model, sys.argv[2].encode())\n")
    carvq_out, stock_out = tmp_path / "carvq-saved.gguf", tmp_path / "stock-saved.gguf"
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_carvq("llama")[0]), str(carvq_out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not carvq_out.exists()
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_gguf("llama")), str(stock_out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and stock_out.stat().st_size > 0, proc.stderr[-2000:]


# ---- the converter keeps data safe (issue 12, items 11-14) --------------------------------

def test_existing_output_needs_force(tmp_path, tiny_gguf):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"precious")
    proc = run_cli("convert", tiny_gguf("llama"), "-o", out, "-q", "--adaptor-rank", "0", "--iters", "1")
    assert proc.returncode == 1 and "exists; pass --force" in proc.stderr, proc.stderr
    assert out.read_bytes() == b"precious"
    proc = run_cli("convert", tiny_gguf("llama"), "-o", out, "-q", "--adaptor-rank", "0", "--iters", "1", "--force")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:4] == b"GGUF"


def test_output_inside_the_input_checkpoint_or_on_the_calibration_text(tmp_path, tiny_hf, tiny_gguf):
    hf_dir = tiny_hf("llama")
    before = sorted(p.name for p in hf_dir.iterdir())
    proc = run_cli("convert", hf_dir, "-o", hf_dir / "model.carvq.gguf", "-q", "--force")
    assert proc.returncode == 1 and "inside the input checkpoint" in proc.stderr, proc.stderr
    assert sorted(p.name for p in hf_dir.iterdir()) == before
    text = tmp_path / "calib.txt"
    text.write_text("the city")
    proc = run_cli("convert", tiny_gguf("llama"), "-o", text, "--calibration", text, "-q", "--force")
    assert proc.returncode == 1 and "is the calibration text" in proc.stderr, proc.stderr
    assert text.read_text() == "the city"


def _hf_copy(tmp_path, tiny_hf, **config_changes) -> Path:
    import json
    import shutil

    dst = tmp_path / "hf"
    shutil.copytree(tiny_hf("llama"), dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_hf_checkpoint_asking_for_its_own_code_is_refused(tmp_path, tiny_hf, monkeypatch):
    """Refused from config.json alone: llama.cpp's convert_hf_to_gguf.py never runs."""
    from carvq.converter import hf

    ran = []
    monkeypatch.setattr(hf, "source_tree", lambda: ran.append(1))
    src = _hf_copy(tmp_path, tiny_hf, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    out = tmp_path / "out.gguf"
    with pytest.raises(Exception, match="auto_map"):
        from carvq.converter.convert import convert

        convert(src, out, tiny_config("llama"), iters=1, progress=False)
    assert not ran and not out.exists()
    src2 = _hf_copy(tmp_path / "b", tiny_hf, architectures=["BitnetForCausalLM"])
    assert_clean_failure(run_cli("convert", src2, "-o", out, "-q"), out, "not supported")


def test_split_gguf_is_refused(tmp_path, tiny_gguf):
    from hostile_corpus import rewrite

    src = tmp_path / "model-00001-of-00002.gguf"
    rewrite(tiny_gguf("llama"), src, keys={"split.count": ("UINT32", 2)})
    out = tmp_path / "out.gguf"
    assert_clean_failure(run_cli("convert", src, "-o", out, "-q"), out, "split GGUF")


def test_non_finite_source_is_refused(tmp_path, tiny_gguf):
    import numpy as np

    from carvq import gguf_io as gio
    from hostile_corpus import rewrite

    reader = gio.open_gguf(tiny_gguf("llama"))
    embd = gio.dequantize(gio.tensor_by_name(reader, gio.EMBD)).copy()
    embd[7, 3] = np.nan
    src = tmp_path / "nan.gguf"
    rewrite(tiny_gguf("llama"), src, tensors={gio.EMBD: embd})
    out = tmp_path / "out.gguf"
    assert_clean_failure(run_cli("convert", src, "-o", out, "-q"), out, "non-finite values (row 7)")


def test_written_file_is_validated_before_it_takes_the_name(tmp_path, tiny_gguf, monkeypatch):
    from carvq import format as fmt
    from carvq.converter.convert import convert
    from carvq.errors import CarvqError

    def reject(path):
        raise CarvqError("planted")

    monkeypatch.setattr(fmt, "read_tensors", reject)
    out = tmp_path / "out.gguf"
    with pytest.raises(CarvqError, match="fails validation"):
        convert(tiny_gguf("llama"), out, tiny_config("qwen2"), iters=1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_writes_are_fsynced(tmp_path, monkeypatch):
    import os

    from carvq import gguf_io as gio

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    out = tmp_path / "x.bin"
    with gio.atomic_output(out) as tmp:
        tmp.write_bytes(b"data")
    assert out.read_bytes() == b"data"
    assert any(".x.bin." in s for s in synced) and str(tmp_path) in synced, synced


def test_sigterm_and_sigkill_leave_no_temp_file_for_ever(tmp_path):
    """SIGTERM: the CLI's handler unwinds and the temp file goes. SIGKILL: the next write to the
    same target removes the dead writer's file and says so."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "out.gguf"
    child = ("import sys, time, signal\nfrom pathlib import Path\nfrom carvq import cli, gguf_io as gio\n"
             "signal.signal(signal.SIGTERM, cli._on_sigterm)\n"
             "try:\n    with gio.atomic_output(Path(sys.argv[1])) as tmp:\n        tmp.write_bytes(b'x' * 1000)\n"
             "        print('writing', flush=True)\n        time.sleep(60)\n"
             "except cli._Terminated:\n    sys.exit(143)\n")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen([sys.executable, "-c", child, str(out)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(sig)
        proc.wait(timeout=30)
        left = [p.name for p in tmp_path.iterdir()]
        if sig == signal.SIGTERM:
            assert proc.returncode == 143 and left == [], left
        else:
            assert len(left) == 1 and left[0].startswith(".out.gguf."), left
    from carvq import gguf_io as gio

    with gio.atomic_output(out) as tmp:
        tmp.write_bytes(b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["out.gguf"]


# ---- runtime limits (issue 12, item 7) ------------------------------------------------------

def test_runtime_limits_are_messages(tiny_carvq, monkeypatch):
    import numpy as np

    from carvq.errors import CarvqError
    from carvq.runtime import model as model_mod
    from carvq.runtime.model import Model

    path, _ = tiny_carvq("llama")
    with pytest.raises(CarvqError, match="n_ctx"):
        Model(path, n_ctx=0)
    with Model(path, n_ctx=16, n_batch=64) as m:
        rows = m.embedding_rows(list(range(40)))  # more ids than n_ctx: batches of at most n_ctx
        assert rows.shape == (40, m.n_embd) and np.isfinite(rows).all()
        monkeypatch.setattr(model_mod, "_available_memory", lambda: 16 * 1024)  # 16 x 320 floats: 20 KiB
        with pytest.raises(CarvqError, match="more than half"):
            m.logits([1] * 16)


def test_error_state_is_per_thread(tiny_carvq, workdir):
    """Two threads loading at once: each gets its own file's error, never the other's."""
    import threading

    from carvq.errors import CarvqError
    from carvq.runtime.model import Model
    from hostile_corpus import rewrite

    path, _ = tiny_carvq("llama")
    bad = {}
    for name, keys in (("a", {"carvq.levels": ("UINT32", 0)}), ("b", {"carvq.codebook_size": ("UINT32", 99)})):
        bad[name] = workdir / f"thread-{name}.carvq.gguf"
        rewrite(path, bad[name], keys=keys)
    got = {}

    def load(name):
        msgs = []
        for _ in range(20):
            try:
                Model(bad[name])
            except CarvqError as exc:
                msgs.append(str(exc))
        got[name] = msgs

    threads = [threading.Thread(target=load, args=(n,)) for n in bad]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got["a"]) == 20 and all("levels" in m for m in got["a"]), got["a"][:3]
    assert len(got["b"]) == 20 and all("codebook" in m for m in got["b"]), got["b"][:3]
