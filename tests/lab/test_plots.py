"""The lab's plots, checked on the Figure objects: (e) every estimator has its own style (the bias
plot once drew 12 series in 4 colours), one style per estimator in every panel and figure, (c)
error bars of non-negative quantities above 0, (f) no text cut at the figure's edge."""

import math
from types import SimpleNamespace as NS

import pytest
from matplotlib.colors import to_hex

from ratiorl.lab import plots as P
from ratiorl.lab.study import SEQUENCE_REWARD_ESTIMATORS, TOKEN_ADVANTAGE_ESTIMATORS
from tests.report.test_plot_defects import errorbar_lower_ends, texts_outside

SEQ = [s.name for s in SEQUENCE_REWARD_ESTIMATORS]
TOK = [s.name for s in TOKEN_ADVANTAGE_ESTIMATORS]
GS = (4, 8, 16, 32)


class Exact:
    def __init__(self, k):
        self.k, self.bias_norm, self.variance_one = k, 0.01 * k, 0.1 * k

    def variance(self, G):
        return self.variance_one / G


def _by_G():
    # some estimators with a standard error larger than their bias (the bar reached below 0)
    return {G: {n: (None, NS(bias_norm=0.1 * (i + 1) / G, bias_norm_se=(0.3 if i % 3 == 0 else 0.01) / G,
                            variance=(i + 1) / G)) for i, n in enumerate(SEQ)} for G in GS}


def _by_kl():
    out = {}
    for j, kl in enumerate((0.0, 0.1, 0.4)):
        sampled = {n: (None, NS(bias_norm=0.01 * j, bias_norm_se=0.05, variance=0.2 + j, variance_se=0.5))
                   for n in TOK[:3]}
        out[kl] = (kl, sampled, {n: Exact(i + 1 + j) for i, n in enumerate(TOK)})
    return out


def _by_T():
    return {T: (0.1 * T, {n: Exact(i + T) for i, n in enumerate(TOK[:3])}) for T in (2, 4, 6)}


def _styles(fig):
    """{estimator: {(colour, marker, linestyle) in each panel}}, from the lines tagged with its gid."""
    out = {}
    for ax in fig.axes:
        for line in ax.lines:
            if line.get_gid():
                out.setdefault(line.get_gid(), set()).add(
                    (to_hex(line.get_color()), line.get_marker(), line.get_linestyle()))
    return out


def test_e_every_estimator_has_its_own_style_in_the_bias_plot():
    fig = P.bias_vs_G_figure(_by_G())
    styles = _styles(fig)
    assert set(styles) == set(SEQ)
    assert all(len(s) == 1 for s in styles.values()), styles  # one style in every panel
    flat = [next(iter(s)) for s in styles.values()]
    assert len(set(flat)) == len(flat)  # no two estimators share a style
    for ax in fig.axes:  # within a panel, colours alone tell the estimators apart
        cols = [to_hex(line.get_color()) for line in ax.lines if line.get_gid()]
        assert len(cols) == len(set(cols)) <= 7, (ax.get_title(), cols)
    # every estimator is in a legend, and no series is drawn in yellow (too faint for thin lines)
    legends = {t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()}
    assert set(SEQ) <= legends
    assert "#f0e442" not in {c for c, _, _ in flat}


def test_e_families_split_the_panels():
    assert P.family_of("grpo_rloo") == P.family_of("snib_rloo") == "other advantage baselines"
    assert P.family_of("new_clip") == "the presets' own clipping" and P.family_of("newthing") == "plain weights"
    fig = P.bias_vs_G_figure(_by_G())
    assert len(fig.axes) == 6  # 3 families present x (bias, variance)


def test_d_an_estimator_keeps_its_style_across_lab_figures():
    a = _styles(P.token_vs_kl_figure(_by_kl(), 8))
    b = _styles(P.variance_vs_T_figure(_by_T()))
    c = _styles(P.variance_by_position_figure({n: [1.0, 2.0, 3.0] for n in TOK[:3]}, [1.0, 1.1, 1.2]))
    for n in TOK[:3]:
        assert a[n] == b[n] == c[n] and len(a[n]) == 1


def test_c_error_bars_stay_above_zero():
    fig = P.bias_vs_G_figure(_by_G())
    for ax in fig.axes[:3]:  # the bias row: log axes
        ends = errorbar_lower_ends(ax)
        assert ends and min(ends) > 0, ax.get_title()
    fig = P.token_vs_kl_figure(_by_kl(), 8)
    bias_ends, var_ends = errorbar_lower_ends(fig.axes[0]), errorbar_lower_ends(fig.axes[1])
    assert bias_ends and min(bias_ends) >= 0  # linear axis: cut at 0 (se 0.05 > bias 0.0)
    assert var_ends and min(var_ends) > 0  # log axis: cut above 0 (se 0.5 > variance 0.2)


def test_c_errorbar_nonnegative_by_hand():
    import matplotlib.pyplot as plt

    _, ax = plt.subplots()
    c = P.errorbar_nonnegative(ax, [1, 2, 3], [0.2, 1.0, 0.0], [0.5, 0.1, 0.3])
    first_bar = c.lines[2][0].get_segments()[0][:, 1]
    assert sorted(first_bar.tolist()) == pytest.approx([0.0, 0.7])  # from 0 (not -0.3) to 0.7
    ends = sorted(min(seg[:, 1]) for seg in c.lines[2][0].get_segments())
    assert ends == pytest.approx([0.0, 0.0, 0.9])
    # log: points at 0 are left out; the floor is half the smallest value drawn
    c = P.errorbar_nonnegative(ax, [1, 2, 3], [0.2, 1.0, 0.0], [0.5, 0.1, 0.3], log=True)
    ends = sorted(min(seg[:, 1]) for seg in c.lines[2][0].get_segments())
    assert ends == pytest.approx([0.1, 0.9]) and all(math.isfinite(e) for e in ends)
    plt.close("all")


FIGURES = {
    "bias_vs_G": lambda: P.bias_vs_G_figure(_by_G(), NS(tree=NS(V=3, T=4), kl=0.2)),
    "variance_vs_T": lambda: P.variance_vs_T_figure(_by_T()),
    "variance_by_position": lambda: P.variance_by_position_figure({n: [1.0, 2.0, 3.0] for n in TOK[:3]},
                                                                  [1.0, 1.1, 1.2], NS(tree=NS(V=3, T=3), kl=0.4)),
    "token_vs_kl": lambda: P.token_vs_kl_figure(_by_kl(), 8),
}


@pytest.mark.parametrize("name", list(FIGURES))
def test_f_no_text_is_cut(name):
    import matplotlib.pyplot as plt

    # variance_vs_T cut its y label ("tr Cov(ĝ), G=8") at the left edge before constrained layout
    assert texts_outside(FIGURES[name]()) == []
    plt.close("all")
