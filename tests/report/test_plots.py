"""Metrics sinks and plots: crash-tolerant JSONL, truncation on resume, learning curves, compare."""

import json
import os

import pytest

from ratiorl.report.plots import compare_runs, plot_learning_curves
from ratiorl.report.sinks import MetricsLogger, read_jsonl, truncate_jsonl


def _fake_run(d, n=5, scale=1.0):
    os.makedirs(d, exist_ok=True)
    log = MetricsLogger(d, tensorboard=False)
    for s in range(1, n + 1):
        m = {"reward/mean": scale * s / n, "loss": 1.0 / s, "kl": 0.01 * s}
        if s % 2 == 0:
            m["eval/avg@k"] = 0.1 * s
        log.log(s, m)
    log.close()


def test_jsonl_is_read_back_and_a_torn_last_line_is_skipped(tmp_path):
    d = str(tmp_path / "run")
    _fake_run(d)
    with open(os.path.join(d, "metrics.jsonl"), "a") as f:
        f.write('{"step": 6, "reward/me')  # a crash in the middle of a write
    rows = read_jsonl(os.path.join(d, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


def test_truncate_keeps_rows_up_to_the_checkpoint(tmp_path):
    d = str(tmp_path / "run")
    _fake_run(d)
    path = os.path.join(d, "metrics.jsonl")
    truncate_jsonl(path, 3)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
    truncate_jsonl(path, None)
    assert read_jsonl(path) == []


def test_nonfinite_values_are_kept_visible(tmp_path):
    log = MetricsLogger(str(tmp_path), tensorboard=False)
    log.log(1, {"loss": float("nan")})
    log.close()
    with open(tmp_path / "metrics.jsonl") as f:
        assert json.loads(f.readline())["loss"] == "nan"


def test_learning_curves_and_compare_write_pngs(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _fake_run(a)
    _fake_run(b, scale=2.0)
    png = plot_learning_curves(a)
    assert png.endswith("learning_curves.png") and os.path.getsize(png) > 1000
    out = compare_runs([a, b], str(tmp_path / "cmp.png"))
    assert os.path.getsize(out) > 1000
    with pytest.raises(ValueError, match="not a run folder"):
        compare_runs([a, str(tmp_path)], str(tmp_path / "x.png"))


def test_html_report(tmp_path):
    from ratiorl.report.html import write_report

    a = str(tmp_path / "a")
    _fake_run(a)
    md, html = write_report(a)
    with open(md) as f:
        text = f.read()
    assert "reward/mean" in text and "eval/avg@k" in text
    with open(html) as f:
        assert "data:image/png;base64" in f.read()


def test_html_report_names_the_objective_and_embeds_the_diagnostics(tmp_path):
    import re

    from ratiorl.report.html import write_report
    from ratiorl.report.plots import plot_learning_curves

    a = str(tmp_path / "a")
    _fake_run(a)
    with open(os.path.join(a, "summary.json"), "w") as f:
        json.dump({"objective": "grpo", "steps": 5}, f)
    os.makedirs(os.path.join(a, "plots"))
    plot_learning_curves(a, os.path.join(a, "plots", "weight_histograms.png"))  # any PNG stands in
    md, html = write_report(a)
    with open(html) as f:
        text = f.read()
    with open(md) as f:
        markdown = f.read()
    assert "<h1>Run report: a (grpo)</h1>" in text
    assert len(re.findall(r"src='data:image/png;base64,", text)) == 2
    assert "<h2>importance weights</h2>" in text and "](plots/weight_histograms.png)" in markdown


def test_compare_keeps_two_runs_of_the_same_name_apart(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    a, b = str(tmp_path / "x" / "seed0"), str(tmp_path / "y" / "seed0")
    _fake_run(a)
    _fake_run(b, scale=2.0)
    seen = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *args, **kw: seen.append(self))
    compare_runs([a, b], str(tmp_path / "cmp.png"))
    gids = {line.get_gid() for ax in seen[0].axes for line in ax.lines}
    assert len(gids) == 2  # both runs drawn, neither replaced the other
    plt.close("all")
