"""ratiorl.report: metrics sinks (JSONL, TensorBoard), learning-curve plots, run reports, diagnostics.

    from ratiorl.report import MetricsLogger, plot_learning_curves, compare_runs, write_report
    from ratiorl.report import diagnostics   # importance-weight / clipping diagnostics
"""

from .html import write_report
from .plots import compare_runs, plot_learning_curves
from .sinks import JsonlSink, MetricsLogger, TensorBoardSink, read_jsonl, truncate_jsonl

__all__ = ["MetricsLogger", "JsonlSink", "TensorBoardSink", "read_jsonl", "truncate_jsonl",
           "plot_learning_curves", "compare_runs", "write_report"]
