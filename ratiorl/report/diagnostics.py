"""Training diagnostics of importance weights and clipping (the trainer calls these every step;
they work as well on a saved batch).

- ``step_scalars``: cheap scalars for every step (log-ratio spread, clip fractions of the token
  and cumulative ratios, fixed vs position-adaptive, sequence-weight spread, ESS, KL estimates,
  length correlation);
- ``clip_fraction_by_position`` / ``plot_clip_by_position``: per-position clip rate of the
  cumulative log-ratio under a fixed and a position-adaptive window, and its std (CTPO Fig. 1);
- ``weight_histograms`` / ``plot_weight_histograms``: log sequence weights before and after
  self-normalisation, with their ESS (SNIB Fig. 2);
- ``gradient_weight`` / ``plot_gradient_weights``: the gradient weight F(r) of every ``weighted``
  rule, measured by autograd through the library's objective (DGPO Fig. 2);
- ``grad_norm_by_length`` / ``plot_grad_norm_by_length``: per-sequence gradient norms by response
  length bucket, and corr(length, |log w|) (SNIB Table 4a).

Shapes follow SPEC section 1: logp, old_logp, mask are (B, T) (right padding, mask 1 on counted
tokens); advantages (B,) or (B, T); group_ids (B,) ints. Nothing here needs gradients except
``gradient_weight`` and ``per_sequence_grad_norms``; everything else runs under ``no_grad``.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

LOG_RATIO_CLAMP = 20.0  # as the objectives (SPEC section 7)


# ----------------------------------------------------------------------------- building blocks


def log_ratios(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """delta_t = clamp(logp - old_logp, -20, 20), 0 on padding; float32 or wider, no gradient."""
    dt = torch.promote_types(logp.dtype, torch.float32)
    m = mask.to(dt)
    d = (logp.detach().to(dt) - old_logp.detach().to(dt)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.where(m > 0, d, torch.zeros_like(d))


def positions(mask: torch.Tensor) -> torch.Tensor:
    """pos_t = cumsum(mask): 1-based count of valid tokens up to t (SPEC section 1), long."""
    return mask.to(torch.long).cumsum(-1)


def _group_index(group_ids: torch.Tensor | None, B: int, device) -> tuple[torch.Tensor, int]:
    if group_ids is None:
        return torch.zeros(B, dtype=torch.long, device=device), 1
    _, inv = torch.unique(group_ids, return_inverse=True)
    return inv, int(inv.max()) + 1 if B else 0


def _group_logsumexp(x: torch.Tensor, gid: torch.Tensor, n_groups: int) -> torch.Tensor:
    """logsumexp of x over each group, (n_groups,), stable (max shift per group)."""
    mx = torch.full((n_groups,), -math.inf, dtype=x.dtype, device=x.device)
    mx = mx.scatter_reduce(0, gid, x, reduce="amax", include_self=True)
    s = torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add_(0, gid, (x - mx[gid]).exp())
    return mx + s.log()


def self_normalized_log_weights(log_w: torch.Tensor, group_ids: torch.Tensor | None = None) -> torch.Tensor:
    """log w~_i = log w_i - log wbar_g, wbar_g = mean of w over the group (SNIB Alg. 1 lines 6-9);
    a group of one gets log w~ = 0. Without group ids the whole batch is one group."""
    gid, n = _group_index(group_ids, log_w.shape[0], log_w.device)
    size = torch.zeros(n, dtype=log_w.dtype, device=log_w.device).index_add_(0, gid, torch.ones_like(log_w))
    log_mean = _group_logsumexp(log_w, gid, n) - size.log()
    return log_w - log_mean[gid]


def ess(log_w: torch.Tensor, group_ids: torch.Tensor | None = None) -> float:
    """Normalised effective sample size (sum w)^2 / (n sum w^2) in (0, 1], from log weights
    (computed in log space: 2 lse(log w) - lse(2 log w) - log n). With group ids: the mean over
    groups of each group's normalised ESS (what self-normalisation within a group sees)."""
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
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    pos_clip_low: float = 0.025,
    pos_clip_high: float = 0.05,
    pos_power: float = 0.5,
) -> dict:
    """Per-position clip rates of the ``cumulative`` (CTPO: log rho_t = S_t = sum_{k<=t} delta_k)
    or ``token`` (log r_t = delta_t) log-ratio, under

    - the fixed window [1 - clip_low, 1 + clip_high] on the ratio, and
    - the position-adaptive window [-lo_t, hi_t] on the log-ratio, lo_t = pos_clip_low * pos_t^p,
      hi_t = pos_clip_high * pos_t^p (CTPO sec. 3.3; SPEC ``position_clip``).

    Without ``advantages`` a token counts as clipped when its ratio is outside the window (the
    CTPO Fig. 1 clip rate); with them, only where the clip is active (A > 0 above the window,
    A < 0 below it: the PPO/TRL clip fraction). Positions are 1-based valid-token counts.
    Returns lists of length Tmax: ``position``, ``count``, ``clip_frac_fixed``,
    ``clip_frac_adaptive``, ``log_ratio_std`` (std of the log-ratio at that position),
    ``log_ratio_mean``.
    """
    if weight not in ("cumulative", "token"):
        raise ValueError(f"weight must be 'cumulative' or 'token', got {weight!r}")
    with torch.no_grad():
        d = log_ratios(logp, old_logp, mask)
        m = mask.to(d.dtype) > 0
        x = d.cumsum(-1) if weight == "cumulative" else d
        pos = positions(mask)
        Tmax = int(pos.max()) if pos.numel() else 0
        lo_f = math.log(1.0 - clip_low) if clip_low is not None and clip_low < 1 else -math.inf
        hi_f = math.log(1.0 + clip_high) if clip_high is not None else math.inf
        pw = pos.to(d.dtype).clamp_min(1.0) ** pos_power
        lo_a, hi_a = -pos_clip_low * pw, pos_clip_high * pw
        below_f, above_f = x < lo_f, x > hi_f
        below_a, above_a = x < lo_a, x > hi_a
        if advantages is not None:
            A = advantages.detach().to(d.dtype)
            A = A[:, None].expand_as(d) if A.dim() == 1 else A
            below_f, above_f = below_f & (A < 0), above_f & (A > 0)
            below_a, above_a = below_a & (A < 0), above_a & (A > 0)
        idx = (pos - 1).clamp_min(0)[m]  # position bucket of each valid token
        cnt = torch.zeros(Tmax, dtype=d.dtype, device=d.device).index_add_(0, idx, torch.ones_like(x[m]))

        def per_pos(v):
            return torch.zeros(Tmax, dtype=d.dtype, device=d.device).index_add_(0, idx, v[m].to(d.dtype))

        c = cnt.clamp_min(1.0)
        mean = per_pos(x) / c
        var = (per_pos(x * x) / c - mean**2).clamp_min(0.0) * cnt / (cnt - 1).clamp_min(1.0)
        out = dict(
            position=list(range(1, Tmax + 1)),
            count=cnt.tolist(),
            clip_frac_fixed=(per_pos(below_f | above_f) / c).tolist(),
            clip_frac_adaptive=(per_pos(below_a | above_a) / c).tolist(),
            log_ratio_mean=mean.tolist(),
            log_ratio_std=var.sqrt().tolist(),
        )
    return out


