"""Plot defects seen on first use, each with the check that would have caught it (on the
matplotlib Figure objects, not on pixels): (a) a weight histogram titled after another objective,
(b) empty / mislabelled length bins, (c) error bars below zero, (d) a run's colour changing
between panels, (f) text cut at the figure's edge. (e) is in tests/lab/test_plots.py."""

import math
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.container import ErrorbarContainer  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from ratiorl.report import diagnostics_plots as DP  # noqa: E402
from ratiorl.report.diagnostics import grad_norm_by_length  # noqa: E402
from ratiorl.report.plots import learning_curves_figure  # noqa: E402
from ratiorl.study.palette import Palette  # noqa: E402


def drawn_texts(fig):
    """(text, window extent) of every text the figure draws: titles, labels, legends, figure
    texts, and the tick labels of ticks inside the view limits (matplotlib keeps labels of ticks
    outside them, which it does not draw)."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    ticks, shown = set(), []
    for ax in fig.axes:
        for axis, lim in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            lo, hi = min(lim), max(lim)
            span = (hi - lo) * 1e-9
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                for lab in (tick.label1, tick.label2):
                    ticks.add(id(lab))
                    if lab.get_visible() and lab.get_text() and lo - span <= tick.get_loc() <= hi + span:
                        shown.append(lab)
    others = [t for t in fig.findobj(Text) if id(t) not in ticks and t.get_visible() and t.get_text().strip()]
    return [(t.get_text(), t.get_window_extent(r)) for t in shown + others]


def texts_outside(fig, tol=1.0):
    """The texts whose extent is not inside the figure (a cut label)."""
    W, H = fig.bbox.width, fig.bbox.height
    return [(s, (round(b.x0), round(b.y0), round(b.x1), round(b.y1))) for s, b in drawn_texts(fig)
            if b.x0 < -tol or b.y0 < -tol or b.x1 > W + tol or b.y1 > H + tol]


def all_text(fig):
    return [s for s, _ in drawn_texts(fig)]


def _hist():
    g = torch.Generator().manual_seed(0)
    return dict(log_w=torch.randn(16, generator=g), log_w_normalized=0.1 * torch.randn(16, generator=g),
                ess_raw=0.41, ess_normalized=0.93, frac_unclipped=0.95)


def _rows(n, eval_every=None, scale=1.0):
    rows = []
    for s in range(1, n + 1):
        r = {"step": s, "reward/mean": scale * s / n, "loss": 1.0 / s, "kl": 0.01 * s, "grad_norm": 1.0}
        if eval_every and s % eval_every == 0:
            r["eval/avg@k"] = 0.05 * s
        rows.append(r)
    return rows


# ----------------------------------------------------------------------------- (a)


def test_a_weight_histogram_titles_name_the_runs_objective():
    fig = DP.weight_histograms_figure(_hist(), objective="grpo", label="step 12")
    texts = all_text(fig)
    assert any("grpo run" in t and "step 12" in t for t in texts), texts
    # a GRPO run's plot must not claim to be SNIB's (the normalised panel is a diagnostic)
    assert not any("SNIB" in t or "snib" in t for t in texts), texts
    fig_snib = DP.weight_histograms_figure(_hist(), objective="snib")
    assert any("snib run" in t for t in all_text(fig_snib))
    # without an objective nothing names one
    assert not any(re.search(r"snib|grpo", t, re.IGNORECASE) for t in all_text(DP.weight_histograms_figure(_hist())))
    plt.close("all")


def test_a_plot_step_passes_the_objective(tmp_path, monkeypatch):
    from ratiorl.objectives import objective
    from ratiorl.report import diagnostics_step

    seen = {}
    monkeypatch.setattr(diagnostics_step, "plot_weight_histograms",
                        lambda hist, path, **kw: seen.update(kw) or path)
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 3, generator=g)
    old = logp + 0.05 * torch.randn(4, 3, generator=g)
    diagnostics_step.plot_step(objective("grpo"), logp, old, torch.tensor([1.0, -1.0, 0.5, -0.5]),
                               torch.ones(4, 3), torch.tensor([0, 0, 1, 1]), out_dir=str(tmp_path),
                               max_new_tokens=3, label="step 1")
    plt.close("all")
    assert seen.get("objective") == "grpo"


# ----------------------------------------------------------------------------- (b)


def test_b_length_labels_are_ranges_and_single_lengths():
    assert DP.length_label("2-2") == "2"
    assert DP.length_label("3-4") == "3-4"
    assert DP.length_label("<=1") == "<=1" and DP.length_label(">512") == ">512"


def test_b_empty_length_bins_are_dropped_and_labels_are_correct():
    # max_new_tokens = 4 gives buckets {1, 2}: "<=1", "2-2", ">2"; lengths 3, 4 leave the first two empty
    stats = grad_norm_by_length(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([3, 3, 4, 4]), buckets=[1, 2])
    assert stats["labels"] == ["<=1", "2-2", ">2"] and stats["count"] == [0, 0, 4]
    fig = DP.grad_norm_by_length_figure(stats)
    ax = fig.axes[0]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == [">2\n(n=4)"]
    assert len(ax.patches) == 1  # one bar: the non-empty bin
    # a single-length bin that has sequences is labelled by that length, not "2-2"
    stats = grad_norm_by_length(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 2, 4]), buckets=[1, 2])
    ticks = [t.get_text() for t in DP.grad_norm_by_length_figure(stats).axes[0].get_xticklabels()]
    assert ticks == ["<=1\n(n=1)", "2\n(n=1)", ">2\n(n=1)"]
    plt.close("all")


# ----------------------------------------------------------------------------- (c)


def errorbar_lower_ends(ax):
    ends = []
    for c in ax.containers:
        if isinstance(c, ErrorbarContainer):
            _, _, barcols = c.lines
            for col in barcols:
                for seg in col.get_segments():
                    ends.append(min(y for _, y in seg))
    return ends


def test_c_nonnegative_error_bars_stop_at_zero():
    low, high = DP.nonnegative_yerr([0.1, 1.0, float("nan")], [0.5, 0.2, 0.3])
    assert low == pytest.approx([0.1, 0.2, 0.0]) and high == pytest.approx([0.5, 0.2, 0.3])
    # a spread larger than the mean (std 2.12 of norms 0 and 3: mean 1.5) drew a bar to -0.62
    stats = grad_norm_by_length(torch.tensor([0.0, 3.0, 1.0, 1.2]), torch.tensor([1, 1, 3, 3]), buckets=[2])
    assert stats["std"][0] > stats["mean"][0]
    ax = DP.grad_norm_by_length_figure(stats).axes[0]
    ends = errorbar_lower_ends(ax)
    assert ends and min(ends) >= 0.0
    assert ax.get_ylim()[0] == 0.0
    plt.close("all")


# ----------------------------------------------------------------------------- (d)


def _colours_by_gid(fig):
    out = {}
    for ax in fig.axes:
        for line in ax.lines:
            if line.get_gid():
                out.setdefault(line.get_gid(), set()).add(to_hex(line.get_color()))
    return out


def test_d_a_run_keeps_its_colour_in_every_panel():
    # run "b" has no eval metric: before the fix the eval panel gave "c" the colour "b" had elsewhere
    runs = {"a (grpo)": _rows(10, eval_every=2), "b (snib)": _rows(10, scale=2.0), "c (grpo)": _rows(10, eval_every=5)}
    fig = learning_curves_figure(runs)
    by_run = _colours_by_gid(fig)
    assert set(by_run) == set(runs)
    assert all(len(c) == 1 for c in by_run.values()), by_run  # one colour per run, in every panel
    colours = [next(iter(c)) for c in by_run.values()]
    assert len(set(colours)) == len(colours)  # and distinct runs differ
    pal = Palette(runs)
    assert {r: next(iter(c)) for r, c in by_run.items()} == {r: to_hex(pal.colour(r)) for r in runs}
    assert by_run["b (snib)"] == {to_hex(Palette().colour("objective=snib"))}  # the objective's own colour
    panels_with_c = [ax for ax in fig.axes if any(line.get_gid() == "c (grpo)" for line in ax.lines)]
    assert len(panels_with_c) == 5  # reward, eval, loss, KL, grad norm
    plt.close("all")


def test_d_clip_curves_of_several_steps_keep_one_colour_per_step():
    curve = dict(position=[1, 2, 3], count=[4, 4, 4], clip_frac_fixed=[0.0, 0.1, 0.2],
                 clip_frac_adaptive=[0.0, 0.05, 0.1], log_ratio_mean=[0, 0, 0], log_ratio_std=[0.1, 0.15, 0.2])
    fig = DP.clip_by_position_figure([curve, curve], labels=["step 1", "step 2"])
    for step in ("step 1", "step 2"):
        cols = {to_hex(line.get_color()) for ax in fig.axes for line in ax.lines if line.get_label().startswith(step)}
        assert len(cols) == 1, (step, cols)
    one = DP.clip_by_position_figure(dict(curve, objective="snib", clip_frac_objective=[0, 0, 0.1]), ["step 3"])
    assert {to_hex(line.get_color()) for ax in one.axes for line in ax.lines} == {to_hex(Palette().colour("snib"))}
    assert any("snib run" in t for t in all_text(one))
    plt.close("all")


# ----------------------------------------------------------------------------- (f)


def _curve():
    return dict(position=list(range(1, 41)), count=[4] * 40, clip_frac_fixed=[t / 40 for t in range(40)],
                clip_frac_adaptive=[t / 80 for t in range(40)], log_ratio_mean=[0] * 40,
                log_ratio_std=[math.sqrt(t) / 10 for t in range(1, 41)], objective="ctpo",
                clip_frac_objective=[t / 90 for t in range(40)])


def _grad_stats():
    stats = grad_norm_by_length(torch.rand(12), torch.tensor([1, 2, 3, 5, 9, 40, 70, 130, 200, 513, 600, 900]))
    return {"snib": stats, "grpo": dict(stats, corr_length_abs_log_w=0.42)}


LONG_RUN = "objective=snib,rollout.num_generations=8,optim.lr=1e-6 (snib)"
FIGURES = {
    "learning curves": lambda: learning_curves_figure({LONG_RUN: _rows(30, 5), "baseline (grpo)": _rows(30, 5)},
                                                      title="comparison"),
    "weight histograms": lambda: DP.weight_histograms_figure(_hist(), objective="grpo", label="step 120"),
    "grad norm by length": lambda: DP.grad_norm_by_length_figure(_grad_stats()),
    "clip by position": lambda: DP.clip_by_position_figure(_curve(), ["step 120"]),
}


@pytest.mark.parametrize("name", list(FIGURES))
def test_f_no_text_is_cut_at_the_figure_edge(name):
    fig = FIGURES[name]()
    assert texts_outside(fig) == []
    plt.close("all")


def test_f_the_check_itself_sees_a_cut_label():
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.set_title("a title far too long for a figure of three inches: it runs off both edges")
    fig.subplots_adjust(left=0.02, bottom=0.02)
    ax.set_ylabel("a y label")
    outside = [s for s, _ in texts_outside(fig)]
    assert "a y label" in outside and any(s.startswith("a title far") for s in outside)
    plt.close(fig)


def test_gradient_weight_figure_fits_and_uses_one_colour_per_rule():
    fig = DP.gradient_weights_figure(["hard", "dgpo"], num=50)
    assert texts_outside(fig) == []
    for rule in ("hard", "dgpo"):
        cols = {to_hex(line.get_color()) for ax in fig.axes for line in ax.lines if line.get_label() == rule}
        assert len(cols) == 1
    plt.close("all")
