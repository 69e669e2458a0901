"""Statistics of a study: per setting a mean over seeds with its confidence interval, per pair of
settings a paired difference with its interval and test (docs/studies.md has the formulas).

    mean_interval([0.41, 0.38, 0.45])                  # Interval(mean, low, high, n, level): Student t
    mean_interval(values, method="bootstrap")          # percentile bootstrap of the mean
    final_value(steps, values)                         # mean of the last 20% of the logged points
    area_under_curve(steps, values)                    # trapezoid / step span: the curve's mean level
    paired_difference({0: .5, 1: .6}, {0: .4, 1: .45}) # Difference: a - b over the common seeds
    summarize("runs/studies/x")                        # reads the cells, writes results.json

Student t quantiles and tail probabilities come from the regularised incomplete beta function
(a continued fraction, Numerical Recipes sec. 6.4), so no statistics library is needed;
tests/study/test_stats.py checks them against the published table.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

BOOTSTRAP_SAMPLES = 10_000
SUMMARIES = ("final", "auc")  # the two numbers each curve is reduced to


# ----------------------------------------------------------------------------- Student t


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if math.isnan(t) or df <= 0:
        return float("nan")
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t (``t_quantile(0.975, 4)`` = 2.776...), by bisection on the tail."""
    if not 0.0 < q < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < q < 1 and df > 0, got q={q}, df={df}")
    if q == 0.5:
        return 0.0
    tail = 2.0 * (1.0 - q) if q > 0.5 else 2.0 * q  # two-sided tail probability of |T| >= t
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > tail:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_two_sided_p(mid, df) > tail:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    t = 0.5 * (lo + hi)
    return t if q > 0.5 else -t


# ----------------------------------------------------------------------------- intervals


@dataclass(frozen=True)
class Interval:
    """A mean with its confidence interval at ``level`` over ``n`` values (NaN bounds when n < 2)."""

    mean: float
    low: float
    high: float
    n: int
    level: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _finite(values: Iterable) -> np.ndarray:
    x = np.asarray([float(v) for v in values if v is not None], dtype=float)
    return x[np.isfinite(x)]


def _check(level: float, method: str) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if method not in ("t", "bootstrap"):
        raise ValueError(f"interval method must be 't' or 'bootstrap', got {method!r}")


def mean_interval(values: Iterable, level: float = 0.95, method: str = "t", seed: int = 0,
                  samples: int = BOOTSTRAP_SAMPLES) -> Interval:
    """Mean of the finite ``values`` with a two-sided ``level`` interval.

    ``t``: mean +- t_{n-1, 1-a/2} s / sqrt(n) (s the sample standard deviation, a = 1 - level).
    ``bootstrap``: the a/2 and 1-a/2 percentiles of the means of ``samples`` resamples (with
    replacement, numpy generator seeded with ``seed``). With fewer than two values the bounds are NaN.
    """
    _check(level, method)
    x = _finite(values)
    n = int(x.size)
    nan = float("nan")
    if n == 0:
        return Interval(nan, nan, nan, 0, level)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, nan, nan, n, level)
    alpha = 1.0 - level
    if method == "t":
        half = t_quantile(1.0 - alpha / 2.0, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
        return Interval(mean, mean - half, mean + half, n, level)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, n, size=(samples, n))].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return Interval(mean, float(low), float(high), n, level)


# ----------------------------------------------------------------------------- curves


def _curve(steps: Sequence, values: Sequence) -> tuple:
    s = np.asarray(steps, dtype=float)
    v = np.asarray(values, dtype=float)
    if s.shape != v.shape:
        raise ValueError(f"steps and values differ in length: {s.size} vs {v.size}")
    keep = np.isfinite(s) & np.isfinite(v)
    s, v = s[keep], v[keep]
    order = np.argsort(s, kind="stable")
    return s[order], v[order]


def final_value(steps: Sequence, values: Sequence, last_fraction: float = 0.2) -> float:
    """Mean of the last ceil(last_fraction * n) of the n logged points (at least one); NaN if none."""
    if not 0.0 < last_fraction <= 1.0:
        raise ValueError(f"last_fraction must be in (0, 1], got {last_fraction}")
    _, v = _curve(steps, values)
    if v.size == 0:
        return float("nan")
    k = max(1, math.ceil(last_fraction * v.size - 1e-9))
    return float(v[-k:].mean())


def area_under_curve(steps: Sequence, values: Sequence) -> float:
    """Trapezoid area under the curve divided by its step span: the curve's mean level over the
    run (one point: its value; none: NaN)."""
    s, v = _curve(steps, values)
    if v.size == 0:
        return float("nan")
    span = s[-1] - s[0]
    if v.size == 1 or span <= 0:
        return float(v.mean())
    return float(np.sum((v[1:] + v[:-1]) * np.diff(s)) / 2.0 / span)


# ----------------------------------------------------------------------------- differences


