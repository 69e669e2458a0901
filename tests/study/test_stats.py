"""Study statistics against hand-computed values and published Student t tables."""

import json
import math
import os

import numpy as np
import pytest

from ratiorl.study.stats import (
    area_under_curve,
    betainc,
    final_value,
    mean_interval,
    paired_difference,
    summarize,
    t_quantile,
    t_two_sided_p,
)

# two-sided 95% / 99% / 90% critical values of Student's t (any statistics table)
T_TABLE = [(0.975, 1, 12.7062047), (0.975, 2, 4.30265273), (0.975, 4, 2.77644511), (0.975, 9, 2.26215716),
           (0.975, 30, 2.04227246), (0.995, 3, 5.84090931), (0.95, 5, 2.01504837), (0.9, 10, 1.37218364)]


@pytest.mark.parametrize("q,df,t", T_TABLE)
def test_t_quantile_matches_the_table(q, df, t):
    assert t_quantile(q, df) == pytest.approx(t, rel=1e-7)
    assert t_quantile(1 - q, df) == pytest.approx(-t, rel=1e-7)
    assert t_two_sided_p(t, df) == pytest.approx(2 * (1 - q), rel=1e-6)


def test_t_tails_closed_forms():
    # df = 1 is Cauchy: P(|T| >= t) = 1 - 2 atan(t) / pi; df = 2: 1 - t / sqrt(2 + t^2)
    for t in (0.3, 1.0, 2.5, 10.0):
        assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-10)
        assert t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)
    assert t_two_sided_p(0.0, 5) == pytest.approx(1.0)
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-12)  # I_0.4(2,3) = 1 - 0.6^4 - 4*0.4*0.6^3


def test_mean_interval_t_by_hand():
    iv = mean_interval([1.0, 2.0, 3.0, 4.0], level=0.95)
    # mean 2.5, s = sqrt(5/3), half width t_{3,0.975} s / 2 with t_{3,0.975} = 3.18244631
    half = 3.18244631 * math.sqrt(5 / 3) / 2
    assert (iv.mean, iv.n, iv.level) == (2.5, 4, 0.95)
    assert iv.low == pytest.approx(2.5 - half, rel=1e-7) and iv.high == pytest.approx(2.5 + half, rel=1e-7)


def test_mean_interval_edge_cases():
    one = mean_interval([0.7])
    assert one.mean == 0.7 and one.n == 1 and math.isnan(one.low) and math.isnan(one.high)
    none = mean_interval([float("nan"), None])
    assert none.n == 0 and math.isnan(none.mean)
    same = mean_interval([0.3, 0.3, 0.3])
    assert same.low == pytest.approx(0.3) and same.high == pytest.approx(0.3)
    with pytest.raises(ValueError, match="level"):
        mean_interval([1, 2], level=95)
    with pytest.raises(ValueError, match="method"):
        mean_interval([1, 2], method="normal")


def test_bootstrap_interval_of_two_values_spans_them():
    # resampling {0, 1} twice: means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4 -> 95% percentiles 0 and 1
    iv = mean_interval([0.0, 1.0], method="bootstrap")
    assert (iv.mean, iv.low, iv.high) == (0.5, 0.0, 1.0)
    # many values: close to the t interval, reproducible for a seed
    x = np.random.default_rng(3).normal(1.0, 2.0, size=40)
    b1, b2, t = mean_interval(x, method="bootstrap", seed=1), mean_interval(x, method="bootstrap", seed=1), mean_interval(x)
    assert b1 == b2
    assert b1.low == pytest.approx(t.low, abs=0.15) and b1.high == pytest.approx(t.high, abs=0.15)


def test_final_value_and_auc_by_hand():
    steps = [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]
    values = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert final_value(steps, values) == 8.5  # last 2 of 10 points
    assert final_value(steps, values, last_fraction=0.25) == 8.0  # ceil(2.5) = 3 points: 7, 8, 9
    assert final_value(steps, values, last_fraction=1.0) == 4.5
    assert area_under_curve(steps, values) == pytest.approx(4.5)  # a line: its mean level
    # a step function sampled unevenly: trapezoids (0->10: 0..2, 10->40: 2..2) / span 40
    assert area_under_curve([0, 10, 40], [0.0, 2.0, 2.0]) == pytest.approx((10 * 1 + 30 * 2) / 40)
    assert area_under_curve([5], [0.3]) == 0.3 and math.isnan(area_under_curve([], []))
    # unsorted steps and NaN points are handled
    assert final_value([2, 1, 3], [20.0, 10.0, float("nan")], last_fraction=0.5) == 20.0


def test_paired_difference_resolved_by_hand():
    a = {0: 0.60, 1: 0.55, 2: 0.70}
    b = {0: 0.40, 1: 0.45, 2: 0.50}
    d = paired_difference(a, b, 0.95, a="x", b="y", metric="m", summary="final")
    # differences 0.20, 0.10, 0.20: mean 1/6, s = sqrt(1/300), t = mean / (s / sqrt 3) = 5
    s = math.sqrt(1 / 300)
    half = 4.30265273 * s / math.sqrt(3)
    assert d.mean == pytest.approx(1 / 6) and d.n == 3
    assert d.low == pytest.approx(1 / 6 - half) and d.high == pytest.approx(1 / 6 + half)
    assert d.p_value == pytest.approx(1 - 5 / math.sqrt(2 + 25), rel=1e-9)  # df=2 closed form at t=5
    assert d.resolved and (d.a, d.b, d.metric, d.summary) == ("x", "y", "m", "final")


