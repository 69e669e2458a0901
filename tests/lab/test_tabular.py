"""Exact quantities of the enumerable tabular policy, checked against independent computations."""

import pytest
import torch

from ratiorl.lab import (
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

DT = torch.float64


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(123)
    tree = make_tree(3, 4)
    theta = torch.randn(tree.num_states, 3, generator=g, dtype=DT)
    rewards = make_rewards(tree, "structured", g)
    return tree, theta, rewards


def test_tree_enumerates_every_sequence_once():
    tree = make_tree(3, 3)
    assert tree.num_sequences == 27 and tree.num_states == 1 + 3 + 9
    assert len({tuple(r) for r in tree.tokens.tolist()}) == 27
    # the state of position t is determined by the prefix, and distinct prefixes get distinct ids
    seen = {}
    for toks, sts in zip(tree.tokens.tolist(), tree.states.tolist()):
        for t in range(3):
            assert seen.setdefault(tuple(toks[:t]), sts[t]) == sts[t]
    assert len(set(seen.values())) == len(seen) == tree.num_states


def test_sequence_probabilities_sum_to_one(setup):
    tree, theta, _ = setup
    assert torch.isclose(token_logp(tree, theta).sum(-1).exp().sum(), torch.tensor(1.0, dtype=DT))


def test_exact_gradient_equals_autograd_of_enumerated_sum(setup):
    tree, theta, rewards = setup
    th = theta.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(objective_value(tree, th, rewards), th)
    torch.testing.assert_close(exact_gradient(tree, theta, rewards), auto, rtol=1e-10, atol=1e-12)


def test_exact_gradient_equals_finite_differences(setup):
    tree, theta, rewards = setup
    grad = exact_gradient(tree, theta, rewards)
    g = torch.Generator().manual_seed(7)
    h = 1e-6
    for _ in range(6):
        s, a = int(torch.randint(tree.num_states, (1,), generator=g)), int(torch.randint(3, (1,), generator=g))
        e = torch.zeros_like(theta)
        e[s, a] = h
        fd = (objective_value(tree, theta + e, rewards) - objective_value(tree, theta - e, rewards)) / (2 * h)
        assert abs(float(fd) - float(grad[s, a])) < 1e-8


def test_analytic_score_map_equals_autograd(setup):
    """sum_{i,t} c[i,t] grad log pi(a_t|s_t) per batch, by scatter vs by autograd."""
    tree, theta, _ = setup
    g = torch.Generator().manual_seed(11)
    M, K = 40, 3
    idx = torch.randint(tree.num_sequences, (M,), generator=g)
    coef = torch.randn(M, tree.T, generator=g, dtype=DT)
    batch = torch.randint(K, (M,), generator=g)
    fast = scores_to_theta(tree, torch.softmax(theta, -1), idx, coef, batch_index=batch, num_batches=K)
    for k in range(K):
        th = theta.clone().requires_grad_(True)
        lp = token_logp(tree, th)[idx]
        (auto,) = torch.autograd.grad((coef * lp)[batch == k].sum(), th)
        torch.testing.assert_close(fast[k], auto, rtol=1e-10, atol=1e-12)


def test_token_advantages_recover_value_and_gradient(setup):
    tree, theta, rewards = setup
    q, v, adv = token_advantages(tree, theta, rewards)
    p = token_logp(tree, theta).sum(-1).exp()
    J = float((p * rewards).sum())
    assert torch.allclose(v[:, 0], torch.full_like(v[:, 0], J))  # V(s_1) = J
    assert torch.allclose(q[:, -1], rewards.to(DT))  # Q at the last token is the reward
    # E_pi[A_t | s_t] = 0: the pi-weighted mean of A over each state's sequences vanishes
    for t in range(tree.T):
        num = torch.zeros(tree.num_states, dtype=DT).index_add_(0, tree.states[:, t], p * adv[:, t])
        assert num.abs().max() < 1e-12
    # per-decision policy gradient theorem: grad J = E_pi[sum_t A(s_t,a_t) grad log pi(a_t|s_t)]
    pg = scores_to_theta(tree, torch.softmax(theta, -1), torch.arange(tree.num_sequences), p[:, None] * adv)
    torch.testing.assert_close(pg, exact_gradient(tree, theta, rewards), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("target", [0.05, 0.3])
def test_behaviour_policy_hits_target_kl(setup, target):
    tree, theta, _ = setup
    old, kl = behaviour_policy(tree, theta, target, torch.Generator().manual_seed(5))
    assert abs(kl - target) < 1e-3 * target
    assert abs(sequence_kl(tree, old, theta) - kl) < 1e-12


def test_rewards_kinds(setup):
    tree = setup[0]
    g = torch.Generator().manual_seed(0)
    sparse = make_rewards(tree, "sparse", g)
    assert set(sparse.unique().tolist()) == {0.0, 1.0}
    r = make_rewards(tree, "random", g)
    assert r.min() >= 0 and r.max() <= 1 and r.unique().numel() == tree.num_sequences
    with pytest.raises(ValueError, match="valid"):
        make_rewards(tree, "nope", g)


def test_make_problem_on_policy():
    p = make_problem(3, 3, kl=0.0, seed=1)
    assert p.kl == 0.0 and torch.equal(p.logp, p.old_logp)
