"""The papers' claims, asserted against the exact gradient of an enumerable policy.

Every estimate is computed with the library's objectives (``ratiorl.objective``) on K batches
sampled from pi_old. Seeds are fixed only so that the Monte Carlo assertions are stable; every
bound is stated in Monte Carlo standard errors (``z``: the debiased squared bias norm over its
standard error) or is a property of exact (enumerated) quantities.
"""

import pytest
import torch

from ratiorl.lab import estimate, exact_moments, loglog_slope, make_problem, paired_variance_ratio, summarize
from ratiorl.lab.study import SEQUENCE_REWARD_ESTIMATORS, TOKEN_ADVANTAGE_ESTIMATORS

ESTIMATORS = {s.name: s for s in SEQUENCE_REWARD_ESTIMATORS + TOKEN_ADVANTAGE_ESTIMATORS}


# ----------------------------------------------------------------------------- sequence rewards


@pytest.fixture(scope="module")
def bias_by_G():
    """V=3, T=4, KL(pi_old||pi_theta)=0.2, random rewards; all estimators on common batches."""
    p = make_problem(3, 4, kl=0.2, reward="random", seed=0)
    gen = torch.Generator().manual_seed(1)
    stats = {}
    for G, K in [(4, 6000), (8, 6000), (16, 6000), (64, 2000)]:
        idx = torch.multinomial(p.old_seq_probs, G * K, replacement=True, generator=gen)
        for name in ("snib", "gspo", "grpo", "sequence_rloo"):
            stats[name, G] = summarize(estimate(p, ESTIMATORS[name], G, K, None, index=idx).est, p.grad)
    return stats


def test_snib_bias_falls_like_one_over_G(bias_by_G):
    Gs = (4, 8, 16)
    b = [bias_by_G["snib", G] for G in Gs]
    assert all(s.bias_z > 3 for s in b), [s.bias_z for s in b]  # biased at finite G ...
    slope, se = loglog_slope(Gs, [s.bias_norm for s in b], [s.bias_norm_se for s in b])
    assert -1.4 <= slope <= -0.6, f"log-log slope {slope:.3f} ± {se:.3f}"  # ... like 1/G


@pytest.mark.parametrize("name", ["gspo", "grpo"])
def test_geometric_and_token_bias_level_off(bias_by_G, name):
    lo, hi = bias_by_G[name, 4], bias_by_G[name, 64]
    assert hi.bias_norm > 0.5 * lo.bias_norm, (lo.bias_norm, hi.bias_norm)
    assert hi.bias_z > 10, hi.bias_z  # many standard errors above zero at G=64


@pytest.mark.parametrize("G", [4, 16, 64])
def test_sequence_weight_with_leave_one_out_baseline_is_unbiased(bias_by_G, G):
    s = bias_by_G["sequence_rloo", G]
    assert abs(s.bias_z) < 3, f"||b|| = {s.bias_norm:.5f} ± {s.bias_norm_se:.5f}, z = {s.bias_z:.2f}"


# ----------------------------------------------------------------------------- CTPO Prop. 1


@pytest.fixture(scope="module")
def per_token():
    """V=3, T=5, structured rewards, exact per-token advantages A(s_t, a_t) of pi_theta."""
    gen = torch.Generator().manual_seed(2)
    out = {}
    for kl in (0.0, 0.1, 0.4):
        p = make_problem(3, 5, kl=kl, reward="structured", seed=3)
        idx = torch.multinomial(p.old_seq_probs, 8 * 4000, replacement=True, generator=gen)
        est = {n: estimate(p, ESTIMATORS[n], 8, 4000, None, index=idx).est for n in ("token", "cumulative", "sequence_token")}
        out[kl] = (p, est, {n: summarize(e, p.grad) for n, e in est.items()})
    return out


@pytest.mark.parametrize("kl", [0.0, 0.1, 0.4])
def test_cumulative_weight_is_unbiased(per_token, kl):
    p, _, st = per_token[kl]
    assert abs(st["cumulative"].bias_z) < 3, st["cumulative"]
    assert exact_moments(p, ESTIMATORS["cumulative"]).bias_norm < 1e-6 * float(p.grad.norm())


def test_token_weight_biased_off_policy_unbiased_on_policy(per_token):
    assert abs(per_token[0.0][2]["token"].bias_z) < 3
    for kl in (0.1, 0.4):
        assert per_token[kl][2]["token"].bias_z > 5, per_token[kl][2]["token"]
    p = per_token[0.0][0]
    assert exact_moments(p, ESTIMATORS["token"]).bias_norm < 1e-6 * float(p.grad.norm())


def test_sequence_weight_per_token_form_is_unbiased(per_token):
    for kl in (0.1, 0.4):
        assert abs(per_token[kl][2]["sequence_token"].bias_z) < 3


def test_cumulative_variance_below_sequence_and_gap_grows_with_kl(per_token):
    """Sampled (paired batches): ratio < 1 by > 3 se, and smaller at the larger KL."""
    (r1, s1), (r4, s4) = (paired_variance_ratio(per_token[kl][1]["cumulative"], per_token[kl][1]["sequence_token"])
                          for kl in (0.1, 0.4))
    assert r1 + 3 * s1 < 1 and r4 + 3 * s4 < 1, (r1, s1, r4, s4)
    assert r4 + 3 * (s1**2 + s4**2) ** 0.5 < r1, (r1, s1, r4, s4)


def test_cumulative_variance_below_sequence_exact():
    """Exact (enumerated): ratio < 1 at every KL > 0, strictly falling as KL grows; equal on-policy;
    per position the gain is there at every position except the last, where the weights agree."""
    ratios = []
    for kl in (0.0, 0.05, 0.1, 0.2, 0.4, 0.8):
        p = make_problem(3, 5, kl=kl, reward="structured", seed=3)
        c, s = exact_moments(p, ESTIMATORS["cumulative"]), exact_moments(p, ESTIMATORS["sequence_token"])
        ratios.append(c.variance_one / s.variance_one)
        per_pos = [a / b for a, b in zip(c.variance_by_position, s.variance_by_position)]
        assert abs(per_pos[-1] - 1) < 1e-4
        if kl > 0:
            assert all(r < 1 for r in per_pos[:-1]), per_pos
    assert abs(ratios[0] - 1) < 1e-6
    assert all(a > b for a, b in zip(ratios, ratios[1:])), ratios
