"""ratiorl.lab: the exact-gradient estimator lab.

A tabular autoregressive softmax policy small enough to enumerate every sequence gives the true
gradient of J(theta) = E_pi[R] (and the exact per-token advantages of CTPO Prop. 1); the library's
objectives are then run on thousands of sampled batches from a behaviour policy to measure each
estimator's bias, variance, MSE and direction. ``run_lab(out_dir)`` writes the full report.
"""

from .estimators import (
    EstimatorSpec,
    Stats,
    ExactMoments,
    estimate,
    exact_moments,
    token_coefficients,
    library_loss,
    loglog_slope,
    paired_variance_ratio,
    summarize,
)
from .tabular import (
    Problem,
    Tree,
    behaviour_policy,
    exact_gradient,
    make_problem,
    make_rewards,
    make_tree,
    objective_value,
    scores_to_theta,
    sequence_kl,
    token_advantages,
    token_logp,
)


def run_lab(out_dir: str, seed: int = 0, quick: bool = False, **kw) -> dict:
    """Run the estimator study and write ``results.csv``, plots and ``summary.md`` to ``out_dir``.

    See ``ratiorl.lab.study.run_lab`` for the options."""
    from .study import run_lab as _run

    return _run(out_dir, seed=seed, quick=quick, **kw)


__all__ = [
    "EstimatorSpec", "ExactMoments", "exact_moments", "token_coefficients", "Problem", "Stats", "Tree", "behaviour_policy", "estimate", "exact_gradient",
    "library_loss", "loglog_slope", "make_problem", "make_rewards", "make_tree", "objective_value",
    "paired_variance_ratio", "run_lab", "scores_to_theta", "sequence_kl",
    "summarize", "token_advantages", "token_logp",
]