# ----------------------------------------------------------------------------- weight histograms


def weight_histograms(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    *,
    clip: float = 0.2,
) -> dict:
    """Sequence log weights log w_i = sum_t delta_t (vanilla IS) and self-normalised log weights
    log w~_i = log w_i - log wbar_g (SNIB) of one batch (SNIB Fig. 2), with their normalised ESS
    and the fraction of normalised weights inside [1 - clip, 1 + clip] (SNIB: "> 95% unchanged")."""
    with torch.no_grad():
        log_w = log_ratios(logp, old_logp, mask).sum(-1)
        valid = mask.to(log_w.dtype).sum(-1) > 0
        gids = group_ids[valid] if group_ids is not None else None
        lw = log_w[valid]
        lsn = self_normalized_log_weights(lw, gids)
        inside = ((lsn >= math.log(1 - clip)) & (lsn <= math.log(1 + clip))).to(lw.dtype)
        return dict(
            log_w=lw.cpu(),
            log_w_normalized=lsn.cpu(),
            ess_raw=ess(lw),  # the whole batch: what unnormalised IS sees
            ess_raw_group=ess(lw, gids),
            ess_normalized=ess(lsn, gids),  # equals ess_raw_group: ESS is scale-free within a group
            ess_normalized_batch=ess(lsn),  # the whole batch after per-group normalisation
            frac_unclipped=float(inside.mean()) if inside.numel() else float("nan"),
        )


