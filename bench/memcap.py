"""Generation under a memory cap: the budget a model really needs on a small board.

Peak RSS overstates what a memory-mapped model needs: the kernel maps file pages 64 KiB at a
time around each fault (fault-around), so a head whose rows are read sparsely (the screened
head reads k of V rows a token) still shows as resident, although the kernel can drop those
clean pages under pressure and rarely needs them back. A memory cgroup settles it: the model
runs under a hard limit that counts its page cache too (the file is evicted from the page
cache first, so that its pages are charged to the cgroup), with no swap. Below its working set
a model thrashes (re-reads its file from disk every token) or is killed.

For each model and cap: llama-bench's generation tokens/s (64 tokens, 2 threads), or OOM /
timeout. Needs root and a memory cgroup (v1 `memory.limit_in_bytes` or v2 `memory.max`).

    python bench/memcap.py [--models gemma3 smollm2]

Writes bench/results/memcap.{json,md,png} and the README's bench:memcap block.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import date
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import update_readme  # noqa: E402
from convert import machine  # noqa: E402
from screen import MODELS, _converted  # noqa: E402

from carvq.runtime import tool_path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 1 << 20


class Cgroup:
    """A memory cgroup of our own (v1 or v2), removed on exit."""

    def __init__(self, name: str):
        v1 = Path("/sys/fs/cgroup/memory")
        v2_roots = [Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")]
        if (v1 / "memory.limit_in_bytes").exists():
            self.v2, self.path = False, v1 / name
        else:
            root = next((r for r in v2_roots if (r / "cgroup.controllers").exists()
                         and "memory" in (r / "cgroup.controllers").read_text()), None)
            if root is None:
                raise SystemExit("memcap: no memory cgroup (v1 or v2) on this machine")
            self.v2, self.path = True, root / name
        try:
            self.path.mkdir(exist_ok=True)
        except OSError as e:
            raise SystemExit(f"memcap: cannot make a cgroup at {self.path} ({e}); run as root") from e

    def limit(self, nbytes: int | None) -> None:
        if self.v2:
            (self.path / "memory.max").write_text(str(nbytes) if nbytes else "max")
            swap = self.path / "memory.swap.max"
            if swap.exists():
                swap.write_text("0")
        else:
            (self.path / "memory.limit_in_bytes").write_text(str(nbytes) if nbytes else "-1")
            try:
                (self.path / "memory.max_usage_in_bytes").write_text("0")
            except OSError:
                pass

    def peak(self) -> int | None:
        f = self.path / ("memory.peak" if self.v2 else "memory.max_usage_in_bytes")
        return int(f.read_text()) if f.exists() else None

    def join(self) -> None:
        """Called in the child before exec."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


@contextmanager
def cgroup(name: str):
    cg = Cgroup(name)
    try:
        yield cg
    finally:
        cg.remove()


