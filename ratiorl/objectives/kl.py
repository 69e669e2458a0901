"""KL regularisation (docs/objectives.md, "KL"): estimators, placements and beta controllers.

Estimators ``fn(logp, ref_logp, token_kl, info, *, <options>) -> (B, T)`` per-token KL values
(float32), registered in ``KL_ESTIMATORS`` with the input they read: ``needs_ref_logp=True``
(sampled estimators of log(pi / pi_ref)) or ``needs_token_kl=True`` (the full-vocabulary KL
supplied by the policy engine); ``info.log_ratio_clamp`` is the objective's clamp.
Placements (``KL_PLACEMENTS``) decide how beta * KL enters the loss; the core applies them
(see ``core.Objective.__call__``); ``needs_sequence_weight=True`` marks the placement that
weights each sequence's mean KL by the sequence weight:

- ``loss``: beta * kl_t added to each token's loss before aggregation (GRPO);
- ``loss_is``: beta * x_t * kl_t, x the policy weight of that token, gradient through both
  (TRL use_bias_correction_kl=True; DeepSeek-V3.2 unbiased KL);
- ``is_weighted``: beta * (1/B') sum_i w_i K_i, K_i = mean_t kl over sequence i, w the same
  (sequence-level) weight as the policy term (SNIB Alg. 1 line 11).
"""

from __future__ import annotations

import torch

from ._ops import clamp_abs
from .._registry import Registry

KL_ESTIMATORS = Registry("KL estimator")
KL_PLACEMENTS = Registry("KL placement")


def missing_input_message(name: str, needs_token_kl: bool) -> str:
    """The error for a KL estimator called without the input it declares."""
    if needs_token_kl:
        others = ", ".join(k for k, f in KL_ESTIMATORS.items() if getattr(f, "needs_ref_logp", False))
        return (f"kl_estimator={name!r} needs token_kl (B, T), the per-state full-vocabulary KL from the "
                "policy engine (Policy.completion_stats(..., with_kl=True).token_kl); supply it, or pick "
                f"another estimator ({others}) and pass ref_logp")
    exact = [k for k, f in KL_ESTIMATORS.items() if getattr(f, "needs_token_kl", False)]
    alt = f", or use kl_estimator={exact[0]!r} with token_kl" if exact else ""
    return f"beta > 0 with a sampled KL estimator needs ref_logp (B, T): pass ref_logp=..., or set beta=0{alt}"


def _log_diff(logp, ref_logp, info):
    if ref_logp is None:
        raise ValueError(missing_input_message("k3", False))
    c = info.log_ratio_clamp
    cd = torch.promote_types(logp.dtype, torch.float32)  # float32 at least
    return clamp_abs(ref_logp.to(cd) - logp.to(cd), c)  # log(pi_ref / pi_theta), clamped like delta


@KL_ESTIMATORS.register("k1", needs_ref_logp=True)
def k1(logp, ref_logp, token_kl, info):
    # Schulman's k1: log(pi / pi_ref), unbiased, can be negative
    return -_log_diff(logp, ref_logp, info)


@KL_ESTIMATORS.register("k2", needs_ref_logp=True)
def k2(logp, ref_logp, token_kl, info):
    # k2: 0.5 * (log(pi / pi_ref))^2
    return 0.5 * _log_diff(logp, ref_logp, info).square()


@KL_ESTIMATORS.register("k3", needs_ref_logp=True)
def k3(logp, ref_logp, token_kl, info, *, max_kl=None):
    # GRPO's KL (tutorial sec. 6.2): exp(ref - logp) - (ref - logp) - 1 >= 0;
    # max_kl=10 clamps the value (and its gradient) like verl's "low_var_kl"
    d = _log_diff(logp, ref_logp, info)
    kl = torch.exp(d) - d - 1.0
    return kl if max_kl is None else kl.clamp(max=max_kl)


@KL_ESTIMATORS.register("abs", needs_ref_logp=True)
def abs_(logp, ref_logp, token_kl, info):
    # |log(pi / pi_ref)| (verl kl_penalty="abs")
    return _log_diff(logp, ref_logp, info).abs()


def _straight_through(value, d):
    # value of one estimator, gradient of k2 = 0.5 d^2 (Schulman 2020: k2's gradient is the unbiased
    # gradient of KL(pi || pi_ref) under on-policy sampling); verl kl_penalty="<name>+"
    k2_ = 0.5 * d.square()
    return k2_ - k2_.detach() + value.detach()