# ----------------------------------------------------------------------------- F(r) curves


def _weighted_objective(rule: str, **overrides):
    import ratiorl
    from ratiorl.objectives import PRESETS

    base = rule if rule in PRESETS.names() else "grpo"  # 'hard' has no preset of its own
    kw = dict(weight="token", shaping="weighted", rule=rule, aggregation="token_mean", beta=0.0)
    kw.update(overrides)
    return ratiorl.objective(base, **kw)


def gradient_weight(rule, r: torch.Tensor, advantage_sign: float, **overrides) -> torch.Tensor:
    """F(r) of a ``weighted`` rule (or of any token-level ``Objective`` passed as ``rule``),
    measured through the library: with old_logp = 0 and logp = log r, one token per sequence and
    token_mean over one token, d loss / d logp = -A F(r), so F = -(d loss / d logp) / A.
    Bounds and rule constants are the rule's preset defaults unless overridden."""
    if advantage_sign == 0:
        raise ValueError("advantage_sign must be nonzero (F multiplies A)")
    obj = rule if not isinstance(rule, str) else _weighted_objective(rule, **overrides)
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
        if lo == 0:
            labels.append(f"<={hi}")
        elif hi == math.inf:
            labels.append(f">{lo}")
        else:
            labels.append(f"{lo + 1}-{hi}")
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


# ----------------------------------------------------------------------------- per-step scalars


