"""Training diagnostics of importance weights and clipping, computed by calling objectives.

Every weight, clip, ESS and KL number here comes from an ``Objective`` call
(``return_details=True``): the training objective itself, or the objective of a counterfactual
(e.g. ``ratiorl.objective("ctpo")`` for the position-adaptive clip of the cumulative ratio,
``"vanilla_is"`` / ``"snib"`` for raw vs self-normalised sequence weights). A newly registered
weight or shaping therefore shows up here without touching this module. The trainer calls:

- ``step_scalars(obj, logp, old_logp, advantages, mask, group_ids)``: cheap scalars for a step;
- ``plot_step(obj, ..., out_dir, max_new_tokens, label)``: clip_by_position.png (CTPO Fig. 1),
  weight_histograms.png (SNIB Fig. 2), grad_norm_by_length.png (SNIB Table 4a) and, for a
  shaping with ``uses_rule``, gradient_weight.png (DGPO Fig. 2).

Shapes: logp, old_logp, mask are (B, T) (mask 1 on counted tokens); advantages (B,) or (B, T);
group_ids (B,) ints or None (one group). Without advantages, a clip counts on either side of the
window (both signs of A are tried): the CTPO Fig. 1 clip rate; with them, only where the clip is
active (the PPO/TRL clip fraction).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch

from ratiorl.objectives import WEIGHTS, Objective, objective

from .diagnostics_plots import plot_clip_by_position, plot_grad_norm_by_length, plot_gradient_weights, plot_weight_histograms

LOG_RATIO_CLAMP = 20.0  # the objectives' default clamp of per-token log-ratios
_ABSENT = object()


# ----------------------------------------------------------------------------- building blocks


def log_ratios(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """delta_t = clamp(logp - old_logp, -20, 20), 0 on padding; float32 or wider, no gradient."""
    dt = torch.promote_types(logp.dtype, torch.float32)
    m = mask.to(dt)
    d = (logp.detach().to(dt) - old_logp.detach().to(dt)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.where(m > 0, d, torch.zeros_like(d))


def positions(mask: torch.Tensor) -> torch.Tensor:
    """pos_t = cumsum(mask): 1-based count of valid tokens up to t (CTPO sec. 3.3), long."""
    return mask.to(torch.long).cumsum(-1)


@functools.lru_cache(maxsize=256)
def _preset(name: str, **kw) -> Objective:
    """``ratiorl.objective(name, **kw)``, without the KL term unless ``beta`` is given, built once
    per argument set."""
    return objective(name, **{"beta": 0.0, **kw})


def _clean(logp, old_logp, mask):
    """Detached inputs with 0 on padding (so NaN/inf padding never takes the slow path)."""
    m = mask > 0
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    return torch.where(m, logp.detach(), zero), torch.where(m, old_logp.detach(), zero.to(old_logp.dtype)), m


@torch.no_grad()
def _call(obj, logp, old_logp, adv, mask, group_ids, **kw):
    return obj(logp, old_logp, adv, mask, group_ids=group_ids, return_details=True, **kw)


@torch.no_grad()
def _clipped(obj, logp, old_logp, adv, mask, group_ids):
    """((B, T) float 0/1 clipped tokens, output). Without ``adv``: the union over A = +1 (above the
    window) and A = -1 (below it), i.e. the weight is outside the window on either side."""
    if adv is not None:
        out = _call(obj, logp, old_logp, adv, mask, group_ids)
        return out.details.clipped_by_token, out
    ones = torch.ones(logp.shape[0], dtype=logp.dtype, device=logp.device)
    up = _call(obj, logp, old_logp, ones, mask, group_ids)
    down = _call(obj, logp, old_logp, -ones, mask, group_ids)
    return ((up.details.clipped_by_token + down.details.clipped_by_token) > 0).to(logp.dtype), up


@functools.lru_cache(maxsize=64)
def _without_kl(obj: Objective) -> Objective:
    """The policy term of ``obj`` (diagnostics have no reference log-probs)."""
    return obj if obj.beta == 0 else obj.replace(beta=0.0)


def _shared(obj, names) -> dict:
    """The options of ``obj`` among ``names`` (to build a counterfactual with the same window)."""
    out = {}
    for k in names:
        v = obj.option(k, _ABSENT) if obj is not None else _ABSENT
        if v is not _ABSENT:
            out[k] = v
    return out


def _scope(group_ids):
    return {"normalize_scope": "group" if group_ids is not None else "batch"}


def self_normalized_log_weights(log_w: torch.Tensor, group_ids: torch.Tensor | None = None) -> torch.Tensor:
    """log w~_i = log w_i - log wbar_g, wbar_g = mean of w over the group (SNIB Alg. 1 lines 6-9);
    a group of one gets log w~ = 0. Without group ids the whole batch is one group. Computed by the
    ``snib`` objective on one-token sequences with log-ratio log_w (no clamp)."""
    lw = log_w.detach()
    lw = lw if lw.is_floating_point() else lw.float()
    sn = _preset("snib", shaping="none", log_ratio_clamp=math.inf, **_scope(group_ids))
    ones = torch.ones(lw.shape[0], 1, dtype=lw.dtype, device=lw.device)
    out = _call(sn, lw[:, None], torch.zeros_like(ones), torch.zeros_like(lw), ones, group_ids)
    return out.details.log_weight


def _group_index(group_ids: torch.Tensor | None, B: int, device) -> tuple[torch.Tensor, int]:
    if group_ids is None:
        return torch.zeros(B, dtype=torch.long, device=device), 1
    _, inv = torch.unique(group_ids, return_inverse=True)
    return inv, int(inv.max()) + 1 if B else 0


def _group_logsumexp(x: torch.Tensor, gid: torch.Tensor, n_groups: int) -> torch.Tensor:
    mx = torch.full((n_groups,), -math.inf, dtype=x.dtype, device=x.device)
    mx = mx.scatter_reduce(0, gid, x, reduce="amax", include_self=True)
    s = torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add_(0, gid, (x - mx[gid]).exp())
    return mx + s.log()


def ess(log_w: torch.Tensor, group_ids: torch.Tensor | None = None) -> float:
    """Normalised effective sample size (sum w)^2 / (n sum w^2) in (0, 1] of given log weights
    (in log space: 2 lse(log w) - lse(2 log w) - log n). With group ids: the mean over groups of
    each group's normalised ESS (what self-normalisation within a group sees)."""
    if log_w.numel() == 0:
        return float("nan")
    lw = log_w.detach().double()
    gid, n = _group_index(group_ids, lw.shape[0], lw.device)
    size = torch.zeros(n, dtype=lw.dtype, device=lw.device).index_add_(0, gid, torch.ones_like(lw))
    log_ess = 2 * _group_logsumexp(lw, gid, n) - _group_logsumexp(2 * lw, gid, n) - size.log()
    return float(log_ess.exp().mean())


