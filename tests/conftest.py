"""Shared fixtures: tiny random checkpoints, their GGUFs and CARVQ conversions (made once per session)."""
from __future__ import annotations

import contextlib
import importlib.util
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny_models import make_tiny_checkpoint


def _load_pi_build():
    """scripts/pi/build.py (not a package): the Pi CPU profiles and the emulated Pi."""
    spec = importlib.util.spec_from_file_location("carvq_pi_build", Path(__file__).resolve().parents[1] / "scripts" / "pi" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


pi_build = _load_pi_build()
PI_PROFILES = list(pi_build.PROFILES.values())

# Small but complete configurations; each arch exercises another adaptor variant.
# gemma3 gets none: its FFN's ggml_gelu rounds inputs to F16 for a table lookup, so the
# adaptor's float32 rounding differences (1e-7) could flip roundings and blur the
# logit comparison; RVQ alone is bit-exact, which makes gemma3's comparison exact too.
# Hot rows (format v2) on three of them, qwen2 without, so both decode paths run in llama.cpp.
TINY_ARCHES = {
    "llama": dict(adaptor_rank=4, adaptor_hidden=16, activation="gelu", hot_rows=24, hot_levels=2),
    "qwen2": dict(adaptor_rank=3, adaptor_hidden=8, activation="silu"),
    "gemma3": dict(adaptor_rank=0, adaptor_hidden=0, activation="gelu", hot_rows=40, hot_levels=3),
    "phi3": dict(adaptor_rank=2, adaptor_hidden=8, activation="relu", hot_rows=7, hot_levels=1),
}


def run_cli(*args) -> subprocess.CompletedProcess:
    """`carvq ARGS` in a child process."""
    return subprocess.run([sys.executable, "-m", "carvq.cli", *map(str, args)], capture_output=True, text=True,
                          errors="replace")


def tiny_config(arch: str):
    from carvq.converter.config import Config

    return Config(group_size=8, levels=2, codebook_type="F32", **TINY_ARCHES[arch])


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("carvq")


@pytest.fixture(scope="session")
def tiny_hf(workdir):
    """arch -> HF checkpoint directory (tied heads)."""
    cache = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = make_tiny_checkpoint(arch, workdir / f"hf-{arch}", tied=True, seed=1)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def tiny_gguf(workdir, tiny_hf):
    """arch -> F32 GGUF of the tiny checkpoint, made by the pinned convert_hf_to_gguf.py."""
    from carvq.converter.hf import convert_hf

    cache = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            out = workdir / f"{arch}.gguf"
            convert_hf(tiny_hf(arch), out, "f32")
            cache[arch] = out
        return cache[arch]

    return get


SCREEN_TEXT = ("the river runs past the old mill and the bridge. a cat sat on the wall of the city, and the "
               "people of the town went to the market in the morning.\n") * 60


@pytest.fixture(scope="session")
def tiny_carvq(workdir, tiny_gguf):
    """(arch, screen index or not, screen correction or not) -> (CARVQ-GGUF path, conversion report),
    converted from the GGUF (the default conversion: a tied head gets the screen correction)."""
    from carvq.converter.convert import convert

    cache = {}

    def get(arch: str, screen: bool = False, fix: bool = True):
        if (arch, screen, fix) not in cache:
            out = workdir / f"{arch}{'' if screen else '.noscreen'}{'' if fix else '.nofix'}.carvq.gguf"
            text = None
            if screen:  # a screen index is fitted to the hidden states of a calibration text
                text = workdir / "screen-calibration.txt"
                text.write_text(SCREEN_TEXT)
            report = convert(tiny_gguf(arch), out, tiny_config(arch), iters=2, seed=0, progress=False, screen=screen,
                             calibration=text, fix_screen=fix)
            cache[arch, screen, fix] = (out, report)
        return cache[arch, screen, fix]

    return get


@pytest.fixture(scope="session")
def tiered_tiny(tiny_gguf, workdir):
    """carvq convert --trim-to on the tiny llama (tied, no adaptor; its ids a hot
    map, format v7): (path, report, target bpw)."""
    from carvq.converter import config as cfgmod
    from carvq.converter.config import Config
    from carvq.converter.convert import convert
    from carvq import gguf_io as gio

    out = workdir / "llama.tiered.carvq.gguf"
    cfg = Config(group_size=8, levels=4, codebook_type="F32", hot_rows=24, hot_levels=2, hot_bpw=0.0)
    n, V = (int(x) for x in gio.tensor_by_name(gio.open_gguf(tiny_gguf("llama")), gio.EMBD).shape[:2])
    target = cfgmod.bpw(cfg, V, n) - 0.6  # the tiny vocabulary's codebooks cost several bpw: trim a little
    report = convert(tiny_gguf("llama"), out, cfg, iters=1, seed=0, progress=False, trim_to=target, tier_floor=2)
    return out, report, target


@pytest.fixture(scope="session")
def stock_perplexity() -> Path:
    """llama-perplexity built from the same tree without the patch series (ccache makes it cheap)."""
    repo = Path(__file__).resolve().parent.parent
    build = repo / "build" / "stock"
    cfg = subprocess.run(["cmake", "-G", "Ninja", "-S", str(repo), "-B", str(build), "-DCARVQ_STOCK=ON",
                          "-DCMAKE_BUILD_TYPE=Release"], capture_output=True, text=True, errors="replace")
    assert cfg.returncode == 0, cfg.stdout[-2000:] + cfg.stderr[-2000:]
    proc = subprocess.run(["cmake", "--build", str(build), "--target", "llama-perplexity"], capture_output=True, text=True, errors="replace")
    assert proc.returncode == 0, proc.stdout[-3000:]
    return build / "bin" / "llama-perplexity"


@contextlib.contextmanager
def llama_server(model: Path, *extra: str):
    """llama-server (carvq's patched build) on a free loopback port; yields (base URL, process),
    stops it on the way out."""
    from carvq.runtime import tool_path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(tool_path("llama-server")), "-m", str(model), "--host", "127.0.0.1", "--port",
                               str(port), "-t", "2", "--no-webui", *extra],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def until_answered(server, call, seconds: float = 180):
    """call() until it stops raising (the server is loading), or fail with the server's log."""
    deadline = time.time() + seconds
    while True:
        try:
            return call()
        except Exception:  # noqa: BLE001 - connection refused, 503 while loading, ...
            if server.poll() is not None or time.time() > deadline:
                raise AssertionError("llama-server did not answer: " + (server.stderr.read()[-2000:]
                                     if server.poll() is not None else "timeout")) from None
            time.sleep(0.5)


