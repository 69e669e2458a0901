"""More shapings (``SHAPINGS`` entries, docs/objectives.md "Shapings"): GMPO's log-space clip with a
geometric mean, DPPO's TV / KL trust regions, VESPO's gamma weight, and the plain log-prob surrogate.

Same contract as ``shaping.py``: ``fn(x, A, w, info, *, <options>) -> Shaped``. The surrogates
whose gradient is ``F * A * grad log pi`` with a detached F (DPPO, VESPO, ``logp``) report the value
of the source's own surrogate ``-A sg(F) log pi`` (it depends on the absolute log-probs), so loss and
gradient both equal verl's / TRL's; ``log pi`` here is ``old_logp + delta`` (equal to ``logp`` while
|logp - old_logp| <= log_ratio_clamp).
"""

from __future__ import annotations

import math

import torch

from ._ops import masked_clamp
from .shaping import SHAPINGS, Shaped, _and, _full

_INF = float("inf")


def _log_pi(w, info):
    """log pi_theta of each token, with the gradient of the token's log-ratio (any finite value on
    padding: the aggregation masks it)."""
    return info.old_logp + w.logp_term


@SHAPINGS.register("geo_mean", requires_token_level=True, sequence_advantage=True)
def geo_mean(x, A, w, info, *, log_clip_low: float = 0.4, log_clip_high: float = 0.4):
    # GMPO (Zhao et al. 2025, arXiv:2507.20673, eq. 5; verl compute_policy_loss_geo_mean): each token's log
    # weight is clipped in log space, sign-aware (A > 0: <= log_clip_high; A < 0: >= -log_clip_low), and the
    # sequence weight is the geometric mean: L_i = -A_i exp(mean_t clip(log w_t)), one loss per sequence
    # (use aggregation="sequence": verl's torch.mean over the batch). A (B, T) advantage is averaged per sequence.
    lw = w.log_w
    neg, pos = A < 0, A > 0
    lower = torch.where(neg, _full(A, -log_clip_low), _full(A, -_INF))
    upper = torch.where(pos, _full(A, log_clip_high), _full(A, _INF))
    with torch.no_grad():
        lwd = lw.detach()
        low, high = lwd < lower, lwd > upper
    lc = masked_clamp(lw, lower, upper, ~(low | high))
    log_s = (lc * info.mask).sum(1) / info.lengths.clamp_min(1.0)
    A_seq = A[:, 0] if A.shape[1] == 1 else info.seq_mean(A)
    return Shaped(-A_seq * torch.exp(log_s) * info.seq_valid, low, high)


def _dppo(x, A, w, info, valid, trunc_c):
    pos = A > 0
    with torch.no_grad():
        xd = x.detach()
        over = xd > trunc_c
        F = torch.where(valid, torch.where(over, _full(A, trunc_c), xd), _full(A, 0.0)) * (-A)
        out = ~valid
    loss = F * _log_pi(w, info)
    return Shaped(loss, _and(out, ~pos), _and(out, pos), valid & over)


def _sign_thr(A, div_low, div_high):
    """(s, thr): s = +1 where A > 0 else -1, thr = div_high where A > 0 else div_low, A-shaped."""
    pos = A > 0
    return torch.where(pos, _full(A, 1.0), _full(A, -1.0)), torch.where(pos, _full(A, div_high), _full(A, div_low))


@SHAPINGS.register("dppo_tv", requires_token_level=True)
def dppo_tv(x, A, w, info, *, div_low: float = 0.2, div_high: float = 0.2, trunc_c: float = 20.0):
    # DPPO-Binary-TV (arXiv:2602.04879; verl compute_policy_loss_dppo_tv): a token keeps its gradient while the
    # change of its own probability stays inside the trust region: p - p_old <= div_high for A > 0,
    # p - p_old >= -div_low otherwise. L = -A sg(min(x, c) * valid) log pi (truncated IS, c = trunc_c).
    with torch.no_grad():
        s, thr = _sign_thr(A, div_low, div_high)
        diff = torch.exp(info.old_logp) * torch.expm1(w.logp_term.detach())  # p - p_old
        valid = diff * s <= thr
    return _dppo(x, A, w, info, valid, trunc_c)


@SHAPINGS.register("dppo_kl", requires_token_level=True)
def dppo_kl(x, A, w, info, *, div_low: float = 0.2, div_high: float = 0.2, trunc_c: float = 20.0):
    # DPPO-Binary-KL (arXiv:2602.04879; verl compute_policy_loss_dppo_kl): the binary KL of the sampled
    # token, D = p_old log(p_old/p) + (1-p_old) log((1-p_old+1e-8)/(1-p+1e-8)), must stay <= div_high when
    # A > 0 and p grows (<= div_low when A <= 0 and p shrinks); moves back into the region are always kept.
    with torch.no_grad():
        s, thr = _sign_thr(A, div_low, div_high)
        dl = w.logp_term.detach()  # log p - log p_old
        p_old = torch.exp(info.old_logp)
        q_old = 1.0 - p_old
        d = torch.log((q_old + 1e-8) / (1e-8 - p_old * torch.expm1(dl) + q_old)).mul_(q_old).sub_(p_old * dl)
        valid = (d <= thr) | (dl * s <= 0)  # A > 0: p <= p_old is kept; A <= 0: p >= p_old is kept
    return _dppo(x, A, w, info, valid, trunc_c)


@SHAPINGS.register("gamma", requires_token_level=True)
def gamma(x, A, w, info, *, k_pos: float = 2.0, lambda_pos: float = 3.0, k_neg: float = 3.0,
          lambda_neg: float = 2.0):
    # VESPO (arXiv:2602.10693; TRL loss_type="vespo", get_gamma_weights): a detached gamma weight of the
    # sequence ratio W = exp(clamp(sum_t log w_t, log 1e-8, 20)):
    # phi(W) = e^lambda W^k e^(-lambda W) (phi(1) = 1), (k, lambda) by the sign of A (A >= 0: pos);
    # L = -A sg(phi) log pi per token. Never clips.
    with torch.no_grad():
        lw = (w.log_w.detach() * info.mask).sum(1, keepdim=True).clamp(math.log(1e-8), 20.0)
        nonneg = A >= 0
        k = torch.where(nonneg, _full(A, k_pos), _full(A, k_neg))
        lam = torch.where(nonneg, _full(A, lambda_pos), _full(A, lambda_neg)).clamp(min=1e-4)
        phi = torch.exp(lam + k * lw - lam * torch.exp(lw)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return Shaped(-A * phi * _log_pi(w, info))


@SHAPINGS.register("logp", requires_token_level=True)
def logp(x, A, w, info, *, dro_beta: float = 0.0):
    # The log-prob surrogate L = -A log pi + (dro_beta / 2) (log pi - log pi_old)^2, gradient
    # -A grad log pi + dro_beta * delta * grad log pi, whatever the weight: verl's "gpg" and "reinforce"
    # losses (dro_beta = 0) and its "dro" loss (policy_loss.dro_beta). Never clips.
    lp = _log_pi(w, info)
    loss = -A * lp
    if dro_beta:
        loss = loss + 0.5 * dro_beta * w.logp_term.square()
    return Shaped(loss)


__all__ = ["geo_mean", "dppo_tv", "dppo_kl", "gamma", "logp"]
