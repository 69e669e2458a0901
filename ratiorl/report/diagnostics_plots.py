"""Plots of the training diagnostics (matplotlib, Agg backend): CTPO Fig. 1 (clip rate by
position), SNIB Fig. 2 (weight histograms), DGPO Fig. 2 (gradient weight F(r)), SNIB Table 4a
(gradient norm by length). The numbers come from ``ratiorl.report.diagnostics``.

Each ``plot_*`` saves a PNG and returns its path; the matching ``*_figure`` returns the
matplotlib Figure unsaved. Titles name the run's objective (``objective=``) and its colour is the
objective's colour in ``ratiorl.study.palette``; figures use constrained layout (no cut labels).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _palette(labels=()):
    from ratiorl.study.palette import Palette  # noqa: PLC0415

    return Palette(labels)


def _save(fig, out_path):
    fig.savefig(out_path, dpi=90)
    _plt().close(fig)
    return out_path


def _run(objective: str | None, label: str = "") -> str:
    """``grpo run, step 12`` / ``step 12`` / ``''``: who the plot is about, for titles."""
    parts = [f"{objective} run"] if objective else []
    return ", ".join(parts + ([label] if label else []))


def nonnegative_yerr(mean: Sequence[float], err: Sequence[float]) -> list[list[float]]:
    """Asymmetric error bars of a non-negative quantity: ``[lower, upper]`` with the lower bar
    cut at 0 (mean - lower >= 0); NaN as 0 (no bar)."""
    low, high = [], []
    for m, e in zip(mean, err):
        m = 0.0 if m is None or math.isnan(m) else m
        e = 0.0 if e is None or math.isnan(e) else abs(e)
        low.append(min(e, max(m, 0.0)))
        high.append(e)
    return [low, high]


# ----------------------------------------------------------------------------- CTPO Fig. 1


def clip_by_position_figure(curves, labels: Iterable[str] | None = None, objective: str | None = None):
    plt = _plt()
    curves = [curves] if isinstance(curves, dict) else list(curves)
    labels = list(labels) if labels is not None else [f"#{i}" for i in range(len(curves))]
    objective = objective or next((c["objective"] for c in curves if c.get("objective")), None)
    pal = _palette([objective] if objective else ())
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for c, lab in zip(curves, labels):
        t = torch.tensor(c["position"], dtype=torch.float64)
        sd = torch.tensor(c["log_ratio_std"], dtype=torch.float64)
        # one curve: the run's objective colour; several (e.g. steps): one colour per curve
        col = pal.colour(objective) if objective and len(curves) == 1 else pal.colour(lab)
        ax[0].plot(t, sd, color=col, label=lab)
        if len(t) and float((t * t).sum()) > 0:
            k = float((sd * t.sqrt()).sum() / t.sum())  # least-squares fit of sd = k sqrt(t)
            ax[0].plot(t, k * t.sqrt(), color=col, ls=":", lw=1, label=f"{lab} k√t fit")
        ax[1].plot(t, c["clip_frac_fixed"], color=col, label=f"{lab} fixed window")
        ax[1].plot(t, c["clip_frac_adaptive"], color=col, ls="--", label=f"{lab} adaptive window")
        if "clip_frac_objective" in c:
            ax[1].plot(t, c["clip_frac_objective"], color=col, ls=":", lw=2,
                       label=f"{lab} {c.get('objective', 'objective')} (trained)")
    ax[0].set(xlabel="position t", ylabel="std of log ρ_t", title="cumulative log-ratio spread (dotted: k√t fit)")
    ax[1].set(xlabel="position t", ylabel="clip rate", title="clip rate per position: fixed vs adaptive")
    ax[1].set_ylim(bottom=0)
    for a in ax:
        a.grid(True, alpha=0.3)
        a.legend(fontsize=7)
    if objective or len(labels) == 1:
        fig.suptitle(f"clip rate by position ({_run(objective, labels[0] if len(labels) == 1 else '')})", fontsize=10)
    return fig


def plot_clip_by_position(curves, out_path: str, labels: Iterable[str] | None = None,
                          objective: str | None = None) -> str:
    """CTPO Fig. 1: std of the cumulative log-ratio per position (with the sqrt(t) fit) and the
    clip rate per position under the fixed and the adaptive window (and of the training objective,
    when the curve has it). ``curves``: one dict from ``clip_fraction_by_position`` or a list of
    them (e.g. one per training step); the objective is the curves' own unless given."""
    return _save(clip_by_position_figure(curves, labels, objective), out_path)


# ----------------------------------------------------------------------------- SNIB Fig. 2


def weight_histograms_figure(hist: dict, bins: int = 50, objective: str | None = None, label: str = ""):
    """The raw and the self-normalised sequence log weights of one batch. The self-normalised
    panel is a diagnostic computed for any run (SNIB's normalisation applied to this batch), so
    its title says what it is, and the figure title names the run's objective."""
    plt = _plt()
    col = _palette([objective]).colour(objective) if objective else "#4d4d4d"
    fig, ax = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True, layout="constrained")
    ax[0].hist(hist["log_w"].numpy(), bins=bins, color=col, alpha=0.8)
    ax[0].set(xlabel="log w = Σ_t log(π_θ / π_old) (vanilla IS)", ylabel="sequences",
              title=f"raw weights: ESS {hist['ess_raw']:.3f}")
    ax[1].hist(hist["log_w_normalized"].numpy(), bins=bins, color=col, alpha=0.8)
    ax[1].set(xlabel="log w̃ = log(w / mean of w in the group)",
              title=f"self-normalised weights: ESS {hist['ess_normalized']:.3f},\n"
                    f"{100 * hist['frac_unclipped']:.1f}% inside the clip window")
    for a in ax:
        a.grid(True, alpha=0.3)
    who = _run(objective, label)
    fig.suptitle(f"sequence importance weights of one batch ({who})" if who else
                 "sequence importance weights of one batch", fontsize=10)
    return fig


