"""The lab's claims: statements about the estimators, each checked against the measurements.

``evaluate_claims`` turns the five experiments' results into a dict of claims, each with its
``text``, whether it ``held`` and the numbers behind it (with standard errors where sampled):
SNIB's bias falls like 1/G while GSPO's and GRPO's level off; the plain sequence weight with a
leave-one-out baseline is unbiased; with exact per-token advantages (CTPO Prop. 1) the
cumulative weight is unbiased at every KL and the token weight only on-policy; the cumulative
weight has lower variance than the sequence weight, the more so the longer the horizon and the
earlier the position (CTPO Prop. 2); and a self-check that sampling agrees with enumeration.
"""

from __future__ import annotations

from .estimators import loglog_slope, summarize


def mc_vs_exact(d, st, e, G):
    """z of the sampled mean against the exact mean (debiased squared distance over its se), and
    the sampled variance against the exact one, in standard errors."""
    m_exact = summarize(d.est, e.mean)  # the same statistics with the exact mean as 'truth'
    return m_exact.bias_z, (st.variance - e.variance(G)) / max(st.variance_se, 1e-300)


def evaluate_claims(cfg, by_G, by_kl, by_T, pos_ratio, by_reward) -> dict:
    """The claims of one lab run from the per-experiment results built by ``run_lab``."""
    st = lambda G, n: by_G[G][n][1]  # noqa: E731
    claims = {}
    Gs = sorted(by_G)
    fit = [G for G in Gs if 4 <= G <= 16]
    if len(fit) >= 2:
        ys = [st(G, "snib").bias_norm for G in fit]
        slope, se = loglog_slope(fit, ys, [st(G, "snib").bias_norm_se for G in fit])
        slope_all, se_all = loglog_slope(Gs, [max(st(G, "snib").bias_norm, 1e-12) for G in Gs],
                                         [st(G, "snib").bias_norm_se for G in Gs])
        claims["snib_bias_1_over_G"] = dict(
            text=f"SNIB (self_normalized, group-mean baseline) bias falls like 1/G: log-log slope over "
            f"G={fit[0]}..{fit[-1]} in [-1.4, -0.6]",
            held=bool(-1.4 <= slope <= -0.6),
            slope=(slope, se),
            slope_all_G=(slope_all, se_all),
            bias_by_G={G: (st(G, "snib").bias_norm, st(G, "snib").bias_norm_se) for G in Gs},
        )
    lo, hi = (4 if 4 in Gs else Gs[0]), Gs[-1]
    for n, label in (("gspo", "GSPO geometric mean"), ("grpo", "GRPO token ratio")):
        b_lo, b_hi = st(lo, n), st(hi, n)
        claims[f"{n}_bias_levels_off"] = dict(
            text=f"{label} bias levels off: at G={hi} it stays above half its G={lo} value and > 5 se above zero",
            held=bool(b_hi.bias_norm > 0.5 * b_lo.bias_norm and b_hi.bias_z > 5),
            bias_lo=(b_lo.bias_norm, b_lo.bias_norm_se),
            bias_hi=(b_hi.bias_norm, b_hi.bias_norm_se),
            z_hi=b_hi.bias_z,
        )
    zs = {G: st(G, "sequence_rloo").bias_z for G in Gs}
    claims["sequence_rloo_unbiased"] = dict(
        text="plain sequence weight with a leave-one-out baseline is unbiased: |z| < 3 at every G",
        held=bool(all(abs(z) < 3 for z in zs.values())),
        z_by_G=zs,
    )
    kls = sorted(by_kl)
    zc = {by_kl[k][0]: by_kl[k][1]["cumulative"][1].bias_z for k in kls}
    ec = {by_kl[k][0]: by_kl[k][2]["cumulative"].bias_norm for k in kls}
    gnorm = max(float(by_kl[k][2]["cumulative"].mean.norm()) for k in kls)
    claims["cumulative_unbiased"] = dict(
        text="with exact per-token advantages (CTPO Prop. 1) the cumulative weight is unbiased at every KL: "
        "sampled |z| < 3 and exact bias < 1e-5 |grad J| (float32 round-off)",
        held=bool(all(abs(z) < 3 for z in zc.values()) and all(b < 1e-5 * gnorm for b in ec.values())),
        z_by_kl=zc,
        exact_bias_by_kl=ec,
    )
    zt = {by_kl[k][0]: by_kl[k][1]["token"][1].bias_z for k in kls}
    et = {by_kl[k][0]: by_kl[k][2]["token"].bias_norm for k in kls}
    claims["token_biased_off_policy"] = dict(
        text="with exact per-token advantages the token weight is unbiased on-policy (|z| < 3) and biased "
        "off-policy (z > 5 at KL >= 0.1)",
        held=bool(all(abs(zt[k]) < 3 for k in zt if k == 0) and all(zt[k] > 5 for k in zt if k >= 0.1 - 1e-3)),
        z_by_kl=zt,
        exact_bias_by_kl=et,
    )
    ratio = {by_kl[k][0]: by_kl[k][2]["cumulative"].variance_one / by_kl[k][2]["sequence_token"].variance_one
             for k in kls if k > 0}
    rk = sorted(ratio)
    claims["cumulative_lower_variance"] = dict(
        text="exact total variance: cumulative < sequence (per-token form) at every KL > 0, the ratio falling as KL grows",
        held=bool(all(ratio[k] < 1 for k in rk) and all(a > b for a, b in zip([ratio[k] for k in rk], [ratio[k] for k in rk[1:]]))),
        ratio_by_kl=ratio,
    )
    checks = {}
    for k in kls:
        kl, draws, ex = by_kl[k]
        for n in ("token", "cumulative", "sequence_token"):
            checks[f"{n}@{kl:.2f}"] = mc_vs_exact(*draws[n], ex[n], cfg["token_G"])
    claims["sampling_matches_exact"] = dict(
        text="self-check: sampled batch means agree with the exact means (|z| < 3) and sampled variances with "
        "exact variances (within 4 se) at KL <= 0.4",
        held=bool(all(abs(zm) < 3 for zm, _ in checks.values())
                  and all(abs(zv) < 4 for key, (_, zv) in checks.items() if float(key.split("@")[1]) <= 0.4)),
        z_mean_and_variance={k: f"{zm:.1f}/{zv:.1f}" for k, (zm, zv) in checks.items()},
    )
    Ts = sorted(by_T)
    rT = {T: by_T[T][1]["cumulative"].variance_one / by_T[T][1]["sequence_token"].variance_one for T in Ts}
    claims["variance_gap_grows_with_T"] = dict(
        text=f"exact, at a fixed KL per position ({cfg['kl_per_position']}): the variance ratio cumulative/sequence "
        "is below 1 and falls from the shortest to the longest horizon",
        held=bool(all(r < 1 for r in rT.values()) and rT[Ts[-1]] < rT[Ts[0]]),
        ratio_by_T=rT,
    )
    half = len(pos_ratio) // 2
    claims["early_positions_gain_most"] = dict(
        text="exact, per position (CTPO Prop. 2): the cumulative weight's term has lower variance than the "
        "sequence weight's at every position but the last (where they are equal), and early positions gain more than late ones",
        held=bool(all(r < 1 for r in pos_ratio[:-1]) and abs(pos_ratio[-1] - 1) < 1e-4
                  and sum(pos_ratio[:half]) / half < sum(pos_ratio[half:]) / (len(pos_ratio) - half)),
        ratio_by_position=pos_ratio,
    )
    return claims
