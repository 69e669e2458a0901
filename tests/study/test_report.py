"""The study report on a synthetic study folder (a fake results.json and fake cells' metrics.jsonl
and plots): a self-contained page whose images are valid PNGs, one statistics row per setting,
the differences with their verdicts, one colour per setting in every panel and swatch, and
bands that are the interval over seeds (cut at 0 for a non-negative metric)."""

import base64
import io
import json
import math
import os
import re
from html.parser import HTMLParser

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from PIL import Image  # noqa: E402

from ratiorl.study import report as R  # noqa: E402
from ratiorl.study.palette import Palette  # noqa: E402

LABELS = ["objective=grpo", "objective=snib", "objective=gspo,rollout.num_generations=8"]
SEEDS = [0, 1, 2]
METRICS = ["reward/mean", "eval/avg@k"]
STEPS = 20


def _iv(mean, half):
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": 3, "level": 0.95}


def _metric_rows(i, seed):
    rows = []
    for s in range(1, STEPS + 1):
        r = {"step": s, "reward/mean": 0.1 * i + 0.02 * s + 0.01 * seed, "loss": 1.0 / s,
             "objective/ess": 1.0 - 0.01 * s - 0.02 * seed,
             # 0 for two seeds and 0.03 for the third: the t-interval of the mean reaches below 0
             "objective/clip_frac": 0.03 if seed == 2 else 0.0, "diag/ess_group": 0.9}
        if s % 5 == 0:
            r["eval/avg@k"] = min(1.0, 0.2 + 0.1 * i + 0.01 * s + 0.05 * seed)
        rows.append(r)
    return rows


def small_png() -> bytes:
    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1], [0, 1])
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=50)
    plt.close(fig)
    return buf.getvalue()


