"""The default estimator study behind ``ratiorl lab`` / ``python -m ratiorl.lab``.

Five experiments, each against the exact gradient of a small enumerable policy:

1. ``bias_vs_G``     sequence rewards, group-mean (and leave-one-out) baselines; SNIB's
                     self-normalized weight (and SNIB-fg), GSPO's geometric mean, GRPO's token
                     ratio, the plain sequence weight, shaping ``none`` and with their presets'
                     clipping; G sweep, sampled.
2. ``token_vs_kl``   exact per-token advantages A(s_t,a_t) of pi_theta (CTPO Prop. 1 estimand):
                     token, cumulative and full-sequence (per-token form) weights, plus CTPO's
                     clipped presets; sweep of the off-policy distance KL(pi_old || pi_theta);
                     exact moments, and sampled batches for the three unclipped weights.
3. ``variance_vs_T`` the three weights, horizon sweep at a fixed KL per position (exact).
4. ``by_position``   variance of each position's share of the estimate (CTPO Prop. 2, exact).
5. ``rewards``       the main comparisons again for structured and sparse 0/1 rewards.

Every estimate comes from the library's own objectives (``ratiorl.objective``) and advantages
(``ratiorl.advantages``); see ``estimators.py`` for the stacking trick and the statistics.
"""

from __future__ import annotations

import csv
import math
import os
import time
from typing import Callable

import torch

from .estimators import (
    EstimatorSpec,
    estimate,
    exact_moments,
    library_advantages,
    library_loss,
    loglog_slope,
    summarize,
)
from .tabular import make_problem

# ----------------------------------------------------------------------------- the estimators

# Aggregations are overridden so every estimator sums over tokens (token-level weights:
# seq_mean_token_sum) or over sequences (sequence-level weights: sequence) and is averaged over
# the G sequences of its batch; KL terms are switched off (beta=0): we measure the policy term.
_TOK = dict(aggregation="seq_mean_token_sum", beta=0.0)
_SEQ = dict(aggregation="sequence", beta=0.0)

SEQUENCE_REWARD_ESTIMATORS = [
    EstimatorSpec("snib", "snib", dict(weight="self_normalized", shaping="none", **_SEQ)),
    EstimatorSpec("gspo", "gspo", dict(weight="geometric", shaping="none", **_SEQ), scale="T"),
    EstimatorSpec("grpo", "grpo", dict(weight="token", shaping="none", **_TOK)),
    EstimatorSpec("sequence", "vanilla_is", dict(weight="sequence", shaping="none", **_SEQ)),
    EstimatorSpec("sequence_rloo", "vanilla_is", dict(weight="sequence", shaping="none", **_SEQ), "rloo"),
    EstimatorSpec("snib_rloo", "snib", dict(weight="self_normalized", shaping="none", **_SEQ), "rloo"),
    EstimatorSpec("snib_fg", "snib_fg", dict(weight="self_normalized_fg", shaping="none", **_SEQ)),
    # geometric_token summed over tokens has no 1/T: equals gspo (SPEC section 9, equivalence 4)
    EstimatorSpec("gspo_token", "gspo_token", dict(weight="geometric_token", shaping="none", **_TOK)),
    # the presets' own clipping (still group-mean advantages and token sums, for comparability)
    EstimatorSpec("snib_clip", "snib", dict(_SEQ)),
    EstimatorSpec("gspo_clip", "gspo", dict(_SEQ), scale="T"),
    EstimatorSpec("grpo_clip", "grpo", dict(_TOK)),
    EstimatorSpec("sequence_clip", "vanilla_is", dict(_SEQ)),
]

TOKEN_ADVANTAGE_ESTIMATORS = [
    EstimatorSpec("token", "grpo", dict(weight="token", shaping="none", **_TOK), "token_exact"),
    EstimatorSpec("cumulative", "ctpo", dict(weight="cumulative", shaping="none", **_TOK), "token_exact"),
    EstimatorSpec(
        "sequence_token", "reinforce", dict(weight="sequence_token", shaping="none", **_TOK), "token_exact"
    ),
    EstimatorSpec("ctpo_clip", "ctpo", dict(_TOK), "token_exact"),
    EstimatorSpec("ctpo_fixed_clip", "ctpo_fixed", dict(_TOK), "token_exact"),
]


def _spec(specs, name):
    return next(s for s in specs if s.name == name)


# ----------------------------------------------------------------------------- configuration

