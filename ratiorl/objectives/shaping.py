"""Trust-region shaping: the "clip" axis (SPEC section 3).

A shaping is ``fn(x, A, w, info, obj) -> Shaped`` registered in ``SHAPINGS``:

- ``x``: the weight exp(log_w) (B, T) or (B,), carrying the gradient path of its weight;
- ``A``: advantages broadcastable to ``x`` (float32, no gradient);
- ``w``: the ``weights.Weight`` (log_w, level, logp_term) it came from.

It returns the per-element loss L (to be minimised, before masking/aggregation) and, for metrics,
boolean masks of the elements clipped at the low / high side (``None`` when the shaping never
clips). ``requires_token_level=True`` marks shapings that only make sense per token.

The gradient-weight family (``shaping="weighted"``, DGPO eq. 1) is
L = -A * (sg(v) + sg(F) * (logp - sg(logp))): value v, gradient F * A * grad logp. Its rules
(``RULES``) are ``rule(r, A, l, u, regions, obj) -> F`` with the five regions of DGPO sec. 3.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._registry import Registry

SHAPINGS = Registry("shaping")
RULES = Registry("weighted rule")


class Shaped(NamedTuple):
    loss: torch.Tensor
    clipped_low: Optional[torch.Tensor] = None  # bool, same shape as loss
    clipped_high: Optional[torch.Tensor] = None
    clipped_dual: Optional[torch.Tensor] = None


def _bounds(obj):
    """(l, u) = (1 - clip_low, 1 + clip_high); ``None`` for a missing side."""
    lo = None if obj.clip_low is None else 1.0 - obj.clip_low
    hi = None if obj.clip_high is None else 1.0 + obj.clip_high
    return lo, hi


def _clip_regions(x, A, lo, hi):
    # PPO/TRL clip metrics: the clamp is active (chosen by the min) only when it lowers the objective
    low = (x < lo) & (A < 0) if lo is not None else None
    high = (x > hi) & (A > 0) if hi is not None else None
    return low, high


@SHAPINGS.register("none")
def none(x, A, w, info, obj):
    # Plain IS policy gradient: L = -x * A   (tutorial sec. 5.2)
    return Shaped(-x * A)


@SHAPINGS.register("clip")
def clip(x, A, w, info, obj):
    # PPO clipped surrogate: L = -min(x A, clamp(x, l, u) A)   (tutorial sec. 5.3; GRPO; GSPO; SNIB Alg. 1 line 10)
    lo, hi = _bounds(obj)
    xc = x.clamp(min=lo, max=hi)
    loss = torch.maximum(-x * A, -xc * A)
    with torch.no_grad():
        low, high = _clip_regions(x, A, lo, hi)
    return Shaped(loss, low, high)


@SHAPINGS.register("dual_clip")
def dual_clip(x, A, w, info, obj):
    # PPO dual clip (Ye et al. 2020): for A < 0 also cap the loss at -c * A
    shaped = clip(x, A, w, info, obj)
    c = obj.dual_clip
    loss = torch.where(A < 0, torch.minimum(shaped.loss, -c * A), shaped.loss)
    with torch.no_grad():
        dual = (A < 0) & (x > c)
    return Shaped(loss, shaped.clipped_low, shaped.clipped_high, dual)


@SHAPINGS.register("position_clip", requires_token_level=True)
def position_clip(x, A, w, info, obj):
    # CTPO sec. 3.3: log-space bounds growing like pos_t^p, lo_t = a * pos^p, hi_t = b * pos^p;
    # x~ = exp(clamp(log x, -lo_t, hi_t)); L = max(-x A, -x~ A); for A < 0: min(L, -A exp(c_t)).
    pp = info.pos.pow(obj.pos_power)
    lo_t = obj.pos_clip_low * pp
    hi_t = obj.pos_clip_high * pp
    c_t = obj.pos_dual_clip * pp
    x_clip = torch.exp(torch.clamp(w.log_w, min=-lo_t, max=hi_t))
    loss = torch.maximum(-x * A, -x_clip * A)
    neg = A < 0
    loss = torch.where(neg, torch.minimum(loss, -A * torch.exp(c_t)), loss)
    with torch.no_grad():
        lw = w.log_w
        low = (lw < -lo_t) & neg
        high = (lw > hi_t) & (A > 0)
        dual = neg & (lw > c_t)
    return Shaped(loss, low, high, dual)


@SHAPINGS.register("gate")
def gate(x, A, w, info, obj):
    # SAPO soft gate (tutorial sec. 7.5): L = -(4/tau) sigmoid(tau (x - 1)) A, tau = tau_pos if A > 0 else tau_neg;
    # its gradient at x = 1 is exactly the REINFORCE gradient -A grad logp. Never hard-clips.
    tau = torch.where(A > 0, A.new_full((), obj.tau_pos), A.new_full((), obj.tau_neg))
    return Shaped(-(4.0 / tau) * torch.sigmoid(tau * (x - 1.0)) * A)


@SHAPINGS.register("weighted")
def weighted(x, A, w, info, obj):
    # DGPO eq. 1 (gradient-weight view): L = -A (sg(v) + sg(F) (logp - sg(logp)));
    # regions (DGPO sec. 3): LN r<l,A<0; HP r>u,A>0; LP r<l,A>0; HN r>u,A<0; M the rest.
    rule = RULES.lookup(obj.rule)
    lo, hi = _bounds(obj)
    with torch.no_grad():
        r = x.detach()
        pos, neg = A > 0, A < 0
        below = r < lo if lo is not None else torch.zeros_like(r, dtype=torch.bool)
        above = r > hi if hi is not None else torch.zeros_like(r, dtype=torch.bool)
        regions = {"LN": below & neg, "HP": above & pos, "LP": below & pos, "HN": above & neg, "pos": pos}
        l = 0.0 if lo is None else lo  # an absent bound makes its regions empty
        u = float("inf") if hi is None else hi
        clipped = regions["LN"] | regions["HP"]
        v = torch.where(clipped, r.clamp(min=l, max=u), r)
        F = rule(r, A, l, u, regions, obj)
        F = torch.broadcast_to(F, r.shape)
    lp = w.logp_term
    loss = -A * (v + F * (lp - lp.detach()))
    return Shaped(loss, regions["LN"], regions["HP"])


# ---- rules of the gradient-weight family (SPEC section 3 table; F multiplies A * grad logp) ----


@RULES.register("hard")
def rule_hard(r, A, l, u, reg, obj):
    # GRPO written in this family: zero gradient where the clip is active (DGPO eq. 2)
    return torch.where(reg["LN"] | reg["HP"], 0.0, r)


@RULES.register("cispo")
def rule_cispo(r, A, l, u, reg, obj):
    # CISPO: F = sg(clamp(r, l, u)) everywhere, gradient never zero (DGPO eq. 3; MiniMax-M1)
    return r.clamp(min=l, max=u)


@RULES.register("gppo")
def rule_gppo(r, A, l, u, reg, obj):
    # GPPO: keep the gradient of clipped tokens with the bound as weight (DGPO eq. 4)
    F = torch.where(reg["LN"], l, r)
    return torch.where(reg["HP"], u, F)


@RULES.register("ce_gppo")
def rule_ce_gppo(r, A, l, u, reg, obj):
    # CE-GPPO: GPPO with scaled bounds beta1 * l on LN, beta2 * u on HP (DGPO eq. 5)
    F = torch.where(reg["LN"], obj.beta1 * l, r)
    return torch.where(reg["HP"], obj.beta2 * u, F)


@RULES.register("aspo")
def rule_aspo(r, A, l, u, reg, obj):
    # ASPO as tabulated in DGPO eq. 6 -- OUR READING of a table whose symbols were lost in
    # extraction: flipped ratio 1/r for positive tokens, soft dual clip at 1 + aspo_clip_high.
    lo_a, hi_a = 1.0 - obj.aspo_clip_low, 1.0 + obj.aspo_clip_high
    F = torch.where(reg["pos"], 1.0 / r, r)  # M
    lp = torch.where(r < lo_a, lo_a, torch.clamp(1.0 / r, max=hi_a))
    F = torch.where(reg["LP"], lp, F)
    F = torch.where(reg["HN"], torch.clamp(r, max=hi_a), F)
    return torch.where(reg["LN"] | reg["HP"], 0.0, F)


@RULES.register("dgpo")
def rule_dgpo(r, A, l, u, reg, obj):
    # DGPO eq. 9-10 on grad logp: LN F = r^(n+1) / l^n, HP F = u^(1/m) r^(1-1/m);
    # continuous at r = l and r = u, never zero (decoupled decay of the probability gradient).
    n, m = obj.n, obj.m
    F = torch.where(reg["LN"], r.pow(n + 1) / (l**n), r)
    return torch.where(reg["HP"], (u ** (1.0 / m)) * r.pow(1.0 - 1.0 / m), F)


__all__ = ["SHAPINGS", "RULES", "Shaped"]
