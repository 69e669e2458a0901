"""Metrics and per-element details of one objective call (docs/objectives.md, "Metrics").

Everything here runs under ``no_grad`` after the loss is built; the metrics are moved to the host
with a single ``.tolist()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class ObjectiveDetails:
    """Per-element tensors of one call (``return_details=True``), all detached.

    ``weight``: the importance weight, (B, T) for a token-level weight, (B,) for a sequence-level
    one; ``log_weight``: its log; ``level``: "token" | "sequence"; ``mask``: (B, T) float, 1 on
    counted tokens (0 on dropped sequences); ``clipped_low`` / ``clipped_high`` / ``clipped_dual``:
    bool, weight-shaped, where that bound is active on a valid element (None when the shaping
    never clips); ``clipped_by_token``: (B, T) float 0/1, clipped low or high (sequence clips
    broadcast to their tokens); ``token_kl``: (B, T) per-token KL of the estimator or None.
    """

    weight: torch.Tensor
    log_weight: torch.Tensor
    level: str
    mask: torch.Tensor
    clipped_low: Optional[torch.Tensor]
    clipped_high: Optional[torch.Tensor]
    clipped_dual: Optional[torch.Tensor]
    clipped_by_token: torch.Tensor
    token_kl: Optional[torch.Tensor] = None
    correction: Optional[torch.Tensor] = None  # applied mismatch correction pi_old/mu (mismatch.py) or None



@torch.no_grad()
def call_metrics(obj, x, w, shaped, info, kl_tok, n_dropped, corr=None, keep=None, ent=None) -> dict:
    """``out.metrics`` of one objective call (floats, one host sync; see ``Objective``)."""
    level = obj.level
    xv = x.detach()
    mb = info.mask_bool if level == "token" else info.seq_valid
    m = info.mask if level == "token" else info.seq_valid.to(info.mask.dtype)
    n = m.sum().clamp_min(1.0)
    xm = xv * m
    zero = xm.new_zeros(())
    wmax = xm.max() if xm.numel() else zero
    xn = xm * (1.0 / wmax.clamp_min(1e-30))  # scaled to <= 1: sum of squares cannot overflow
    s1n = xn.sum()

    def count(c):  # valid elements where the bool mask c is set
        return torch.count_nonzero(c & mb).to(xm.dtype) if c is not None else zero

    low, high = count(shaped.clipped_low), count(shaped.clipped_high)
    vals = [low / n, high / n, s1n * wmax / n, wmax, s1n * s1n / (n * (xn * xn).sum()).clamp_min(1e-30)]
    keys = ["clip_frac_low", "clip_frac_high", "weight_mean", "weight_max", "ess"]
    if shaped.clipped_dual is not None:
        vals.append(count(shaped.clipped_dual) / n)
        keys.append("dual_clip_frac")
    if kl_tok is not None:
        vals.append((kl_tok.detach() * info.mask).sum() / info.mask.sum().clamp_min(1.0))
        keys.append("kl")
    if keep is not None:  # token selection: fraction of valid tokens that keep their policy-gradient loss
        vals.append((torch.broadcast_to(keep.detach(), info.mask.shape) * info.mask).sum().to(xm.dtype)
                    / info.mask.sum().clamp_min(1.0))
        keys.append("selection_keep_frac")
    if ent is not None:
        vals.append(ent.detach().to(xm.dtype).reshape(()))
        keys.append("entropy")
    floats = {}
    for k, v in {**(w.metrics or {}), **(corr.metrics if corr else {})}.items():  # weight's, mismatch
        if isinstance(v, torch.Tensor):
            vals.append(v.detach().to(xm.dtype).reshape(()))
            keys.append(k)
        else:
            floats[k] = float(v)
    out = dict(zip(keys, torch.stack(vals).tolist()))
    out.update(floats)
    out["clip_frac"] = out["clip_frac_low"] + out["clip_frac_high"]
    if obj.nonfinite == "mask":
        out["nonfinite_dropped"] = float(n_dropped)
    if obj.per_position_metrics:
        clipped = clipped_by_token(xv, shaped, level, info)
        out["clip_frac_by_position"] = (clipped.sum(0) / info.mask.sum(0).clamp_min(1.0)).tolist()
    return out

@torch.no_grad()
def call_details(obj, x, w, shaped, info, kl_tok, corr=None) -> ObjectiveDetails:
    """``out.details`` of one objective call (``return_details=True``)."""
    xv = x.detach()
    mb = info.mask_bool if obj.level == "token" else info.seq_valid

    def valid(c):
        return None if c is None else torch.broadcast_to(c, xv.shape) & mb

    return ObjectiveDetails(
        weight=xv, log_weight=w.log_w.detach(), level=obj.level, mask=info.mask,
        clipped_low=valid(shaped.clipped_low), clipped_high=valid(shaped.clipped_high),
        clipped_dual=valid(shaped.clipped_dual), clipped_by_token=clipped_by_token(xv, shaped, obj.level, info),
        token_kl=None if kl_tok is None else kl_tok.detach(), correction=None if corr is None else corr.c)


def clipped_by_token(xv, shaped, level, info):
    """(B, T) float 0/1: valid tokens where the low or the high bound is active (a sequence's clip
    is broadcast to its tokens)."""
    clipped = torch.zeros_like(xv)
    for c in (shaped.clipped_low, shaped.clipped_high):
        if c is not None:
            clipped = clipped + c
    if level == "sequence":
        clipped = clipped[:, None]
    return clipped * info.mask


__all__ = ["ObjectiveDetails", "call_metrics", "call_details", "clipped_by_token"]
