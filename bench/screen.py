"""The screened output head (docs/SCREEN.md) on SmolLM2-135M-Instruct and Gemma-3-270M (both
from PyPI, converted with the default `carvq convert`: since session 31 a tied model's head is the
lookup's codes, format v8; rows of the head-copy default before it are kept, marked):

- quality against k: KLD, top-1 agreement and delta perplexity of the screened head against the
  dense head of the same file (llama-perplexity on the 1911 Britannica text), and generation
  tokens/s at each k;
- speed: alternating llama-bench A/B rounds, screened CARVQ against the stock GGUF and against
  the same CARVQ file with its dense head;
- greedy generations identical to the dense head's (20 prompts x 128 tokens);
- peak RSS generating 256 tokens (carvq footprint, mmap);
- the scan alone (carvq-screen-bench): code bytes/s against memcpy and the dense head matvec.

Writes bench/results/screen.{json,md,png} and the README's bench:screen block.

    python bench/screen.py [--rounds 4] [--models smollm2 gemma3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402
from converter_digest import converter_digest  # noqa: E402
import update_readme  # noqa: E402
from convert import machine  # noqa: E402

from carvq import format as fmt  # noqa: E402
from carvq import gguf_io as gio  # noqa: E402
from carvq.llama_source import cache_dir  # noqa: E402
from carvq.runtime import tool_path  # noqa: E402
from carvq.runtime.ab_speed import bench, llama_bench  # noqa: E402
from carvq.runtime.evaluate import parse_kld, parse_ppl  # noqa: E402
from carvq.runtime.footprint import footprint  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# name -> (fetch, eval chunks of 512 tokens: Gemma's 262k-wide reference logits take 0.5 GB a chunk)
MODELS = {"smollm2": ("SmolLM2-135M-Instruct", models.smollm2, 20), "gemma3": ("Gemma-3-270M", models.gemma3_270m, 4)}


def _converted(name: str, stock: Path, own_index: bool = False) -> Path:
    """The default conversion (the screen reads the lookup's codes and its correction; a tied source's
    head is those codes since format v8), or with --screen-index (format v3 where the held-out check
    keeps the head's own index)."""
    kind = "v3" if own_index else "v8"
    out = cache_dir() / "bench" / f"{name}.default.{kind}.{converter_digest()}.carvq.gguf"
    if not out.exists():  # made again whenever the converter's code changes
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in out.parent.glob(f"{name}.default.{kind}.*carvq.gguf"):
            stale.unlink()
        extra = ["--screen-index", "--calibration", str(_screen_calibration())] if own_index else []
        subprocess.run([sys.executable, "-m", "carvq.cli", "convert", str(stock), "-o", str(out), "-q", *extra],
                       check=True, stdout=subprocess.DEVNULL)
    return out


def _screen_calibration() -> Path:
    """Calibration text for --screen-index: 300 000 characters of the Britannica text from far
    after the part the quality runs evaluate on (its first chunks)."""
    out = cache_dir() / "bench" / "britannica-screen-calibration.txt"
    if not out.exists():
        out.write_text(models.britannica_text().read_text(encoding="utf-8")[200_000:500_000], encoding="utf-8")
    return out


def _default_k(n_vocab: int, own_index: bool = False, fix_rank: int = 0, coded_head: bool = False) -> int:
    from carvq.converter.screen_index import default_k

    return default_k(n_vocab, own_index, fix_rank, coded_head)


# rows measured when the default kept a Q5_0 copy of a tied head (until session 30), renamed so
# that the coded head's rows do not replace them
COPY_LABEL = " (Q5_0 head copy, v7, until session 30)"


LONG_GEN, LONG_REPS = 256, 3  # the long-generation A/B: llama-bench -n 256 -r 3, one process a side

INDEX_LABEL = " (--screen-index)"  # result rows of files with the head's own screen index


def _perplexity(model: Path, text: Path, chunks: int, env: dict, extra: list[str]) -> str:
    cmd = [str(tool_path("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", "512", "--chunks", str(chunks),
           "-t", str(os.cpu_count() or 1), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=dict(os.environ, **env))
    if proc.returncode != 0:
        raise SystemExit(f"llama-perplexity failed: {proc.stderr[-1500:]}")
    return proc.stdout + proc.stderr


def _tg_speed(model: Path, env: dict, reps: int = 3) -> float:
    return llama_bench(model, 0, 64, os.cpu_count() or 1, env, reps)["tg64"]


def quality_vs_k(model: Path, text: Path, chunks: int, ks: list[int]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="carvq-screen-") as tmp:
        base = Path(tmp) / "dense.bin"
        out = _perplexity(model, text, chunks, {"CARVQ_HEAD": "dense"}, ["--kl-divergence-base", str(base)])
        dense_ppl, _ = parse_ppl(out)
        dense_tps = _tg_speed(model, {"CARVQ_HEAD": "dense"})
        rows.append({"k": 0, "kld": 0.0, "kld_p99": 0.0, "top1": 1.0, "dppl": 0.0, "ppl": dense_ppl, "tg_tps": dense_tps})
        for k in tqdm(ks, desc="k", leave=False):
            env = {"CARVQ_HEAD": "screened", "CARVQ_SCREEN_K": str(k)}
            out = _perplexity(model, text, chunks, env, ["--kl-divergence-base", str(base), "--kl-divergence"])
            stats = parse_kld(out)
            rows.append({"k": k, "kld": stats["kld_mean"], "kld_p99": stats["kld_p99"], "top1": stats["top1"],
                         "dppl": stats["ppl"] - stats["base_ppl"], "ppl": None,
                         "tg_tps": _tg_speed(model, {"CARVQ_HEAD": "screened", "CARVQ_SCREEN_K": str(k)})})
    return rows


def greedy_identity(model: Path, text: Path, n_prompts: int = 20, tokens: int = 128) -> dict:
    from carvq.runtime.model import Model

    words = text.read_text(encoding="utf-8").split()
    prompts = [" ".join(words[i * 997 % (len(words) - 40):][:24]) for i in range(n_prompts)]
    outs = {}
    for head in ("dense", "auto"):
        with Model(model, n_ctx=512, head=head) as m:
            outs[head] = [m.generate_tokens(m.tokenize(p), tokens, temperature=0) for p in tqdm(prompts, desc=head, leave=False)]
            outs[head] = [list(o) for o in outs[head]]
    same = sum(a == b for a, b in zip(outs["dense"], outs["auto"]))
    first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(outs["dense"], outs["auto"])]
    return {"identical": same, "prompts": n_prompts, "tokens": tokens, "first_difference": first_diff}


def scan_bench(model: Path) -> dict:
    t = fmt.read_tensors(gio.open_gguf(model))
    lo = t.screen.rvq.layout if t.screen is not None else t.layout  # what the screen scans
    proc = subprocess.run([str(tool_path("carvq-screen-bench")), str(lo.n_vocab), str(lo.n_embd), str(lo.group_size),
                           str(lo.levels)], capture_output=True, text=True, check=True)
    return {r["what"]: r for r in map(json.loads, proc.stdout.splitlines())}


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results.items():
        q = [row for row in r["quality"] if row["k"]]
        a.plot([row["k"] for row in q], [row["kld"] for row in q], "o-", label=name)
        b.plot([row["k"] for row in q], [row["tg_tps"] / r["stock_tg_tps"] for row in q], "o-", label=name)
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.set_xlabel("k (candidates computed exactly)")
    a.set_ylabel("KLD, screened vs dense head")
    a.axhline(0.01, color="grey", lw=0.8, ls="--")
    b.set_xscale("log", base=2)
    b.set_xlabel("k")
    b.set_ylabel("generation tokens/s, screened CARVQ / stock")
    b.axhline(1.0, color="grey", lw=0.8, ls="--")
    for ax in (a, b):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--screen", choices=["index", "codes"], default="codes",
                    help="convert with --screen-index (the head's own index, format v3, where the converter keeps it) "
                         "or by default (the lookup's codes screen, v2)")
    ap.add_argument("--redraw", action="store_true", help="only redraw the table and plot from the saved results")
    args = ap.parse_args()
    own_index = args.screen == "index"
    if args.redraw:
        return _write(json.loads((RESULTS / "screen.json").read_text()))
    text = models.britannica_text()
    results = {}
    for key in args.models:
        name, fetch, chunks = MODELS[key]
        stock = fetch()
        carvq = _converted(key, stock, own_index)
        name += INDEX_LABEL if own_index else ""
        V = fmt.read_layout(gio.open_gguf(carvq)).n_vocab
        tensors = fmt.read_tensors(carvq)
        k0 = _default_k(V, tensors.screen is not None, tensors.screen_fix.rank if tensors.screen_fix is not None else 0,
                        tensors.head_codes)
        print(f"{name}: quality and speed against k ...", flush=True)
        ks = sorted({1024, 2048, 4096, k0, min(V, 2 * k0)})
        r = {"default_k": k0, "n_vocab": V, "screen_index": tensors.screen is not None, "head": "codes" if tensors.head_codes else "copy",
             "quality": quality_vs_k(carvq, text, chunks, ks)}
        r["stock_tg_tps"] = _tg_speed(stock, {})
        print(f"{name}: A/B speed ...", flush=True)
        r["ab_stock"] = bench(carvq, stock, rounds=args.rounds, prompt=128, gen=64, progress=False).summary()
        r["ab_dense"] = bench(carvq, carvq, rounds=args.rounds, prompt=128, gen=64, progress=False,
                              baseline_head="dense").summary()
        # a long reply: the row cache warm after the first repetition (its first reads of rows, a
        # fresh process's cost, weigh less), as in a chat that goes on
        r["ab_stock_long"] = bench(carvq, stock, rounds=args.rounds, prompt=0, gen=LONG_GEN, progress=False,
                                   reps=LONG_REPS).summary()
        print(f"{name}: greedy identity, RSS, scan ...", flush=True)
        r["greedy"] = greedy_identity(carvq, text)
        fs, fc = footprint(stock, 256), footprint(carvq, 256, head="auto")
        r["rss_mmap_peak"] = {"stock": fs.rss["mmap"]["peak"], "carvq": fc.rss["mmap"]["peak"]}
        r["file_bytes"] = {"stock": fs.file_bytes, "carvq": fc.file_bytes}
        r["scan"] = scan_bench(carvq)
        results[name] = r
    RESULTS.mkdir(exist_ok=True)
    previous = RESULTS / "screen.json"
    if previous.exists():  # a run of some models keeps the others' latest results
        old = json.loads(previous.read_text())
        # a default row of the head-copy design ("head" absent or "copy") keeps its place under its own label
        old = {(k + COPY_LABEL if k in results and v.get("head", "copy") != results[k].get("head") else k): v
               for k, v in old.items()}
        results = {**{k: v for k, v in old.items() if k not in results}, **results}
        order = [n + suffix for suffix in ("", INDEX_LABEL) for n, _, _ in MODELS.values()]
        order += [name for name in results if name not in order]  # rows of earlier designs, kept
        results = {name: results[name] for name in order if name in results}
    previous.write_text(json.dumps(results, indent=2))
    _write(results)


def _write(results: dict) -> None:
    plot(results, RESULTS / "screen.png")
    (RESULTS / "screen.md").write_text(table(results) + "\n")
    update_readme.update("screen")
    print(table(results))


def _long_ratio(r: dict) -> str:
    """The long-generation A/B's ratio with its 95 % interval; rows from before it existed: a dash."""
    long = r.get("ab_stock_long", {}).get(f"tg{LONG_GEN}")
    if long is None:
        return "–"
    half = long.get("ratio_ci95")
    return f"{long['ratio']:.2f} ({long['ratio'] - half:.2f}–{long['ratio'] + half:.2f})" if half else f"{long['ratio']:.2f}"


def table(results: dict) -> str:
    mib = lambda n: f"{n / 2**20:.1f}"  # noqa: E731
    lines = [f"Latest run {date.today().isoformat()} on {machine()}; default `carvq convert` (since session 31 a tied "
             "model's head is the lookup's codes, format v8, the coded head at 3.0 bpw, screened at k = 2048: its dense "
             "head decodes every row from the codes; rows marked 'Q5_0 head copy': the default until session 30, a "
             "1.6 bpw lookup and a Q5_0 copy of the head, screened by the lookup's codes with the screen correction, "
             "format v7; rows marked --screen-index: converted "
             "with it, the head's own index screening, format v3); "
             "KLD / top-1 / Δ perplexity of the screened head against the dense head of the same file on the "
             "Britannica text; speeds are generation (64 tokens) tokens/s; A/B ratios over alternating llama-bench "
             "rounds (mean ± std) with the default `--head auto` (auto screens only where k <= V/5); long generation: "
             f"{LONG_REPS} × {LONG_GEN} tokens in each side's one process (llama-bench -n {LONG_GEN} -r {LONG_REPS}), so "
             "that the head's row cache is warm after the first: the rounds' mean ratio and its 95 % interval.", "",
             "| model | k (default) | KLD | 99% KLD | top-1 | Δ PPL | tg t/s ratio vs stock | long generation vs stock | vs own dense head | "
             "greedy = dense (20 × 128 tokens) | peak RSS, mmap, 256 tokens | file | scan GB/s (% of memcpy) | scan vs dense Q5_0 head |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        q = next(row for row in r["quality"] if row["k"] == r["default_k"])
        s = r["scan"]
        lines.append(
            f"| {name} | {r['default_k']} of {r['n_vocab']} | {q['kld']:.4f} | {q['kld_p99']:.3f} | {100 * q['top1']:.2f} % | "
            f"{q['dppl']:+.3f} | {r['ab_stock']['tg64']['ratio']:.2f} ± {r['ab_stock']['tg64']['ratio_std']:.2f} | "
            f"{_long_ratio(r)} | "
            f"{r['ab_dense']['tg64']['ratio']:.2f} ± {r['ab_dense']['tg64']['ratio_std']:.2f} | "
            f"{r['greedy']['identical']}/{r['greedy']['prompts']} | "
            f"{mib(r['rss_mmap_peak']['stock'])} → {mib(r['rss_mmap_peak']['carvq'])} MiB "
            f"({r['rss_mmap_peak']['carvq'] / r['rss_mmap_peak']['stock']:.2f}x) | "
            f"{mib(r['file_bytes']['stock'])} → {mib(r['file_bytes']['carvq'])} MiB | "
            f"{s['scan']['bytes_per_s'] / 1e9:.1f} ({100 * s['scan']['bytes_per_s'] / s['memcpy_codes']['bytes_per_s']:.0f} %) | "
            f"{s['dense_head_q5_0']['seconds'] / s['scan']['seconds']:.1f}x faster |")
    lines += ["", "Against k, screening forced (`CARVQ_HEAD=screened`; `auto` screens only from k <= V/5):", "",
              "| model | k | KLD | top-1 | Δ PPL | tg t/s |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        for row in r["quality"]:
            lines.append(f"| {name} | {row['k'] or 'dense'} | {row['kld']:.4f} | {100 * row['top1']:.2f} % | "
                         f"{row['dppl']:+.3f} | {row['tg_tps']:.1f} |")
    lines += ["", "![KLD and speed against k](bench/results/screen.png)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