def test_paired_difference_within_noise():
    # a is higher on average (+0.05) but the seeds disagree on the sign: not resolved
    a = {0: 0.50, 1: 0.40, 2: 0.65}
    b = {0: 0.45, 1: 0.48, 2: 0.47}
    d = paired_difference(a, b)
    assert d.mean == pytest.approx((0.05 - 0.08 + 0.18) / 3)
    assert d.low < 0 < d.high and not d.resolved and d.p_value > 0.05


def test_paired_difference_uses_common_seeds_only():
    d = paired_difference({0: 1.0, 1: 2.0, 5: 100.0}, {0: 0.0, 1: 0.5, 2: -7.0})
    assert d.n == 2 and d.mean == pytest.approx(1.25)
    few = paired_difference({0: 1.0}, {0: 0.0})
    assert few.n == 1 and not few.resolved and math.isnan(few.p_value)
    const = paired_difference({0: 1.0, 1: 2.0}, {0: 0.5, 1: 1.5})  # every pair differs by 0.5
    assert const.resolved and const.p_value == 0.0 and const.low == pytest.approx(0.5)


# ----------------------------------------------------------------------------- a synthetic study


def _write_cell(root, cell_id, rows, done=True, headline="greedy"):
    d = os.path.join(root, "cells", cell_id)
    os.makedirs(d)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(d, "config.yaml"), "w") as f:
        f.write(f"eval:\n  headline: {headline}\n")
    if done:
        open(os.path.join(d, "DONE"), "w").close()


def test_summarize_synthetic_study(tmp_path):
    """Three seeds per setting with known curves: known means, differences and verdicts."""
    root = str(tmp_path)
    with open(os.path.join(root, "study.yaml"), "w") as f:
        f.write("seeds: [0, 1, 2]\naxes:\n  objective.name: [snib, grpo, gspo]\nbaseline: snib\n")
    # reward/mean constant per run: snib 0.5 + 0.01 k, grpo 0.3 + 0.01 k (resolved, -0.2),
    # gspo noisy around snib (within noise); eval/greedy_acc a line from 0 to its final value
    levels = {"snib": [0.50, 0.51, 0.52], "grpo": [0.30, 0.31, 0.32], "gspo": [0.55, 0.45, 0.54]}
    for name, per_seed in levels.items():
        for k, level in enumerate(per_seed):
            rows = [{"step": 0, "eval/greedy_acc": 0.0}]
            rows += [{"step": s, "reward/mean": level} for s in range(1, 11)]
            rows.append({"step": 10, "eval/greedy_acc": 2 * level})
            _write_cell(root, f"objective={name}__seed{k}", rows)
    res = summarize(root)
    assert res["metrics"] == ["reward/mean", "eval/greedy_acc"]  # default: reward and the greedy headline
    assert res["baseline"] == "objective=snib" and res["level"] == 0.95
    by_label = {s["label"]: s for s in res["settings"]}
    assert list(by_label) == ["objective=snib", "objective=grpo", "objective=gspo"]
    snib = by_label["objective=snib"]
    assert snib["cells"] == [f"objective=snib__seed{k}" for k in range(3)] and snib["missing"] == []
    assert snib["stats"]["reward/mean"]["final"]["mean"] == pytest.approx(0.51)
    half = 4.30265273 * 0.01 / math.sqrt(3)  # s = 0.01
    assert snib["stats"]["reward/mean"]["final"]["low"] == pytest.approx(0.51 - half)
    assert snib["stats"]["reward/mean"]["auc"]["mean"] == pytest.approx(0.51)
    # the eval line 0 -> 2 level: final = last point (ceil(0.2 * 2) = 1), AUC = its mean, = level
    assert snib["stats"]["eval/greedy_acc"]["final"]["mean"] == pytest.approx(1.02)
    assert snib["stats"]["eval/greedy_acc"]["auc"]["mean"] == pytest.approx(0.51)
    assert snib["per_seed"]["reward/mean"]["final"] == {"0": pytest.approx(0.5), "1": pytest.approx(0.51),
                                                         "2": pytest.approx(0.52)}
    diffs = {(d["a"], d["metric"], d["summary"]): d for d in res["differences"]}
    assert len(diffs) == 2 * 2 * 2  # two settings x two metrics x (final, auc), none for the baseline
    g = diffs[("objective=grpo", "reward/mean", "final")]
    assert g["b"] == "objective=snib" and g["mean"] == pytest.approx(-0.2) and g["resolved"] and g["n"] == 3
    n = diffs[("objective=gspo", "reward/mean", "final")]
    assert n["mean"] == pytest.approx((0.05 - 0.06 + 0.02) / 3) and not n["resolved"]
    with open(os.path.join(root, "results.json")) as f:
        assert json.load(f)["differences"] == json.loads(json.dumps(res["differences"]))


def test_summarize_skips_unfinished_cells(tmp_path):
    root = str(tmp_path)
    with open(os.path.join(root, "study.yaml"), "w") as f:
        f.write("seeds: 2\nsettings:\n  - {label: a, optim.lr: 0.1}\n  - {label: b, optim.lr: 0.2}\n"
                "metrics: [reward/mean]\n")
    _write_cell(root, "a__seed0", [{"step": 1, "reward/mean": 1.0}])
    _write_cell(root, "a__seed1", [{"step": 1, "reward/mean": 3.0}])
    _write_cell(root, "b__seed0", [{"step": 1, "reward/mean": 5.0}])
    _write_cell(root, "b__seed1", [{"step": 1, "reward/mean": 99.0}], done=False)  # no DONE: left out
    res = summarize(root)
    b = res["settings"][1]
    assert b["missing"] == ["b__seed1"] and b["stats"]["reward/mean"]["final"]["n"] == 1
    assert b["stats"]["reward/mean"]["final"]["mean"] == 5.0
    (d,) = [d for d in res["differences"] if d["summary"] == "final"]
    assert d["n"] == 1 and d["mean"] == 4.0 and not d["resolved"]
