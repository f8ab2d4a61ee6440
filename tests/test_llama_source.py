"""src/carvq/llama_source.py's pinned-sdist helpers, offline: the sdist name, the sha256 check of
a file already downloaded, and the unpacking of one folder of the archive."""
from __future__ import annotations

import hashlib
import importlib.util
import io
import tarfile
from pathlib import Path

import pytest

# loaded from the tree by path (CMake and bench/ik_ggml.py run it that way), not the installed copy
_spec = importlib.util.spec_from_file_location(
    "carvq_llama_source_under_test", Path(__file__).resolve().parents[1] / "src" / "carvq" / "llama_source.py")
llama_source = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(llama_source)


def test_sdist_name_and_offline_fetch(tmp_path, monkeypatch):
    assert llama_source.sdist_name(llama_source.PACKAGE, llama_source.VERSION) == llama_source.SDIST
    assert llama_source.sdist_name("ik-llama-cpp-python", "0.1.5") == "ik_llama_cpp_python-0.1.5.tar.gz"

    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for name, data in [("pkg_x-1.0/vendor/lib/CMakeLists.txt", b"project(x)\n"),
                           ("pkg_x-1.0/vendor/lib/.git", b"gitdir: ../../.git/modules/lib\n"),
                           ("pkg_x-1.0/README", b"not vendored\n")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    sdist = downloads / "pkg_x-1.0.tar.gz"
    sdist.write_bytes(archive.getvalue())
    digest = hashlib.sha256(archive.getvalue()).hexdigest()
    monkeypatch.setenv("CARVQ_CACHE", str(tmp_path))
    monkeypatch.setattr(llama_source, "package_indexes", lambda: pytest.fail("a cached sdist must not be fetched"))

    tree = llama_source.fetch_tree("pkg-x", "1.0", digest, "pkg_x-1.0/vendor/lib", tmp_path / "lib-1.0")
    assert (tree / "CMakeLists.txt").read_bytes() == b"project(x)\n"
    assert not (tree / ".git").exists()  # the gitlink into a repository that is not there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["downloads", "lib-1.0"]  # no staging folder left
    assert llama_source.fetch_tree("pkg-x", "1.0", digest, "unused", tree) == tree  # unpacked once

    with pytest.raises(SystemExit, match="expected 0+"):
        llama_source._download(downloads, "pkg-x", "1.0", "0" * 64)
    assert not sdist.exists()  # a file that fails its check is deleted