def plot_weight_histograms(hist: dict, out_path: str, bins: int = 50, objective: str | None = None,
                           label: str = "") -> str:
    """SNIB Fig. 2: histogram of the raw log sequence weights (vanilla IS) and of the
    self-normalised ones, from ``weight_histograms``; ``objective``: the run's objective (titles)."""
    return _save(weight_histograms_figure(hist, bins, objective, label), out_path)


# ----------------------------------------------------------------------------- DGPO Fig. 2


def gradient_weights_figure(rules: Sequence, r_min: float = 0.2, r_max: float = 3.0, num: int = 400, **overrides):
    from .diagnostics import gradient_weight  # noqa: PLC0415 - diagnostics imports this module

    from ratiorl.study.palette import REFERENCE  # noqa: PLC0415

    plt = _plt()
    names = [rule if isinstance(rule, str) else f"{rule.name} ({rule.rule})" for rule in rules]
    pal = _palette(names)
    r = torch.linspace(r_min, r_max, num)
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, layout="constrained")
    for rule, lab in zip(rules, names):
        for j, sign in enumerate((1.0, -1.0)):
            F = gradient_weight(rule, r, sign, **overrides)
            ax[j].plot(r, F, color=pal.colour(lab), linestyle=pal.linestyle(lab), label=lab, lw=1.4)
    for j, sign in enumerate(("A > 0", "A < 0")):
        ax[j].plot(r, r, color=REFERENCE, ls=":", lw=0.8, label="F = r (no clip)")
        ax[j].set(xlabel="ratio r", title=f"gradient weight F(r), {sign}")
        ax[j].grid(True, alpha=0.3)
    ax[0].set_ylabel("F (gradient = F · A · ∇log π)")
    ax[0].legend(fontsize=7)
    return fig


def plot_gradient_weights(
    rules: Sequence,
    out_path: str,
    r_min: float = 0.2,
    r_max: float = 3.0,
    num: int = 400,
    **overrides,
) -> str:
    """DGPO Fig. 2: F(r) for A > 0 and A < 0, for each ``weighted`` rule name or ``Objective``,
    measured by autograd through the library (``gradient_weight``); a rule name gets its preset's
    bounds unless overridden (e.g. ``clip_low=0.2, clip_high=0.2``)."""
    return _save(gradient_weights_figure(rules, r_min, r_max, num, **overrides), out_path)


# ----------------------------------------------------------------------------- SNIB Table 4a


def length_label(label: str) -> str:
    """A bucket label with its range written correctly: ``2-2`` -> ``2`` (one length)."""
    m = re.fullmatch(r"(\d+)-(\d+)", label.strip())
    return m.group(1) if m and m.group(1) == m.group(2) else label


def grad_norm_by_length_figure(stats, objective: str | None = None, label: str = ""):
    """Bars of mean ± std per length bucket, empty buckets dropped (a bucket stays when any
    method has a sequence in it), the lower bar cut at 0 (a norm is non-negative)."""
    plt = _plt()
    if "labels" in stats:
        stats = {objective or "": stats}
    names = list(stats)
    pal = _palette([n for n in names if n])
    all_labels = stats[names[0]]["labels"]
    keep = [k for k in range(len(all_labels)) if any(stats[n]["count"][k] > 0 for n in names)]
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    legend = len(names) > 1
    for i, n in enumerate(names):
        s = stats[n]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(keep))]
        mean = [0.0 if math.isnan(s["mean"][k]) else s["mean"][k] for k in keep]
        std = [s["std"][k] for k in keep]
        corr = s.get("corr_length_abs_log_w")
        lab = n + (f" (corr(len,|log w|)={corr:.2f})" if corr is not None and math.isfinite(corr) else "")
        legend = legend or lab != n
        ax.bar(xs, mean, width, yerr=nonnegative_yerr(mean, std), capsize=3, label=lab or None,
               color=pal.colour(n) if n else "#4d4d4d")

    def count(k):
        cs = [stats[n]["count"][k] for n in names]
        return str(cs[0]) if len(set(cs)) == 1 else "/".join(map(str, cs))

    ax.set_xticks(range(len(keep)), [f"{length_label(all_labels[k])}\n(n={count(k)})" for k in keep])
    who = _run(objective, label)
    ax.set(xlabel="response length (tokens)", ylabel="per-sequence gradient norm",
           title="gradient norm by length" + (f" ({who})" if who else ""))
    ax.set_ylim(bottom=0)
    if not keep:
        ax.text(0.5, 0.5, "no sequences", ha="center", va="center", transform=ax.transAxes)
    ax.grid(True, axis="y", alpha=0.3)
    if legend:
        ax.legend(fontsize=7)
    return fig


def plot_grad_norm_by_length(stats, out_path: str, objective: str | None = None, label: str = "") -> str:
    """SNIB Table 4a as a bar chart: mean ± std of per-sequence gradient norms per length bucket.
    ``stats``: one dict from ``grad_norm_by_length`` or {method name: dict} to compare methods."""
    return _save(grad_norm_by_length_figure(stats, objective, label), out_path)


__all__ = ["plot_clip_by_position", "plot_weight_histograms", "plot_gradient_weights", "plot_grad_norm_by_length",
           "clip_by_position_figure", "weight_histograms_figure", "gradient_weights_figure",
           "grad_norm_by_length_figure", "nonnegative_yerr", "length_label"]
