"""Importance weights: the "ratio" axis (docs/objectives.md, "weights").

Each weight is a function ``fn(delta, info, *, <options>) -> Weight`` registered in ``WEIGHTS``
with its ``level`` ("token": one weight per token, shape (B, T); "sequence": one per sequence,
shape (B,)) and, if it needs group ids, ``needs_groups`` (a bool, or a function of the resolved
options, e.g. ``lambda o: o["normalize_scope"] == "group"``). Its hyperparameters are its
keyword-only parameters; their defaults are the defaults. ``delta`` is the per-token log-ratio
logp - old_logp, already clamped to [-log_ratio_clamp, log_ratio_clamp], in float32, and 0 on
padding.

A ``Weight`` carries the *log* of the weight (with exactly the gradient path of its estimator),
optional ``metrics`` (a dict of 0-dim tensors or floats reported in ``out.metrics``) and
``logp_term``: the tensor whose gradient is grad log pi of the weighted unit (delta_t for
token-level weights, u_i = sum_t delta_t for sequence-level ones), used by the
gradient-weight family of ``shaping.py``.

Overflow guard: the per-token clamp alone does not bound a *sum* of log-ratios
(8192 tokens x 0.5 = 4096, and exp(4096) = inf). The weights whose log is an unnormalised sum
of log-ratios over a whole sequence (``sequence``, ``sequence_token``) clamp that summed log
weight to [-max_log_weight, max_log_weight] (default 20, i.e. weights in
[2e-9, 4.9e8]) (torch.clamp semantics): beyond the bound the weight saturates and, like a clipped
token, passes no gradient. ``cumulative`` clamps its detached prefix sum S_{t-1} to the same
bound and adds the current (clamped) token log-ratio, so rho_t <= exp(max_log_weight +
log_ratio_clamp) and every token keeps its own gradient (a truncated prefix weight).
``geometric`` is a mean of clamped log-ratios and needs no guard; the self-normalised weights
stay in log space (logsumexp) and are bounded by the group size.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._ops import clamp_abs
from .._registry import Registry

WEIGHTS = Registry("weight")

_NEG = -1e30  # finite "minus infinity" for masked logsumexp (no inf * 0 = NaN in backward)


class Weight(NamedTuple):
    log_w: torch.Tensor  # (B, T) or (B,), float32, log of the weight, with its gradient path
    level: str  # "token" or "sequence"
    logp_term: torch.Tensor  # delta (B, T) or u = sum_t delta (B,): d/dtheta = grad log pi
    metrics: Optional[dict] = None  # extra metrics (0-dim tensors or floats) for out.metrics


def _seq_sum(delta):
    return delta.sum(1)  # delta is 0 on padding; float32 sum


@WEIGHTS.register("token", level="token")
def token(delta, info):
    # PPO / GRPO: r_t = exp(logp_t - old_t)   (tutorial secs. 5.3 and 6)
    return Weight(delta, "token", delta)


@WEIGHTS.register("sequence", level="sequence")
def sequence(delta, info, *, max_log_weight: float = 20.0):
    # Vanilla sequence IS: w_i = exp(sum_t delta_t)   (SNIB: the ablation without self-normalisation)
    u = _seq_sum(delta)
    return Weight(clamp_abs(u, max_log_weight), "sequence", u)


@WEIGHTS.register("geometric", level="sequence")
def geometric(delta, info):
    # GSPO: s_i = exp(sum_t delta_t / |y_i|), length-normalised sequence ratio (tutorial sec. 7.4; SNIB estimator hierarchy)
    u = _seq_sum(delta)
    return Weight(u / info.lengths.clamp_min(1.0), "sequence", u)


@WEIGHTS.register("geometric_token", level="token")
def geometric_token(delta, info):
    # GSPO-token: s_{i,t} = sg(s_i) * pi_t / sg(pi_t)   (GSPO-token variant, tutorial sec. 7.4)
    log_s = _seq_sum(delta) / info.lengths.clamp_min(1.0)
    return Weight(log_s.detach()[:, None] + delta - delta.detach(), "token", delta)


@WEIGHTS.register("sequence_token", level="token")
def sequence_token(delta, info, *, max_log_weight: float = 20.0):
    # Full-sequence ratio in per-token form: w_{i,t} = sg(w_i) * pi_t / sg(pi_t)   (CTPO Prop. 2 baseline)
    log_w = clamp_abs(_seq_sum(delta), max_log_weight)
    return Weight(log_w.detach()[:, None] + delta - delta.detach(), "token", delta)


@WEIGHTS.register("cumulative", level="token")
def cumulative(delta, info, *, max_log_weight: float = 20.0):
    # CTPO Prop. 1: rho_t = prod_{k<=t} r_k = exp(sg(S_{t-1}) + delta_t), S_t = sum_{k<=t} delta_k;
    # per-decision IS, the gradient at t flows through logp_t only.
    # Overflow guard: the (detached) prefix S_{t-1} is clamped to +-max_log_weight, so
    # |log rho_t| <= max_log_weight + log_ratio_clamp and the current token keeps its gradient.
    prefix = (torch.cumsum(delta, dim=1) - delta).detach().clamp_(-max_log_weight, max_log_weight)
    return Weight(prefix + delta, "token", delta)


def _log_group_mean_exp(u, info, scope, detach_norm: bool):
    """log wbar_g = logsumexp_{j in g} u_j - log|g| over non-empty sequences, per sequence (B,)."""
    idx, G = info.group_index(scope)
    valid = info.seq_valid
    um = torch.where(valid, u, u.new_full((), _NEG))
    gmax = u.new_full((G,), _NEG).scatter_reduce(0, idx, um.detach(), "amax", include_self=True)
    e = torch.exp(um - gmax[idx]) * valid  # <= 1, exactly 1 at each group's max
    s = u.new_zeros(G).index_add(0, idx, e)
    cnt = u.new_zeros(G).index_add(0, idx, valid.to(u.dtype))
    log_norm = gmax + torch.log(s.clamp_min(1e-30)) - torch.log(cnt.clamp_min(1.0))
    if detach_norm:
        log_norm = log_norm.detach()
    return log_norm[idx]


def _self_normalized(delta, info, scope, detach_norm):
    u = _seq_sum(delta)
    log_w = u - _log_group_mean_exp(u, info, scope, detach_norm)
    # A group of one gets log_w = u - u = 0 exactly; empty responses get weight 1 but no loss.
    log_w = torch.where(info.seq_valid, log_w, torch.zeros_like(log_w))
    return Weight(log_w, "sequence", u)


def _group_scope(o):
    return o["normalize_scope"] == "group"


@WEIGHTS.register("self_normalized", level="sequence", needs_groups=_group_scope)
def self_normalized(delta, info, *, normalize_scope: str = "group"):
    # SNIB-sg (SNIB Alg. 1 lines 6-9): w~_i = w_i / sg(mean_{j in g} w_j), all in log space:
    # log w~_i = u_i - sg(logsumexp_{j in g} u_j - log|g|)
    return _self_normalized(delta, info, normalize_scope, detach_norm=True)


@WEIGHTS.register("self_normalized_fg", level="sequence", needs_groups=_group_scope)
def self_normalized_fg(delta, info, *, normalize_scope: str = "group"):
    # SNIB-fg (SNIB App. C.4): the same weight with the gradient also through the normaliser
    return _self_normalized(delta, info, normalize_scope, detach_norm=False)


__all__ = ["WEIGHTS", "Weight"]
