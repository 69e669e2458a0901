"""Plots of the training diagnostics (matplotlib, Agg backend): CTPO Fig. 1 (clip rate by
position), SNIB Fig. 2 (weight histograms), DGPO Fig. 2 (gradient weight F(r)), SNIB Table 4a
(gradient norm by length). The numbers come from ``ratiorl.report.diagnostics``.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_path, plt):
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.88, wspace=0.28)
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path


def plot_clip_by_position(curves, out_path: str, labels: Iterable[str] | None = None) -> str:
    """CTPO Fig. 1: std of the cumulative log-ratio per position (with the sqrt(t) fit) and the
    clip rate per position under the fixed and the adaptive window (and of the training objective,
    when the curve has it). ``curves``: one dict from ``clip_fraction_by_position`` or a list of
    them (e.g. one per training step)."""
    plt = _plt()
    curves = [curves] if isinstance(curves, dict) else list(curves)
    labels = list(labels) if labels is not None else [f"#{i}" for i in range(len(curves))]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for i, (c, lab) in enumerate(zip(curves, labels)):
        t = torch.tensor(c["position"], dtype=torch.float64)
        sd = torch.tensor(c["log_ratio_std"], dtype=torch.float64)
        col = f"C{i % 10}"
        ax[0].plot(t, sd, color=col, label=lab)
        if len(t) and float((t * t).sum()) > 0:
            k = float((sd * t.sqrt()).sum() / t.sum())  # least-squares fit of sd = k sqrt(t)
            ax[0].plot(t, k * t.sqrt(), color=col, ls=":", lw=1)
        ax[1].plot(t, c["clip_frac_fixed"], color=col, label=f"{lab} fixed")
        ax[1].plot(t, c["clip_frac_adaptive"], color=col, ls="--", label=f"{lab} adaptive")
        if "clip_frac_objective" in c:
            ax[1].plot(t, c["clip_frac_objective"], color=col, ls=":", label=f"{lab} {c.get('objective', 'objective')}")
    ax[0].set(xlabel="position t", ylabel="std of log ρ_t", title="cumulative log-ratio spread (dotted: k√t fit)")
    ax[1].set(xlabel="position t", ylabel="clip rate", title="clip rate per position: fixed vs adaptive")
    for a in ax:
        a.grid(True, alpha=0.3)
        a.legend(fontsize=7)
    return _save(fig, out_path, plt)


def plot_weight_histograms(hist: dict, out_path: str, bins: int = 50) -> str:
    """SNIB Fig. 2: histogram of the raw log sequence weights (vanilla IS) and of the
    self-normalised ones (SNIB), from ``weight_histograms``."""
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    ax[0].hist(hist["log_w"].numpy(), bins=bins, color="C3", alpha=0.8)
    ax[0].set(xlabel="log w (vanilla IS)", ylabel="sequences", title=f"raw, ESS {hist['ess_raw']:.3f}")
    ax[1].hist(hist["log_w_normalized"].numpy(), bins=bins, color="C0", alpha=0.8)
    ax[1].set(xlabel="log w~ (self-normalised)",
              title=f"SNIB, ESS {hist['ess_normalized']:.3f}, {100 * hist['frac_unclipped']:.1f}% in the clip window")
    for a in ax:
        a.grid(True, alpha=0.3)
    return _save(fig, out_path, plt)


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
    from .diagnostics import gradient_weight  # noqa: PLC0415 - diagnostics imports this module

    plt = _plt()
    r = torch.linspace(r_min, r_max, num)
    fig, ax = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for i, rule in enumerate(rules):
        for j, sign in enumerate((1.0, -1.0)):
            F = gradient_weight(rule, r, sign, **overrides)
            lab = rule if isinstance(rule, str) else f"{rule.name} ({rule.rule})"
            ax[j].plot(r, F, color=f"C{i % 10}", label=lab, lw=1.4)
    for j, sign in enumerate(("A > 0", "A < 0")):
        ax[j].plot(r, r, color="gray", ls=":", lw=0.8, label="F = r (no clip)")
        ax[j].set(xlabel="ratio r", title=f"gradient weight F(r), {sign}")
        ax[j].grid(True, alpha=0.3)
    ax[0].set_ylabel("F (gradient = F · A · ∇log π)")
    ax[0].legend(fontsize=7)
    return _save(fig, out_path, plt)


def plot_grad_norm_by_length(stats, out_path: str) -> str:
    """SNIB Table 4a as a bar chart: mean ± std of per-sequence gradient norms per length bucket.
    ``stats``: one dict from ``grad_norm_by_length`` or {method name: dict} to compare methods."""
    plt = _plt()
    if "labels" in stats:
        stats = {"": stats}
    names = list(stats)
    labels = stats[names[0]]["labels"]
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, n in enumerate(names):
        s = stats[n]
        xs = [k + (i - (len(names) - 1) / 2) * width for k in range(len(labels))]
        corr = s.get("corr_length_abs_log_w")
        lab = n + (f" (corr(len,|log w|)={corr:.2f})" if corr is not None and math.isfinite(corr) else "")
        ax.bar(xs, [0 if math.isnan(v) else v for v in s["mean"]], width,
               yerr=[0 if math.isnan(v) else v for v in s["std"]], capsize=3, label=lab or None, color=f"C{i % 10}")
    ax.set_xticks(range(len(labels)), [f"{lab}\n(n={c})" for lab, c in zip(labels, stats[names[0]]["count"])])
    ax.set(xlabel="response length (tokens)", ylabel="per-sequence gradient norm", title="gradient norm by length")
    ax.grid(True, axis="y", alpha=0.3)
    if any(names):
        ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.12, right=0.98, bottom=0.18, top=0.9)
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path


__all__ = ["plot_clip_by_position", "plot_weight_histograms", "plot_gradient_weights", "plot_grad_norm_by_length"]
