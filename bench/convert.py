"""Convert SmolLM2-135M-Instruct and Gemma-3-270M (both from PyPI) as a new user does (`carvq
convert` with no flags), or at --target-bpw X.

Records wall time (and rows/s), peak memory (and its ratio to the F32 embedding), bpw and both reconstruction errors; writes
bench/results/convert.json and a Markdown table (bench/results/convert.md) for the README.

    python bench/convert.py [--models smollm2 gemma3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402

from carvq import format as fmt  # noqa: E402
from carvq import gguf_io as gio  # noqa: E402
from carvq.llama_source import cache_dir  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"smollm2": ("SmolLM2-135M-Instruct", models.smollm2), "gemma3": ("Gemma-3-270M", models.gemma3_270m)}


def convert_one(name: str, src: Path, target: float | None) -> dict:
    out = cache_dir() / "bench" / f"{name}.{'default' if target is None else f'target{target}'}.carvq.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    flags = [] if target is None else ["--target-bpw", str(target)]
    proc = subprocess.Popen([sys.executable, "-m", "carvq.cli", "convert", str(src), "-o", str(out), "--force", "-q",
                             *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", cwd=RESULTS)
    stdout, stderr = proc.stdout.read(), proc.stderr.read()  # -q: the report and a few lines
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS, not the max of all children
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(stderr)
    peak_kib = usage.ru_maxrss
    lo = fmt.read_layout(gio.open_gguf(out))
    report = stdout
    grab = lambda pat: float(re.search(pat, report).group(1))  # noqa: E731
    return {
        "model": name, "target_bpw": target, "wall_s": round(wall, 1),
        "peak_rss_mib": round(peak_kib / 1024, 1), "n_vocab": lo.n_vocab, "n_embd": lo.n_embd,
        "peak_over_f32": round(peak_kib * 1024 / (4 * lo.n_vocab * lo.n_embd), 2),
        "rows_per_s": round(lo.n_vocab / wall),
        "lookup_bpw": grab(r"lookup total\s+[\d,]+\s+([\d.]+)"),
        "head_bpw": grab(r"head copy \(\w+\)\s+[\d,]+\s+([\d.]+)") if "head copy (" in report else 0.0,
        "head": _head(report),
        "rel_error": grab(r"relative error \(Frobenius\)\s+([\d.]+)"),
        "weighted_rel_error": grab(r"relative error \(token-weighted\)\s+([\d.]+)"),
        "config": re.search(r"^\s*(?:config|fit[^:]*): (.*)", report, re.M).group(1).strip(),
        "metric": _metric(report),
        "report": report,
    }


def _head(report: str) -> str:
    """What serves as the output head: a copy beside the lookup (its type), the lookup's own codes
    (a coded head, format v8), or the source's untied head."""
    copy = re.search(r"head copy \((\w+)\)", report)
    if copy:
        return f"{copy.group(1)} copy"
    return "coded (the lookup's rows)" if "note: coded head" in report else "untied (the source's)"


def _metric(report: str) -> str:
    """The fit's metric as the report's note gives it: Fisher (its dtype and time) or uniform."""
    note = re.search(r"note: each dimension weighted by the model's Fisher information.*?(\d+) s\)", report)
    if note is None:
        return "uniform"
    return f"Fisher ({'bfloat16' if 'bfloat16' in note.group(0) else 'float32'}, {note.group(1)} s)"


def machine() -> str:
    """CPU model and core count, from /proc/cpuinfo where there is one."""
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(("model name", "Model")):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({platform.machine()}), {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--target-bpw", type=float, default=None, help="default: none (the default conversion)")
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    rows = []
    for key in args.models:
        name, fetch = MODELS[key]
        print(f"converting {name} ...", flush=True)
        rows.append(convert_one(name, fetch(), args.target_bpw))
        print(rows[-1]["report"], flush=True)
    meta = {"date": date.today().isoformat(), "machine": machine(), "python": platform.python_version()}
    (RESULTS / "convert.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    how = "`carvq convert` with no flags" if args.target_bpw is None else f"`carvq convert --target-bpw {args.target_bpw}`"
    lines = [f"Measured {meta['date']} on {meta['machine']}; {how}.", "",
             "| model | config chosen | fit's metric (Fisher pass) | lookup bpw | head | head copy bpw | rel. error | weighted rel. error | wall time | rows/s | peak RSS (x F32 embedding) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['config']} | {r['metric']} | {r['lookup_bpw']:.4f} | {r.get('head', '')} | "
                     f"{r['head_bpw']:.3f} | {r['rel_error']:.4f} | "
                     f"{r['weighted_rel_error']:.4f} | {r['wall_s']:.0f} s | {r['rows_per_s']:,} | "
                     f"{r['peak_rss_mib']:.0f} MiB ({r['peak_over_f32']:.2f}x) |")
    (RESULTS / "convert.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import update_readme

    update_readme.update("convert")


if __name__ == "__main__":
    main()
