"""Trust-region shaping: the "clip" axis (docs/objectives.md, "shapings").

A shaping is ``fn(x, A, w, info, *, <options>) -> Shaped`` registered in ``SHAPINGS``; its
hyperparameters are its keyword-only parameters (defaults in the signature):

- ``x``: the weight exp(log_w) (B, T) or (B,), carrying the gradient path of its weight;
- ``A``: advantages broadcastable to ``x`` (float32, no gradient);
- ``w``: the ``weights.Weight`` (log_w, level, logp_term) it came from.

It returns the per-element loss L (to be minimised, before masking/aggregation) and, for metrics,
boolean masks of the elements clipped at the low / high side (``None`` when the shaping never
clips). ``requires_token_level=True`` marks shapings that only make sense per token;
``uses_rule=True`` marks shapings that take ``rule=`` (a ``RULES`` entry with its options bound).

The gradient-weight family (``shaping="weighted"``, DGPO eq. 1) is
L = -A * (sg(v) + sg(F) * (logp - sg(logp))): value v, gradient F * A * grad logp. Its rules
(``RULES``) are ``rule(r, A, l, u, regions, *, <options>) -> F`` with the five regions of DGPO sec. 3
(``Regions``: lazily computed boolean masks ``LN, HP, LP, HN``, the clipped value ``v``, and
``pos``/``neg`` = A > 0 / A < 0); ``l`` = 0 and ``u`` = inf when a bound is absent.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._ops import masked_clamp
from .._registry import Registry

SHAPINGS = Registry("shaping")
RULES = Registry("weighted rule")


class Shaped(NamedTuple):
    loss: torch.Tensor
    clipped_low: Optional[torch.Tensor] = None  # bool, same shape as loss
    clipped_high: Optional[torch.Tensor] = None
    clipped_dual: Optional[torch.Tensor] = None


def _bounds(clip_low, clip_high):
    """(l, u) = (1 - clip_low, 1 + clip_high); ``None`` for a missing side."""
    lo = None if clip_low is None else 1.0 - clip_low
    hi = None if clip_high is None else 1.0 + clip_high
    return lo, hi


_INF = float("inf")


def _full(A, v):
    return A.new_full((), v)


def _and(mask, rows):
    """mask & rows for a (B, T) bool mask and an A-shaped (B, 1) or (B, T) bool; expanding first
    is much faster than a broadcasting bitwise op on CPU."""
    if rows.shape != mask.shape:
        rows = rows.expand_as(mask).contiguous()
    return mask & rows


def _clip_bounds(A, clip_low, clip_high, dual=None):
    """Per-element bounds (lower, upper) on the weight, shaped like A (usually (B, 1): cheap).

    PPO's -min(x A, clamp(x, l, u) A) equals -A * clamp(x, lower, upper) with
    (lower, upper) = (-inf, u) for A > 0 and (l, inf) for A < 0 -- or (l, c) with the dual clip,
    since min(-A max(x, l), -c A) = -A min(max(x, l), c). One clamp instead of two products and a
    max; the gradient is the same (zero exactly where the PPO objective is flat).
    """
    lo, hi = _bounds(clip_low, clip_high)
    neg, pos = A < 0, A > 0
    lower = torch.where(neg, _full(A, -_INF if lo is None else lo), _full(A, -_INF))
    upper_neg = _full(A, _INF if dual is None else dual)
    upper = torch.where(pos, _full(A, _INF if hi is None else hi), upper_neg)
    return lower, upper, neg, pos


@SHAPINGS.register("none")
def none(x, A, w, info):
    # Plain IS policy gradient: L = -x * A   (tutorial sec. 5.2)
    return Shaped(-x * A)


@SHAPINGS.register("clip")
def clip(x, A, w, info, *, clip_low=0.2, clip_high=0.2):
    # PPO clipped surrogate: L = -min(x A, clamp(x, l, u) A)   (tutorial sec. 5.3; GRPO; GSPO; SNIB Alg. 1 line 10)
    # computed as -A * clamp(x, lower(A), upper(A)), see _clip_bounds.
    lower, upper, _, _ = _clip_bounds(A, clip_low, clip_high)
    with torch.no_grad():  # PPO/TRL metrics: the bound is active and lowers the objective
        xd = x.detach()
        low, high = xd < lower, xd > upper
    loss = -A * masked_clamp(x, lower, upper, ~(low | high))
    return Shaped(loss, low, high)


@SHAPINGS.register("dual_clip")
def dual_clip(x, A, w, info, *, clip_low=0.2, clip_high=0.2, dual_clip: float = 3.0):
    # PPO dual clip (Ye et al. 2020): as clip, then for A < 0 also min(L, -c A): -A * clamp(x, l, c) for A < 0
    lower, upper, neg, pos = _clip_bounds(A, clip_low, clip_high, dual=dual_clip)
    with torch.no_grad():
        xd = x.detach()
        low, above = xd < lower, xd > upper
    loss = -A * masked_clamp(x, lower, upper, ~(low | above))
    return Shaped(loss, low, _and(above, pos), _and(above, neg))


@SHAPINGS.register("position_clip", requires_token_level=True)
def position_clip(x, A, w, info, *, pos_clip_low: float = 0.025, pos_clip_high: float = 0.05,
                  pos_power: float = 0.5, pos_dual_clip: float = 0.05):
    # CTPO sec. 3.3: log-space bounds growing like pos_t^p: lo_t = a pos^p, hi_t = b pos^p, c_t = c pos^p;
    # x~ = exp(clamp(log x, -lo_t, hi_t)); L = max(-x A, -x~ A); for A < 0: min(L, -A exp(c_t)).
    # Same value and gradient, one clamp: L = -A exp(clamp(log x, lower_t, upper_t)) with
    # (lower_t, upper_t) = (-inf, hi_t) for A > 0 and (-lo_t, c_t) for A < 0.
    pp = info.pos_pow(pos_power)  # (1, T) for right-padded masks, else (B, T)
    big = 1e30  # a finite "infinity": it multiplies pp, which is 0 before a row's first token
    neg, pos = A < 0, A > 0
    lower = torch.where(neg, _full(A, -pos_clip_low), _full(A, -big)) * pp
    upper = torch.where(neg, _full(A, pos_dual_clip), torch.where(pos, _full(A, pos_clip_high), _full(A, big))) * pp
    lw = w.log_w
    with torch.no_grad():
        lwd = lw.detach()
        low, above = lwd < lower, lwd > upper
    loss = -A * torch.exp(masked_clamp(lw, lower, upper, ~(low | above)))
    return Shaped(loss, low, _and(above, pos), _and(above, neg))


@SHAPINGS.register("gate")
def gate(x, A, w, info, *, tau_pos: float = 1.0, tau_neg: float = 1.05):
    # SAPO soft gate (tutorial sec. 7.5): L = -(4/tau) sigmoid(tau (x - 1)) A, tau = tau_pos if A > 0 else tau_neg;
    # its gradient at x = 1 is exactly the REINFORCE gradient -A grad logp. Never hard-clips.
    tau = torch.where(A > 0, A.new_full((), tau_pos), A.new_full((), tau_neg))
    return Shaped(-(4.0 / tau) * torch.sigmoid(tau * (x - 1.0)) * A)


class Regions:
    """The five regions of DGPO sec. 3 (Table 1), computed lazily (a rule pays only for the ones it
    reads): LN r<l,A<0; HP r>u,A>0; LP r<l,A>0; HN r>u,A<0; M the rest. ``v`` is the clipped value
    clamp(r, l, u) on LN/HP and r elsewhere; ``pos``/``neg`` are A>0 / A<0."""

    def __init__(self, r, A, lo, hi, lower, upper, neg, pos):
        self.r, self.A, self.lo, self.hi = r, A, lo, hi
        self.lower, self.upper, self.neg, self.pos = lower, upper, neg, pos
        self.v = torch.maximum(torch.minimum(r, upper), lower)  # = clamp(r, lower, upper), faster broadcast
        self._cache = {}

    def _get(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @property
    def LN(self):
        return self._get("LN", lambda: self.r < self.lower)

    @property
    def HP(self):
        return self._get("HP", lambda: self.r > self.upper)

    @property
    def LP(self):
        return self._get("LP", lambda: _and(self.r < self.lo, self.pos) if self.lo is not None else self.r < -1.0)

    @property
    def HN(self):
        return self._get("HN", lambda: _and(self.r > self.hi, self.neg) if self.hi is not None else self.r < -1.0)


@SHAPINGS.register("weighted", uses_rule=True)
def weighted(x, A, w, info, *, rule, clip_low=0.2, clip_high=0.2):
    # DGPO eq. 1 (gradient-weight view): L = -A (sg(v) + sg(F) (logp - sg(logp))), value v, gradient F A grad logp;
    # regions of DGPO sec. 3 (see Regions); v = clamp(r, l, u) on LN/HP, r elsewhere.
    lo, hi = _bounds(clip_low, clip_high)
    lower, upper, neg, pos = _clip_bounds(A, clip_low, clip_high)
    with torch.no_grad():
        reg = Regions(x.detach(), A, lo, hi, lower, upper, neg, pos)
        l = 0.0 if lo is None else lo  # an absent bound makes its regions empty
        u = _INF if hi is None else hi
        F = torch.broadcast_to(rule(reg.r, A, l, u, reg), reg.r.shape)
        low, high = reg.LN, reg.HP
    lp = w.logp_term
    loss = -A * (reg.v + F * (lp - lp.detach()))
    return Shaped(loss, low, high)


# ---- rules of the gradient-weight family (DGPO sec. 3, Table 1; F multiplies A * grad logp) ----


@RULES.register("hard")
def rule_hard(r, A, l, u, reg):
    # GRPO written in this family: zero gradient where the clip is active (DGPO eq. 2)
    return r * ~(reg.LN | reg.HP)


@RULES.register("cispo")
def rule_cispo(r, A, l, u, reg):
    # CISPO: F = sg(clamp(r, l, u)) everywhere, gradient never zero (DGPO eq. 3; MiniMax-M1)
    return r.clamp(min=l, max=u)


@RULES.register("gppo")
def rule_gppo(r, A, l, u, reg):
    # GPPO: keep the gradient of clipped tokens with the bound as weight (DGPO eq. 4):
    # l on LN, u on HP, r elsewhere -- which is exactly the clipped value v
    return reg.v


@RULES.register("ce_gppo")
def rule_ce_gppo(r, A, l, u, reg, *, beta1: float = 0.75, beta2: float = 1.0):
    # CE-GPPO: GPPO with scaled bounds beta1 * l on LN, beta2 * u on HP (DGPO eq. 5)
    F = torch.where(reg.LN, beta1 * l, r)
    return torch.where(reg.HP, beta2 * u, F)


@RULES.register("aspo")
def rule_aspo(r, A, l, u, reg, *, aspo_clip_low: float = 0.33, aspo_clip_high: float = 3.0):
    # ASPO as tabulated in DGPO eq. 6 -- OUR READING of a table whose symbols were lost in
    # extraction: flipped ratio 1/r for positive tokens, soft dual clip at 1 + aspo_clip_high.
    # LN, HP: 0; LP: min(1/r, 1 + c_high), or 1 - c_low where r < 1 - c_low; HN: min(r, 1 + c_high);
    # M: 1/r if A > 0, r if A < 0.
    lo_a, hi_a = 1.0 - aspo_clip_low, 1.0 + aspo_clip_high
    inv = r.reciprocal()
    F = inv * reg.pos + r * reg.neg  # M: 1/r for A > 0, r for A < 0 (pos/neg are A-shaped: cheap, exact)
    if u <= hi_a and l * hi_a >= 1.0 and lo_a <= l:
        # the usual parameters (defaults: u = 1.2 <= 4, l * 4 >= 1, 0.67 <= 0.8): the cap 1 + c_high
        # never binds on M, so LP (above 1 - c_low), M and HN are all min(F, 1 + c_high): same F, fewer ops
        F = F.clamp_(max=hi_a)
        F = torch.where(_and(r < lo_a, reg.pos), lo_a, F)
    else:
        lp = torch.where(r < lo_a, lo_a, inv.clamp_(max=hi_a))
        F = torch.where(reg.LP, lp, F)
        F = torch.where(reg.HN, r.clamp(max=hi_a), F)
    return F * ~(reg.LN | reg.HP)


@RULES.register("dgpo")
def rule_dgpo(r, A, l, u, reg, *, n: float = 1.0, m: float = 2.0):
    # DGPO eq. 9-10 on grad logp: LN F = r^(n+1) / l^n, HP F = u^(1/m) r^(1-1/m), r elsewhere;
    # continuous at r = l and r = u, never zero (decoupled decay of the probability gradient).
    # With q = r / v (r/l on LN, r/u on HP, 1 elsewhere): F = r q^n on LN, r q^(-1/m) on HP, and
    # since LN needs A < 0 and HP needs A > 0 the exponent is one number per sign of A.
    e = torch.where(reg.neg, A.new_full((), float(n)), A.new_full((), -1.0 / m))
    return r * torch.pow(r / reg.v, e)


__all__ = ["SHAPINGS", "RULES", "Shaped", "Regions"]
