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
    se(||b||^2)^2 = 4 b' Sigma b / K + 2 tr(Sigma^2) / K^2     (Gaussian approximation; b' Sigma b
                    estimated as ||b||^2 (debiased) times the Rayleigh quotient of Sigma along b_hat),
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


def library_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, method: str, **inputs) -> torch.Tensor:
    """``ratiorl.advantages`` on the stacked batches. A method that declares ``needs_mask`` or
    ``token_level`` (REINFORCE++ and GDPO whiten over the batch, OPO / the optimal baseline read
    lengths / token stats) runs once per batch (group id), so nothing crosses batches."""
    import ratiorl
    from ratiorl.objectives import ADVANTAGES

    fn = ADVANTAGES.lookup(method)
    if not (getattr(fn, "needs_mask", False) or getattr(fn, "token_level", False)):
        return ratiorl.advantages(rewards, group_ids, method=method, **inputs)
    K = int(group_ids.max()) + 1
    G = len(rewards) // K
    parts = []
    for k in range(K):
        sl = slice(k * G, (k + 1) * G)
        parts.append(ratiorl.advantages(rewards[sl], group_ids[sl], method=method,
                                        **{n: v[sl] if v is not None else None for n, v in inputs.items()}))
    return torch.cat(parts)


def problem_inputs(problem: Problem, idx: torch.Tensor) -> dict:
    """The inputs an advantage method may declare, exact on the tabular problem for rows ``idx``:
    ``mask`` (all ones: fixed length T), ``baseline`` (ReMax: the reward of pi_old's greedy
    sequence), ``logp`` and ``sum_pi_squared`` of pi_old (the optimal token baseline)."""
    tree = problem.tree
    old_probs = torch.softmax(problem.theta_old, -1)
    greedy = (tree.tokens == old_probs.argmax(-1)[tree.states]).all(1)
    base = problem.rewards[greedy][0]
    return {"mask": torch.ones(len(idx), tree.T, dtype=problem.logp.dtype),
            "baseline": base.expand(len(idx)).clone(), "logp": problem.old_logp[idx],
            "sum_pi_squared": (old_probs * old_probs).sum(-1)[tree.states[idx]]}


# ----------------------------------------------------------------------------- sampling


def sample_batches(problem: Problem, G: int, K: int, generator: torch.Generator) -> torch.Tensor:
    """(K*G,) sequence indices drawn iid from pi_old; rows k*G..k*G+G-1 form batch k."""
    return torch.multinomial(problem.old_seq_probs, K * G, replacement=True, generator=generator)


@dataclass
class Draw:
    """Per-batch gradient estimates of one estimator: ``est`` (K, D)."""

    est: torch.Tensor
    seconds: float = 0.0


def token_coefficients(
    problem: Problem,
    spec: EstimatorSpec,
    idx: torch.Tensor,
    G: int,
    loss_fn: LossFn | None = None,
    advantages_fn: Callable | None = None,
) -> torch.Tensor:
    """c (K*G, T) with  g_hat_k = sum_{rows i of batch k, t} c[i,t] * grad_theta log pi(a_t|s_t).

    Rows k*G..k*G+G-1 of ``idx`` form batch k (group id k). One library call on the stacked
    batch with num_sequences=G, num_tokens=G*T makes the loss the sum of the K batch losses, so
    one autograd call gives every batch's d loss / d logp; c = -scale * d loss / d logp because
    the loss is minimised and we estimate grad J."""
    T = problem.tree.T
    K = len(idx) // G
    gid = torch.arange(K).repeat_interleave(G)
    logp = problem.logp[idx].clone().requires_grad_(True)
    old_logp = problem.old_logp[idx]
    mask = torch.ones_like(old_logp)
    if spec.advantage == "token_exact":
        adv = problem.adv_token[idx]
    elif advantages_fn is not None and advantages_fn is not library_advantages:
        adv = advantages_fn(problem.rewards[idx], gid, spec.advantage)
    else:
        adv = library_advantages(problem.rewards[idx], gid, spec.advantage, **problem_inputs(problem, idx))
    loss = (loss_fn or library_loss(spec))(logp, old_logp, adv.to(logp.dtype), mask, gid, G, G * T)
    (dlogp,) = torch.autograd.grad(loss, logp)
    return -spec.scale_for(T) * dlogp.detach().to(DTYPE)


