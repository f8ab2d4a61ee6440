"""`carvq bench MODEL --baseline OTHER`: a user's A/B of two GGUFs' prompt and generation speed
through llama-bench (the project's own benchmark scripts, with committed results, are bench/).

Each round runs llama-bench once on each model, in alternating order (A B, B A, ...), so
slow drifts of the machine (thermal, other load) hit both alike. Reported: mean tokens/s
of each model and the per-round ratio model/baseline with its standard deviation.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from carvq.errors import CarvqError
from carvq.runtime import tool_path


@dataclass
class SpeedResult:
    model: str
    baseline: str
    rounds: int
    prompt_tokens: int
    gen_tokens: int
    threads: int
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # test -> side -> t/s per round

    def ratios(self, test: str) -> list[float]:
        s = self.samples[test]
        return [a / b for a, b in zip(s["model"], s["baseline"])]

    def summary(self) -> dict:
        out = {}
        for test, s in self.samples.items():
            r = self.ratios(test)
            out[test] = {"model_tps": statistics.fmean(s["model"]), "baseline_tps": statistics.fmean(s["baseline"]),
                         "ratio": statistics.fmean(r), "ratio_std": statistics.stdev(r) if len(r) > 1 else 0.0}
        return out

    def table(self) -> str:
        lines = [f"model    {self.model}", f"baseline {self.baseline}",
                 f"{self.rounds} alternating rounds, {self.threads} threads", "",
                 f"{'test':<10}{'model t/s':>12}{'baseline t/s':>14}{'ratio':>9}{'± std':>8}"]
        for test, v in self.summary().items():
            lines.append(f"{test:<10}{v['model_tps']:>12.1f}{v['baseline_tps']:>14.1f}{v['ratio']:>9.3f}{v['ratio_std']:>8.3f}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"model": self.model, "baseline": self.baseline, "rounds": self.rounds,
                           "prompt_tokens": self.prompt_tokens, "gen_tokens": self.gen_tokens,
                           "threads": self.threads, "summary": self.summary(), "samples": self.samples}, indent=2)


def llama_bench(model: Path, prompt: int, gen: int, threads: int, env: dict[str, str] | None = None,
                reps: int = 1) -> dict[str, float]:
    """One llama-bench run: tokens/s by test ("pp128", "tg32", ...). env: extra environment,
    e.g. CARVQ_HEAD / CARVQ_SCREEN_K, which the patched library reads (docs/SCREEN.md)."""
    cmd = [str(tool_path("llama-bench")), "-m", str(model), "-p", str(prompt), "-n", str(gen), "-r", str(reps),
           "-t", str(threads), "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=dict(os.environ, **(env or {})))
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise CarvqError(f"llama-bench failed on {model}: {lines[-1] if lines else proc.returncode}")
    out = {}
    for row in json.loads(proc.stdout):
        test = "pp" if row.get("n_prompt", 0) > 0 else "tg"
        out[f"{test}{row.get('n_prompt') or row.get('n_gen')}"] = float(row["avg_ts"])
    return out


def bench(model, baseline, *, rounds: int = 5, prompt: int = 128, gen: int = 32, threads: int | None = None,
          progress: bool = True, head: str = "auto", baseline_head: str = "auto") -> SpeedResult:
    """head / baseline_head: CARVQ_HEAD for each side (auto, screened or dense), so that one
    CARVQ file can be compared with itself, screened against dense."""
    from tqdm import tqdm

    model, baseline = Path(model), Path(baseline)
    for p in (model, baseline):
        if not p.is_file():
            raise CarvqError(f"{p}: no such file")
    if rounds < 2:
        raise CarvqError("--rounds must be at least 2 to give a spread")
    threads = threads or os.cpu_count() or 1
    result = SpeedResult(f"{model} (head {head})", f"{baseline} (head {baseline_head})", rounds, prompt, gen, threads)
    for i in tqdm(range(rounds), desc="A/B rounds", disable=not progress, leave=False):
        order = [("model", model, head), ("baseline", baseline, baseline_head)]
        if i % 2:
            order.reverse()
        for side, path, side_head in order:
            for test, tps in llama_bench(path, prompt, gen, threads, {"CARVQ_HEAD": side_head}).items():
                result.samples.setdefault(test, {"model": [], "baseline": []})[side].append(tps)
    return result