DEFAULTS = dict(
    V=3,
    T=4,  # horizon of experiments 1 and 5
    kl=0.2,  # KL(pi_old || pi_theta) of experiments 1 and 5
    reward="random",
    Gs=(2, 4, 8, 16, 32, 64),
    K=4000,  # batches per measurement (at most; see rows_per_point)
    rows_per_point=64000,  # experiment 1 uses K = min(K, max(500, rows_per_point // G)) batches
    token_T=5,  # horizon of experiment 2
    token_G=8,
    token_reward="structured",  # reward of experiments 2-4
    kls=(0.0, 0.05, 0.1, 0.2, 0.4, 0.8),
    Ts=(2, 3, 4, 5, 6),
    kl_per_position=0.08,  # experiment 3: KL = kl_per_position * T
    position_T=6,
    position_kl=0.6,
    rewards=("structured", "sparse"),  # experiment 5 (experiment 1 already uses ``reward``)
)
QUICK = dict(Gs=(4, 8, 16), K=600, kls=(0.0, 0.1, 0.4), Ts=(2, 4, 6), rewards=("sparse",))


def _row(section, problem, spec, G, K, stats, seconds, **extra):
    row = dict(
        section=section,
        reward=extra.pop("reward"),
        V=problem.tree.V,
        T=problem.tree.T,
        kl=round(problem.kl, 6),
        G=G,
        K=K,
        estimator=spec.name,
        preset=spec.preset,
        weight=spec.overrides.get("weight", "(preset)"),
        shaping=spec.overrides.get("shaping", "(preset)"),
        advantage=spec.advantage,
        grad_norm=float(problem.grad.norm()),
    )
    if stats is not None:
        row.update(stats.as_dict())
    row["seconds"] = round(seconds, 4)
    row.update(extra)
    return row


def run_lab(
    out_dir: str,
    seed: int = 0,
    quick: bool = False,
    *,
    loss_factory: Callable | None = None,
    advantages_fn: Callable | None = None,
    progress: bool = True,
    plots: bool = True,
    **kw,
) -> dict:
    """Run the estimator study and write ``results.csv``, PNG plots and ``summary.md``.

    Keyword overrides: any key of ``DEFAULTS`` (e.g. ``K=1000``, ``Gs=(4, 16)``). ``quick``
    shrinks the sweeps (a smoke run). ``loss_factory(spec) -> loss_fn`` replaces the library's
    objectives (only for testing the lab itself). Returns a dict with the claims (each with
    ``held``, the numbers and their standard errors), the rows, the runtime and the file paths.
    """
    # The lab does many small tensor ops: intra-op threads only add synchronisation (measured
    # 7x more CPU time with 2 threads than with 1 on a busy 2-core machine), so run on one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_lab(out_dir, seed, quick, loss_factory, advantages_fn, progress, plots, kw)
    finally:
        torch.set_num_threads(threads)


