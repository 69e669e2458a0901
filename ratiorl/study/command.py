"""``ratiorl study STUDY.yaml --out DIR``: run a grid of runs, then compare them with statistics.

    ratiorl study examples/studies/snib_ablations.yaml --out runs/studies/snib_ablations --jobs 2
    ratiorl study STUDY.yaml --out DIR --dry-run            # check every cell's config, list what would run
    ratiorl study STUDY.yaml --out DIR --summarize          # only recompute results.json, the table, the report
    ratiorl study STUDY.yaml --out DIR --set train.steps=4  # a config override for every cell (a smoke run)

Exit status: 0 when every cell finished, 1 when a cell failed (each failure is listed with its
log), 2 for a bad spec or config (one line naming the key), 130 when interrupted (rerun the same
command to continue). ``python -m ratiorl.study`` runs the same command.
"""

from __future__ import annotations

import math
import os
import signal
import sys

from .spec import load_spec
from .stats import SUMMARIES


def add_arguments(parser) -> None:
    parser.add_argument("spec", help="the study spec (YAML): base config, axes or settings, seeds, metrics")
    parser.add_argument("--out", default=None, help="the study folder (default runs/studies/<spec name>)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="cells run at once as separate processes (default: the spec's `jobs`, else 1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every cell (repeatable), e.g. --set train.steps=4")
    parser.add_argument("--dry-run", action="store_true",
                        help="check every cell's config and list what would run; run nothing")
    parser.add_argument("--summarize", action="store_true",
                        help="run nothing: recompute results.json, the table and the report from the finished cells")
    parser.add_argument("--no-report", action="store_true", help="do not write report.html")


# ----------------------------------------------------------------------------- the table


def _num(x: float, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:+.3g}" if signed else f"{x:.3g}"


def _iv(d: dict, signed: bool = False) -> str:
    if d["n"] < 2 or math.isnan(d["low"]):
        return _num(d["mean"], signed)
    return f"{_num(d['mean'], signed)} [{_num(d['low'], signed)}, {_num(d['high'], signed)}]"


def _p(p: float) -> str:
    if p is None or math.isnan(p):
        return "-"
    return "<0.0001" if p < 1e-4 else f"{p:.2g}" if p < 0.01 else f"{p:.3f}"


def verdict(diff: dict) -> str:
    """'higher' / 'lower' when the interval of the difference excludes 0, 'within noise' otherwise."""
    if diff["n"] < 2:
        return "too few seeds"
    if not diff["resolved"]:
        return "within noise"
    return "higher" if diff["mean"] > 0 else "lower"


def build_tables(results: dict) -> list:
    """One rich Table per metric and summary (final value, AUC): each setting's mean with its
    interval, its difference from the baseline with the interval, the paired p-value and the verdict."""
    from rich.markup import escape  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    level, method = results["level"], results.get("interval", "t")
    diffs = {(d["a"], d["metric"], d["summary"]): d for d in results["differences"]}
    tables = []
    for metric in results["metrics"]:
        for s in SUMMARIES:
            what = "final value" if s == "final" else "area under the curve / steps"
            t = Table(title=f"{metric}: {what}  ({level:.0%} {method} intervals over seeds; "
                            f"differences paired by seed vs {results['baseline']})", title_justify="left")
            t.add_column("setting", overflow="fold", ratio=2)
            t.add_column("n", justify="right")
            t.add_column(escape("mean [interval]"), justify="right")
            t.add_column(escape("diff [interval]"), justify="right")
            t.add_column("p", justify="right")
            t.add_column("verdict")
            for st in results["settings"]:
                iv = st["stats"][metric][s]
                d = diffs.get((st["label"], metric, s))
                if d is None:
                    row = ["baseline", "", ""]
                else:
                    word = verdict(d)
                    style = {"higher": "green", "lower": "red"}.get(word, "dim")
                    row = [escape(_iv(d, signed=True)), _p(d["p_value"]), f"[{style}]{word}[/]"]
                t.add_row(escape(st["label"]), str(iv["n"]), escape(_iv(iv)), *row)
            tables.append(t)
    return tables


def print_tables(results: dict, console, path: str = None) -> None:
    """Print the tables; with ``path`` also write them as plain text there."""
    from rich.console import Console  # noqa: PLC0415

    tables = build_tables(results)
    for t in tables:
        console.print(t)
    if path:
        with open(path, "w") as f:
            text = Console(file=f, width=200, no_color=True, force_terminal=False)
            for t in tables:
                text.print(t)


def write_report(study_dir: str, say) -> None:
    try:
        from .report import write_study_report  # noqa: PLC0415
    except ImportError as e:
        say(f"no HTML report: ratiorl.study.report is not available ({e})")
        return
    try:
        path = write_study_report(study_dir)
    except Exception as e:  # the statistics are written already; a report failure must not hide them
        say(f"[yellow]report.html failed: {type(e).__name__}: {e}[/]")
        return
    say(f"report: {path or os.path.join(study_dir, 'report.html')}")


# ----------------------------------------------------------------------------- main


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def main(args, train_command=None) -> int:
    """Run the study ``args.spec`` into ``args.out``; returns the exit status."""
    from rich.console import Console  # noqa: PLC0415

    from .runner import check_study_folder, run_study  # noqa: PLC0415
    from .stats import summarize  # noqa: PLC0415

    console = Console(stderr=True)

    def say(text: str) -> None:  # not wrapped: paths stay whole for copying
        console.print(text, soft_wrap=True, highlight=False)

    extra = list(getattr(args, "overrides", None) or [])
    if getattr(args, "plugins", None):
        extra.append(f"plugins={args.plugins}")
    try:
        spec = load_spec(args.spec, extra=extra)
        out = args.out or os.path.join("runs", "studies", spec.name)
        if args.summarize:
            if not os.path.isdir(os.path.join(out, "cells")):
                raise ValueError(f"{out} holds no study (no cells/ folder)")
            check_study_folder(spec, out)
            outcome = None
        else:
            old = signal.signal(signal.SIGTERM, _sigterm) if _main_thread() else None
            try:
                outcome = run_study(spec, out, jobs=args.jobs, train_command=train_command, say=say,
                                    dry_run=args.dry_run)
            finally:
                if old is not None:
                    signal.signal(signal.SIGTERM, old)
            if args.dry_run:
                return 0
    except ValueError as e:
        print(f"ratiorl study: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ratiorl study: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130
    results = summarize(out, spec)
    stdout = Console()
    print_tables(results, stdout if stdout.is_terminal else Console(width=120), os.path.join(out, "table.txt"))
    say(f"results: {os.path.join(out, 'results.json')}")
    if not args.no_report:
        write_report(out, say)
    if outcome is None:
        return 0
    if outcome.failed:
        say(f"[red]{len(outcome.failed)} of {len(outcome.cells)} cells failed:[/]")
        for f in outcome.failed:
            say(f"  {f.cell_id}: {f.reason}; log {f.log}")
    if outcome.interrupted:
        say("interrupted: rerun the same command to continue (finished cells are not rerun)")
        return 130
    return 1 if outcome.failed else 0


def _main_thread() -> bool:
    import threading  # noqa: PLC0415

    return threading.current_thread() is threading.main_thread()


__all__ = ["add_arguments", "main", "build_tables", "print_tables", "verdict"]