# ----------------------------------------------------------------------------- clip by position


def clip_fraction_by_position(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    advantages: torch.Tensor | None = None,
    weight: str = "cumulative",
    clip_low: float | None = 0.2,
    clip_high: float | None = 0.2,
    pos_clip_low: float = 0.025,
    pos_clip_high: float = 0.05,
    pos_power: float = 0.5,
    obj: Objective | None = None,
    group_ids: torch.Tensor | None = None,
) -> dict:
    """Per-position clip rates of a token-level weight (``cumulative``: CTPO's log rho_t = S_t)
    under the fixed window [1 - clip_low, 1 + clip_high] (the ``ctpo_fixed`` objective with a
    plain clip) and the position-adaptive window [-lo_t, hi_t] on the log-ratio, lo_t =
    pos_clip_low * pos_t^p, hi_t = pos_clip_high * pos_t^p (the ``ctpo`` objective, CTPO sec. 3.3);
    with ``obj`` (and its ``group_ids``), also the clip rate of that objective (``clip_frac_objective``).
    Returns lists of length Tmax: ``position``, ``count``, ``clip_frac_fixed``,
    ``clip_frac_adaptive``, ``log_ratio_mean`` / ``log_ratio_std`` (of the log weight).
    """
    if WEIGHTS.lookup(weight).level != "token":
        raise ValueError(f"weight must be a token-level weight, got {weight!r}")
    logp, old_logp, m = _clean(logp, old_logp, mask)
    adv = None if advantages is None else advantages.detach()
    fixed = _preset("ctpo_fixed", weight=weight, shaping="clip", clip_low=clip_low, clip_high=clip_high)
    adaptive = _preset("ctpo", weight=weight, pos_clip_low=pos_clip_low, pos_clip_high=pos_clip_high,
                       pos_power=pos_power)
    c_fixed, out = _clipped(fixed, logp, old_logp, adv, mask, None)
    c_adapt, _ = _clipped(adaptive, logp, old_logp, adv, mask, None)
    x = out.details.log_weight
    dt = x.dtype
    pos = positions(mask)
    Tmax = int(pos.max()) if pos.numel() else 0
    idx = (pos - 1).clamp_min(0)[m]  # position bucket of each valid token
    cnt = torch.zeros(Tmax, dtype=dt, device=x.device).index_add_(0, idx, torch.ones_like(x[m]))

    def per_pos(v):
        return torch.zeros(Tmax, dtype=dt, device=x.device).index_add_(0, idx, v[m].to(dt))

    c = cnt.clamp_min(1.0)
    mean = per_pos(x) / c
    var = (per_pos(x * x) / c - mean**2).clamp_min(0.0) * cnt / (cnt - 1).clamp_min(1.0)
    res = dict(
        position=list(range(1, Tmax + 1)),
        count=cnt.tolist(),
        clip_frac_fixed=(per_pos(c_fixed) / c).tolist(),
        clip_frac_adaptive=(per_pos(c_adapt) / c).tolist(),
        log_ratio_mean=mean.tolist(),
        log_ratio_std=var.sqrt().tolist(),
    )
    if obj is not None:
        c_obj, _ = _clipped(_without_kl(obj), logp, old_logp, adv, mask, group_ids)
        res["clip_frac_objective"] = (per_pos(c_obj) / c).tolist()
        res["objective"] = obj.name
    return res


