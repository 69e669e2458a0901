"""An independent, deliberately plain reimplementation of the objectives for the tests
(weights, shapings, KL, aggregations as written in the papers: PPO/GRPO tutorial secs. 5-7,
DGPO eqs. 1-10, CTPO sec. 3.3, SNIB Alg. 1, GSPO).

Python loops over sequences and tokens, scalar torch ops in float64 (so autograd gives the
reference gradient). It shares no code with ``ratiorl.objectives``; it reads the hyperparameters
from an ``Objective`` only as a bag of numbers (``obj.option(name)``).
"""

from __future__ import annotations

import math

import torch


def _clampf(x, lo, hi):
    if lo is not None and x < lo:
        return x * 0 + lo
    if hi is not None and x > hi:
        return x * 0 + hi
    return x


def _min(a, b):
    return a if a <= b else b


def _max(a, b):
    return a if a >= b else b


def _F(rule, r, a, l, u, o):
    """Gradient weight F of the weighted family, region by region (DGPO sec. 3, Table 1)."""
    below = l is not None and r < l
    above = u is not None and r > u
    LN, HP, LP, HN = below and a < 0, above and a > 0, below and a > 0, above and a < 0
    if rule == "hard":
        return 0.0 if (LN or HP) else r
    if rule == "cispo":
        return _clampf(r, l, u)
    if rule == "gppo":
        return l if LN else (u if HP else r)
    if rule == "ce_gppo":
        return o.beta1 * l if LN else (o.beta2 * u if HP else r)
    if rule == "aspo":
        if LN or HP:
            return 0.0
        if LP:
            return (1 - o.aspo_clip_low) if r < 1 - o.aspo_clip_low else min(1 / r, 1 + o.aspo_clip_high)
        if HN:
            return min(r, 1 + o.aspo_clip_high)
        return 1 / r if a > 0 else r
    if rule == "dgpo":
        if LN:
            return r ** (o.n + 1) / l ** o.n
        if HP:
            return u ** (1 / o.m) * r ** (1 - 1 / o.m)
        return r
    raise KeyError(rule)


def _shape(o, x, a, pos, lp_term):
    """Per-element loss for weight value x (0-dim tensor with its gradient path)."""
    l = None if o.option("clip_low") is None else 1 - o.clip_low
    u = None if o.option("clip_high") is None else 1 + o.clip_high
    if o.shaping == "none":
        return -x * a
    if o.shaping in ("clip", "dual_clip"):
        L = -_min(x * a, _clampf(x, l, u) * a)
        if o.shaping == "dual_clip" and a < 0:
            L = _min(L, -o.dual_clip * a + 0 * x)
        return L
    if o.shaping == "position_clip":
        lo = o.pos_clip_low * pos ** o.pos_power
        hi = o.pos_clip_high * pos ** o.pos_power
        ct = o.pos_dual_clip * pos ** o.pos_power
        xt = torch.exp(_clampf(torch.log(x), -lo, hi))
        L = _max(-x * a, -xt * a)
        if a < 0:
            L = _min(L, -a * math.exp(ct) + 0 * x)
        return L
    if o.shaping == "gate":
        tau = o.tau_pos if a > 0 else o.tau_neg
        return -(4 / tau) * torch.sigmoid(tau * (x - 1)) * a
    if o.shaping == "weighted":
        r = float(x.detach())
        below = l is not None and r < l
        above = u is not None and r > u
        v = _clampf(r, l, u) if ((below and a < 0) or (above and a > 0)) else r
        F = _F(o.rule, r, a, l, u, o)
        return -a * (v + F * (lp_term - lp_term.detach()))
    raise KeyError(o.shaping)


def _kl(o, lp, rf, tk):
    if o.kl_estimator == "exact":
        return tk
    d = rf - lp
    if o.kl_estimator == "k1":
        return -d
    if o.kl_estimator == "k2":
        return 0.5 * d * d
    return torch.exp(d) - d - 1