@KL_ESTIMATORS.register("k1+", needs_ref_logp=True)
def k1_plus(logp, ref_logp, token_kl, info):
    # value k1, gradient k2 (verl "k1+" / "kl+")
    d = _log_diff(logp, ref_logp, info)
    return _straight_through(-d, d)


@KL_ESTIMATORS.register("k3+", needs_ref_logp=True)
def k3_plus(logp, ref_logp, token_kl, info, *, max_kl=None):
    # value k3 (clamped to max_kl if given, verl uses 10), gradient k2 (verl "k3+" / "low_var_kl+")
    d = _log_diff(logp, ref_logp, info)
    kl = torch.exp(d) - d - 1.0
    return _straight_through(kl if max_kl is None else kl.clamp(max=max_kl), d)


@KL_ESTIMATORS.register("abs+", needs_ref_logp=True)
def abs_plus(logp, ref_logp, token_kl, info):
    # value |k1|, gradient k2 (verl "abs+")
    d = _log_diff(logp, ref_logp, info)
    return _straight_through(d.abs(), d)


@KL_ESTIMATORS.register("exact", needs_token_kl=True)
def exact(logp, ref_logp, token_kl, info):
    # Full-vocabulary KL(pi_theta(.|s_t) || pi_ref(.|s_t)) supplied by the policy engine (SNIB Alg. 1 line 11)
    if token_kl is None:
        raise ValueError(missing_input_message("exact", True))
    return token_kl.to(torch.promote_types(token_kl.dtype, torch.float32))


# Placements: the core asks each for (per-token term to add before aggregation or None,
# per-sequence weight for the separate is_weighted term or None).


@KL_PLACEMENTS.register("loss", needs_sequence_weight=False)
def loss(kl, x_tok):
    return kl


@KL_PLACEMENTS.register("loss_is", needs_sequence_weight=False)
def loss_is(kl, x_tok):
    return kl * x_tok


@KL_PLACEMENTS.register("is_weighted", needs_sequence_weight=True)
def is_weighted(kl, x_tok):
    return None  # handled as a separate sequence-level term in the core


class FixedBeta:
    """A constant beta: ``update`` returns it unchanged."""

    def __init__(self, beta: float = 0.0):
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta = float(beta)

    def update(self, observed_kl: float) -> float:
        return self.beta

    def __repr__(self):
        return f"FixedBeta(beta={self.beta})"


class PrimalDualBeta:
    """Dual ascent on the KL constraint KL <= target (SNIB App. G.4):
    beta <- max(0, beta + lr * (KL - target))."""

    def __init__(self, target: float, lr: float, beta: float = 0.0):
        if lr <= 0 or target < 0 or beta < 0:
            raise ValueError(f"PrimalDualBeta needs target >= 0, lr > 0, beta >= 0; got {target}, {lr}, {beta}")
        self.target, self.lr, self.beta = float(target), float(lr), float(beta)

    def update(self, observed_kl: float) -> float:
        self.beta = max(0.0, self.beta + self.lr * (float(observed_kl) - self.target))
        return self.beta

    def __repr__(self):
        return f"PrimalDualBeta(target={self.target}, lr={self.lr}, beta={self.beta})"


class AdaptiveBeta:
    """Multiplicative controller of Ziegler et al. (2019) / PPO:
    e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n_steps / horizon)."""

    def __init__(self, target: float, horizon: float, beta: float = 0.1):
        if target <= 0 or horizon <= 0 or beta < 0:
            raise ValueError(f"AdaptiveBeta needs target > 0, horizon > 0, beta >= 0; got {target}, {horizon}, {beta}")
        self.target, self.horizon, self.beta = float(target), float(horizon), float(beta)

    def update(self, observed_kl: float, n_steps: int = 1) -> float:
        err = min(max(float(observed_kl) / self.target - 1.0, -0.2), 0.2)
        self.beta = self.beta * (1.0 + err * n_steps / self.horizon)
        return self.beta

    def __repr__(self):
        return f"AdaptiveBeta(target={self.target}, horizon={self.horizon}, beta={self.beta})"


__all__ = ["KL_ESTIMATORS", "KL_PLACEMENTS", "missing_input_message", "FixedBeta", "PrimalDualBeta", "AdaptiveBeta"]
