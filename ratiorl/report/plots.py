"""Learning-curve plots from metrics.jsonl (matplotlib, Agg backend, no display needed).

    plot_learning_curves("runs/demo", "runs/demo/plots/learning_curves.png")
    compare_runs(["runs/grpo", "runs/snib"], "compare.png")
    fig = learning_curves_figure({"grpo": rows_a, "snib": rows_b})   # the Figure, unsaved

Every run keeps one colour in every panel (``ratiorl.study.palette``: its objective's colour when
the name says it), whichever metrics it has; a panel with two metric keys tells them apart by
line style. Figures use constrained layout, so no title or label is cut.
"""

from __future__ import annotations

import json
import math
import os

from .sinks import read_jsonl

# (title, candidate metric keys: the first one present in the run is drawn)
PANELS = [
    ("train reward", ["reward/mean"]),
    ("eval accuracy", ["eval/avg@k", "eval/greedy_acc"]),
    ("loss", ["loss"]),
    ("KL to reference", ["kl", "objective/kl", "kl/mean"]),
    ("clip fraction", ["objective/clip_frac", "clip_frac"]),
    ("grad norm", ["grad_norm"]),
    ("completion length", ["length/mean"]),
    ("entropy", ["entropy"]),
]
KEY_STYLES = ("-", "--", ":", "-.")


def _plt():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _series(rows: list, key: str):
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def _smooth(ys: list, window: int) -> list:
    if window <= 1 or len(ys) < window:
        return ys
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _panels_for(runs: dict) -> list:
    panels = []
    for title, keys in PANELS:
        present = [k for k in keys if any(_series(rows, k)[0] for rows in runs.values())]
        if present:
            panels.append((title, present))
    return panels


def learning_curves_figure(runs: dict, title: str = ""):
    """The learning-curve Figure of ``runs`` ({run name: metrics rows}). Each line's ``gid`` is
    its run name; a run has the same colour in every panel."""
    from ratiorl.study.palette import Palette  # noqa: PLC0415

    plt = _plt()
    palette = Palette(runs)
    panels = _panels_for(runs) or [("no metrics", [])]
    ncol = min(4, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3 * nrow + 0.6), squeeze=False, layout="constrained")
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (ptitle, keys) in zip(axes.flat, panels):
        for run_name, rows in runs.items():
            for j, key in enumerate(keys):
                xs, ys = _series(rows, key)
                if not xs:
                    continue
                label = key if len(runs) == 1 else (run_name if len(keys) == 1 else f"{run_name} {key}")
                is_eval = key.startswith("eval/")
                ys = ys if is_eval else _smooth(ys, max(1, len(ys) // 20))
                (line,) = ax.plot(xs, ys, color=palette.colour(run_name), linestyle=KEY_STYLES[j % len(KEY_STYLES)],
                                  marker="o" if is_eval else None, label=label, markersize=3, linewidth=1.2)
                line.set_gid(run_name)
        ax.set_title(ptitle, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.lines and (len(keys) > 1 or len(runs) > 1):
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def _draw(runs: dict, out_png: str, title: str = "") -> str:
    plt = _plt()
    fig = learning_curves_figure(runs, title)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def plot_learning_curves(run_dir: str, out_png: str | None = None) -> str:
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    out_png = out_png or os.path.join(run_dir, "plots", "learning_curves.png")
    return _draw({_run_title(run_dir): rows}, out_png, title=_run_title(run_dir))


def run_objective(run_dir: str) -> str | None:
    """The objective a run folder trained with (summary.json, else config.yaml), or None."""
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            obj = json.load(f).get("objective")
        if obj:
            return str(obj)
    except (OSError, ValueError, AttributeError):
        pass
    try:
        from omegaconf import OmegaConf  # noqa: PLC0415

        cfg = OmegaConf.load(os.path.join(run_dir, "config.yaml"))
        name = OmegaConf.select(cfg, "objective.name")
        return str(name) if name else None
    except Exception:  # noqa: BLE001 - a missing or foreign config just has no objective
        return None


def _run_title(run_dir: str) -> str:
    name = os.path.basename(os.path.normpath(run_dir))
    obj = run_objective(run_dir)
    return f"{name} ({obj})" if obj else name


def compare_runs(run_dirs: list, out_png: str) -> str:
    """Side-by-side learning curves of several run folders in one PNG."""
    runs = {}
    for d in run_dirs:
        path = os.path.join(d, "metrics.jsonl")
        if not os.path.exists(path):
            raise ValueError(f"{d} is not a run folder (no metrics.jsonl)")
        name = _run_title(d)
        if name in runs:  # two folders of the same name (e.g. .../a/seed0, .../b/seed0): the path tells them apart
            name = f"{os.path.normpath(d)} ({run_objective(d)})" if run_objective(d) else os.path.normpath(d)
        runs[name] = read_jsonl(path)
    return _draw(runs, out_png, title="comparison")
