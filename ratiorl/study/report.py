"""The study report: ``write_study_report(DIR)`` writes DIR/report.html, one self-contained page
(plots embedded as base64 PNG, inline CSS, no script, nothing fetched from a network).

It reads DIR/results.json (the statistics ``ratiorl.study.stats.summarize`` wrote: nothing is
recomputed here) and the cells' run folders (DIR/cells/<cell_id>/metrics.jsonl and plots/):

- learning curves of each study metric: the mean over seeds with a band of the per-step interval
  (the same ``level``; ``ratiorl.study.stats.mean_interval`` when present, else a t-interval);
- the statistics table of each metric (rows = settings: final value and AUC with their intervals)
  and the differences against the baseline (interval, p-value, "resolved" / "within noise");
- the importance-weight diagnostics over training (ESS, clip rates: the same bands) and per cell
  the trainer's plots (weight histograms, clip rate by position, gradient norm by length);
- one colour per setting in every panel and swatch (``ratiorl.study.palette``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from ratiorl.report.sinks import read_jsonl

from .palette import Palette

# metric key -> readable title (the key is always shown as the y label)
TITLES = {
    "reward/mean": "train reward",
    "accuracy": "train accuracy",
    "eval/avg@k": "eval accuracy (avg@k)",
    "eval/pass@k": "eval pass@k",
    "eval/greedy_acc": "eval greedy accuracy",
    "loss": "loss",
    "kl": "KL to the reference",
    "length/mean": "completion length",
    "entropy": "entropy",
    "objective/ess": "ESS of the objective's weights",
    "diag/ess_raw": "ESS of the raw sequence weights (batch)",
    "diag/ess_group": "ESS of the sequence weights (within groups)",
    "objective/clip_frac": "clip fraction of the objective",
    "diag/token_clip_frac": "token-ratio clip fraction",
    "diag/cumulative_clip_frac": "cumulative-ratio clip fraction",
    "diag/objective_clip_frac_early": "objective clip fraction, first half of positions",
    "diag/objective_clip_frac_late": "objective clip fraction, second half of positions",
    "diag/kl_k3": "KL(π_old ‖ π_θ) under the sampler (k3)",
}
DIAGNOSTIC_KEYS = ["objective/ess", "diag/ess_group", "diag/ess_raw", "objective/clip_frac",
                   "diag/objective_clip_frac_early", "diag/objective_clip_frac_late", "diag/kl_k3"]
CELL_PLOTS = [("weight_histograms", "importance weights"), ("clip_by_position", "clip rate by position"),
              ("grad_norm_by_length", "gradient norm by length"), ("gradient_weight", "gradient weight F(r)")]
_FRACTION_HINTS = ("frac", "acc", "avg@", "pass@", "ess")


@dataclass
class Study:
    """What the report reads: results.json, each setting's cells' metric rows, the palette."""

    dir: str
    results: dict
    settings: list
    palette: Palette
    rows: dict = field(default_factory=dict)  # cell_id -> metrics rows ([] when missing)

    @property
    def level(self) -> float:
        return float(self.results.get("level", 0.95))

    @property
    def method(self) -> str:
        return str(self.results.get("interval", "t"))

    @property
    def baseline(self) -> str | None:
        b = self.results.get("baseline")
        if b is None:  # every difference is against one setting: that is the baseline
            bs = {d.get("b") for d in self.results.get("differences", [])}
            b = bs.pop() if len(bs) == 1 else None
        return b

    @property
    def labels(self) -> list:
        return [s["label"] for s in self.settings]

    def cell_dir(self, cell_id: str) -> str:
        return os.path.join(self.dir, "cells", cell_id)


def load_study(study_dir: str) -> Study:
    path = os.path.join(study_dir, "results.json")
    if not os.path.exists(path):
        raise ValueError(f"{study_dir} has no results.json: summarise the study first (ratiorl study ...)")
    with open(path) as f:
        results = json.load(f)
    settings = list(results.get("settings", []))
    study = Study(study_dir, results, settings, Palette([s["label"] for s in settings]))
    for s in settings:
        for cell in s.get("cells", []):
            p = os.path.join(study.cell_dir(cell), "metrics.jsonl")
            study.rows[cell] = read_jsonl(p) if os.path.exists(p) else []
    return study


# ----------------------------------------------------------------------------- bands


def t_quantile(q: float, df: int) -> float:
    """The q-quantile (q > 0.5) of Student's t with ``df`` degrees of freedom: with t = √df tan θ
    the density in θ is ∝ cos^(df-1) θ on (-π/2, π/2), integrated on a fine grid (4 digits)."""
    th = np.linspace(0.0, np.pi / 2, 20001)
    f = np.cos(th) ** (df - 1)
    cum = np.concatenate([[0.0], np.cumsum((f[1:] + f[:-1]) / 2 * np.diff(th))])
    return math.sqrt(df) * math.tan(float(np.interp((q - 0.5) * 2 * cum[-1], cum, th)))


def interval(values, level: float, method: str = "t") -> tuple[float, float, float]:
    """(mean, low, high) of the mean of ``values``: ``ratiorl.study.stats.mean_interval`` (the
    study's method) when it is importable, else the t-interval; low = high = mean for one value."""
    v = [float(x) for x in values]
    if len(v) < 2:
        m = v[0] if v else float("nan")
        return m, m, m
    try:
        from ratiorl.study.stats import mean_interval  # noqa: PLC0415 - written alongside; optional here

        iv = mean_interval(v, level=level, method=method)
        m, lo, hi = float(iv.mean), float(iv.low), float(iv.high)
    except Exception:  # noqa: BLE001 - absent or not importable: the local t-interval
        m, sd = float(np.mean(v)), float(np.std(v, ddof=1))
        h = t_quantile(0.5 + level / 2, len(v) - 1) * sd / math.sqrt(len(v))
        lo, hi = m - h, m + h
    return (m, lo, hi) if math.isfinite(lo) and math.isfinite(hi) else (m, m, m)


def _values(rows: list, key: str) -> dict:
    out = {}
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and "step" in r:
            out[int(r["step"])] = float(v)
    return out


def _smooth(series: dict, window: int) -> dict:
    steps = sorted(series)
    if window <= 1:
        return {s: series[s] for s in steps}
    ys = np.array([series[s] for s in steps])
    return {s: float(ys[max(0, i - window + 1) : i + 1].mean()) for i, s in enumerate(steps)}


def band(study: Study, setting: dict, key: str, smooth: bool = True) -> dict:
    """Per step: ``steps``, ``mean``, ``low``, ``high``, ``n`` over the setting's seeds (those that
    logged the step) and ``seeds`` (each seed's curve). Train metrics are smoothed per seed (a
    moving average over 1/20 of the points) before the band; eval metrics are not. A key whose
    values are all >= 0 gets its band cut at 0, a fraction (all in [0, 1]) also at 1."""
    curves = [_values(study.rows.get(c, []), key) for c in setting.get("cells", [])]
    curves = [c for c in curves if c]
    if smooth and not key.startswith("eval/"):
        curves = [_smooth(c, max(1, len(c) // 20)) for c in curves]
    steps = sorted({s for c in curves for s in c})
    out = dict(steps=steps, mean=[], low=[], high=[], n=[], seeds=curves)
    every = [v for c in curves for v in c.values()]
    floor = 0.0 if every and min(every) >= 0 else -math.inf
    ceil = 1.0 if every and max(every) <= 1 and floor == 0 and any(h in key for h in _FRACTION_HINTS) else math.inf
    for s in steps:
        vals = [c[s] for c in curves if s in c]
        m, lo, hi = interval(vals, study.level, study.method)
        out["mean"].append(m)
        out["low"].append(min(max(lo, floor), ceil))
        out["high"].append(min(max(hi, floor), ceil))
        out["n"].append(len(vals))
    return out


# ----------------------------------------------------------------------------- figures


def _plt():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def curves_figure(study: Study, keys: list, title: str = ""):
    """One panel per key: each setting's mean over seeds (line, ``gid`` = the setting label) with
    its interval band (``gid`` = label + " band") and each seed faintly, in the setting's colour."""
    plt = _plt()
    keys = keys or ["(no metric)"]
    ncol = min(3, len(keys))
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.4 * nrow + 0.9), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(keys) :]:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys):
        for s in study.settings:
            b = band(study, s, key)
            if not b["steps"]:
                continue
            col = study.palette.colour(s["label"])
            for seed_curve in b["seeds"]:
                xs = sorted(seed_curve)
                ax.plot(xs, [seed_curve[x] for x in xs], color=col, lw=0.6, alpha=0.25)
            (line,) = ax.plot(b["steps"], b["mean"], color=col, lw=1.6, label=s["label"],
                              marker="o" if key.startswith("eval/") else None, markersize=3)
            line.set_gid(s["label"])
            poly = ax.fill_between(b["steps"], b["low"], b["high"], color=col, alpha=0.2, linewidth=0)
            poly.set_gid(s["label"] + " band")
        ax.set_title(TITLES.get(key, key), fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(key, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    legend = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncol=min(len(legend), 3),
                   fontsize=8)
    fig.suptitle(title or f"mean over seeds, band: {study.level:.0%} interval of the mean", fontsize=10)
    return fig


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    _plt().close(fig)
    return buf.getvalue()


# ----------------------------------------------------------------------------- html


def _img(png: bytes, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def _num(x) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3g}"


def _iv(d: dict | None) -> str:
    if not d:
        return "–"
    return f"{_num(d.get('mean'))} [{_num(d.get('low'))}, {_num(d.get('high'))}]"


def _p(p) -> str:
    if p is None or not math.isfinite(p):
        return "–"
    return "&lt;0.001" if p < 0.001 else f"{p:.3f}"


def _swatch(study: Study, label: str) -> str:
    return f"<span class='swatch' style='background:{study.palette.colour(label)}'></span>"


def _setting(study: Study, label: str) -> str:
    """Swatch, label and a baseline mark."""
    mark = " <span class='baseline'>(baseline)</span>" if label == study.baseline else ""
    return f"{_swatch(study, label)}{html.escape(label)}{mark}"


def _stats_tables(study: Study) -> list:
    h = []
    lv = f"{study.level:.0%}"
    for metric in study.results.get("metrics", []):
        h.append(f"<h3>{html.escape(TITLES.get(metric, metric))} <code>{html.escape(metric)}</code></h3>")
        h.append(f"<table class='stats' data-metric='{html.escape(metric)}'><tr><th>setting</th><th>seeds</th>"
                 f"<th>final value [{lv} interval]</th><th>AUC (mean level) [{lv} interval]</th></tr>")
        for s in study.settings:
            st = s.get("stats", {}).get(metric, {})
            n = len(s.get("seeds", [])) - len(s.get("missing", []))
            h.append(f"<tr data-setting='{html.escape(s['label'])}'><td>{_setting(study, s['label'])}</td>"
                     f"<td>{n}</td>"
                     f"<td>{_iv(st.get('final'))}</td><td>{_iv(st.get('auc'))}</td></tr>")
        h.append("</table>")
    return h


def _differences_table(study: Study) -> list:
    diffs = study.results.get("differences", [])
    if not diffs:
        return ["<p>No differences: the study has one setting or no baseline.</p>"]
    lv = f"{study.level:.0%}"
    h = [(f"<p>Each row: setting − baseline, paired over the seeds both ran; <b>resolved</b> when the {lv} "
          "interval excludes 0, else <b>within noise</b>.</p>"),
         (f"<table class='differences'><tr><th>metric</th><th>summary</th><th>setting</th><th>baseline</th>"
          f"<th>difference [{lv} interval]</th><th>verdict</th><th>p-value</th><th>seeds</th></tr>")]
    for d in diffs:
        verdict = "resolved" if d.get("resolved") else "within noise"
        h.append(f"<tr data-setting='{html.escape(str(d.get('a')))}'><td>{html.escape(str(d.get('metric')))}</td>"
                 f"<td>{html.escape(str(d.get('summary')))}</td>"
                 f"<td>{_swatch(study, str(d.get('a')))}{html.escape(str(d.get('a')))}</td>"
                 f"<td>{_swatch(study, str(d.get('b')))}{html.escape(str(d.get('b')))}</td>"
                 f"<td>{_iv(d)}</td><td class='{verdict.replace(' ', '-')}'>{verdict}</td>"
                 f"<td>{_p(d.get('p_value'))}</td><td>{d.get('n', '–')}</td></tr>")
    h.append("</table>")
    return h


def _last(rows: list, key: str):
    vals = _values(rows, key)
    return vals[max(vals)] if vals else None


def _cells(study: Study) -> list:
    h = []
    for s in study.settings:
        h.append(f"<h3>{_swatch(study, s['label'])}{html.escape(s['label'])}</h3>")
        for i, cell in enumerate(s.get("cells", [])):
            d = study.cell_dir(cell)
            rows = study.rows.get(cell, [])
            last = ", ".join(f"{k} {_num(_last(rows, k))}" for k in DIAGNOSTIC_KEYS[:4] if _last(rows, k) is not None)
            h.append(f"<details{' open' if i == 0 else ''}><summary><b>{html.escape(cell)}</b>"
                     f"{' (last step: ' + html.escape(last) + ')' if last else ''}</summary><div class='cell'>")
            found = False
            for stem, title in CELL_PLOTS:
                p = os.path.join(d, "plots", f"{stem}.png")
                if os.path.exists(p):
                    with open(p, "rb") as f:
                        h.append(f"<figure>{_img(f.read(), f'{cell}: {title}')}<figcaption>{html.escape(title)}"
                                 "</figcaption></figure>")
                    found = True
            if not found:
                h.append("<p>No diagnostics plots in this cell (logging.plots off, or no evaluation ran).</p>")
            h.append("</div></details>")
    return h


CSS = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:0.5em 0 1em}td,th{padding:3px 10px;border-bottom:1px solid #ddd;"
       "text-align:left;white-space:nowrap}th{background:#f4f4f4}.stats td+td,.differences td:nth-child(n+5)"
       "{text-align:right}img{max-width:100%;height:auto}figure{display:inline-block;margin:0.3em;max-width:100%}"
       ".swatch{display:inline-block;width:0.9em;height:0.9em;margin-right:0.4em;border:1px solid #555;"
       "vertical-align:middle}.resolved{font-weight:bold}.within-noise{color:#666}.baseline{color:#666}"
       "details{margin:0.4em 0}code{font-size:0.9em}.wide{overflow-x:auto}.cell img{max-width:560px}")


def write_study_report(study_dir: str) -> str:
    """Write DIR/report.html from DIR/results.json and the cells; returns its path."""
    study = load_study(study_dir)
    name = str(study.results.get("study") or os.path.basename(os.path.normpath(study_dir)))
    spec = ""
    if os.path.exists(os.path.join(study_dir, "study.yaml")):
        with open(os.path.join(study_dir, "study.yaml")) as f:
            spec = f.read()
    metrics = list(study.results.get("metrics", []))
    present = {k for rows in study.rows.values() for r in rows for k in r}
    diag_keys = [k for k in DIAGNOSTIC_KEYS if k in present]
    n_seeds = sorted({len(s.get("seeds", [])) for s in study.settings})
    h = [(f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Study report: {html.escape(name)}"
          f"</title><link rel='icon' href='data:,'><style>{CSS}</style></head><body>"),
         f"<h1>Study report: {html.escape(name)}</h1>",
         (f"<p>{len(study.settings)} settings × {'/'.join(map(str, n_seeds)) or 0} seeds; intervals at the "
          f"{study.level:.0%} level over seeds ({html.escape(study.method)}). Colours: one per setting in every "
          "plot and table.</p>"),
         "<table class='settings'><tr><th>setting</th><th>axes</th><th>seeds</th></tr>"]
    for s in study.settings:
        axes = ", ".join(f"{k}={v}" for k, v in s.get("axes", {}).items())
        missing = f" (not finished: {', '.join(s['missing'])})" if s.get("missing") else ""
        h.append(f"<tr><td>{_setting(study, s['label'])}</td><td>{html.escape(axes)}</td>"
                 f"<td>{html.escape(', '.join(map(str, s.get('seeds', []))) + missing)}</td></tr>")
    h.append("</table><h2>Learning curves</h2>")
    h.append(_img(figure_png(curves_figure(study, metrics)), "learning curves"))
    h += ["<h2>Statistics</h2>"] + _stats_tables(study)
    h += ["<h2>Differences against the baseline</h2><div class='wide'>"] + _differences_table(study) + ["</div>"]
    if diag_keys:
        h.append("<h2>Importance-weight diagnostics over training</h2>")
        h.append(_img(figure_png(curves_figure(study, diag_keys, f"diagnostics: mean over seeds, band: "
                                               f"{study.level:.0%} interval of the mean")), "diagnostics"))
    h += ["<h2>Per cell: weight histograms, clip rate by position, gradient norm by length</h2>"] + _cells(study)
    if spec:
        h.append(f"<h2>Study spec</h2><pre>{html.escape(spec)}</pre>")
    h.append("</body></html>")
    out = os.path.join(study_dir, "report.html")
    with open(out, "w") as f:
        f.write("\n".join(h))
    return out


__all__ = ["Study", "load_study", "band", "interval", "t_quantile", "curves_figure", "figure_png",
           "write_study_report"]
