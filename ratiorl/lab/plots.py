"""PNG plots of the lab study (matplotlib, Agg backend).

Every estimator has one style (colour, marker, line style) in every panel and every figure, from
``ratiorl.study.palette`` with a fixed registration order (``LAB_ORDER``), so each family panel
shows distinct colours and no two estimators share a style. The bias plot splits the estimators
into families (``FAMILIES``), one panel each, rather than a dozen lines in one panel. Error bars of
non-negative quantities never reach below 0 (nor below the floor of a log axis). ``*_figure``
functions return the Figure unsaved; ``plot_*`` save it and return the path.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from matplotlib.lines import Line2D  # noqa: E402

from ratiorl.study.palette import COLOURS, NEUTRAL, REFERENCE, Palette  # noqa: E402

# family title, members (in order); a name in no family joins the one its suffix suggests
FAMILIES = [
    ("plain weights", ["grpo", "snib", "gspo", "sequence", "snib_fg", "gspo_token"]),
    ("other advantage baselines", ["sequence_rloo", "snib_rloo", "grpo_rloo", "grpo_reinforce_pp", "grpo_remax",
                                   "grpo_opo", "grpo_optimal_baseline"]),
    ("the presets' own clipping", ["grpo_clip", "snib_clip", "gspo_clip", "sequence_clip"]),
    ("per-token advantages", ["token", "cumulative", "sequence_token", "ctpo_clip", "ctpo_fixed_clip"]),
]
LAB_ORDER = [n for _, members in FAMILIES for n in members]
_ADVANTAGE_SUFFIXES = ("_rloo", "_reinforce_pp", "_remax", "_opo", "_optimal_baseline")
_PALETTE = Palette(LAB_ORDER, colours=COLOURS[:7])  # no yellow: too faint for thin lines


def _style(name):
    return _PALETTE.style(name)


def family_of(name: str) -> str:
    for title, members in FAMILIES:
        if name in members:
            return title
    if name.endswith("_clip"):
        return FAMILIES[2][0]
    if name.endswith(_ADVANTAGE_SUFFIXES):
        return FAMILIES[1][0]
    return FAMILIES[0][0]


def _save(fig, out_path):
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path


def errorbar_nonnegative(ax, x, y, err, *, log: bool = False, **kw):
    """``ax.errorbar`` of a non-negative quantity: the lower bar is cut at 0, or on a log axis at
    half the smallest positive value drawn (an interval that reaches 0 cannot be drawn there:
    its bar ends at that floor). Points with y <= 0 are left out on a log axis."""
    pts = [(a, b, abs(e) if e is not None and math.isfinite(e) else 0.0) for a, b, e in zip(x, y, err)
           if math.isfinite(b) and (b > 0 if log else True)]
    if not pts:
        return None
    floor = 0.5 * min(b for _, b, _ in pts) if log else 0.0
    low = [min(e, max(b - floor, 0.0)) for _, b, e in pts]
    high = [e for *_, e in pts]
    return ax.errorbar([a for a, *_ in pts], [b for _, b, _ in pts], yerr=[low, high], **kw)


def _bias_panel(ax, by_G, Gs, names, problem_ref):
    for n in names:
        b = [by_G[G][n][1].bias_norm for G in Gs]
        se = [by_G[G][n][1].bias_norm_se for G in Gs]
        c = errorbar_nonnegative(ax, Gs, b, se, log=True, label=n, capsize=2, **_style(n))
        if c is not None:
            c.lines[0].set_gid(n)
    if problem_ref is not None:
        ax.plot(Gs, problem_ref, color=REFERENCE, lw=0.8, ls="-.", label="∝ 1/G")


def bias_vs_G_figure(by_G, problem=None):
    """by_G[G] = {name: (draw, Stats)}: bias (top row) and variance (bottom row) against G, one
    column per estimator family."""
    Gs = sorted(by_G)
    names = list(by_G[Gs[0]].keys())
    fams = [(t, [n for n in names if family_of(n) == t]) for t, _ in FAMILIES]
    fams = [(t, ns) for t, ns in fams if ns]
    fig, axes = plt.subplots(2, len(fams), figsize=(4.6 * len(fams), 7.6), squeeze=False, layout="constrained")
    s0 = by_G[Gs[0]].get("snib")
    for j, (title, ns) in enumerate(fams):
        ref = None
        if "snib" in ns and s0 is not None and s0[1].bias_norm > 0:  # reference slope -1 through SNIB's first point
            ref = [s0[1].bias_norm * Gs[0] / G for G in Gs]
        _bias_panel(axes[0, j], by_G, Gs, ns, ref)
        for n in ns:
            (line,) = axes[1, j].plot(Gs, [by_G[G][n][1].variance for G in Gs], label=n, **_style(n))
            line.set_gid(n)
        axes[0, j].set(xscale="log", yscale="log", xlabel="group size G", title=f"bias: {title}")
        axes[1, j].set(xscale="log", yscale="log", xlabel="group size G", title=f"variance: {title}")
        # every estimator of the family, also one with no positive bias to draw (same styles below)
        handles = [Line2D([], [], label=n, **_style(n)) for n in ns] + [h for h in axes[0, j].get_lines()
                                                                       if h.get_label() == "∝ 1/G"]
        axes[0, j].legend(handles=handles, fontsize=7, ncol=2 if len(ns) > 4 else 1)
    axes[0, 0].set_ylabel("||E[ĝ] − ∇J||  (debiased)")
    axes[1, 0].set_ylabel("tr Cov(ĝ) of one batch estimate")
    for a in axes.flat:
        a.grid(True, which="both", alpha=0.3)
        a.set_xticks(Gs, [str(G) for G in Gs])
        a.xaxis.minorticks_off()  # the G ticks only; the log y axis keeps its labels within a decade
    head = "bias and variance vs G (sequence rewards)"
    if problem is not None:
        head += f": V={problem.tree.V}, T={problem.tree.T}, KL(π_old‖π_θ)={problem.kl:.2f}"
    fig.suptitle(head, fontsize=10)
    return fig


def plot_bias_vs_G(by_G, out_path, problem=None):
    return _save(bias_vs_G_figure(by_G, problem), out_path)


def variance_vs_T_figure(by_T, G=8):
    Ts = sorted(by_T)
    names = list(by_T[Ts[0]][1].keys())
    fig, ax = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained")
    for n in names:
        (line,) = ax[0].plot(Ts, [by_T[T][1][n].variance(G) for T in Ts], label=n, **_style(n))
        line.set_gid(n)
    ax[0].set(yscale="log", xlabel="horizon T", ylabel=f"tr Cov(ĝ), G={G}", title="exact variance vs T (exact per-token A)")
    ax[1].plot(Ts, [by_T[T][1]["cumulative"].variance_one / by_T[T][1]["sequence_token"].variance_one for T in Ts],
               color=NEUTRAL, marker="o")
    ax[1].axhline(1.0, color=REFERENCE, lw=0.8)
    ax[1].set(xlabel="horizon T", ylabel="variance ratio", title="cumulative / sequence_token")
    for a in ax:
        a.grid(True, alpha=0.3)
    ax[0].legend(fontsize=8)
    return fig


def plot_variance_vs_T(by_T, out_path, G=8):
    """by_T[T] = (kl, {name: ExactMoments})."""
    return _save(variance_vs_T_figure(by_T, G), out_path)


def variance_by_position_figure(pos_var, pos_ratio, problem=None):
    fig, ax = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained")
    for n, v in pos_var.items():
        (line,) = ax[0].plot(range(1, len(v) + 1), v, label=n, **_style(n))
        line.set_gid(n)
    ax[0].set(yscale="log", xlabel="position t", ylabel="tr Cov_old(f_t)", title="exact variance of each position's term")
    ax[1].plot(range(1, len(pos_ratio) + 1), pos_ratio, color=NEUTRAL, marker="o")
    ax[1].axhline(1.0, color=REFERENCE, lw=0.8)
    ax[1].set(xlabel="position t", ylabel="variance ratio", title="cumulative / sequence_token per position")
    for a in ax:
        a.grid(True, alpha=0.3)
    ax[0].legend(fontsize=8)
    if problem is not None:
        fig.suptitle(f"V={problem.tree.V}, T={problem.tree.T}, KL={problem.kl:.2f}", fontsize=9)
    return fig


def plot_variance_by_position(pos_var, pos_ratio, out_path, problem=None):
    """pos_var[name] = exact variance of each position's term; pos_ratio = cumulative / sequence."""
    return _save(variance_by_position_figure(pos_var, pos_ratio, problem), out_path)