# ----------------------------------------------------------------------------- weight histograms


def weight_histograms(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    *,
    clip: float = 0.2,
) -> dict:
    """Sequence log weights of vanilla IS (the ``vanilla_is`` objective) and self-normalised ones
    (``snib``) of one batch (SNIB Fig. 2), with their normalised ESS and the fraction of
    normalised weights inside [1 - clip, 1 + clip] (SNIB: "> 95% unchanged")."""
    logp, old_logp, _ = _clean(logp, old_logp, mask)
    zeros = torch.zeros(logp.shape[0], dtype=logp.dtype, device=logp.device)
    raw = _call(_preset("vanilla_is", shaping="none"), logp, old_logp, zeros, mask, group_ids)
    sn = _preset("snib", clip_low=clip, clip_high=clip, **_scope(group_ids))
    outside, sn_out = _clipped(sn, logp, old_logp, None, mask, group_ids)
    valid = mask.to(logp.dtype).sum(-1) > 0
    gids = group_ids[valid] if group_ids is not None else None
    lw, lsn = raw.details.log_weight[valid], sn_out.details.log_weight[valid]
    inside = 1.0 - outside.amax(-1)[valid]
    return dict(
        log_w=lw.cpu(),
        log_w_normalized=lsn.cpu(),
        ess_raw=raw.metrics["ess"] if lw.numel() else float("nan"),  # the whole batch: what unnormalised IS sees
        ess_raw_group=ess(lw, gids),
        ess_normalized=ess(lsn, gids),  # equals ess_raw_group: ESS is scale-free within a group
        ess_normalized_batch=sn_out.metrics["ess"] if lw.numel() else float("nan"),  # after normalisation
        frac_unclipped=float(inside.mean()) if inside.numel() else float("nan"),
    )


# ----------------------------------------------------------------------------- F(r) curves


