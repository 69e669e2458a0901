"""The two diagnostics entry points the trainer calls every step / at each eval:
``step_scalars`` and ``plot_step`` (see ``ratiorl.report.diagnostics``)."""

from __future__ import annotations

import os

import torch

from .diagnostics import (
    _call,
    _clean,
    _clipped,
    _corr,
    _preset,
    _scope,
    _shared,
    _without_kl,
    clip_fraction_by_position,
    ess,
    grad_norm_by_length,
    per_sequence_grad_norms,
    positions,
    weight_histograms,
)
from .diagnostics_plots import plot_clip_by_position, plot_grad_norm_by_length, plot_gradient_weights, plot_weight_histograms

_WINDOW = ("clip_low", "clip_high")
_POS_WINDOW = ("pos_clip_low", "pos_clip_high", "pos_power", "pos_dual_clip")


def _early_late(clipped, mask, pos):
    """Clip rate among valid tokens in the first / second half of the longest response."""
    m = mask.to(clipped.dtype)
    half = pos.max().clamp_min(1).to(clipped.dtype) / 2 if pos.numel() else clipped.new_tensor(1.0)
    early = m * (pos.to(clipped.dtype) <= half).to(m.dtype)
    late = m - early
    return (clipped * early).sum() / early.sum().clamp_min(1.0), (clipped * late).sum() / late.sum().clamp_min(1.0)


def _stats(x, prefix):
    nan = x.new_tensor(float("nan"))
    return {f"{prefix}_mean": x.mean() if x.numel() else nan, f"{prefix}_std": x.std() if x.numel() > 1 else nan,
            f"{prefix}_max": x.max() if x.numel() else nan, f"{prefix}_min": x.min() if x.numel() else nan}


@torch.no_grad()
def step_scalars(obj, logp, old_logp, advantages, mask, group_ids=None, *, prefix: str = "") -> dict[str, float]:
    """Cheap scalars for one training step, every one from an objective call (keys with ``prefix``):

    objective_<metric>             the training objective's own metrics without its KL term
                                   (clip_frac, weight_mean, weight_max, ess, the weight's own
                                   metrics, ...) and objective_clip_frac_early / _late
    log_ratio_mean / _std / _absmax    token log-ratios (the ``token`` weight) over valid tokens
    token_clip_frac                the token ratio under the objective's clip window (grpo's clip)
    cumulative_clip_frac           the cumulative ratio, same fixed window (ctpo_fixed with a
                                   plain clip: CTPO's problem), and _early / _late (first / second
                                   half of the longest response: CTPO Fig. 1 in two numbers)
    cumulative_clip_frac_adaptive  the cumulative ratio, position-adaptive window (ctpo: CTPO's fix)
    seq_log_w_mean / _std / _max / _min    sequence log weights (vanilla_is)
    sn_log_w_std / sn_weight_max   self-normalised sequence weights (snib, per group)
    ess_raw / ess_group / ess_geometric    normalised ESS of the sequence weights over the batch,
                                   mean within groups, and of the geometric weight (gspo)
    kl_k1 / kl_k3                  token means of the k1 / k3 estimators of KL(pi_old || pi_theta)
                                   under the sampler (the library's estimators, pi_old as policy)
    length_mean / corr_length_abs_log_w
    """
    logp, old_logp, m = _clean(logp, old_logp, mask)
    adv = None if advantages is None else advantages.detach()
    B = logp.shape[0]
    dt = torch.promote_types(logp.dtype, torch.float32)
    pos = positions(mask)
    vals, out = {}, {}

    own_clip, own = _clipped(_without_kl(obj), logp, old_logp, adv, mask, group_ids)
    for k, v in own.metrics.items():
        if isinstance(v, float):
            out[f"objective_{k}"] = v
    vals["objective_clip_frac_early"], vals["objective_clip_frac_late"] = _early_late(own_clip, mask, pos)

    window = _shared(obj, _WINDOW)
    tok_clip, tok = _clipped(_preset("grpo", **window), logp, old_logp, adv, mask, None)
    d = tok.details.log_weight[m]
    n_tok = m.sum().clamp_min(1).to(dt)
    nan = torch.tensor(float("nan"), dtype=dt, device=logp.device)
    vals["log_ratio_mean"] = d.mean() if d.numel() else nan
    vals["log_ratio_std"] = d.std() if d.numel() > 1 else nan
    vals["log_ratio_absmax"] = d.abs().max() if d.numel() else nan
    vals["token_clip_frac"] = tok_clip.sum() / n_tok
    cum, _ = _clipped(_preset("ctpo_fixed", shaping="clip", **window), logp, old_logp, adv, mask, None)
    vals["cumulative_clip_frac"] = cum.sum() / n_tok
    cum_a, _ = _clipped(_preset("ctpo", **_shared(obj, _POS_WINDOW)), logp, old_logp, adv, mask, None)
    vals["cumulative_clip_frac_adaptive"] = cum_a.sum() / n_tok
    vals["cumulative_clip_frac_early"], vals["cumulative_clip_frac_late"] = _early_late(cum, mask, pos)

    zeros = torch.zeros(B, dtype=logp.dtype, device=logp.device)
    lengths = mask.to(dt).sum(-1)
    valid = lengths > 0
    raw = _call(_preset("vanilla_is", shaping="none"), logp, old_logp, zeros, mask, group_ids)
    sn = _call(_preset("snib", shaping="none", **_scope(group_ids)), logp, old_logp, zeros, mask, group_ids)
    geo = _call(_preset("gspo", shaping="none"), logp, old_logp, zeros, mask, group_ids)
    log_w, lsn = raw.details.log_weight[valid], sn.details.log_weight[valid]
    vals.update(_stats(log_w, "seq_log_w"))
    vals["sn_log_w_std"] = lsn.std() if lsn.numel() > 1 else nan
    vals["sn_weight_max"] = lsn.max().exp() if lsn.numel() else nan
    vals["length_mean"] = lengths.mean() if lengths.numel() else nan
    # KL(pi_old || pi_theta) under the sampler: the estimators with pi_old as the policy, pi_theta as reference
    for est in ("k1", "k3"):
        kl_obj = _preset("grpo", shaping="none", kl_estimator=est, beta=1.0)
        vals[f"kl_{est}"] = torch.tensor(_call(kl_obj, old_logp, old_logp, zeros, mask, None,
                                               ref_logp=logp).metrics["kl"], dtype=dt)

    keys = list(vals)
    host = torch.stack([vals[k].to(torch.float64).reshape(()) for k in keys]).tolist()  # one transfer
    out.update(zip(keys, host))
    has = bool(valid.any())
    gids = group_ids[valid] if group_ids is not None else None
    out["ess_raw"] = raw.metrics["ess"] if has else float("nan")
    out["ess_group"] = ess(log_w, gids) if has else float("nan")
    out["ess_geometric"] = geo.metrics["ess"] if has else float("nan")
    out["corr_length_abs_log_w"] = _corr(lengths[valid].double().cpu(), log_w.double().abs().cpu())
    return {prefix + k: float(v) for k, v in out.items()}


