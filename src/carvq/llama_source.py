"""The pinned llama.cpp source tree: fetched from the package index by name, verified, cached.

carvq never commits llama.cpp. Its source is the `vendor/llama.cpp` of the
llama-cpp-python sdist below, downloaded from the package index pip is configured to use,
checked against a fixed sha256 and unpacked once into the user cache.

Standard library only, and no build backend: CMake runs this file as a script before
anything else is installed. `pip download` is not used because pip prepares an sdist's
metadata before it saves the file, which needs llama-cpp-python's build backend
(scikit-build-core); the index's simple API (PEP 503 / PEP 691) only needs HTTP.

    python src/carvq/llama_source.py          # prints the path of the unpacked tree
"""
from __future__ import annotations

import hashlib
import html.parser
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
SDIST = "llama_cpp_python-0.3.36.tar.gz"  # = sdist_name(PACKAGE, VERSION)
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
COMMIT = "0c1e57098"
VENDOR_DIR = "llama_cpp_python-0.3.36/vendor/llama.cpp"
DEFAULT_INDEX = "https://pypi.org/simple"
TIMEOUT_S = 120


def cache_dir() -> Path:
    root = os.environ.get("CARVQ_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "carvq")
    return Path(root)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_indexes() -> list[str]:
    """The simple-API indexes pip would use: its index-url (environment, then pip config,
    then PyPI) followed by its extra-index-urls. A private mirror keeps working."""
    found: dict[str, list[str]] = {"index-url": [], "extra-index-url": []}
    try:
        listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        listing = ""
    for line in listing.splitlines():  # e.g. global.index-url='https://mirror/simple'
        key, _, value = line.partition("=")
        option = key.rsplit(".", 1)[-1]
        if option in found:
            found[option] += value.strip().strip("'\"").split()
    index = os.environ.get("PIP_INDEX_URL", "").split() or found["index-url"][-1:] or [DEFAULT_INDEX]
    extra = os.environ.get("PIP_EXTRA_INDEX_URL", "").split() or found["extra-index-url"]
    return list(dict.fromkeys(index + extra))


class _Anchors(html.parser.HTMLParser):
    """The href of every <a> in a PEP 503 project page."""

    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.hrefs.append(href)


def _sdist_url(index: str, package: str = PACKAGE, sdist: str = SDIST) -> str | None:
    """The sdist's download URL on one index, or None when that index does not have it."""
    page = f"{index.rstrip('/')}/{package}/"
    request = urllib.request.Request(page, headers={
        "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as resp:
            body, kind = resp.read(), resp.headers.get("Content-Type", "")
    except (OSError, ValueError):
        return None
    if "json" in kind:
        links = [f["url"] for f in json.loads(body).get("files", [])]
    else:
        parser = _Anchors()
        parser.feed(body.decode("utf-8", "replace"))
        links = parser.hrefs
    for link in links:
        if urllib.parse.urlsplit(link).path.rsplit("/", 1)[-1] == sdist:
            return urllib.parse.urljoin(page, link)
    return None


def sdist_name(package: str, version: str) -> str:
    """The file name of a package's sdist (PEP 625: normalized name, dashes as underscores)."""
    return f"{package.lower().replace('-', '_').replace('.', '_')}-{version}.tar.gz"


def _download(dest_dir: Path, package: str = PACKAGE, version: str = VERSION, sha256: str = SHA256) -> Path:
    """The sdist of `package` `version` from the package index into dest_dir (kept there),
    checked against `sha256`; the defaults are the pinned llama-cpp-python."""
    filename = sdist_name(package, version)
    dest_dir.mkdir(parents=True, exist_ok=True)
    sdist = dest_dir / filename
    if not sdist.exists():
        indexes = package_indexes()
        url = next((u for u in (_sdist_url(i, package, filename) for i in indexes) if u), None)
        if url is None:
            hint = ", or set CARVQ_LLAMA_CPP_DIR to an unpacked tree" if package == PACKAGE else ""
            raise SystemExit(f"carvq: {filename} not found on the package index ({', '.join(indexes)}); "
                             f"download it by hand into {dest_dir}{hint}")
        print(f"carvq: downloading {url}", file=sys.stderr)
        fd, partial = tempfile.mkstemp(prefix=filename + ".", suffix=".part", dir=dest_dir)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
                shutil.copyfileobj(resp, out, 1 << 20)
            os.replace(partial, sdist)
        except OSError as exc:
            raise SystemExit(f"carvq: downloading {url} failed: {exc}") from None
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    digest = _sha256(sdist)
    if digest != sha256:
        sdist.unlink()
        raise SystemExit(f"carvq: {filename} has sha256 {digest}, expected {sha256}; deleted it")
    return sdist


def unpack(sdist: Path, member_dir: str, tree: Path) -> Path:
    """The folder `member_dir` of the archive `sdist`, unpacked as `tree` (the rename is
    atomic: a half-unpacked tree is never visible)."""
    tree.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=tree.name + "-", dir=tree.parent))
    try:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(member_dir + "/")]
            tar.extractall(staging, members=members, **_tar_filter())
        unpacked = staging / member_dir
        # a vendored submodule's .git is a gitlink into a repo that is not there
        git_link = unpacked / ".git"
        if git_link.is_file():
            git_link.unlink()
        os.replace(unpacked, tree)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tree


def fetch_tree(package: str, version: str, sha256: str, member_dir: str, tree: Path) -> Path:
    """`member_dir` of a pinned sdist (fetched into the cache's downloads and sha256-checked
    when absent), unpacked once as `tree`."""
    if tree.is_dir():
        return tree
    return unpack(_download(cache_dir() / "downloads", package, version, sha256), member_dir, tree)


def source_tree() -> Path:
    """Path of the pristine, unpacked llama.cpp tree (fetching it when absent)."""
    override = os.environ.get("CARVQ_LLAMA_CPP_DIR")
    if override:
        return Path(override)
    tree = cache_dir() / f"llama.cpp-{COMMIT}"
    if (tree / "CMakeLists.txt").exists():
        return tree
    return unpack(_download(cache_dir() / "downloads"), VENDOR_DIR, tree)


def _tar_filter() -> dict:
    # the "data" filter refuses links out of the tree and device files; Pythons before
    # 3.10.12 / 3.11.4 lack it, and the sha256 check above already pins the archive
    return {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


def sdist_path() -> Path:
    """The pinned llama-cpp-python sdist itself (fetched and sha256-checked when absent): its
    Python bindings install on carvq's library without building llama.cpp again."""
    return _download(cache_dir() / "downloads")


if __name__ == "__main__":
    print(sdist_path() if sys.argv[1:] == ["--sdist"] else source_tree())