def step_scalars(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor | None = None,
    group_ids: torch.Tensor | None = None,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    pos_clip_low: float = 0.025,
    pos_clip_high: float = 0.05,
    pos_power: float = 0.5,
    prefix: str = "diag/",
) -> dict[str, float]:
    """Cheap scalars for every training step (one host transfer). Keys (with ``prefix``):

    log_ratio_mean / log_ratio_std / log_ratio_absmax   token log-ratios delta over valid tokens
    token_clip_frac            token ratio outside [1-clip_low, 1+clip_high] (active only, with A)
    cumulative_clip_frac       cumulative ratio, same fixed window (CTPO's problem)
    cumulative_clip_frac_adaptive   cumulative ratio, position-adaptive window (CTPO's fix)
    cumulative_clip_frac_early / _late   fixed window, positions in the first / second half of
                               the longest response (CTPO Fig. 1 in two numbers)
    seq_log_w_mean / _std / _max / _min    log w_i = sum_t delta_t
    sn_log_w_std / sn_weight_max           self-normalised (per group) sequence weights
    ess_raw / ess_group / ess_geometric    normalised ESS of w over the batch, mean within groups,
                               and of the geometric-mean weight exp(mean_t delta) over the batch
    kl_k1 / kl_k3              token means of old - logp and of exp(d) - d - 1, d = logp - old:
                               estimates of KL(pi_old || pi_theta) per token under the sampler
    length_mean / corr_length_abs_log_w
    """
    with torch.no_grad():
        d = log_ratios(logp, old_logp, mask)
        m = mask.to(d.dtype)
        n_tok = m.sum().clamp_min(1.0)
        lengths = m.sum(-1)
        valid = lengths > 0
        S = d.cumsum(-1)
        lo_f = math.log(1.0 - clip_low) if clip_low is not None else -math.inf
        hi_f = math.log(1.0 + clip_high) if clip_high is not None else math.inf
        pos = positions(mask).to(d.dtype)
        pw = pos.clamp_min(1.0) ** pos_power

        def outside(x, lo, hi):
            below, above = x < lo, x > hi
            if advantages is not None:
                A = advantages.detach().to(d.dtype)
                A = A[:, None].expand_as(d) if A.dim() == 1 else A
                below, above = below & (A < 0), above & (A > 0)
            return (below | above).to(d.dtype) * m

        tok = outside(d, lo_f, hi_f)
        cum = outside(S, lo_f, hi_f)
        cum_a = outside(S, -pos_clip_low * pw, pos_clip_high * pw)
        nan = d.new_tensor(float("nan"))
        half = pos.max().clamp_min(1.0) / 2 if pos.numel() else d.new_tensor(1.0)
        early = m * (pos <= half).to(d.dtype)
        late = m - early
        log_w = d.sum(-1)[valid]
        gids = group_ids[valid] if group_ids is not None else None
        lsn = self_normalized_log_weights(log_w, gids) if log_w.numel() else log_w
        log_geo = log_w / lengths[valid].clamp_min(1.0)
        dm = d[m > 0]
        kl3 = (d.exp() - d - 1) * m
        vals = dict(
            log_ratio_mean=dm.mean() if dm.numel() else nan,
            log_ratio_std=dm.std() if dm.numel() > 1 else nan,
            log_ratio_absmax=dm.abs().max() if dm.numel() else nan,
            token_clip_frac=tok.sum() / n_tok,
            cumulative_clip_frac=cum.sum() / n_tok,
            cumulative_clip_frac_adaptive=cum_a.sum() / n_tok,
            cumulative_clip_frac_early=(cum * early).sum() / early.sum().clamp_min(1.0),
            cumulative_clip_frac_late=(cum * late).sum() / late.sum().clamp_min(1.0),
            seq_log_w_mean=log_w.mean() if log_w.numel() else nan,
            seq_log_w_std=log_w.std() if log_w.numel() > 1 else nan,
            seq_log_w_max=log_w.max() if log_w.numel() else nan,
            seq_log_w_min=log_w.min() if log_w.numel() else nan,
            sn_log_w_std=lsn.std() if lsn.numel() > 1 else nan,
            sn_weight_max=lsn.max().exp() if lsn.numel() else nan,
            kl_k1=-(d * m).sum() / n_tok,
            kl_k3=kl3.sum() / n_tok,
            length_mean=lengths.mean() if lengths.numel() else nan,
        )
        keys = list(vals)
        host = torch.stack([vals[k].to(torch.float64).reshape(()) for k in keys]).tolist()  # one transfer
        out = {prefix + k: float(v) for k, v in zip(keys, host)}
        out[prefix + "ess_raw"] = ess(log_w) if log_w.numel() else float("nan")
        out[prefix + "ess_group"] = ess(log_w, gids) if log_w.numel() else float("nan")
        out[prefix + "ess_geometric"] = ess(log_geo) if log_w.numel() else float("nan")
        out[prefix + "corr_length_abs_log_w"] = _corr(lengths[valid].double().cpu(), log_w.double().abs().cpu())
    return out


# ----------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_path, plt):
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.88, wspace=0.28)
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path


def plot_clip_by_position(curves, out_path: str, labels: Iterable[str] | None = None) -> str:
    """CTPO Fig. 1: std of the cumulative log-ratio per position (with the sqrt(t) fit) and the
    clip rate per position under the fixed and the adaptive window. ``curves``: one dict from
    ``clip_fraction_by_position`` or a list of them (e.g. one per training step)."""
    plt = _plt()
    curves = [curves] if isinstance(curves, dict) else list(curves)
    labels = list(labels) if labels is not None else [f"#{i}" for i in range(len(curves))]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for i, (c, lab) in enumerate(zip(curves, labels)):
        t = torch.tensor(c["position"], dtype=torch.float64)
        sd = torch.tensor(c["log_ratio_std"], dtype=torch.float64)
        col = f"C{i % 10}"
        ax[0].plot(t, sd, color=col, label=lab)
        if len(t) and float((t * t).sum()) > 0:
            k = float((sd * t.sqrt()).sum() / t.sum())  # least-squares fit of sd = k sqrt(t)
            ax[0].plot(t, k * t.sqrt(), color=col, ls=":", lw=1)
        ax[1].plot(t, c["clip_frac_fixed"], color=col, label=f"{lab} fixed")
        ax[1].plot(t, c["clip_frac_adaptive"], color=col, ls="--", label=f"{lab} adaptive")
    ax[0].set(xlabel="position t", ylabel="std of log ρ_t", title="cumulative log-ratio spread (dotted: k√t fit)")
    ax[1].set(xlabel="position t", ylabel="clip rate", title="clip rate per position: fixed vs adaptive")
    for a in ax:
        a.grid(True, alpha=0.3)
        a.legend(fontsize=7)
    return _save(fig, out_path, plt)


