"""A tabular autoregressive softmax policy small enough to enumerate every sequence.

The policy emits exactly ``T`` tokens from a vocabulary of ``V``. Its state at step t is the
whole prefix (a_1..a_{t-1}), so there are S = 1 + V + ... + V^(T-1) states and the parameters
are one row of V logits per state: theta has shape (S, V) and

    pi_theta(a | s) = softmax(theta[s])[a].

Every one of the N = V^T sequences is enumerated once (``Tree``), which gives exact values of

    J(theta)      = sum_y pi_theta(y) R(y)                              (the objective)
    grad J        = sum_y pi_theta(y) R(y) sum_t grad log pi(a_t|s_t)   (score-function form)
    Q(s_t, a_t)   = E_pi[R | s_t, a_t],  V(s_t) = E_pi[R | s_t],  A = Q - V   (per-token advantages)

and, because the score of a tabular softmax is analytic,

    d log pi(a|s) / d theta[s', :] = 1[s' = s] * (onehot(a) - pi(.|s)),

any d(loss)/d(logp) of a batch maps to d(loss)/d(theta) with one scatter (``scores_to_theta``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DTYPE = torch.float64


@dataclass(frozen=True)
class Tree:
    """Index tables of the full sequence tree for vocabulary ``V`` and horizon ``T``."""

    V: int
    T: int
    tokens: torch.Tensor  # (N, T) long: every sequence, lexicographic order
    states: torch.Tensor  # (N, T) long: state id of the prefix before token t
    offsets: tuple  # offsets[t] = id of the first state at depth t (prefix length t)

    @property
    def num_sequences(self) -> int:
        return self.V**self.T

    @property
    def num_states(self) -> int:
        return self.offsets[-1]


def make_tree(V: int, T: int) -> Tree:
    if V < 2 or T < 1:
        raise ValueError(f"need V >= 2 and T >= 1, got V={V}, T={T}")
    N = V**T
    if N > 2_000_000:
        raise ValueError(f"V^T = {N} sequences is too many to enumerate; pick a smaller V or T")
    # Sequence n in base V, most significant digit first: tokens[n, t].
    n = torch.arange(N)
    powers = V ** torch.arange(T - 1, -1, -1)
    tokens = (n[:, None] // powers[None, :]) % V
    # Depth-t prefixes are numbered by their base-V value, after all shallower prefixes.
    offsets = [0]
    for t in range(T):
        offsets.append(offsets[-1] + V**t)
    prefix_value = n[:, None] // (V ** torch.arange(T, 0, -1))[None, :]  # value of a_1..a_{t}
    states = prefix_value + torch.tensor(offsets[:-1])[None, :]
    return Tree(V=V, T=T, tokens=tokens, states=states, offsets=tuple(offsets))


# ----------------------------------------------------------------------------- exact quantities


def token_logp(tree: Tree, theta: torch.Tensor) -> torch.Tensor:
    """(N, T) log pi(a_t | s_t) of every sequence at every position (differentiable in theta)."""
    logpi = torch.log_softmax(theta, dim=-1)  # (S, V)
    return logpi[tree.states, tree.tokens]


def sequence_probs(tree: Tree, theta: torch.Tensor) -> torch.Tensor:
    """(N,) pi(y) for every sequence; sums to one."""
    return token_logp(tree, theta).sum(-1).exp()


def objective_value(tree: Tree, theta: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """J(theta) = sum_y pi_theta(y) R(y), differentiable (used to check the analytic gradient)."""
    return (sequence_probs(tree, theta) * rewards).sum()


def scores_to_theta(
    tree: Tree,
    probs: torch.Tensor,
    seq_index: torch.Tensor,
    coef: torch.Tensor,
    batch_index: torch.Tensor | None = None,
    num_batches: int = 1,
) -> torch.Tensor:
    """Map per-token coefficients to theta space: sum_{i,t} coef[i,t] * grad_theta log pi(a_t|s_t).

    ``seq_index`` (M,) picks rows of the tree, ``coef`` (M, T). With ``batch_index`` (M,) the rows
    are summed per batch and the result has shape (num_batches, S, V); otherwise (S, V).
    Uses grad log pi(a|s) = onehot(a) - pi(.|s) at state s (tabular softmax).
    """
    S, V = probs.shape
    states = tree.states[seq_index]  # (M, T)
    tokens = tree.tokens[seq_index]
    if batch_index is None:
        batch_index = torch.zeros(len(seq_index), dtype=torch.long)
        squeeze = True
    else:
        squeeze = False
    coef = coef.to(probs.dtype)
    flat_state = (batch_index[:, None] * S + states).reshape(-1)  # (M*T,) ids into (K*S)
    c = coef.reshape(-1)
    # onehot(a) part: coef lands on (batch, s, a)
    onehot = torch.zeros(num_batches * S * V, dtype=probs.dtype)
    onehot.index_add_(0, flat_state * V + tokens.reshape(-1), c)
    # -pi(.|s) part: total coefficient per (batch, s), times pi(.|s)
    per_state = torch.zeros(num_batches * S, dtype=probs.dtype)
    per_state.index_add_(0, flat_state, c)
    out = onehot.view(num_batches, S, V) - per_state.view(num_batches, S, 1) * probs[None]
    return out[0] if squeeze else out


def exact_gradient(tree: Tree, theta: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """grad J = sum_y pi(y) R(y) sum_t (onehot(a_t) - pi(.|s_t)) at s_t, shape (S, V)."""
    with torch.no_grad():
        p = sequence_probs(tree, theta)
        coef = (p * rewards)[:, None].expand(-1, tree.T)
        return scores_to_theta(tree, torch.softmax(theta, -1), torch.arange(len(p)), coef)


def token_advantages(tree: Tree, theta: torch.Tensor, rewards: torch.Tensor):
    """Exact Q(s_t,a_t), V(s_t) and A = Q - V of pi_theta for every sequence and position.

    Backward recursion over the tree: the value of a depth-T node is R(y); a node at depth t has
    V(s) = sum_a pi(a|s) Q(s,a) with Q(s,a) = V(child(s,a)). Returns three (N, T) tensors.
    """
    V_, T = tree.V, tree.T
    probs = torch.softmax(theta.detach(), -1)
    q = torch.empty(V_**T, T, dtype=DTYPE)
    v = torch.empty(V_**T, T, dtype=DTYPE)
    child_values = rewards.to(DTYPE)  # values of depth-(t+1) nodes, in base-V order
    for t in range(T - 1, -1, -1):
        # nodes at depth t (prefix length t) have ids offsets[t] + 0..V^t-1, children in blocks of V
        pi_t = probs[tree.offsets[t] : tree.offsets[t + 1]]  # (V^t, V)
        qv = child_values.view(V_**t, V_)  # Q(s, a) for each depth-t state s
        value = (pi_t * qv).sum(-1)  # V(s)
        # broadcast to sequences: sequence n at position t sits at node n // V^(T-t)
        node = torch.arange(V_**T) // V_ ** (T - t)
        q[:, t] = qv[node, tree.tokens[:, t]]
        v[:, t] = value[node]
        child_values = value
    return q, v, q - v


# ----------------------------------------------------------------------------- KL, behaviour


def sequence_kl(tree: Tree, theta_p: torch.Tensor, theta_q: torch.Tensor) -> float:
    """KL(p || q) between the sequence distributions of two tabular policies (exact)."""
    lp = token_logp(tree, theta_p).sum(-1)
    lq = token_logp(tree, theta_q).sum(-1)
    return float((lp.exp() * (lp - lq)).sum())


def behaviour_policy(
    tree: Tree,
    theta: torch.Tensor,
    target_kl: float,
    generator: torch.Generator,
    tol: float = 1e-4,
) -> tuple[torch.Tensor, float]:
    """A sampler pi_old = softmax(theta + c * noise) with KL(pi_old || pi_theta) = target_kl.

    The direction is standard normal; the scale c is found by bisection (KL grows with c near 0).
    target_kl = 0 returns theta itself (on-policy). Returns (theta_old, achieved KL).
    """
    if target_kl <= 0:
        return theta.clone(), 0.0
    noise = torch.randn(theta.shape, generator=generator, dtype=theta.dtype)
    kl = lambda c: sequence_kl(tree, theta + c * noise, theta)  # noqa: E731
    hi = 1.0
    while kl(hi) < target_kl:
        hi *= 2.0
        if hi > 1e4:
            raise ValueError(f"cannot reach KL {target_kl}; the largest KL found was {kl(hi / 2)}")
    lo = 0.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if kl(mid) < target_kl:
            lo = mid
        else:
            hi = mid
        if hi - lo < tol * hi:
            break
    c = 0.5 * (lo + hi)
    return theta + c * noise, kl(c)


# ----------------------------------------------------------------------------- rewards


def make_rewards(tree: Tree, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Sequence rewards R(y), shape (N,).

    - ``random``: iid uniform in [0, 1] per sequence (no structure at all);
    - ``structured``: fraction of positions whose token equals a random target pattern, plus a
      bonus for a correct first token (dense, smooth in the tokens, like partial credit);
    - ``sparse``: 0/1, one for a random quarter of the sequences (like a verifier).
    """
    N = tree.num_sequences
    if kind == "random":
        return torch.rand(N, generator=generator, dtype=DTYPE)
    if kind == "structured":
        target = torch.randint(tree.V, (tree.T,), generator=generator)
        match = (tree.tokens == target[None]).to(DTYPE)
        return match.mean(-1) + 0.5 * match[:, 0]
    if kind == "sparse":
        k = max(1, math.ceil(N / 4))
        r = torch.zeros(N, dtype=DTYPE)
        r[torch.randperm(N, generator=generator)[:k]] = 1.0
        return r
    raise ValueError(f"unknown reward kind {kind!r}; valid: random, structured, sparse")


