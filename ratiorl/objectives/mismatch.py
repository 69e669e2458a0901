"""Sampler/trainer mismatch: correct for mu (the behaviour policy that sampled the tokens) != pi_old
(the proximal policy the trust region is measured against) (docs/objectives.md, "Sampler/trainer
mismatch").

Three registries, in the library's style (keyword-only parameters are options, ``register(...)``
keywords are capabilities):

- ``MISMATCH_LEVELS``: ``fn(d, info, *, <options>) -> log_w``, registered with ``level`` ("token":
  log_w is (B, T); "sequence": (B,); None for ``none``) and optionally ``needs_groups``. ``d`` is the
  per-token log-ratio log pi_old - log mu, detached, clamped to +-log_ratio_clamp, 0 on padding.
- ``MISMATCH_MODES``: ``fn(log_w, d, info, level, *, <options>) -> ModeResult`` registered with
  ``action`` ("truncated" | "masked" | "rejected", the word of the metrics and docs).
- ``PROXIMALS``: ``fn(logp, behaviour_logp, behaviour_version, policy_version) -> old_logp``,
  registered with ``needs_versions``; used when ``old_logp`` is None.

The correction c = pi_old / mu (after the mode) is detached and multiplies the per-element
policy-gradient loss; everything stays in log space until the mode has bounded the weight.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch

from .._registry import Registry
from .weights import _log_group_mean_exp

MISMATCH_LEVELS = Registry("mismatch_level")
MISMATCH_MODES = Registry("mismatch_mode")
PROXIMALS = Registry("proximal")

NORMALIZERS = ("none", "batch")
DIVERGENCES = ("k1_mean", "k1_max", "k2_mean", "k2_max", "k3_mean", "k3_max")
POSITIVE_LOGP_TOL = 1e-4  # behaviour log-probs above this on a valid token are an input error


class ModeResult(NamedTuple):
    log_c: torch.Tensor  # log of the applied weight, shaped like log_w (its value where dropped is unused)
    keep: torch.Tensor | None  # bool, broadcastable to log_w ((B, 1) for a token-level rejection), or None
    affected: torch.Tensor  # bool, shaped like log_w: truncated / masked / rejected elements


# ----------------------------------------------------------------------------- levels


@MISMATCH_LEVELS.register("none", level=None)
def none(d, info):
    return None


@MISMATCH_LEVELS.register("token", level="token")
def token(d, info):
    # TIS / IcePop / MIS: one ratio pi_old(y_t|s_t) / mu(y_t|s_t) per token
    return d


@MISMATCH_LEVELS.register("cumulative", level="token")
def cumulative(d, info):
    # CTPO Prop. 1 applied to mu -> pi_old: the prefix product prod_{k<=t} pi_old/mu (per-decision IS)
    return torch.cumsum(d, dim=1)


@MISMATCH_LEVELS.register("geometric", level="sequence")
def geometric(d, info):
    # per-sequence geometric mean exp(mean_t d_t) (GSPO's length normalisation; verl seq_mean_k1)
    return d.sum(1) / info.lengths.clamp_min(1.0)


@MISMATCH_LEVELS.register("sequence", level="sequence")
def sequence(d, info):
    # the full sequence ratio pi_old(y) / mu(y) = exp(sum_t d_t): unbiased, high variance
    return d.sum(1)


def _scope_is_group(o):
    return o["mismatch_scope"] == "group"


@MISMATCH_LEVELS.register("self_normalized", level="sequence", needs_groups=_scope_is_group)
def self_normalized(d, info, *, mismatch_scope: str = "group"):
    # SNIB Alg. 1 lines 6-9 applied to mu -> pi_old: w_i / mean_{j in g(i)} w_j, in log space
    u = d.sum(1)
    log_w = u - _log_group_mean_exp(u, info, mismatch_scope, detach_norm=True)
    return torch.where(info.seq_valid, log_w, torch.zeros_like(log_w))


# ----------------------------------------------------------------------------- modes


def _log(v: float) -> float:
    return math.log(v) if v > 0 else -math.inf


@MISMATCH_MODES.register("truncate", action="truncated")
def truncate(log_w, d, info, level, *, mismatch_low: float = 0.0, mismatch_high: float = 2.0):
    # TIS (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training"):
    # c = min(w, high), and max(., low) when low > 0 (TRL *_truncate with clip_min)
    lo, hi = _log(mismatch_low), math.log(mismatch_high)
    return ModeResult(log_w.clamp(lo, hi), None, (log_w > hi) | (log_w < lo))


@MISMATCH_MODES.register("mask", action="masked")
def mask(log_w, d, info, level, *, mismatch_low: float = 0.5, mismatch_high: float = 2.0):
    # IcePop (token band) / MIS (sequence mask): c = w inside [low, high], 0 outside
    lo, hi = _log(mismatch_low), math.log(mismatch_high)
    inside = (log_w >= lo) & (log_w <= hi)
    return ModeResult(log_w.clamp(max=hi), inside, ~inside)


def divergence(d, info, kind: str) -> torch.Tensor:
    """Per-sequence estimate of KL(mu || pi_old) from d = log pi_old - log mu sampled under mu:
    ``k1`` = -d, ``k2`` = d^2 / 2, ``k3`` = e^d - 1 - d (Schulman 2020), ``mean`` or ``max`` over
    valid tokens (0 for an empty response)."""
    est, red = kind.split("_")
    tok = {"k1": lambda: -d, "k2": lambda: 0.5 * d * d, "k3": lambda: torch.expm1(d) - d}[est]()
    if red == "mean":
        return info.seq_mean(tok)
    m = torch.where(info.mask_bool, tok, tok.new_full((), -math.inf)).amax(1)
    return torch.where(info.seq_valid, m, torch.zeros_like(m))


@MISMATCH_MODES.register("reject", action="rejected")
def reject(log_w, d, info, level, *, mismatch_low: float = 0.5, mismatch_high: float = 2.0,
           mismatch_divergence: str | None = None):
    # drop the whole sequence when any token weight (token levels) or the sequence weight is
    # outside [low, high] (geometric: verl's geometric rejection), or, with mismatch_divergence,
    # when that per-sequence divergence exceeds mismatch_high (verl rollout_rs seq_mean_k3, ...)
    if mismatch_divergence is not None:
        bad = divergence(d, info, mismatch_divergence) > mismatch_high
    else:
        lo, hi = _log(mismatch_low), math.log(mismatch_high)
        outside = (log_w < lo) | (log_w > hi)
        bad = (outside & info.mask_bool).any(1) if level == "token" else outside
    keep = ~bad
    if level == "token":
        return ModeResult(log_w, keep[:, None], bad[:, None].expand_as(log_w))
    return ModeResult(log_w, keep, bad)


# ----------------------------------------------------------------------------- proximal policy


@PROXIMALS.register("none", needs_versions=False)
def proximal_none(logp, behaviour_logp, behaviour_version, policy_version):
    # the usual two-policy case: pi_old = mu
    return behaviour_logp


@PROXIMALS.register("loglinear", needs_versions=True)
def proximal_loglinear(logp, behaviour_logp, behaviour_version, policy_version):
    # AReaL's proximal approximation (docs/algorithms/prox_approx.md in AReaL):
    # log pi_prox = log mu + alpha (log pi_theta - log mu), alpha = (v_prox - v_mu) / (v_theta - v_mu),
    # with v_prox = policy_version and v_theta = policy_version + 1
    v = torch.as_tensor(behaviour_version, device=logp.device)
    if v.dim() != 1 or v.shape[0] != logp.shape[0] or v.is_floating_point():
        raise ValueError(f"behaviour_version must be a (B,) = ({logp.shape[0]},) integer tensor, "
                         f"got {tuple(v.shape)} {v.dtype}")
    lag = (int(policy_version) - v).to(behaviour_logp.dtype)
    if bool((lag < 0).any()):
        raise ValueError(f"behaviour_version must be <= policy_version={policy_version} (a row cannot be "
                         f"sampled by weights newer than pi_old), got max {int(v.max())}")
    alpha = (lag / (lag + 1.0))[:, None]
    return behaviour_logp + alpha * (logp.detach().to(behaviour_logp.dtype) - behaviour_logp)


# ----------------------------------------------------------------------------- checks


def check_mismatch_options(o: dict) -> None:
    """Range checks of the mismatch options (keyed by name, on one entry's resolved options)."""
    if "mismatch_high" in o or "mismatch_low" in o:
        lo, hi = o.get("mismatch_low", 0.0), o.get("mismatch_high", 1.0)
        if not (isinstance(hi, (int, float)) and 0 < hi < math.inf):
            raise ValueError(f"mismatch_high must be a finite number > 0, got {hi}")
        if not (isinstance(lo, (int, float)) and 0 <= lo):
            raise ValueError(f"mismatch_low must be a number >= 0, got {lo}")
        if o.get("mismatch_divergence") is None and lo > hi:
            raise ValueError(f"mismatch_low must be <= mismatch_high, got mismatch_low={lo} > mismatch_high={hi}")
    if o.get("mismatch_divergence") is not None and o["mismatch_divergence"] not in DIVERGENCES:
        raise ValueError(f"mismatch_divergence must be None or one of {', '.join(DIVERGENCES)}, "
                         f"got {o['mismatch_divergence']!r}")
    if "mismatch_scope" in o and o["mismatch_scope"] not in ("group", "batch"):
        raise ValueError(f"mismatch_scope must be 'group' or 'batch', got {o['mismatch_scope']!r}")


def check_mismatch_fields(fields: dict):
    """The mismatch scalars of an objective; returns the selected proximal entry."""
    if fields["mismatch_normalize"] not in NORMALIZERS:
        raise ValueError(f"mismatch_normalize must be one of {', '.join(NORMALIZERS)}, got {fields['mismatch_normalize']!r}")
    return PROXIMALS.lookup(fields["proximal"])


_warned_ignored = False


def resolve_old_logp(obj, logp, old_logp, behaviour_logp, behaviour_version, policy_version):
    """(old_logp, behaviour_logp or None): pi_old from the proximal method when ``old_logp`` is
    None; ``behaviour_logp`` checked and returned only when the objective corrects the mismatch."""
    global _warned_ignored
    if behaviour_logp is not None:
        if not isinstance(behaviour_logp, torch.Tensor) or not behaviour_logp.is_floating_point():
            raise ValueError(f"behaviour_logp must be a floating-point torch.Tensor, got {type(behaviour_logp).__name__}")
        if isinstance(logp, torch.Tensor) and tuple(behaviour_logp.shape) != tuple(logp.shape):
            raise ValueError(f"behaviour_logp has shape {tuple(behaviour_logp.shape)} but logp has shape "
                             f"{tuple(logp.shape)}; both must be (B, T)")
        behaviour_logp = behaviour_logp.detach()
    prox = obj.entry("proximal")
    if behaviour_logp is None and obj.uses_mismatch:
        raise ValueError(f"mismatch_level={obj.mismatch_level!r} needs behaviour_logp (B, T): the log-probs of the "
                         "sampled tokens under the sampler (mu)")
    if old_logp is None:
        if behaviour_logp is None:
            raise ValueError("old_logp is None: pass old_logp (pi_old), or behaviour_logp (log mu of the sampled "
                             "tokens) to use the behaviour policy (or proximal='loglinear') as pi_old")
        if prox.needs_versions and (behaviour_version is None or policy_version is None):
            raise ValueError(f"proximal={obj.proximal!r} needs behaviour_version (B,) and policy_version (int)")
        old_logp = prox(logp, behaviour_logp, behaviour_version, policy_version)
    elif prox.needs_versions:
        raise ValueError(f"proximal={obj.proximal!r} computes pi_old from behaviour_logp and the policy versions; "
                         "pass old_logp=None")
    if not obj.uses_mismatch:
        if behaviour_logp is not None and old_logp is not behaviour_logp and not prox.needs_versions \
                and not _warned_ignored:
            _warned_ignored = True
            warnings.warn("behaviour_logp is ignored because mismatch_level='none'; set mismatch_level "
                          "(token, cumulative, geometric, sequence, self_normalized) to correct for the "
                          "sampler/trainer mismatch", UserWarning, stacklevel=3)
        return old_logp, None
    return old_logp, behaviour_logp


# ----------------------------------------------------------------------------- the correction


class Correction(NamedTuple):
    c: torch.Tensor  # applied correction, detached: (B, T) token level, (B,) sequence level; 0 on padding / dropped
    level: str  # "token" | "sequence"
    metrics: dict  # name -> 0-dim tensor


def _buckets(T: int):
    out, a = [], 1
    for k in range(2, 12):
        b = 4 ** k
        if a > T:
            break
        out.append((a, b))
        a = b + 1
    return out


def correction(obj, old_logp, behaviour_logp, info, cd) -> Correction:
    """The detached correction c = pi_old / mu of ``obj``'s level and mode, and its metrics."""
    entries, opts = obj._entries, obj._opts
    level_fn, mode_fn = entries["mismatch_level"], entries["mismatch_mode"]
    valid = info.mask_bool
    mu = behaviour_logp.to(cd)
    d = old_logp.detach().to(cd) - mu
    finite = torch.isfinite(d)
    n_bad, n_pos = torch.stack([(~finite & valid).sum(), ((mu > POSITIVE_LOGP_TOL) & valid).sum()]).tolist()
    if n_pos:
        raise ValueError(f"behaviour_logp has {int(n_pos)} positive value(s) on valid tokens (max "
                         f"{float(mu[valid].max()):.3g}); it must hold log-probabilities (<= 0) of the sampled tokens")
    bad_rows = None
    if n_bad:
        if obj.nonfinite != "mask":
            rows = (~finite & valid).any(1).nonzero().flatten()[:8].tolist()
            raise ValueError(f"behaviour_logp contains NaN/inf at {int(n_bad)} valid position(s) (rows {rows}); fix "
                             "the sampler's log-probs or pass nonfinite='mask' to drop those sequences from the loss")
        bad_rows = (~finite & valid).any(1)
        d = torch.where(finite, d, torch.zeros_like(d))
    clamp = obj.log_ratio_clamp
    d = d.clamp(-clamp, clamp) * info.mask
    if getattr(level_fn, "needs_groups", False) and info.group_ids is None \
            and _needs_groups(level_fn, opts["mismatch_level"]):
        raise ValueError(f"mismatch_level={obj.mismatch_level!r} normalises within groups and needs group_ids (B,); "
                         "pass group_ids=... or set mismatch_scope='batch'")
    level = level_fn.level
    log_w = level_fn(d, info, **opts["mismatch_level"])
    res = mode_fn(log_w, d, info, level, **opts["mismatch_mode"])
    c = torch.exp(res.log_c.clamp(max=clamp))
    vm = info.mask if level == "token" else info.seq_valid.to(cd)
    keep = res.keep
    if bad_rows is not None:
        ok = ~bad_rows[:, None] if level == "token" else ~bad_rows
        keep = ok if keep is None else keep & ok
    c = c * vm if keep is None else c * keep * vm
    n = vm.sum().clamp_min(1.0)
    if obj.mismatch_normalize == "batch":  # verl rollout_is_batch_normalize: mean 1 over the call's valid elements
        mean = c.sum() / n
        c = torch.where(mean > 1e-8, c / mean.clamp_min(1e-8), c)
    metrics = _metrics(d, log_w, res, c, vm, n, level, info, bad_rows, clamp)
    return Correction(c, level, metrics)


def _needs_groups(fn, options):
    v = getattr(fn, "needs_groups", False)
    return v(options) if callable(v) else v


def _metrics(d, log_w, res, c, vm, n, level, info, bad_rows, clamp):
    vb = vm > 0
    lw = torch.where(vb, log_w, log_w.new_full((), -math.inf))
    log_n = torch.log(n)
    lse1, lse2 = torch.logsumexp(lw.flatten(), 0), torch.logsumexp(2 * lw.flatten(), 0)
    lwc = lw.clamp(max=clamp)
    aff = res.affected if level == "token" else res.affected[:, None]
    aff = aff & info.mask_bool
    if bad_rows is not None:
        aff = aff | (bad_rows[:, None] & info.mask_bool)
    n_tok = info.mask.sum().clamp_min(1.0)
    n_seq = info.seq_valid.sum().clamp_min(1).to(c.dtype)
    k3 = (torch.expm1(d) - d) * info.mask
    m = {
        "mismatch_weight_mean": torch.exp(torch.logsumexp(lwc.flatten(), 0) - log_n),
        "mismatch_weight_max": torch.exp(lwc.max()) if lwc.numel() else c.new_zeros(()),
        "mismatch_ess": torch.exp((2 * lse1 - log_n - lse2).clamp(max=0.0)),
        "mismatch_applied_mean": c.sum() / n,
        "mismatch_token_frac": aff.sum() / n_tok,
        "mismatch_seq_frac": aff.any(1).sum() / n_seq,
        "mismatch_kl_k1": -(d * info.mask).sum() / n_tok,
        "mismatch_kl_k3": k3.sum() / n_tok,
    }
    if not bool(vb.any()):  # no valid element: neutral values instead of exp(-inf) / NaN
        m["mismatch_ess"] = m["mismatch_weight_mean"] = c.new_ones(())
    pos = info.pos
    for a, b in _buckets(info.T):
        sel = info.mask * ((pos >= a) & (pos <= b))
        m[f"mismatch_k3_pos_{a}_{b}"] = (k3 * sel).sum() / sel.sum().clamp_min(1.0)
    return m


def apply_correction(L: torch.Tensor, corr: Correction) -> torch.Tensor:
    """``L * c`` with the levels broadcast: a sequence loss times a token correction becomes (B, T)."""
    c = corr.c
    if c.dim() == L.dim():
        return L * c
    return L[:, None] * c if c.dim() == 2 else L * c[:, None]


__all__ = [
    "MISMATCH_LEVELS",
    "MISMATCH_MODES",
    "PROXIMALS",
    "Correction",
    "ModeResult",
    "apply_correction",
    "check_mismatch_fields",
    "check_mismatch_options",
    "correction",
    "divergence",
    "resolve_old_logp",
]