def evict(path: Path) -> None:
    """Drop the file's clean pages from the page cache, so that the capped run pays for them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_capped(model: Path, cap_mib: int | None, env: dict, gen: int, timeout: int, evict_too=(), depth: int = 0) -> dict:
    """One llama-bench generation run (after its warm-up token) in a fresh cgroup."""
    with cgroup(f"carvq-memcap-{os.getpid()}") as cg:
        cg.limit(cap_mib * MiB if cap_mib else None)
        for path in {model, *evict_too}:
            evict(path)
        return _run(cg, model, env, gen, timeout, depth)


def _run(cg: Cgroup, model: Path, env: dict, gen: int, timeout: int, depth: int = 0) -> dict:
    # three repetitions: the first pays the cold page cache (the file was just evicted), the
    # last is the steady state under the cap
    # depth: tokens already in the context (llama-bench -d), so that the KV cache of a long
    # conversation is in the budget too
    cmd = [str(tool_path("llama-bench")), "-m", str(model), "-p", "0", "-n", str(gen), "-d", str(depth), "-t",
           str(os.cpu_count() or 1), "-b", "64", "-ub", "64", "-r", "3", "-o", "json"]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout,
                              env=dict(os.environ, **env), preexec_fn=cg.join)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "tps": None, "seconds": timeout, "peak_mib": _mib(cg.peak())}
    seconds = time.time() - t0
    if proc.returncode != 0:
        status = "killed (OOM)" if proc.returncode in (-9, 137) else f"failed (rc {proc.returncode})"
        return {"status": status, "tps": None, "seconds": seconds, "peak_mib": _mib(cg.peak())}
    samples = [float(x) for x in json.loads(proc.stdout)[0]["samples_ts"]]
    return {"status": "ok", "tps": samples[-1], "cold_tps": samples[0], "seconds": seconds, "peak_mib": _mib(cg.peak())}


def _mib(n: int | None) -> float | None:
    return None if n is None else round(n / MiB, 1)


# caps per model (MiB), from above the stock model's working set down to where both fail
CAPS = {"gemma3": [320, 288, 256, 224, 192], "smollm2": [160, 128, 112, 96, 80]}


def variants(name: str) -> list[tuple[str, Path, dict]]:
    label, fetch, _ = MODELS[name]
    stock = fetch()
    carvq = _converted(name, stock)
    return [("stock GGUF", stock, {}),
            ("CARVQ, screened head (default k = 8192)", carvq, {"CARVQ_HEAD": "screened"}),
            ("CARVQ, screened head, k = 4096", carvq, {"CARVQ_HEAD": "screened", "CARVQ_SCREEN_K": "4096"}),
            ("CARVQ, dense head", carvq, {"CARVQ_HEAD": "dense"})]


def markdown(res: dict) -> str:
    out = []
    for name, block in res["models"].items():
        caps = block["caps_mib"]
        out += [f"**{block['label']}**" + (f" ({block['date']})" if block.get("date") else ""), "",
                "| variant | file MiB | " + " | ".join("no cap" if c is None else f"{c} MiB" for c in caps) + " |",
                "|---|---:|" + "---:|" * len(caps)]
        for row in block["rows"]:
            cells = [f"{r['tps']:.1f}" if r["status"] == "ok" else r["status"] for r in row["runs"]]
            out.append(f"| {row['variant']} | {row['file_mib']:.0f} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out).rstrip()


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(res["models"]), figsize=(6 * len(res["models"]), 4), squeeze=False)
    for ax, block in zip(axes[0], res["models"].values()):
        caps = [c for c in block["caps_mib"] if c is not None]
        for row in block["rows"]:
            ys = [r["tps"] if r["status"] == "ok" else 0.0
                  for c, r in zip(block["caps_mib"], row["runs"]) if c is not None]
            ax.plot(caps, ys, marker="o", label=row["variant"])
        ax.set_title(block["label"])
        ax.set_xlabel("memory cap, MiB (page cache included, no swap)")
        ax.set_ylabel("generation tokens/s (0: killed or timed out)")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["gemma3", "smollm2"], choices=sorted(MODELS))
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--timeout", type=int, default=150)
    ap.add_argument("--depth", type=int, default=0,
                    help="tokens already in the context while generating (e.g. 1984: a full 2048 context); "
                         "results go to memcap-d<depth>.* and not to the README")
    ap.add_argument("--caps", type=int, nargs="+", help="caps in MiB (default: per model)")
    args = ap.parse_args()
    caps_of = {name: args.caps or CAPS[name] for name in args.models}
    res = {"date": str(date.today()), "machine": machine(), "gen": args.gen, "depth": args.depth,
           "threads": os.cpu_count(), "models": {}}
    every = {name: variants(name) for name in args.models}
    files = {path for vs in every.values() for _, path, _ in vs}
    n_runs = sum(len(vs) * (1 + len(caps_of[name])) for name, vs in every.items())
    with tqdm(total=n_runs, desc="capped runs") as bar:
        for name, vs in every.items():
            caps = [None, *caps_of[name]]
            block = res["models"][name] = {"label": MODELS[name][0], "date": res["date"], "caps_mib": caps, "rows": []}
            for variant, path, env in vs:
                row = {"variant": variant, "file_mib": path.stat().st_size / MiB, "env": env, "runs": []}
                for cap in caps:
                    row["runs"].append(run_capped(path, cap, env, args.gen, args.timeout, files, args.depth))
                    bar.update(1)
                block["rows"].append(row)
    RESULTS.mkdir(exist_ok=True)
    stem = f"memcap-d{args.depth}" if args.depth else "memcap"
    previous = RESULTS / f"{stem}.json"
    if previous.exists():  # a run of some models keeps the others' latest results (each block says its date)
        old = json.loads(previous.read_text())
        merged = {**old.get("models", {}), **res["models"]}
        res["models"] = {k: merged[k] for k in [*CAPS, *merged] if k in merged}  # CAPS's order, stable
    previous.write_text(json.dumps(res, indent=1) + "\n")
    at_depth = f" after {args.depth} tokens of context" if args.depth else ""
    md = markdown(res) + (f"\n\n_{res['machine']}, {res['date']}; llama-bench, {args.gen} tokens{at_depth}, {res['threads']} "
                          "threads; tokens/s under each cap (page cache included, no swap), the model file evicted "
                          "from the page cache before each run (bench/memcap.py)._\n\n"
                          f"![tokens/s against the memory cap](bench/results/{stem}.png)")
    (RESULTS / f"{stem}.md").write_text(md + "\n")
    plot(res, RESULTS / f"{stem}.png")
    if not args.depth:
        update_readme.update("memcap")
    print(md)


if __name__ == "__main__":
    main()