def plot_weight_histograms(hist: dict, out_path: str, bins: int = 50) -> str:
    """SNIB Fig. 2: histogram of the raw log sequence weights (vanilla IS) and of the
    self-normalised ones (SNIB), from ``weight_histograms``."""
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    ax[0].hist(hist["log_w"].numpy(), bins=bins, color="C3", alpha=0.8)
    ax[0].set(xlabel="log w (vanilla IS)", ylabel="sequences", title=f"raw, ESS {hist['ess_raw']:.3f}")
    ax[1].hist(hist["log_w_normalized"].numpy(), bins=bins, color="C0", alpha=0.8)
    ax[1].set(xlabel="log w~ (self-normalised)",
              title=f"SNIB, ESS {hist['ess_normalized']:.3f}, {100 * hist['frac_unclipped']:.1f}% in the clip window")
    for a in ax:
        a.grid(True, alpha=0.3)
    return _save(fig, out_path, plt)


def plot_gradient_weights(
    rules: Sequence[str],
    out_path: str,
    r_min: float = 0.2,
    r_max: float = 3.0,
    num: int = 400,
    **overrides,
) -> str:
    """DGPO Fig. 2: F(r) for A > 0 and A < 0, for each ``weighted`` rule, measured by autograd
    through the library (``gradient_weight``); bounds are each rule's preset defaults unless
    overridden (e.g. ``clip_low=0.2, clip_high=0.2``)."""
    plt = _plt()
    r = torch.linspace(r_min, r_max, num)
    fig, ax = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for i, rule in enumerate(rules):
        for j, sign in enumerate((1.0, -1.0)):
            F = gradient_weight(rule, r, sign, **overrides)
            ax[j].plot(r, F, color=f"C{i % 10}", label=rule, lw=1.4)
    for j, sign in enumerate(("A > 0", "A < 0")):
        ax[j].plot(r, r, color="gray", ls=":", lw=0.8, label="F = r (no clip)")
        ax[j].set(xlabel="ratio r", title=f"gradient weight F(r), {sign}")
        ax[j].grid(True, alpha=0.3)
    ax[0].set_ylabel("F (gradient = F · A · ∇log π)")
    ax[0].legend(fontsize=7)
    return _save(fig, out_path, plt)


def plot_grad_norm_by_length(stats, out_path: str) -> str:
    """SNIB Table 4a as a bar chart: mean ± std of per-sequence gradient norms per length bucket.
    ``stats``: one dict from ``grad_norm_by_length`` or {method name: dict} to compare methods."""
    plt = _plt()
    if "labels" in stats:
        stats = {"": stats}
    names = list(stats)
    labels = stats[names[0]]["labels"]
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, n in enumerate(names):
        s = stats[n]
        xs = [k + (i - (len(names) - 1) / 2) * width for k in range(len(labels))]
        corr = s.get("corr_length_abs_log_w")
        lab = n + (f" (corr(len,|log w|)={corr:.2f})" if corr is not None and math.isfinite(corr) else "")
        ax.bar(xs, [0 if math.isnan(v) else v for v in s["mean"]], width,
               yerr=[0 if math.isnan(v) else v for v in s["std"]], capsize=3, label=lab or None, color=f"C{i % 10}")
    ax.set_xticks(range(len(labels)), [f"{lab}\n(n={c})" for lab, c in zip(labels, stats[names[0]]["count"])])
    ax.set(xlabel="response length (tokens)", ylabel="per-sequence gradient norm", title="gradient norm by length")
    ax.grid(True, axis="y", alpha=0.3)
    if any(names):
        ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.12, right=0.98, bottom=0.18, top=0.9)
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path


__all__ = [
    "log_ratios", "positions", "self_normalized_log_weights", "ess", "clip_fraction_by_position",
    "weight_histograms", "gradient_weight", "per_sequence_grad_norms", "token_grads_to_norms",
    "grad_norm_by_length", "step_scalars", "plot_clip_by_position", "plot_weight_histograms",
    "plot_gradient_weights", "plot_grad_norm_by_length",
]