def estimate(
    problem: Problem,
    spec: EstimatorSpec,
    G: int,
    K: int,
    generator: torch.Generator | None,
    loss_fn: LossFn | None = None,
    advantages_fn: Callable | None = None,
    index: torch.Tensor | None = None,
) -> Draw:
    """K independent batch estimates of grad J from ``spec`` (one library call, one autograd
    call, one scatter). ``index`` (K*G,) reuses given samples (common random numbers)."""
    import time

    t0 = time.perf_counter()
    idx = sample_batches(problem, G, K, generator) if index is None else index
    coef = token_coefficients(problem, spec, idx, G, loss_fn, advantages_fn)
    gid = torch.arange(K).repeat_interleave(G)
    est = scores_to_theta(problem.tree, problem.probs, idx, coef, batch_index=gid, num_batches=K)
    return Draw(est=est.reshape(K, -1), seconds=time.perf_counter() - t0)


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
    # every other per-batch quantity from one matmul: X_k . b, X_k . m, X_k . g
    Xb, Xm, Xg = (X @ torch.stack([b, m, g], 1)).unbind(1)
    bSb = float((Xb * Xb).sum() / (K - 1))
    raw2 = float(b @ b)
    bias_sq = raw2 - tr / K
    # b' Sigma b: plugging in b_hat overstates it by tr(Sigma^2)/K, which inflates the se by up to
    # sqrt(3) when there is no bias. Use the Rayleigh quotient along b_hat times the debiased
    # ||b||^2 instead (calibration checked in tests/lab/test_estimators.py).
    bSb = max(bias_sq, 0.0) * bSb / max(raw2, 1e-300)
    bias_sq_se = math.sqrt(max(4 * bSb / K + 2 * tr2 / K**2, 0.0))
    bias_norm = math.sqrt(max(bias_sq, 0.0))
    # delta method; near zero use se(||b||^2)/(2 sqrt(se)) so the interval stays finite
    bias_norm_se = bias_sq_se / (2 * math.sqrt(max(bias_sq, bias_sq_se, 1e-300)))
    err2 = sq + 2 * Xb + raw2  # ||g_k - g||^2
    est_norm = (sq + 2 * Xm + float(m @ m)).clamp_min(0).sqrt()  # ||g_k||
    gnorm = float(g.norm())
    cos_each = (Xg + float(m @ g)) / (est_norm.clamp_min(1e-300) * max(gnorm, 1e-300))
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


def paired_variance_ratio(est_a: torch.Tensor, est_b: torch.Tensor) -> tuple[float, float]:
    """tr(Sigma_a) / tr(Sigma_b) for two estimators evaluated on the SAME batches, and its
    standard error. Pairing (common random numbers) cancels most of the sampling noise:
    with a_k = ||g^a_k - m^a||^2, b_k likewise, the ratio of means has the delta-method
    se = r * std(a_k / mean a - b_k / mean b) / sqrt(K)."""
    a = ((est_a - est_a.mean(0)) ** 2).sum(1)
    b = ((est_b - est_b.mean(0)) ** 2).sum(1)
    K = a.shape[0]
    ma, mb = float(a.mean()), float(b.mean())
    r = ma / mb
    se = r * float((a / ma - b / mb).std()) / math.sqrt(K)
    return r, se


@dataclass
class ExactMoments:
    """Exact mean and variance of an estimator whose batch estimate is an average of iid
    per-sequence terms f(y), y ~ pi_old (no coupling inside a group, as with the exact per-token
    advantages). Then E[g_hat] = E_old[f], tr Cov(g_hat) = tr Cov_old(f) / G."""

    mean: torch.Tensor  # (D,)
    bias_norm: float
    variance_one: float  # tr Cov_old(f): the variance of a batch of G is this / G
    variance_by_position: list  # tr Cov_old(f_t) for each position t
    cosine: float

    def variance(self, G: int) -> float:
        return self.variance_one / G


SEPARABLE_ADVANTAGES = ("token_exact",)


def exact_moments(problem: Problem, spec: EstimatorSpec, loss_fn: LossFn | None = None) -> ExactMoments:
    """Exact moments by enumeration, still through the library: every sequence is evaluated as
    its own batch of one (G=1, K=N), which gives the per-sequence term

        f(y) = sum_t c_t(y) (onehot(a_t) - pi(.|s_t))  placed at state s_t,

    then E_old[f] = sum_y pi_old(y) f(y). The T states of one sequence are distinct (one per
    depth), so the blocks are orthogonal and ||f(y)||^2 = sum_t c_t^2 kappa(s_t, a_t) with
    kappa(s, a) = ||onehot(a) - pi(.|s)||^2 = 1 - 2 pi(a|s) + sum_b pi(b|s)^2: no dense (N, D)."""
    if spec.advantage not in SEPARABLE_ADVANTAGES:
        raise ValueError(
            f"exact moments need per-sequence terms without group coupling (advantage in "
            f"{SEPARABLE_ADVANTAGES}); {spec.name!r} uses advantage={spec.advantage!r}: measure it by sampling"
        )
    tree, T = problem.tree, problem.tree.T
    N = tree.num_sequences
    idx = torch.arange(N)
    c = token_coefficients(problem, spec, idx, 1, loss_fn)  # (N, T)
    q = problem.old_seq_probs
    pi = problem.probs
    kappa = 1 - 2 * pi[tree.states, tree.tokens] + (pi * pi).sum(-1)[tree.states]  # (N, T)
    # per-position means in one scatter: "batch" t holds position t's share
    pos = torch.arange(T).expand(N, T)
    qc = (q[:, None] * c).reshape(-1)
    onehot = torch.zeros(T * pi.numel(), dtype=DTYPE)
    S, V = pi.shape
    flat_state = (pos * S + tree.states).reshape(-1)
    onehot.index_add_(0, flat_state * V + tree.tokens.reshape(-1), qc)
    per_state = torch.zeros(T * S, dtype=DTYPE).index_add_(0, flat_state, qc)
    mean_t = (onehot.view(T, S, V) - per_state.view(T, S, 1) * pi[None]).reshape(T, -1)  # (T, D)
    second_t = (q[:, None] * c * c * kappa).sum(0)  # E_old ||f_t||^2
    var_t = second_t - (mean_t * mean_t).sum(1)
    mean = mean_t.sum(0)
    var = float(second_t.sum() - mean @ mean)
    g = problem.grad.reshape(-1)
    return ExactMoments(
        mean=mean,
        bias_norm=float((mean - g).norm()),
        variance_one=var,
        variance_by_position=[float(v) for v in var_t],
        cosine=float(mean @ g / (mean.norm() * g.norm()).clamp_min(1e-300)),
    )
