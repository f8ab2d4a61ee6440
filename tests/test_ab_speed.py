"""`carvq bench`'s statistics of the per-round ratios (runtime/ab_speed.py): no llama-bench run."""
import json
import math
import statistics

import pytest

from carvq.runtime.ab_speed import SpeedResult, ratio_stats


def test_two_rounds_use_students_t_with_one_degree_of_freedom():
    s = ratio_stats([1.0, 1.2])
    assert s["ratio"] == pytest.approx(1.1)
    assert s["ratio_median"] == pytest.approx(1.1)
    assert s["ratio_std"] == pytest.approx(math.sqrt(0.02))
    assert s["ratio_ci95"] == pytest.approx(12.706 * math.sqrt(0.02) / math.sqrt(2))


def test_twenty_rounds_narrow_the_interval_of_the_mean():
    r = [1.6 + 0.2 * ((i * 7) % 11 - 5) / 5 for i in range(20)]
    s = ratio_stats(r)
    assert s["ratio_std"] == pytest.approx(statistics.stdev(r))
    assert s["ratio_ci95"] == pytest.approx(2.093 * statistics.stdev(r) / math.sqrt(20))
    assert s["ratio_ci95"] < s["ratio_std"] / 2
    assert s["ratio_median"] == pytest.approx(statistics.median(r))


def test_many_rounds_fall_back_to_the_normal_quantile():
    r = [1.0 + 0.01 * (i % 5) for i in range(100)]
    assert ratio_stats(r)["ratio_ci95"] == pytest.approx(1.96 * statistics.stdev(r) / 10)


def test_one_round_has_no_interval_and_stays_valid_json():
    res = SpeedResult("a.gguf", "b.gguf", rounds=1, prompt_tokens=128, gen_tokens=32, threads=2,
                      samples={"tg32": {"model": [120.0], "baseline": [100.0]}})
    summary = json.loads(res.to_json())["summary"]["tg32"]
    assert summary["ratio"] == pytest.approx(1.2) and summary["ratio_ci95"] is None
    assert "(one round)" in res.table()


def test_table_shows_median_and_interval():
    res = SpeedResult("a.gguf", "b.gguf", rounds=3, prompt_tokens=128, gen_tokens=32, threads=2,
                      samples={"tg32": {"model": [110.0, 120.0, 130.0], "baseline": [100.0, 100.0, 100.0]}})
    table = res.table()
    assert "median" in table and "95% CI" in table
    half = 4.303 * 0.1 / math.sqrt(3)
    assert f"{1.2 - half:.3f} .. {1.2 + half:.3f}" in table