def reference_loss(o, logp, old, adv, mask, group_ids=None, ref=None, token_kl=None,
                   num_tokens=None, num_sequences=None):
    B, T = logp.shape
    toks = [[t for t in range(T) if mask[i, t] > 0] for i in range(B)]
    lens = [len(ti) for ti in toks]
    Bp = num_sequences if num_sequences is not None else B
    N = num_tokens if num_tokens is not None else max(sum(lens), 1)
    maxT = o.option("max_tokens") if o.option("max_tokens") is not None else T

    def adv_of(i, t):
        return float(adv[i]) if adv.dim() == 1 else float(adv[i, t])

    d = [[logp[i, t] - old[i, t] for t in toks[i]] for i in range(B)]
    seq_level = o.weight in ("sequence", "geometric", "self_normalized", "self_normalized_fg")

    # ---- sequence-level weights, one per sequence
    xs = [None] * B
    if seq_level:
        u = [sum(d[i], torch.zeros((), dtype=logp.dtype)) for i in range(B)]
        for i in range(B):
            if o.weight == "sequence":
                xs[i] = torch.exp(u[i])
            elif o.weight == "geometric":
                xs[i] = torch.exp(u[i] / max(lens[i], 1))
            else:
                members = [j for j in range(B) if lens[j] > 0 and
                           (o.normalize_scope == "batch" or int(group_ids[j]) == int(group_ids[i]))]
                wbar = sum(torch.exp(u[j]) for j in members) / len(members) if lens[i] > 0 else torch.ones(())
                if o.weight == "self_normalized":
                    wbar = wbar.detach()
                xs[i] = torch.exp(u[i]) / wbar

    # ---- per-token loss and KL
    per_tok = [[None] * lens[i] for i in range(B)]
    seq_loss = [None] * B
    kls = [[None] * lens[i] for i in range(B)]
    for i in range(B):
        if seq_level:
            if lens[i] == 0:
                seq_loss[i] = torch.zeros((), dtype=logp.dtype)
                continue
            a = adv_of(i, None) if adv.dim() == 1 else sum(adv_of(i, t) for t in toks[i]) / lens[i]
            seq_loss[i] = _shape(o, xs[i], a, None, u[i])
        S = torch.zeros((), dtype=logp.dtype)
        for k, t in enumerate(toks[i]):
            lp = logp[i, t]
            if o.beta > 0:
                kls[i][k] = _kl(o, lp, None if ref is None else ref[i, t], None if token_kl is None else token_kl[i, t])
            if seq_level:
                continue
            if o.weight == "token":
                x = torch.exp(d[i][k])
            elif o.weight == "geometric_token":
                s = torch.exp(sum(d[i]) / lens[i]).detach()
                x = s * torch.exp(lp - lp.detach())
            elif o.weight == "sequence_token":
                x = torch.exp(sum(d[i])).detach() * torch.exp(lp - lp.detach())
            elif o.weight == "cumulative":
                x = torch.exp(S.detach() + d[i][k])
            else:
                raise KeyError(o.weight)
            S = S + d[i][k]
            per_tok[i][k] = _shape(o, x, adv_of(i, t), k + 1, d[i][k])

    # ---- KL placement inside the loss
    def x_of(i, k):
        return xs[i] if seq_level else None

    if o.beta > 0 and o.kl_placement in ("loss", "loss_is"):
        for i in range(B):
            for k, t in enumerate(toks[i]):
                kl = kls[i][k]
                if o.kl_placement == "loss_is":
                    if seq_level:
                        kl = kl * xs[i]
                    else:  # recompute the token weight
                        kl = kl * _token_weight(o, d[i], k, logp[i, toks[i][k]], lens[i])
                if seq_level:
                    kls[i][k] = kl
                else:
                    per_tok[i][k] = per_tok[i][k] + o.beta * kl

    zero = torch.zeros((), dtype=logp.dtype)
    if seq_level and o.aggregation != "sequence":
        per_tok = [[seq_loss[i] for _ in toks[i]] for i in range(B)]
        if o.beta > 0 and o.kl_placement in ("loss", "loss_is"):
            per_tok = [[per_tok[i][k] + o.beta * kls[i][k] for k in range(lens[i])] for i in range(B)]

    if o.aggregation == "sequence":
        tot = zero
        for i in range(B):
            if lens[i] == 0:
                continue
            if seq_level:
                Li = seq_loss[i]
                if o.beta > 0 and o.kl_placement in ("loss", "loss_is"):
                    Li = Li + o.beta * sum(kls[i]) / lens[i]
            else:
                Li = sum(per_tok[i]) / lens[i]
            tot = tot + Li
        loss = tot / Bp
    elif o.aggregation == "seq_mean_token_mean":
        loss = sum((sum(per_tok[i]) / lens[i] for i in range(B) if lens[i] > 0), zero) / Bp
    elif o.aggregation == "token_mean":
        loss = sum((sum(per_tok[i]) for i in range(B) if lens[i] > 0), zero) / N
    elif o.aggregation == "seq_mean_token_sum_norm":
        loss = sum((sum(per_tok[i]) for i in range(B) if lens[i] > 0), zero) / (Bp * maxT)
    elif o.aggregation == "seq_mean_token_sum":
        loss = sum((sum(per_tok[i]) for i in range(B) if lens[i] > 0), zero) / Bp
    else:
        raise KeyError(o.aggregation)

    if o.beta > 0 and o.kl_placement == "is_weighted":
        K = sum((xs[i] * sum(kls[i]) / lens[i] for i in range(B) if lens[i] > 0), zero) / Bp
        loss = loss + o.beta * K
    return loss


def _token_weight(o, d_i, k, lp, n):
    if o.weight == "token":
        return torch.exp(d_i[k])
    if o.weight == "geometric_token":
        return torch.exp(sum(d_i) / n).detach() * torch.exp(lp - lp.detach())
    if o.weight == "sequence_token":
        return torch.exp(sum(d_i)).detach() * torch.exp(lp - lp.detach())
    if o.weight == "cumulative":
        return torch.exp(sum(d_i[:k]).detach() + d_i[k]) if k > 0 else torch.exp(d_i[0])
    raise KeyError(o.weight)


def reference_gae(rewards, values, mask, gamma, lam):
    """Plain-loop GAE: outcome reward on the last valid token, terminal after it."""
    B, T = values.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        toks = [t for t in range(T) if mask[i, t] > 0]
        n = len(toks)
        lam_i = float(lam[i]) if torch.is_tensor(lam) and lam.dim() == 1 else float(lam)
        running = 0.0
        for k in range(n - 1, -1, -1):
            t = toks[k]
            r = float(rewards[i]) if k == n - 1 else 0.0
            v_next = float(values[i, toks[k + 1]]) if k + 1 < n else 0.0
            delta = r + gamma * v_next - float(values[i, t])
            running = delta + gamma * lam_i * running
            out[i, t] = running
    return out
