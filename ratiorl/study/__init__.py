"""Studies: a grid of runs (settings x seeds), run as separate processes, resumable, compared
with confidence intervals and paired tests (docs/studies.md).

    ratiorl study examples/studies/snib_ablations.yaml --out runs/studies/snib_ablations

    from ratiorl.study import load_spec, run_study, summarize
    spec = load_spec("examples/studies/snib_ablations.yaml")
    run_study(spec, "runs/studies/snib_ablations")
    results = summarize("runs/studies/snib_ablations")     # also written to results.json
"""

from .runner import StudyOutcome, run_study
from .spec import DONE, Setting, StudySpec, load_spec
from .stats import (
    Difference,
    Interval,
    area_under_curve,
    final_value,
    mean_interval,
    paired_difference,
    summarize,
)

__all__ = [
    "load_spec", "StudySpec", "Setting", "DONE", "run_study", "StudyOutcome", "summarize", "Interval",
    "Difference", "mean_interval", "final_value", "area_under_curve", "paired_difference",
]
