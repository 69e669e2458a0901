"""Monte Carlo measurement of gradient estimators against the exact gradient.

An *estimator* is one of the library's objectives (``ratiorl.objective(preset, **overrides)``)
plus an advantage method. One *batch* is G sequences drawn iid from pi_old; the estimator's
gradient estimate of J from that batch is

    g_hat = -scale * d loss(batch) / d theta.

To measure thousands of batches at once, K batches are stacked into one batch of K*G rows with
group ids 0..K-1 (one group per batch) and ``num_sequences=G``, ``num_tokens=G*T``, so the total
loss is the sum of the K per-batch losses and one autograd call gives every batch's
d loss / d logp. The tabular score map (``tabular.scores_to_theta``) then turns those into K
estimates in theta space with one scatter.

``scale`` undoes an aggregation that is not a sum over tokens: the fixed-length policy makes
every 1/T factor a constant (``seq_mean_token_mean`` and GSPO's geometric mean both carry 1/T),
so on-policy every estimator below estimates grad J itself.

Statistics of the K iid estimates g_1..g_K (mean m, covariance Sigma, truth g):

    bias b = m - g,        ||b||^2 estimated without bias by ||m - g||^2 - tr(Sigma)/K,
    se(||b||^2)^2 = 4 b' Sigma b / K + 2 tr(Sigma^2) / K^2     (Gaussian approximation),
    se(||b||) = se(||b||^2) / (2 ||b||)                          (delta method; see ``Stats``),
    total variance tr(Sigma), MSE = E||g_k - g||^2 = ||b||^2 + tr(Sigma), cosine(m, g).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .tabular import DTYPE, Problem, scores_to_theta

# A loss factory: (spec) -> loss(logp, old_logp, advantages, mask, group_ids, num_sequences,
# num_tokens) -> 0-dim tensor. The default goes through ratiorl.objective.
LossFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class EstimatorSpec:
    """One estimator: a library preset with overrides, an advantage method, a scale.

    advantage: a ``ratiorl.advantages`` method name on the sequence rewards (``group_mean``,
    ``rloo``, ``none``, ...) or ``"token_exact"`` for the exact A(s_t, a_t) of pi_theta.
    scale: a number, or ``"T"`` for the horizon (undoes a 1/T in the aggregation or weight).
    """

    name: str
    preset: str
    overrides: dict = field(default_factory=dict)
    advantage: str = "group_mean"
    scale: float | str = 1.0

    def scale_for(self, T: int) -> float:
        return float(T) if self.scale == "T" else float(self.scale)

    def __hash__(self):  # overrides is a dict; hash on the readable identity
        return hash((self.name, self.preset, tuple(sorted(self.overrides.items())), self.advantage))


def library_loss(spec: EstimatorSpec) -> LossFn:
    """The library's objective for ``spec`` as a loss function (the lab measures the library)."""
    import ratiorl

    obj = ratiorl.objective(spec.preset, **spec.overrides)

    def loss(logp, old_logp, advantages, mask, group_ids, num_sequences, num_tokens):
        out = obj(
            logp,
            old_logp,
            advantages,
            mask,
            group_ids=group_ids,
            num_sequences=num_sequences,
            num_tokens=num_tokens,
        )
        return out.loss

    return loss


def library_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, method: str) -> torch.Tensor:
    import ratiorl

    return ratiorl.advantages(rewards, group_ids, method=method)


# ----------------------------------------------------------------------------- sampling


def sample_batches(problem: Problem, G: int, K: int, generator: torch.Generator) -> torch.Tensor:
    """(K*G,) sequence indices drawn iid from pi_old; rows k*G..k*G+G-1 form batch k."""
    return torch.multinomial(problem.old_seq_probs, K * G, replacement=True, generator=generator)


@dataclass
class Draw:
    """Per-batch gradient estimates of one estimator: ``est`` (K, D), plus per-position ones."""

    est: torch.Tensor
    est_by_position: torch.Tensor | None = None  # (T, K, D) when requested
    seconds: float = 0.0


