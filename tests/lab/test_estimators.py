"""The estimator plumbing: stacking, statistics and exact moments."""

import math

import pytest
import torch

import ratiorl
from ratiorl.lab import estimate, exact_moments, loglog_slope, make_problem, summarize
from ratiorl.lab.estimators import token_coefficients
from ratiorl.lab.study import SEQUENCE_REWARD_ESTIMATORS, TOKEN_ADVANTAGE_ESTIMATORS
from ratiorl.lab.tabular import scores_to_theta

ESTIMATORS = {s.name: s for s in SEQUENCE_REWARD_ESTIMATORS + TOKEN_ADVANTAGE_ESTIMATORS}


@pytest.fixture(scope="module")
def problem():
    return make_problem(3, 3, kl=0.3, reward="random", seed=21)


@pytest.mark.parametrize("name", ["snib", "gspo", "grpo", "sequence_rloo", "snib_clip", "cumulative", "ctpo_clip"])
def test_stacked_batches_equal_separate_library_calls(problem, name):
    """Each batch's row of the stacked estimate is what the library gives on that batch alone."""
    spec = ESTIMATORS[name]
    G, K = 4, 3
    idx = torch.multinomial(problem.old_seq_probs, G * K, replacement=True, generator=torch.Generator().manual_seed(3))
    stacked = estimate(problem, spec, G, K, None, index=idx).est
    obj = ratiorl.objective(spec.preset, **spec.overrides)
    T = problem.tree.T
    for k in range(K):
        rows = idx[k * G : (k + 1) * G]
        logp = problem.logp[rows].clone().requires_grad_(True)
        gid = torch.zeros(G, dtype=torch.long)
        if spec.advantage == "token_exact":
            adv = problem.adv_token[rows]
        else:
            adv = ratiorl.advantages(problem.rewards[rows], gid, method=spec.advantage)
        loss = obj(logp, problem.old_logp[rows], adv, torch.ones_like(logp), group_ids=gid).loss
        (d,) = torch.autograd.grad(loss, logp)
        # undo the preset's own normalisation: per-batch estimates use sums over sequences / G
        alone = scores_to_theta(problem.tree, problem.probs, rows, -spec.scale_for(T) * d.double()).reshape(-1)
        torch.testing.assert_close(stacked[k], alone, rtol=2e-5, atol=1e-7)


def test_token_coefficients_sign_on_policy(problem):
    """On-policy, every estimator with exact per-token advantages is sum_t A_t * score_t / G."""
    p = make_problem(3, 3, kl=0.0, reward="structured", seed=2)
    idx = torch.arange(6)
    c = token_coefficients(p, ESTIMATORS["cumulative"], idx, 2)
    torch.testing.assert_close(c, p.adv_token[idx] / 2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["token", "cumulative", "sequence_token", "ctpo_clip"])
def test_exact_moments_equal_dense_enumeration(problem, name):
    spec = ESTIMATORS[name]
    N = problem.tree.num_sequences
    f = estimate(problem, spec, 1, N, None, index=torch.arange(N)).est  # (N, D): f(y) for every y
    q = problem.old_seq_probs
    mean = q @ f
    var = float(q @ ((f - mean) ** 2).sum(1))
    e = exact_moments(problem, spec)
    torch.testing.assert_close(e.mean, mean, rtol=1e-9, atol=1e-12)
    assert math.isclose(e.variance_one, var, rel_tol=1e-8)
    assert math.isclose(sum(e.variance_by_position), var, rel_tol=1e-8)
    assert math.isclose(e.variance(8), var / 8)


def test_exact_moments_refuse_group_coupled_estimators(problem):
    with pytest.raises(ValueError, match="sampling"):
        exact_moments(problem, ESTIMATORS["snib"])


def test_summarize_on_synthetic_gaussians():
    """Known mean, known covariance: bias, variance and their standard errors behave."""
    g = torch.Generator().manual_seed(0)
    K, D = 4000, 30
    scale = torch.linspace(0.5, 2.0, D, dtype=torch.float64)
    truth = torch.zeros(D, dtype=torch.float64)
    noise = torch.randn(K, D, generator=g, dtype=torch.float64) * scale
    st = summarize(noise, truth)  # unbiased
    assert abs(st.bias_z) < 4
    assert abs(st.variance - float((scale**2).sum())) < 4 * st.variance_se
    shift = torch.zeros(D, dtype=torch.float64)
    shift[0] = 0.4
    st = summarize(noise + shift, truth)  # bias 0.4 along one axis
    assert abs(st.bias_norm - 0.4) < 4 * st.bias_norm_se
    assert st.bias_z > 5


@pytest.mark.parametrize("shift", [0.0, 0.1])
def test_bias_sq_standard_error_is_calibrated(shift):
    """Over many independent experiments, the reported se of the debiased ||b||^2 matches the
    spread of that estimate, with and without a true bias (the estimate itself is unbiased)."""
    g = torch.Generator().manual_seed(1)
    R, K, D = 120, 400, 30
    scale = torch.linspace(0.3, 1.5, D, dtype=torch.float64)
    b = torch.zeros(D, dtype=torch.float64)
    b[-1] = shift
    res = [summarize(torch.randn(K, D, generator=g, dtype=torch.float64) * scale + b, torch.zeros_like(b))
           for _ in range(R)]
    est = torch.tensor([r.bias_sq for r in res])
    se = torch.tensor([r.bias_sq_se for r in res])
    assert abs(float(est.mean()) - shift**2) < 4 * float(est.std()) / math.sqrt(R)
    assert 0.75 < float(se.mean() / est.std()) < 1.35


def test_loglog_slope_recovers_power():
    xs = [2, 4, 8, 16]
    slope, se = loglog_slope(xs, [3.0 / x for x in xs], [0.01] * 4)
    assert abs(slope + 1) < 1e-12 and se > 0
