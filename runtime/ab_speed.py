"""`carvq bench MODEL --baseline OTHER`: a user's A/B of two GGUFs' prompt and generation speed
through llama-bench (the project's own benchmark scripts, with committed results, are bench/).

Each round runs llama-bench once on each model, in alternating order (A B, B A, ...), so
slow drifts of the machine (thermal, other load) hit both alike. Reported: mean tokens/s
of each model and the per-round ratio model/baseline: its mean, standard deviation (the
spread of one round), median, and the 95 % confidence interval of the mean (Student's t), which
says whether a target ratio is resolved by the rounds run: on a noisy 2-core host one round's
ratio spreads by 10-20 %, and over 20 rounds the half-width of the mean's interval is about half that spread.
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


# Student's t, two-sided 95 %, by degrees of freedom (1..30); beyond 30 the normal 1.96 is within 4 %
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def ratio_stats(r: list[float]) -> dict[str, float | None]:
    """Mean, standard deviation, median and the 95 % confidence half-width of the mean of per-round ratios."""
    n = len(r)
    std = statistics.stdev(r) if n > 1 else 0.0
    t = _T95[n - 2] if 2 <= n <= len(_T95) + 1 else 1.96
    return {"ratio": statistics.fmean(r), "ratio_std": std, "ratio_median": statistics.median(r),
            "ratio_ci95": t * std / n ** 0.5 if n > 1 else None}


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
                         **ratio_stats(r)}
        return out

    def table(self) -> str:
        lines = [f"model    {self.model}", f"baseline {self.baseline}",
                 f"{self.rounds} alternating rounds, {self.threads} threads", "",
                 f"{'test':<10}{'model t/s':>12}{'baseline t/s':>14}{'ratio':>9}{'± std':>8}{'median':>9}"
                 f"{'95% CI of the ratio':>22}"]
        for test, v in self.summary().items():
            half = v["ratio_ci95"]
            ci = f"{v['ratio'] - half:.3f} .. {v['ratio'] + half:.3f}" if half is not None else "(one round)"
            lines.append(f"{test:<10}{v['model_tps']:>12.1f}{v['baseline_tps']:>14.1f}{v['ratio']:>9.3f}"
                         f"{v['ratio_std']:>8.3f}{v['ratio_median']:>9.3f}{ci:>22}")
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
          progress: bool = True, head: str = "auto", baseline_head: str = "auto", reps: int = 1) -> SpeedResult:
    """head / baseline_head: CARVQ_HEAD for each side (auto, screened or dense), so that one
    CARVQ file can be compared with itself, screened against dense. reps: llama-bench's
    repetitions in each side's one process (its mean is the round's sample), e.g. 3 for a
    steady state that the first repetition has warmed."""
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
            for test, tps in llama_bench(path, prompt, gen, threads, {"CARVQ_HEAD": side_head}, reps).items():
                result.samples.setdefault(test, {"model": [], "baseline": []})[side].append(tps)
    return result
