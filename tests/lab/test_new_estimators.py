"""The lab measures the new advantage estimators against the exact gradient: ReMax, RLOO and OPO
(equal lengths: OPO = group mean) are unbiased on-policy; REINFORCE++ (batch whitening) and the
optimal token baseline are measured, with finite statistics."""

from __future__ import annotations

import torch

import ratiorl
from ratiorl.lab.estimators import estimate, problem_inputs, sample_batches, summarize
from ratiorl.lab.study import SEQUENCE_REWARD_ESTIMATORS
from ratiorl.lab.tabular import make_problem

SPECS = {s.name: s for s in SEQUENCE_REWARD_ESTIMATORS}


def test_new_estimators_against_exact_gradient():
    problem = make_problem(V=3, T=3, kl=0.0, reward="random", seed=0)  # on-policy
    truth = problem.grad.flatten()
    stats = {}
    for name in ("grpo", "grpo_rloo", "grpo_remax", "grpo_opo", "grpo_reinforce_pp", "grpo_optimal_baseline"):
        d = estimate(problem, SPECS[name], G=4, K=3000, generator=torch.Generator().manual_seed(0))
        stats[name] = summarize(d.est, truth)
        assert torch.isfinite(d.est).all() and stats[name].cosine > 0.9, name
    # RLOO and ReMax (a baseline independent of the sample) are unbiased; group-mean GRPO
    # (scaled by (G-1)/G) and batch-whitened REINFORCE++ are not
    for name in ("grpo_rloo", "grpo_remax"):
        assert stats[name].bias_z < 4, (name, stats[name])
    assert stats["grpo"].bias_z > 4
    # OPO with equal lengths is the group mean: the same estimates
    d1 = estimate(problem, SPECS["grpo_opo"], G=4, K=50, generator=torch.Generator().manual_seed(1))
    d2 = estimate(problem, SPECS["grpo"], G=4, K=50, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(d1.est, d2.est)


def test_remax_baseline_is_the_greedy_sequence():
    problem = make_problem(V=3, T=3, kl=0.1, reward="random", seed=1)
    idx = sample_batches(problem, 4, 2, torch.Generator().manual_seed(0))
    inp = problem_inputs(problem, idx)
    old = torch.softmax(problem.theta_old, -1)
    seq = []
    # walk the tree greedily: the greedy sequence's reward (independent of Tree's state numbering)
    tokens = problem.tree.tokens
    rows = torch.arange(len(tokens))
    for t in range(problem.tree.T):
        a = int(old[problem.tree.states[rows[0], t]].argmax())
        rows = rows[tokens[rows, t] == a]
        seq.append(a)
    assert float(inp["baseline"][0]) == float(problem.rewards[rows[0]])
    adv = ratiorl.advantages(problem.rewards[idx], None, method="remax", baseline=inp["baseline"])
    torch.testing.assert_close(adv, problem.rewards[idx] - problem.rewards[rows[0]])