def _run_lab(out_dir, seed, quick, loss_factory, advantages_fn, progress, plots, kw) -> dict:
    cfg = dict(DEFAULTS)
    if quick:
        cfg.update(QUICK)
    unknown = set(kw) - set(cfg)
    if unknown:
        raise ValueError(f"unknown lab options {sorted(unknown)}; valid: {sorted(cfg)}")
    cfg.update(kw)
    os.makedirs(out_dir, exist_ok=True)
    loss_factory = loss_factory or library_loss
    advantages_fn = advantages_fn or library_advantages
    gen = torch.Generator().manual_seed(seed)
    t_start = time.perf_counter()
    rows: list[dict] = []
    K = int(cfg["K"])

    def log(msg):
        if progress:
            print(f"[lab {time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    def measure(section, problem, specs, G, reward, K):
        """All ``specs`` on the same K batches (common random numbers); returns {name: (draw, stats)}."""
        idx = torch.multinomial(problem.old_seq_probs, K * G, replacement=True, generator=gen)
        draws = {}
        for spec in specs:
            d = estimate(
                problem, spec, G, K, gen, loss_fn=loss_factory(spec), advantages_fn=advantages_fn, index=idx
            )
            st = summarize(d.est, problem.grad)
            rows.append(_row(section, problem, spec, G, K, st, d.seconds, reward=reward))
            draws[spec.name] = (d, st)
        return draws

    def exact_all(problem, specs):
        return {s.name: exact_moments(problem, s, loss_fn=loss_factory(s)) for s in specs}

    # ---- 1. bias vs G (sequence rewards)
    p1 = make_problem(cfg["V"], cfg["T"], cfg["kl"], cfg["reward"], seed=seed + 1)
    log(f"1/5 bias vs G: V={cfg['V']} T={cfg['T']} KL={p1.kl:.3f} |grad J|={float(p1.grad.norm()):.4f}")
    by_G = {}
    for G in cfg["Gs"]:
        KG = min(K, max(500, int(cfg["rows_per_point"]) // G))
        by_G[G] = measure("bias_vs_G", p1, SEQUENCE_REWARD_ESTIMATORS, G, cfg["reward"], K=KG)
        s = {n: st for n, (_, st) in by_G[G].items()}
        log(
            f"    G={G:3d} K={KG}  bias snib {s['snib'].bias_norm:.4f}  gspo {s['gspo'].bias_norm:.4f}  "
            f"grpo {s['grpo'].bias_norm:.4f}  seq+rloo {s['sequence_rloo'].bias_norm:.4f}"
        )

    # ---- 2. per-token advantages vs KL: exact moments (through the library, batches of one)
    #      plus a sampled measurement of the three plain weights (bias z-scores, and a check
    #      that the sampled variance agrees with the exact one).
    tok = TOKEN_ADVANTAGE_ESTIMATORS
    Gt = cfg["token_G"]
    by_kl = {}
    log(f"2/5 per-token advantages vs KL: T={cfg['token_T']} G={Gt} reward={cfg['token_reward']}")
    for kl in cfg["kls"]:
        p2 = make_problem(cfg["V"], cfg["token_T"], kl, cfg["token_reward"], seed=seed + 2)
        ex = exact_all(p2, tok)
        draws = measure("token_vs_kl", p2, tok[:3], Gt, cfg["token_reward"], K=K)
        for n, e in ex.items():
            rows.append(_exact_row("token_vs_kl", p2, _spec(tok, n), Gt, e, cfg["token_reward"]))
        by_kl[kl] = (p2.kl, draws, ex)
        s = {n: st for n, (_, st) in draws.items()}
        log(
            f"    KL={p2.kl:.3f}  bias token {s['token'].bias_norm:.4f} (z={s['token'].bias_z:.1f})"
            f" cumulative {s['cumulative'].bias_norm:.4f} (z={s['cumulative'].bias_z:.1f})"
            f"  exact var cum/seq {ex['cumulative'].variance_one / ex['sequence_token'].variance_one:.3f}"
        )

    # ---- 3. variance vs T (exact)
    by_T = {}
    log(f"3/5 variance vs T (exact): KL = {cfg['kl_per_position']} * T")
    for T in cfg["Ts"]:
        p3 = make_problem(cfg["V"], T, cfg["kl_per_position"] * T, cfg["token_reward"], seed=seed + 3)
        ex = exact_all(p3, tok[:3])
        for n, e in ex.items():
            rows.append(_exact_row("variance_vs_T", p3, _spec(tok, n), Gt, e, cfg["token_reward"]))
        by_T[T] = (p3.kl, ex)
        log(f"    T={T}  var cum/seq {ex['cumulative'].variance_one / ex['sequence_token'].variance_one:.3f}")

    # ---- 4. variance by position (exact)
    p4 = make_problem(cfg["V"], cfg["position_T"], cfg["position_kl"], cfg["token_reward"], seed=seed + 4)
    log(f"4/5 variance by position (exact): T={cfg['position_T']} KL={p4.kl:.3f}")
    pos_ex = exact_all(p4, tok[:3])
    pos_var = {n: e.variance_by_position for n, e in pos_ex.items()}
    for n, e in pos_ex.items():
        for t, v in enumerate(e.variance_by_position):
            rows.append(
                _row("by_position", p4, _spec(tok, n), 1, 0, None, 0.0, reward=cfg["token_reward"],
                     position=t + 1, exact_variance=v)
            )
    pos_ratio = [c / s for c, s in zip(pos_var["cumulative"], pos_var["sequence_token"])]

    # ---- 5. reward kinds
    log("5/5 reward kinds")
    by_reward = {}
    for reward in cfg["rewards"]:
        p5 = make_problem(cfg["V"], cfg["T"], cfg["kl"], reward, seed=seed + 5)
        specs = [_spec(SEQUENCE_REWARD_ESTIMATORS, n) for n in ("snib", "gspo", "grpo", "sequence_rloo")]
        draws = measure("rewards", p5, specs, 8, reward, K=K)
        ex = exact_all(p5, tok[:3])
        for n, e in ex.items():
            rows.append(_exact_row("rewards", p5, _spec(tok, n), 8, e, reward))
        by_reward[reward] = (draws, ex)
        s = {n: st for n, (_, st) in draws.items()}
        log(
            f"    {reward:10s} bias snib {s['snib'].bias_norm:.4f} gspo {s['gspo'].bias_norm:.4f} "
            f"grpo {s['grpo'].bias_norm:.4f}; exact token {ex['token'].bias_norm:.4f} "
            f"cumulative {ex['cumulative'].bias_norm:.1e}"
        )

    claims = _claims(cfg, by_G, by_kl, by_T, pos_ratio, by_reward)

    # ---- outputs
    csv_path = os.path.join(out_dir, "results.csv")
    _write_csv(csv_path, rows)
    files = {"results": csv_path}
    if plots:
        log("plots")
        from . import plots as P

        files["bias_vs_G"] = P.plot_bias_vs_G(by_G, os.path.join(out_dir, "bias_vs_G.png"), p1)
        files["variance_vs_T"] = P.plot_variance_vs_T(by_T, os.path.join(out_dir, "variance_vs_T.png"), Gt)
        files["variance_by_position"] = P.plot_variance_by_position(
            pos_var, pos_ratio, os.path.join(out_dir, "variance_by_position.png"), p4
        )
        files["token_vs_kl"] = P.plot_token_vs_kl(by_kl, Gt, os.path.join(out_dir, "token_vs_kl.png"))
    seconds = time.perf_counter() - t_start
    summary_path = os.path.join(out_dir, "summary.md")
    with open(summary_path, "w") as f:
        f.write(_summary_md(cfg, claims, by_G, by_kl, by_T, pos_ratio, by_reward, seconds, seed))
    files["summary"] = summary_path
    log(f"done in {seconds:.1f}s: {sum(c['held'] for c in claims.values())}/{len(claims)} claims held -> {out_dir}")
    return dict(claims=claims, rows=rows, seconds=seconds, files=files, config=cfg)


def _exact_row(section, problem, spec, G, e, reward):
    return _row(
        section, problem, spec, G, 0, None, 0.0, reward=reward, exact=True, bias_norm=e.bias_norm,
        variance=e.variance(G), cosine=e.cosine, relative_bias=e.bias_norm / float(problem.grad.norm()),
        mse=e.bias_norm**2 + e.variance(G),
    )


def _write_csv(path, rows):
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(r)


# ----------------------------------------------------------------------------- claims


def _mc_vs_exact(d, st, e, G):
    """z of the sampled mean against the exact mean (debiased squared distance over its se), and
    the sampled variance against the exact one, in standard errors."""
    m_exact = summarize(d.est, e.mean)  # the same statistics with the exact mean as 'truth'
    return m_exact.bias_z, (st.variance - e.variance(G)) / max(st.variance_se, 1e-300)


def _claims(cfg, by_G, by_kl, by_T, pos_ratio, by_reward) -> dict:
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
            checks[f"{n}@{kl:.2f}"] = _mc_vs_exact(*draws[n], ex[n], cfg["token_G"])
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


def _fmt(x, se=None, d=4):
    return f"{x:.{d}f}" if se is None else f"{x:.{d}f} ± {se:.{d}f}"


def _summary_md(cfg, claims, by_G, by_kl, by_T, pos_ratio, by_reward, seconds, seed) -> str:
    L = []
    L.append("# ratiorl lab: gradient estimators against the exact gradient\n")
    L.append(
        f"Seed {seed}, vocabulary V={cfg['V']}, runtime {seconds:.1f} s. Sampled measurements use K "
        "independent batches of G sequences from pi_old; every ± is one Monte Carlo standard error "
        "(`se(||b||^2)^2 = 4 b'Σb/K + 2 tr(Σ²)/K²`, delta method for ||b||). `z` is the debiased squared "
        "bias norm over its standard error: |z| < 3 is consistent with no bias. 'exact' numbers are computed "
        "by enumerating every sequence (no sampling error). See docs/lab.md for how to read this.\n"
    )
    held = sum(c["held"] for c in claims.values())
    L.append(f"## Claims ({held}/{len(claims)} held)\n")
    L.append("| claim | held | numbers |\n|---|---|---|")
    for c in claims.values():
        nums = {k: v for k, v in c.items() if k not in ("text", "held")}
        L.append(f"| {c['text']} | {'yes' if c['held'] else '**no**'} | {_nums(nums)} |")
    Gs = sorted(by_G)
    L.append(f"\n## 1. Bias vs G (sequence rewards `{cfg['reward']}`, T={cfg['T']}, KL={cfg['kl']})\n")
    L.append("Bias norm ||E[ĝ] − ∇J|| (debiased) ± se; |∇J| = "
             f"{by_G[Gs[0]]['snib'][1].bias_norm / max(by_G[Gs[0]]['snib'][1].relative_bias, 1e-300):.4f}.\n")
    names = list(by_G[Gs[0]].keys())
    L.append("| estimator | " + " | ".join(f"G={G} (K={by_G[G][names[0]][1].K})" for G in Gs) + " |")
    L.append("|---|" + "---|" * len(Gs))
    for n in names:
        L.append(f"| {n} | " + " | ".join(_fmt(by_G[G][n][1].bias_norm, by_G[G][n][1].bias_norm_se) for G in Gs) + " |")
    L.append("\nTotal variance tr Cov(ĝ) of one batch estimate ± se:\n")
    L.append("| estimator | " + " | ".join(f"G={G}" for G in Gs) + " |")
    L.append("|---|" + "---|" * len(Gs))
    for n in names:
        L.append(f"| {n} | " + " | ".join(_fmt(by_G[G][n][1].variance, by_G[G][n][1].variance_se) for G in Gs) + " |")
    L.append("\nMSE E||ĝ − ∇J||² and cosine(E[ĝ], ∇J):\n")
    L.append("| estimator | " + " | ".join(f"G={G}" for G in Gs) + " |")
    L.append("|---|" + "---|" * len(Gs))
    for n in names:
        L.append(f"| {n} | " + " | ".join(f"{by_G[G][n][1].mse:.4f} / {by_G[G][n][1].cosine:.3f}" for G in Gs) + " |")
    G2 = cfg["token_G"]
    L.append(f"\n## 2. Exact per-token advantages (CTPO Prop. 1), T={cfg['token_T']}, G={G2}, reward `{cfg['token_reward']}`\n")
    L.append("| KL | estimator | exact bias | exact variance | sampled bias | z | sampled variance | cos(E ĝ, ∇J) |")
    L.append("|---|---|---|---|---|---|---|---|")
    for k in sorted(by_kl):
        kl, draws, ex = by_kl[k]
        for n, e in ex.items():
            if n in draws:
                s = draws[n][1]
                samp = f"{_fmt(s.bias_norm, s.bias_norm_se)} | {s.bias_z:.1f} | {_fmt(s.variance, s.variance_se)}"
            else:
                samp = "– | – | –"
            L.append(f"| {kl:.3f} | {n} | {e.bias_norm:.2e} | {e.variance(G2):.5f} | {samp} | {e.cosine:.4f} |")
    L.append(f"\n## 3. Exact variance vs T (KL = {cfg['kl_per_position']} × T, G={G2})\n")
    L.append("| T | KL | token | cumulative | sequence | cumulative / sequence |\n|---|---|---|---|---|---|")
    for T in sorted(by_T):
        kl, ex = by_T[T]
        L.append(
            f"| {T} | {kl:.3f} | {ex['token'].variance(G2):.5f} | {ex['cumulative'].variance(G2):.5f} | "
            f"{ex['sequence_token'].variance(G2):.5f} | {ex['cumulative'].variance_one / ex['sequence_token'].variance_one:.3f} |"
        )
    L.append(f"\n## 4. Exact variance by position (T={cfg['position_T']}, KL={cfg['position_kl']})\n")
    L.append("| position | cumulative / sequence |\n|---|---|")
    for t, r in enumerate(pos_ratio):
        L.append(f"| {t + 1} | {r:.3f} |")
    L.append(f"\n## 5. Reward kinds (T={cfg['T']}, KL={cfg['kl']}, G=8)\n")
    L.append("| reward | estimator | bias | z | variance |\n|---|---|---|---|---|")
    for reward, (draws, ex) in by_reward.items():
        for n, (_, s) in draws.items():
            L.append(f"| {reward} | {n} (sampled) | {_fmt(s.bias_norm, s.bias_norm_se)} | {s.bias_z:.1f} | {_fmt(s.variance, s.variance_se)} |")
        for n, e in ex.items():
            L.append(f"| {reward} | {n}, exact A(s,a) (exact) | {e.bias_norm:.2e} | – | {e.variance(8):.5f} |")
    L.append("\nPlots: `bias_vs_G.png`, `variance_vs_T.png`, `variance_by_position.png`, `token_vs_kl.png`. "
             "Every measurement: `results.csv`.\n")
    return "\n".join(L) + "\n"


def _nums(d) -> str:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out.append(f"{k} {{" + ", ".join(f"{_short(kk)}: {_val(vv)}" for kk, vv in v.items()) + "}")
        elif isinstance(v, list):
            out.append(f"{k} [" + ", ".join(_val(x) for x in v) + "]")
        else:
            out.append(f"{k} = {_val(v)}")
    return "; ".join(out)


def _short(x):
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def _val(v):
    if isinstance(v, tuple):
        return "(" + ", ".join(_val(x) for x in v) + ")" if len(v) != 2 else f"{v[0]:.4g} ± {v[1]:.2g}"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)