def gradient_weight(rule, r: torch.Tensor, advantage_sign: float, **overrides) -> torch.Tensor:
    """F(r) of a ``weighted`` rule name (with its preset's bounds, or grpo's for ``hard``, unless
    overridden), or of an ``Objective`` (its shaping and options on the token ratio), measured
    through the library: with old_logp = 0 and logp = log r, one token per sequence and token_mean
    over one token, d loss / d logp = -A F(r), so F = -(d loss / d logp) / A."""
    if advantage_sign == 0:
        raise ValueError("advantage_sign must be nonzero (F multiplies A)")
    if isinstance(rule, str):
        from ratiorl.objectives import PRESETS  # noqa: PLC0415

        base = rule if rule in PRESETS else "grpo"  # the preset of that name carries the rule's bounds
        obj = _preset(base, weight="token", shaping="weighted", rule=rule, aggregation="token_mean", **overrides)
    else:
        obj = rule.replace(weight="token", aggregation="token_mean", beta=0.0, **overrides)
    r = torch.as_tensor(r, dtype=torch.float32).reshape(-1)
    logp = r.log()[:, None].clone().requires_grad_(True)
    A = torch.full((r.numel(),), float(advantage_sign))
    B = r.numel()
    out = obj(logp, torch.zeros_like(logp), A, torch.ones_like(logp), group_ids=torch.arange(B), num_tokens=1)
    (g,) = torch.autograd.grad(out.loss, logp)
    return -(g[:, 0] / A).detach()


# ----------------------------------------------------------------------------- grad norm by length


def per_sequence_grad_norms(loss: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """||d loss / d logp_i||_2 over each sequence's valid tokens, (B,): the size of sequence i's
    share of the policy gradient in log-prob space (one autograd call; graph is retained)."""
    (g,) = torch.autograd.grad(loss, logp, retain_graph=True)
    return token_grads_to_norms(g, mask)


def token_grads_to_norms(grads: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    g = grads.detach().double()
    if mask is not None:
        g = g * mask.to(g.dtype)
    return g.pow(2).sum(-1).sqrt()


def grad_norm_by_length(
    grad_norms: torch.Tensor,
    lengths: torch.Tensor,
    buckets: Sequence[int] = (128, 512),
    log_w: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> dict:
    """Per-sequence gradient norms grouped by response length (SNIB Table 4a: <=128, 129-512, >512).

    ``grad_norms``: (B,) norms, or (B, T) per-token loss gradients (reduced with ``mask``).
    ``buckets``: upper edges; a last open bucket is added. ``log_w`` (B,): if given, also
    corr(length, |log w|) (Table 4a's length correlation of the weight magnitude).
    Returns ``labels``, ``count``, ``mean``, ``std`` (sample std, nan for < 2), ``corr_length_abs_log_w``.
    """
    gn = grad_norms.detach().double()
    if gn.dim() == 2:
        gn = token_grads_to_norms(gn, mask)
    L = lengths.detach().double()
    edges = [0, *buckets, math.inf]
    labels, counts, means, stds = [], [], [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (L > lo) & (L <= hi) if lo > 0 else L <= hi
        labels.append(f"<={hi}" if lo == 0 else (f">{lo}" if hi == math.inf else f"{lo + 1}-{hi}"))
        v = gn[sel]
        counts.append(int(v.numel()))
        means.append(float(v.mean()) if v.numel() else float("nan"))
        stds.append(float(v.std()) if v.numel() > 1 else float("nan"))
    out = dict(labels=labels, count=counts, mean=means, std=stds)
    if log_w is not None:
        out["corr_length_abs_log_w"] = _corr(L, log_w.detach().double().abs())
    return out


def _corr(x: torch.Tensor, y: torch.Tensor) -> float:
    if x.numel() < 2:
        return float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    den = float(xc.norm() * yc.norm())
    return float(xc @ yc) / den if den > 0 else float("nan")


from .diagnostics_step import plot_step, step_scalars  # noqa: E402 - uses the helpers above

__all__ = [
    "log_ratios", "positions", "self_normalized_log_weights", "ess", "clip_fraction_by_position",
    "weight_histograms", "gradient_weight", "per_sequence_grad_norms", "token_grads_to_norms",
    "grad_norm_by_length", "step_scalars", "plot_step", "plot_clip_by_position", "plot_weight_histograms",
    "plot_gradient_weights", "plot_grad_norm_by_length",
]