def estimate(
    problem: Problem,
    spec: EstimatorSpec,
    G: int,
    K: int,
    generator: torch.Generator,
    loss_fn: LossFn | None = None,
    advantages_fn: Callable | None = None,
    by_position: bool = False,
    index: torch.Tensor | None = None,
) -> Draw:
    """K independent batch estimates of grad J from ``spec``, computed with one autograd call."""
    import time

    t0 = time.perf_counter()
    tree, T = problem.tree, problem.tree.T
    idx = sample_batches(problem, G, K, generator) if index is None else index
    gid = torch.arange(K).repeat_interleave(G)
    logp = problem.logp[idx].clone().requires_grad_(True)
    old_logp = problem.old_logp[idx]
    mask = torch.ones_like(old_logp)
    if spec.advantage == "token_exact":
        adv = problem.adv_token[idx]
    else:
        adv = (advantages_fn or library_advantages)(problem.rewards[idx], gid, spec.advantage)
    loss = (loss_fn or library_loss(spec))(logp, old_logp, adv.to(logp.dtype), mask, gid, G, G * T)
    (dlogp,) = torch.autograd.grad(loss, logp)
    # The loss is minimised: the estimate of grad J is -d loss / d theta (times the scale).
    coef = -spec.scale_for(T) * dlogp.detach().to(DTYPE)
    est = scores_to_theta(tree, problem.probs, idx, coef, batch_index=gid, num_batches=K)
    by_pos = None
    if by_position:
        by_pos = torch.stack(
            [
                scores_to_theta(
                    tree, problem.probs, idx, coef * (torch.arange(T) == t), batch_index=gid, num_batches=K
                ).reshape(K, -1)
                for t in range(T)
            ]
        )
    return Draw(est=est.reshape(K, -1), est_by_position=by_pos, seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------- statistics


@dataclass
class Stats:
    """Bias / variance / MSE of K iid estimates against the truth, with Monte Carlo errors."""

    K: int
    bias_norm: float  # sqrt of the debiased ||b||^2 (0 if that is negative)
    bias_norm_se: float  # se of bias_norm (delta method, floored near 0; see ``summarize``)
    bias_sq: float  # debiased ||b||^2 = ||m - g||^2 - tr(Sigma)/K
    bias_sq_se: float
    bias_z: float  # bias_sq / bias_sq_se: how many standard errors ||b||^2 sits above zero
    raw_bias_norm: float  # ||m - g|| (includes the Monte Carlo noise floor)
    noise_floor: float  # sqrt(tr(Sigma)/K): E||m - g|| when the estimator is unbiased
    variance: float  # tr(Sigma), total variance of one batch estimate
    variance_se: float
    mse: float  # mean_k ||g_k - g||^2
    mse_se: float
    cosine: float  # cos(m, g): direction of the mean estimate
    mean_cosine: float  # mean_k cos(g_k, g): direction of a single batch's estimate
    relative_bias: float  # bias_norm / ||g||

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def summarize(est: torch.Tensor, truth: torch.Tensor) -> Stats:
    est = est.to(DTYPE)
    g = truth.reshape(-1).to(DTYPE)
    K = est.shape[0]
    m = est.mean(0)
    b = m - g
    X = est - m
    sq = (X * X).sum(1)  # ||g_k - m||^2
    tr = float(sq.sum() / (K - 1))
    # tr(Sigma^2) = ||X'X||_F^2 / (K-1)^2, via the smaller Gram matrix
    gram = X.T @ X if X.shape[1] <= K else X @ X.T
    tr2 = float((gram * gram).sum()) / (K - 1) ** 2
    bSb = float(((X @ b) ** 2).sum() / (K - 1))
    raw2 = float(b @ b)
    bias_sq = raw2 - tr / K
    bias_sq_se = math.sqrt(max(4 * bSb / K + 2 * tr2 / K**2, 0.0))
    bias_norm = math.sqrt(max(bias_sq, 0.0))
    # delta method; near zero use se(||b||^2)/(2 sqrt(se)) so the interval stays finite
    bias_norm_se = bias_sq_se / (2 * math.sqrt(max(bias_sq, bias_sq_se, 1e-300)))
    err2 = ((est - g) ** 2).sum(1)
    gnorm = float(g.norm())
    cos_each = (est @ g) / (est.norm(dim=1).clamp_min(1e-300) * max(gnorm, 1e-300))
    return Stats(
        K=K,
        bias_norm=bias_norm,
        bias_norm_se=bias_norm_se,
        bias_sq=bias_sq,
        bias_sq_se=bias_sq_se,
        bias_z=bias_sq / bias_sq_se if bias_sq_se > 0 else float("inf"),
        raw_bias_norm=math.sqrt(raw2),
        noise_floor=math.sqrt(tr / K),
        variance=tr,
        variance_se=float(sq.std() / math.sqrt(K)),
        mse=float(err2.mean()),
        mse_se=float(err2.std() / math.sqrt(K)),
        cosine=float(m @ g / max(float(m.norm()) * gnorm, 1e-300)),
        mean_cosine=float(cos_each.mean()),
        relative_bias=bias_norm / max(gnorm, 1e-300),
    )


def position_variances(est_by_position: torch.Tensor) -> list[float]:
    """Total variance tr(Sigma_t) of the position-t part of the estimate, for each t."""
    return [float(e.var(0).sum()) for e in est_by_position]


def loglog_slope(xs, ys, ses=None) -> tuple[float, float]:
    """Least-squares slope of log y on log x, and its standard error propagated from the
    standard errors of y (delta method: se(log y) = se(y) / y); se is nan without ``ses``."""
    lx = torch.tensor([math.log(x) for x in xs], dtype=DTYPE)
    ly = torch.tensor([math.log(max(y, 1e-300)) for y in ys], dtype=DTYPE)
    xc = lx - lx.mean()
    w = xc / (xc @ xc)
    slope = float(w @ (ly - ly.mean()))
    if ses is None:
        return slope, float("nan")
    sl = torch.tensor([s / max(y, 1e-300) for s, y in zip(ses, ys)], dtype=DTYPE)
    return slope, float(torch.sqrt((w * w * sl * sl).sum()))