@dataclass(frozen=True)
class Difference:
    """``a - b`` for one metric and summary ("final" or "auc"), paired over the seeds both have."""

    a: str
    b: str
    metric: str
    summary: str
    mean: float
    low: float
    high: float
    p_value: float
    n: int
    resolved: bool  # the interval excludes 0 at the level

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def paired_difference(a_by_seed: Mapping, b_by_seed: Mapping, level: float = 0.95, *, a: str = "a",
                      b: str = "b", metric: str = "", summary: str = "final", method: str = "t",
                      seed: int = 0) -> Difference:
    """Paired difference of two settings over their common seeds (finite values on both sides).

    d_k = a_k - b_k; mean d, interval mean(d) +- t_{n-1,1-a/2} s_d / sqrt(n) (or the bootstrap of
    the mean of d), p-value of the paired t test t = mean(d) / (s_d / sqrt(n)), two-sided, n - 1
    degrees of freedom. ``resolved``: the interval excludes 0 (NaN with fewer than two pairs: not resolved)."""
    common = [k for k in a_by_seed if k in b_by_seed]
    pairs = [(float(a_by_seed[k]), float(b_by_seed[k])) for k in common]
    d = np.asarray([x - y for x, y in pairs if math.isfinite(x) and math.isfinite(y)], dtype=float)
    iv = mean_interval(d, level, method=method, seed=seed)
    p = float("nan")
    if d.size >= 2:
        sd = float(d.std(ddof=1))
        if sd > 0:
            p = t_two_sided_p(float(d.mean()) / (sd / math.sqrt(d.size)), d.size - 1)
        else:  # every pair differs by the same amount
            p = 1.0 if float(d.mean()) == 0.0 else 0.0
    resolved = bool(iv.n >= 2 and math.isfinite(iv.low) and (iv.low > 0 or iv.high < 0))
    return Difference(a, b, metric, summary, iv.mean, iv.low, iv.high, p, iv.n, resolved)


# ----------------------------------------------------------------------------- a study folder


def read_metric(metrics_path: str, metric: str) -> tuple:
    """(steps, values) of one metric in a run's metrics.jsonl; a step logged twice keeps its last value."""
    from ratiorl.report.sinks import read_jsonl  # noqa: PLC0415  (skips a line cut by a crash)

    by_step = {row["step"]: float(row[metric]) for row in read_jsonl(metrics_path)
               if metric in row and "step" in row and isinstance(row[metric], (int, float))}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def setting_stats(cell_dirs: Mapping, metrics: Sequence[str], level: float = 0.95, method: str = "t",
                  last_fraction: float = 0.2) -> tuple:
    """For cells {seed: run folder}: ({metric: {"final": Interval, "auc": Interval}},
    {metric: {"final": {seed: value}, "auc": {seed: value}}})."""
    stats, per_seed = {}, {}
    for metric in metrics:
        values = {s: {} for s in SUMMARIES}
        for seed, d in cell_dirs.items():
            steps, vals = read_metric(os.path.join(d, "metrics.jsonl"), metric)
            if steps:
                values["final"][seed] = final_value(steps, vals, last_fraction)
                values["auc"][seed] = area_under_curve(steps, vals)
        per_seed[metric] = values
        stats[metric] = {s: mean_interval(values[s].values(), level, method) for s in SUMMARIES}
    return stats, per_seed


def summarize(study_dir: str, spec=None, write: bool = True) -> dict:
    """Statistics of a study folder from its finished cells (those with a DONE marker); writes
    ``results.json`` (schema in docs/studies.md). ``spec``: a StudySpec (default: DIR/study.yaml)."""
    from .spec import DONE, load_spec  # noqa: PLC0415 - spec imports nothing from here at import time

    spec = spec or load_spec(os.path.join(study_dir, "study.yaml"))
    cells_root = os.path.join(study_dir, "cells")
    metrics = spec.metric_names(None if spec.metrics else _headline(study_dir, spec))
    settings, per_setting = [], {}
    for setting in spec.settings:
        done = {}
        cells, missing = [], []
        for seed in spec.seeds:
            cid = spec.cell_id(setting, seed)
            cells.append(cid)
            d = os.path.join(cells_root, cid)
            if os.path.exists(os.path.join(d, DONE)):
                done[seed] = d
            else:
                missing.append(cid)
        stats, per_seed = setting_stats(done, metrics, spec.level, spec.interval, spec.final_fraction)
        per_setting[setting.label] = per_seed
        settings.append({
            "label": setting.label, "axes": dict(setting.values), "seeds": list(spec.seeds), "cells": cells,
            "missing": missing,
            "stats": {m: {s: stats[m][s].as_dict() for s in SUMMARIES} for m in metrics},
            "per_seed": {m: {s: {str(k): v for k, v in per_seed[m][s].items()} for s in SUMMARIES}
                         for m in metrics},
        })
    base = spec.baseline_setting().label
    differences = []
    for setting in spec.settings:
        if setting.label == base:
            continue
        for m in metrics:
            for s in SUMMARIES:
                diff = paired_difference(per_setting[setting.label][m][s], per_setting[base][m][s], spec.level,
                                         a=setting.label, b=base, metric=m, summary=s, method=spec.interval)
                differences.append(diff.as_dict())
    results = {
        "study": spec.name, "level": spec.level, "interval": spec.interval, "final_fraction": spec.final_fraction,
        "baseline": base, "metrics": list(metrics), "settings": settings, "differences": differences,
    }
    if write:
        path = os.path.join(study_dir, "results.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, path)
    return results


def _headline(study_dir: str, spec) -> Optional[str]:
    """eval.headline of the cells (from the first cell config.yaml found; None if none is)."""
    import yaml  # noqa: PLC0415

    for setting, seed in spec.cells():
        path = os.path.join(study_dir, "cells", spec.cell_id(setting, seed), "config.yaml")
        if os.path.exists(path):
            with open(path) as f:
                cfg = yaml.safe_load(f) or {}
            return (cfg.get("eval") or {}).get("headline")
    return None


__all__ = [
    "Interval", "Difference", "mean_interval", "final_value", "area_under_curve", "paired_difference",
    "summarize", "setting_stats", "read_metric", "t_quantile", "t_two_sided_p", "betainc", "SUMMARIES",
]
