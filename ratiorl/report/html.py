"""`ratiorl report RUN_DIR`: a markdown and a self-contained HTML summary of one run folder.

It reads config.yaml, summary.json and metrics.jsonl, (re)draws plots/learning_curves.png,
lists the final / best values of the main metrics and shows the run's diagnostics plots
(plots/*.png: weight histograms, clip rate by position, ...). The title names the run's objective.
"""

from __future__ import annotations

import base64
import html
import json
import os

from .plots import plot_learning_curves, run_objective
from .sinks import read_jsonl

DIAGNOSTICS = [("weight_histograms", "importance weights"), ("clip_by_position", "clip rate by position"),
               ("grad_norm_by_length", "gradient norm by length"), ("gradient_weight", "gradient weight F(r)")]
KEYS = ["reward/mean", "accuracy", "eval/avg@k", "eval/pass@k", "eval/greedy_acc", "loss", "kl",
        "objective/clip_frac", "objective/ess", "entropy", "length/mean", "grad_norm",
        "throughput/tokens_per_s"]


def _table(rows: list) -> list:
    out = []
    for key in KEYS:
        vals = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if vals:
            first, last = vals[0][1], vals[-1][1]
            best = max(v for _, v in vals)
            out.append((key, first, last, best, len(vals)))
    return out


def _img(path: str, alt: str) -> str:
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return f"<img style='max-width:100%' alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def write_report(run_dir: str, out_dir: str | None = None) -> list:
    if not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        raise ValueError(f"{run_dir} is not a run folder (no metrics.jsonl)")
    out_dir = out_dir or run_dir
    os.makedirs(out_dir, exist_ok=True)
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    summary = {}
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    config = ""
    if os.path.exists(os.path.join(run_dir, "config.yaml")):
        with open(os.path.join(run_dir, "config.yaml")) as f:
            config = f.read()
    png = plot_learning_curves(run_dir, os.path.join(out_dir, "learning_curves.png"))
    table = _table(rows)
    name = os.path.basename(os.path.normpath(run_dir))
    objective = run_objective(run_dir)
    heading = f"Run report: {name}" + (f" ({objective})" if objective else "")
    diags = [(title, os.path.join(run_dir, "plots", f"{stem}.png")) for stem, title in DIAGNOSTICS]
    diags = [(title, path) for title, path in diags if os.path.exists(path)]

    md = [f"# {heading}", ""]
    md += ["## Summary", ""] + [f"- **{k}**: {v}" for k, v in summary.items() if not isinstance(v, dict)] + [""]
    md += ["## Metrics", "", "| metric | first | last | max | points |", "|---|---|---|---|---|"]
    md += [f"| {k} | {a:.4g} | {b:.4g} | {c:.4g} | {n} |" for k, a, b, c, n in table] + [""]
    md += ["## Learning curves", "", f"![learning curves]({os.path.relpath(png, out_dir)})", ""]
    for title, path in diags:
        md += [f"## {title}", "", f"![{title}]({os.path.relpath(path, out_dir)})", ""]
    md += ["## Config", "", "```yaml", config.rstrip(), "```", ""]
    md_path = os.path.join(out_dir, "report.md")
    with open(md_path, "w") as f:
        f.write("\n".join(md))

    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(heading)}</title>",
         ("<style>body{font-family:sans-serif;max-width:1100px;margin:auto}td,th{padding:2px 8px;"
          "border-bottom:1px solid #ddd;text-align:right}td:first-child{text-align:left}</style></head><body>"),
         f"<h1>{html.escape(heading)}</h1><h2>Summary</h2><ul>"]
    h += [f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>" for k, v in summary.items()
          if not isinstance(v, dict)]
    h += ["</ul><h2>Metrics</h2><table><tr><th>metric</th><th>first</th><th>last</th><th>max</th><th>points</th></tr>"]
    h += [f"<tr><td>{html.escape(k)}</td><td>{a:.4g}</td><td>{b:.4g}</td><td>{c:.4g}</td><td>{n}</td></tr>"
          for k, a, b, c, n in table]
    h += [f"</table><h2>Learning curves</h2>{_img(png, 'learning curves')}"]
    h += [f"<h2>{html.escape(title)}</h2>{_img(path, title)}" for title, path in diags]
    h += [f"<h2>Config</h2><pre>{html.escape(config)}</pre></body></html>"]
    html_path = os.path.join(out_dir, "report.html")
    with open(html_path, "w") as f:
        f.write("\n".join(h))
    return [md_path, html_path]