def token_vs_kl_figure(by_kl, G):
    ks = sorted(by_kl)
    kl = [by_kl[k][0] for k in ks]
    names = list(by_kl[ks[0]][2].keys())
    fig, ax = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained")
    for n in names:
        ex = [by_kl[k][2][n] for k in ks]
        for a, ys in ((ax[0], [e.bias_norm for e in ex]), (ax[1], [e.variance(G) for e in ex])):
            (line,) = a.plot(kl, ys, label=f"{n} (exact)", **_style(n))
            line.set_gid(n)
        if n in by_kl[ks[0]][1]:
            st = [by_kl[k][1][n][1] for k in ks]
            col = _style(n)["color"]
            errorbar_nonnegative(ax[0], kl, [s.bias_norm for s in st], [s.bias_norm_se for s in st], fmt="x",
                                 color=col, capsize=2)
            errorbar_nonnegative(ax[1], kl, [s.variance for s in st], [s.variance_se for s in st], log=True,
                                 fmt="x", color=col, capsize=2)
    ax[0].set(xlabel="KL(π_old‖π_θ)", ylabel="bias norm", title="bias, exact per-token A (x: sampled)")
    ax[0].set_ylim(bottom=0)
    ax[1].set(xlabel="KL(π_old‖π_θ)", ylabel=f"tr Cov(ĝ), G={G}", yscale="log", title="variance (x: sampled)")
    for a in ax:
        a.grid(True, alpha=0.3)
    ax[0].legend(fontsize=7)
    return fig


def plot_token_vs_kl(by_kl, G, out_path):
    """by_kl[k] = (kl, {name: (draw, stats)} sampled, {name: ExactMoments})."""
    return _save(token_vs_kl_figure(by_kl, G), out_path)


__all__ = ["FAMILIES", "LAB_ORDER", "family_of", "errorbar_nonnegative", "bias_vs_G_figure", "plot_bias_vs_G",
           "variance_vs_T_figure", "plot_variance_vs_T", "variance_by_position_figure", "plot_variance_by_position",
           "token_vs_kl_figure", "plot_token_vs_kl", "plt"]