# ----------------------------------------------------------------------------- a whole problem


@dataclass
class Problem:
    """One lab problem: the tree, the target policy theta, the sampler theta_old, the rewards,
    and every exact quantity the estimators are measured against."""

    tree: Tree
    theta: torch.Tensor  # (S, V) target policy (the one whose gradient we want)
    theta_old: torch.Tensor  # (S, V) behaviour policy (samples come from it)
    rewards: torch.Tensor  # (N,)
    kl: float  # KL(pi_old || pi_theta), sequence level
    logp: torch.Tensor  # (N, T) log pi_theta(a_t|s_t)
    old_logp: torch.Tensor  # (N, T) log pi_old(a_t|s_t)
    probs: torch.Tensor  # (S, V) pi_theta(.|s)
    old_seq_probs: torch.Tensor  # (N,) pi_old(y), the sampling distribution
    adv_token: torch.Tensor  # (N, T) exact A(s_t, a_t) of pi_theta
    J: float
    grad: torch.Tensor  # (S, V) exact grad J

    @property
    def dim(self) -> int:
        return self.theta.numel()


def make_problem(
    V: int = 3,
    T: int = 4,
    kl: float = 0.2,
    reward: str = "random",
    seed: int = 0,
    logit_scale: float = 1.0,
) -> Problem:
    """Build a problem: random target logits (N(0, logit_scale^2)), a sampler at sequence KL
    ``kl`` from it, rewards of kind ``reward``; all exact quantities by enumeration."""
    g = torch.Generator().manual_seed(seed)
    tree = make_tree(V, T)
    theta = logit_scale * torch.randn(tree.num_states, V, generator=g, dtype=DTYPE)
    rewards = make_rewards(tree, reward, g)
    theta_old, achieved = behaviour_policy(tree, theta, kl, g)
    with torch.no_grad():
        logp = token_logp(tree, theta)
        old_logp = token_logp(tree, theta_old)
        _, _, adv = token_advantages(tree, theta, rewards)
        J = float((logp.sum(-1).exp() * rewards).sum())
    return Problem(
        tree=tree,
        theta=theta,
        theta_old=theta_old,
        rewards=rewards,
        kl=achieved,
        logp=logp,
        old_logp=old_logp,
        probs=torch.softmax(theta, -1),
        old_seq_probs=old_logp.sum(-1).exp(),
        adv_token=adv,
        J=J,
        grad=exact_gradient(tree, theta, rewards),
    )