def rewrite_gguf(src: Path, dst: Path, *, version: int | None = None, drop_keys=(), replace=None,
                 arch: str | None = None, rename=None) -> None:
    """Write a copy of `src` with the format version set to `version`, the keys `drop_keys`
    left out, each tensor named in `replace` ({name: tensor -> new array, or None to drop it})
    swapped for what its function returns (under the name `rename` gives it, if any), and the
    architecture `arch` written instead of the source's: the tests' way to make a file that the
    readers must refuse or accept."""
    import gguf

    from carvq import format as fmt
    from carvq import gguf_io as gio

    replace, rename = replace or {}, rename or {}
    reader = gio.open_gguf(src)
    writer = gguf.GGUFWriter(None, arch or gio.field_value(reader, "general.architecture"))
    gio.copy_fields(reader, writer, skip=({fmt.Key.VERSION} if version is not None else set()) | set(drop_keys))
    if version is not None:
        writer.add_uint32(fmt.Key.VERSION, version)
    for t in reader.tensors:
        if t.name in replace and replace[t.name] is None:
            continue
        if t.name in replace:
            writer.add_tensor(rename.get(t.name, t.name), replace[t.name](t))
        else:
            gio.add_source_tensor(writer, t)
    gio.write_gguf(writer, dst, progress=False)


def check_screened_candidates(path: Path, ids: list[int], k: int, max_others_exact: int = 3) -> None:
    """The patched llama.cpp's screened head at every position of `ids`: its k exact rows are the
    NumPy reference's top-k of the same scan (src/carvq/screen.py: the head's own index with its
    projection, else the lookup's codes in their frame, plus the screen correction), their logits
    the dense head's, and (ties aside) no other row is exact. A coded head's tail is approximated
    from the very codes it is, so rows outside the top-k may come out exact there too."""
    import numpy as np

    from carvq import format as fmt
    from carvq import screen
    from carvq.runtime.model import Model

    with Model(path, n_ctx=64, head="dense") as m:
        dense = m.logits(ids)
        hidden = m.hidden_states(ids)
    with Model(path, n_ctx=64, head="screened", screen_k=k) as m:
        screened = m.logits(ids)
    t = fmt.read_tensors(path)
    own = t.screen is not None
    index = t.screen.rvq if own else screen.lookup_as_index(t)
    for p in range(len(ids)):
        h = screen.project(t.screen.projection, hidden[p]) if own else hidden[p]
        scanned = screen.project(t.transform, h) if not own and t.transform is not None else h
        tables = screen.tables(index.layout, index.codebooks, index.hot_codebooks, scanned)
        scores = screen.scores(index.layout, index.codes, tables, index.hot_ids, index.hot_codes)
        if t.screen_fix is not None:  # format v5: in h's coordinates, as the C scan adds it
            scores = screen.fix_add(scores, t.screen_fix.fix, screen.fix_weights(t.screen_fix.dirs, h, tables.scale))
        want = set(screen.topk(scores, k).tolist())
        close = np.isclose(screened[p], dense[p], rtol=1e-5, atol=1e-5 * np.abs(dense[p]).max())
        exact = set(np.nonzero(close)[0].tolist())
        assert want <= exact, f"position {p}: candidates {sorted(want - exact)} are not exact"
        assert len(exact - want) <= max_others_exact, f"position {p}: rows outside the top-k came out exact: {sorted(exact - want)}"
