"""PNG plots of the lab study (matplotlib, Agg backend)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_STYLE = {
    "snib": ("C0", "o", "-"),
    "snib_rloo": ("C0", "o", ":"),
    "snib_clip": ("C0", "o", "--"),
    "gspo": ("C1", "s", "-"),
    "gspo_clip": ("C1", "s", "--"),
    "grpo": ("C2", "^", "-"),
    "grpo_clip": ("C2", "^", "--"),
    "sequence": ("C3", "D", "-"),
    "sequence_rloo": ("C3", "D", ":"),
    "sequence_clip": ("C3", "D", "--"),
    "snib_fg": ("C9", "o", "-"),
    "gspo_token": ("C1", "x", ":"),
    "token": ("C2", "^", "-"),
    "cumulative": ("C4", "o", "-"),
    "sequence_token": ("C3", "D", "-"),
    "ctpo_clip": ("C4", "o", "--"),
    "ctpo_fixed_clip": ("C5", "v", "--"),
}


def _save(fig, out_path):
    # fixed margins: tight_layout costs more than the rest of a small figure
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.88, wspace=0.28)
    fig.savefig(out_path, dpi=90)


def _style(name):
    c, m, ls = _STYLE.get(name, ("k", ".", "-"))
    return dict(color=c, marker=m, linestyle=ls)


def plot_bias_vs_G(by_G, out_path, problem=None):
    Gs = sorted(by_G)
    names = list(by_G[Gs[0]].keys())
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    for n in names:
        b = [by_G[G][n][1].bias_norm for G in Gs]
        se = [by_G[G][n][1].bias_norm_se for G in Gs]
        v = [by_G[G][n][1].variance for G in Gs]
        pos = [(G, y, e) for G, y, e in zip(Gs, b, se) if y > 0]
        if pos:
            ax[0].errorbar(*zip(*[(g, y) for g, y, _ in pos]), yerr=[e for *_, e in pos], label=n, capsize=2, **_style(n))
        ax[1].plot(Gs, v, label=n, **_style(n))
    # reference slope -1 through SNIB's first point
    s0 = by_G[Gs[0]].get("snib")
    if s0 is not None and s0[1].bias_norm > 0:
        ax[0].plot(Gs, [s0[1].bias_norm * Gs[0] / G for G in Gs], color="gray", lw=0.8, ls="-.", label="∝ 1/G")
    ax[0].set(xscale="log", yscale="log", xlabel="group size G", ylabel="||E[ĝ] − ∇J||  (debiased)",
              title="bias vs G (sequence rewards)")
    ax[1].set(xscale="log", yscale="log", xlabel="group size G", ylabel="tr Cov(ĝ)", title="variance of one batch estimate")
    for a in ax:
        a.grid(True, which="both", alpha=0.3)
        a.set_xticks(Gs, [str(G) for G in Gs])
        a.minorticks_off()
    ax[0].legend(fontsize=7, ncol=2)
    if problem is not None:
        fig.suptitle(f"V={problem.tree.V}, T={problem.tree.T}, KL(π_old‖π_θ)={problem.kl:.2f}", fontsize=9)
    _save(fig, out_path)
    plt.close(fig)
    return out_path


def plot_variance_vs_T(by_T, out_path, G=8):
    """by_T[T] = (kl, {name: ExactMoments})."""
    Ts = sorted(by_T)
    names = list(by_T[Ts[0]][1].keys())
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for n in names:
        ax[0].plot(Ts, [by_T[T][1][n].variance(G) for T in Ts], label=n, **_style(n))
    ax[0].set(yscale="log", xlabel="horizon T", ylabel=f"tr Cov(ĝ), G={G}", title="exact variance vs T (exact per-token A)")
    ax[1].plot(Ts, [by_T[T][1]["cumulative"].variance_one / by_T[T][1]["sequence_token"].variance_one for T in Ts],
               color="C4", marker="o")
    ax[1].axhline(1.0, color="gray", lw=0.8)
    ax[1].set(xlabel="horizon T", ylabel="variance ratio", title="cumulative / sequence")
    for a in ax:
        a.grid(True, alpha=0.3)
    ax[0].legend(fontsize=8)
    _save(fig, out_path)
    plt.close(fig)
    return out_path


def plot_variance_by_position(pos_var, pos_ratio, out_path, problem=None):
    """pos_var[name] = exact variance of each position's term; pos_ratio = cumulative / sequence."""
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for n, v in pos_var.items():
        ax[0].plot(range(1, len(v) + 1), v, label=n, **_style(n))
    ax[0].set(yscale="log", xlabel="position t", ylabel="tr Cov_old(f_t)", title="exact variance of each position's term")
    ax[1].plot(range(1, len(pos_ratio) + 1), pos_ratio, color="C4", marker="o")
    ax[1].axhline(1.0, color="gray", lw=0.8)
    ax[1].set(xlabel="position t", ylabel="variance ratio", title="cumulative / sequence per position")
    for a in ax:
        a.grid(True, alpha=0.3)
    ax[0].legend(fontsize=8)
    if problem is not None:
        fig.suptitle(f"V={problem.tree.V}, T={problem.tree.T}, KL={problem.kl:.2f}", fontsize=9)
    _save(fig, out_path)
    plt.close(fig)
    return out_path


def plot_token_vs_kl(by_kl, G, out_path):
    """by_kl[k] = (kl, {name: (draw, stats)} sampled, {name: ExactMoments})."""
    ks = sorted(by_kl)
    kl = [by_kl[k][0] for k in ks]
    names = list(by_kl[ks[0]][2].keys())
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for n in names:
        ex = [by_kl[k][2][n] for k in ks]
        ax[0].plot(kl, [e.bias_norm for e in ex], label=f"{n} (exact)", **_style(n))
        ax[1].plot(kl, [e.variance(G) for e in ex], label=f"{n} (exact)", **_style(n))
        if n in by_kl[ks[0]][1]:
            st = [by_kl[k][1][n][1] for k in ks]
            ax[0].errorbar(kl, [s.bias_norm for s in st], yerr=[s.bias_norm_se for s in st], fmt="x",
                           color=_style(n)["color"], capsize=2)
            ax[1].errorbar(kl, [s.variance for s in st], yerr=[s.variance_se for s in st], fmt="x",
                           color=_style(n)["color"], capsize=2)
    ax[0].set(xlabel="KL(π_old‖π_θ)", ylabel="bias norm", title="bias, exact per-token A (x: sampled)")
    ax[1].set(xlabel="KL(π_old‖π_θ)", ylabel=f"tr Cov(ĝ), G={G}", yscale="log", title="variance (x: sampled)")
    for a in ax:
        a.grid(True, alpha=0.3)
    ax[0].legend(fontsize=7)
    _save(fig, out_path)
    plt.close(fig)
    return out_path