def plot_step(obj, logp, old_logp, advantages, mask, group_ids=None, *, out_dir: str, max_new_tokens: int,
              label: str = "") -> list[str]:
    """Write the diagnostics plots of one batch into ``out_dir`` and return their paths:
    clip_by_position.png (CTPO Fig. 1, with the objective's own clip rate), weight_histograms.png
    (SNIB Fig. 2), grad_norm_by_length.png (SNIB Table 4a: per-sequence gradient norm of the
    objective's policy term in log-prob space, buckets at max_new_tokens / 4 and / 2) and, when the
    objective's shaping ``uses_rule``, gradient_weight.png (DGPO Fig. 2: its F(r)). May raise."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    window = {k: v for k, v in _shared(obj, _WINDOW + _POS_WINDOW).items() if k != "pos_dual_clip"}
    curve = clip_fraction_by_position(logp, old_logp, mask, advantages=advantages, obj=obj, group_ids=group_ids,
                                      **window)
    paths.append(plot_clip_by_position(curve, os.path.join(out_dir, "clip_by_position.png"), labels=[label]))
    clip = obj.option("clip_low")
    hist = weight_histograms(logp, old_logp, mask, group_ids, clip=clip if clip is not None else 0.2)
    paths.append(plot_weight_histograms(hist, os.path.join(out_dir, "weight_histograms.png"),
                                        objective=obj.name, label=label))
    lp, old, _ = _clean(logp, old_logp, mask)
    lp = lp.clone().requires_grad_(True)
    with torch.enable_grad():
        pg = _without_kl(obj)(lp, old, advantages.detach(), mask, group_ids=group_ids)
        norms = per_sequence_grad_norms(pg.loss, lp, mask)
    M = int(max_new_tokens)
    by_len = grad_norm_by_length(norms, mask.sum(1), buckets=sorted({max(1, M // 4), max(1, M // 2)}))
    paths.append(plot_grad_norm_by_length(by_len, os.path.join(out_dir, "grad_norm_by_length.png"),
                                          objective=obj.name, label=label))
    if getattr(obj.entry("shaping"), "uses_rule", False):
        paths.append(plot_gradient_weights([obj], os.path.join(out_dir, "gradient_weight.png")))
    return paths


__all__ = ["step_scalars", "plot_step"]