def build_study(d, png: bytes) -> str:
    """A study folder as the runner and ``summarize`` leave it: cells with metrics.jsonl and plots
    (the last cell without), results.json with made-up statistics, study.yaml."""
    settings, differences = [], []
    for i, label in enumerate(LABELS):
        cells = [f"{label}__seed{k}" for k in SEEDS]
        for k, cell in zip(SEEDS, cells):
            cdir = os.path.join(d, "cells", cell)
            os.makedirs(cdir)
            with open(os.path.join(cdir, "metrics.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in _metric_rows(i, k))
            if cell != cells[-1] or i != 2:  # the last cell has no plots
                os.makedirs(os.path.join(cdir, "plots"))
                for stem in ("weight_histograms", "clip_by_position", "grad_norm_by_length"):
                    with open(os.path.join(cdir, "plots", f"{stem}.png"), "wb") as f:
                        f.write(png)
        settings.append({"label": label, "axes": {"objective": label.split(",")[0].split("=")[1]}, "seeds": SEEDS,
                         "cells": cells, "missing": [],
                         "stats": {m: {"final": _iv(0.5 + 0.1 * i, 0.05), "auc": _iv(0.3 + 0.1 * i, 0.02)}
                                   for m in METRICS}})
        if i:
            for m in METRICS:
                for summ, (p, res) in (("final", (0.0004 if i == 1 else float("nan"), i == 1)),
                                       ("auc", (0.2, False))):
                    differences.append({"a": label, "b": LABELS[0], "metric": m, "summary": summ, "mean": 0.1 * i,
                                        "low": 0.02 if res else -0.05, "high": 0.2, "p_value": p, "n": 3,
                                        "resolved": res})
    results = {"study": "synthetic", "level": 0.95, "interval": "t", "baseline": LABELS[0], "metrics": METRICS,
               "settings": settings, "differences": differences}
    with open(os.path.join(d, "results.json"), "w") as f:
        json.dump(results, f)
    with open(os.path.join(d, "study.yaml"), "w") as f:
        f.write("name: synthetic\n")
    return str(d)


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    return build_study(str(tmp_path_factory.mktemp("study")), small_png())


class Page(HTMLParser):
    """Images, tables (attributes, rows of (tr attributes, cell texts, swatch colours)), links."""

    def __init__(self, text):
        super().__init__()
        self.imgs, self.tables, self.urls, self.tags = [], [], [], []
        self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.urls += [v for k, v in attrs if k in ("src", "href")]
        if tag == "img":
            self.imgs.append(a)
        elif tag == "table":
            self.tables.append((a, []))
        elif tag == "tr":
            self.tables[-1][1].append((a, [], []))
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "span" and "swatch" in a.get("class", "") and self.tables and self._cell is not None:
            self.tables[-1][1][-1][2].append(re.search(r"background:(#[0-9a-fA-F]{6})", a["style"]).group(1))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][1][-1][1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def table(self, cls, **attrs):
        return [rows for a, rows in self.tables if cls in a.get("class", "").split()
                and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]


@pytest.fixture(scope="module")
def page(study_dir):
    path = R.write_study_report(study_dir)
    assert path == os.path.join(study_dir, "report.html")
    with open(path) as f:
        return Page(f.read())


def test_every_image_is_an_embedded_valid_png(page):
    assert len(page.imgs) == 2 + 3 * (len(LABELS) * len(SEEDS) - 1)  # curves, diagnostics, 3 per cell with plots
    for img in page.imgs:
        src = img["src"]
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0
        assert img.get("alt")


def test_the_page_fetches_nothing(page, study_dir):
    # no script, no stylesheet or font from anywhere: every src / href is inline data
    assert "script" not in page.tags
    assert page.urls and all(u.startswith("data:") for u in page.urls)
    with open(os.path.join(study_dir, "report.html")) as f:
        text = f.read()
    assert "http://" not in text and "https://" not in text and "@import" not in text and "url(" not in text


def test_statistics_tables_have_one_row_per_setting(page):
    for m in METRICS:
        (rows,) = page.table("stats", data_metric=m)
        body = rows[1:]
        assert [a["data-setting"] for a, _, _ in body] == LABELS
        for i, (_, cells, _) in enumerate(body):
            assert cells[1] == "3"  # seeds
            assert cells[2] == f"{0.5 + 0.1 * i:.3g} [{0.45 + 0.1 * i:.3g}, {0.55 + 0.1 * i:.3g}]"
            assert cells[3] == f"{0.3 + 0.1 * i:.3g} [{0.28 + 0.1 * i:.3g}, {0.32 + 0.1 * i:.3g}]"
        assert "(baseline)" in body[0][1][0] and "(baseline)" not in body[1][1][0]


def test_differences_show_interval_p_value_and_verdict(page, study_dir):
    (rows,) = page.table("differences")
    with open(os.path.join(study_dir, "results.json")) as f:
        diffs = json.load(f)["differences"]
    body = rows[1:]
    assert len(body) == len(diffs) == 8
    for (_, cells, _), d in zip(body, diffs):
        metric, summary, a, b, interval, verdict, p, n = cells
        assert (metric, summary, a, b, n) == (d["metric"], d["summary"], d["a"], d["b"], "3")
        assert verdict == ("resolved" if d["resolved"] else "within noise")
        assert interval == f"{d['mean']:.3g} [{d['low']:.3g}, {d['high']:.3g}]"
        want = "–" if not math.isfinite(d["p_value"]) else ("<0.001" if d["p_value"] < 0.001 else f"{d['p_value']:.3f}")
        assert p == want


def test_one_colour_per_setting_in_every_table(page):
    pal = Palette(LABELS)
    want = {lab: to_hex(pal.colour(lab)) for lab in LABELS}
    assert len(set(want.values())) == len(LABELS)
    assert want["objective=snib"] == to_hex(Palette().colour("snib"))  # the objective's own colour
    for rows in page.table("stats") + page.table("settings"):
        for _, cells, swatches in rows[1:]:
            label = cells[0].replace(" (baseline)", "")
            assert [s.lower() for s in swatches] == [want[label]]
    for _, cells, swatches in page.table("differences")[0][1:]:
        assert [s.lower() for s in swatches] == [want[cells[2]], want[cells[3].replace(" (baseline)", "")]]


def _colours(fig):
    lines, bands = {}, {}
    for ax in fig.axes:
        for line in ax.lines:
            if line.get_gid():
                lines.setdefault(line.get_gid(), set()).add(to_hex(line.get_color()))
        for coll in ax.collections:
            if coll.get_gid():
                bands.setdefault(coll.get_gid(), set()).add(to_hex(coll.get_facecolor()[0], keep_alpha=False))
    return lines, bands


@pytest.mark.parametrize("keys", [METRICS, ["objective/ess", "objective/clip_frac", "diag/ess_group"]])
def test_one_colour_per_setting_in_every_panel(study_dir, keys):
    study = R.load_study(study_dir)
    fig = R.curves_figure(study, keys)
    lines, bands = _colours(fig)
    pal = Palette(LABELS)
    assert lines == {lab: {to_hex(pal.colour(lab))} for lab in LABELS}
    assert bands == {f"{lab} band": {to_hex(pal.colour(lab))} for lab in LABELS}
    panels = [ax for ax in fig.axes if ax.lines]
    assert len(panels) == len(keys)
    for ax, key in zip(panels, keys):  # titles and labels
        assert ax.get_title() == R.TITLES[key] and ax.get_ylabel() == key and ax.get_xlabel() == "step"
        assert sorted(line.get_gid() for line in ax.lines if line.get_gid()) == sorted(LABELS)
    plt.close(fig)


def test_no_text_is_cut(study_dir):
    study = R.load_study(study_dir)
    fig = R.curves_figure(study, METRICS + ["objective/ess"])
    fig.canvas.draw()
    r, W, H = fig.canvas.get_renderer(), fig.bbox.width, fig.bbox.height
    texts = [t for ax in fig.axes for t in (ax.title, ax.xaxis.label, ax.yaxis.label)]
    texts += list(fig.texts) + [t for lg in fig.legends for t in lg.get_texts()]
    for t in texts:
        if t.get_text():
            b = t.get_window_extent(r)
            assert b.x0 >= -1 and b.y0 >= -1 and b.x1 <= W + 1 and b.y1 <= H + 1, t.get_text()
    for ax in fig.axes:
        b = ax.get_tightbbox(r)
        assert b.x0 >= -1 and b.y0 >= -1 and b.x1 <= W + 1 and b.y1 <= H + 1
    plt.close(fig)


def test_band_is_the_t_interval_over_seeds(study_dir):
    study = R.load_study(study_dir)
    s = study.settings[1]
    b = R.band(study, s, "eval/avg@k")
    assert b["steps"] == [5, 10, 15, 20] and b["n"] == [3, 3, 3, 3]
    vals = [0.2 + 0.1 + 0.05 + 0.05 * k for k in SEEDS]  # step 5, setting 1
    mean = sum(vals) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / 2)
    half = 4.302653 * sd / math.sqrt(3)  # t_{0.975, 2}
    assert b["mean"][0] == pytest.approx(mean)
    assert (b["low"][0], b["high"][0]) == pytest.approx((mean - half, mean + half), rel=1e-4)


def test_band_of_a_nonnegative_metric_stops_at_zero(study_dir):
    study = R.load_study(study_dir)
    b = R.band(study, study.settings[0], "objective/clip_frac")
    mean = 0.01  # seeds 0, 0, 0.03
    sd = math.sqrt((0.01**2 + 0.01**2 + 0.02**2) / 2)
    half = 4.302653 * sd / math.sqrt(3)
    assert b["mean"][0] == pytest.approx(mean)
    assert mean - half < 0  # the plain interval reaches below zero ...
    assert b["low"] == [0.0] * STEPS  # ... the band does not
    assert b["high"][0] == pytest.approx(mean + half, rel=1e-4)


def test_t_quantile_matches_the_tables():
    assert R.t_quantile(0.975, 2) == pytest.approx(4.303, abs=1e-3)
    assert R.t_quantile(0.975, 10) == pytest.approx(2.228, abs=1e-3)
    assert R.t_quantile(0.995, 4) == pytest.approx(4.604, abs=1e-3)
    assert R.t_quantile(0.975, 1) == pytest.approx(12.706, abs=1e-3)


def test_cells_embed_their_plots_or_say_they_have_none(page, study_dir):
    alts = [img["alt"] for img in page.imgs]
    for label in LABELS:
        for k in SEEDS:
            cell = f"{label}__seed{k}"
            n = sum(a.startswith(cell + ":") for a in alts)
            assert n == (0 if (label == LABELS[2] and k == SEEDS[-1]) else 3), cell
    with open(os.path.join(study_dir, "report.html")) as f:
        assert "No diagnostics plots in this cell" in f.read()


def test_a_folder_without_results_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no results.json"):
        R.write_study_report(str(tmp_path))
