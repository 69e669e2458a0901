"""The default estimator study behind ``ratiorl lab`` / ``python -m ratiorl.lab``.

Six experiments, each against the exact gradient of a small enumerable policy:

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
6. ``mismatch``      a behaviour policy mu != pi_old: every mismatch level x mode (``mismatch.py``).

Every estimate comes from the library's own objectives (``ratiorl.objective``) and advantages
(``ratiorl.advantages``); see ``estimators.py`` for the stacking trick and the statistics,
``claims.py`` for what is checked and ``summary.py`` for the report.
"""

from __future__ import annotations

import csv
import os
import time
from typing import Callable

import torch

from .claims import evaluate_claims
from .estimators import (
    EstimatorSpec,
    estimate,
    exact_moments,
    library_advantages,
    library_loss,
    summarize,
)
from .mismatch import MISMATCH_DEFAULTS, MISMATCH_QUICK, run_mismatch_study
from .summary import summary_markdown
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
    # geometric_token summed over tokens (no 1/T) gives the T-scaled gspo row exactly: GSPO-token
    # has GSPO's gradient when every token carries its sequence's advantage (tutorial sec. 7.4)
    EstimatorSpec("gspo_token", "gspo_token", dict(weight="geometric_token", shaping="none", **_TOK)),
    # the presets' own clipping (still group-mean advantages and token sums, for comparability)
    EstimatorSpec("snib_clip", "snib", dict(_SEQ)),
    EstimatorSpec("gspo_clip", "gspo", dict(_SEQ), scale="T"),
    EstimatorSpec("grpo_clip", "grpo", dict(_TOK)),
    EstimatorSpec("sequence_clip", "vanilla_is", dict(_SEQ)),
    # the token-level policy gradient with other advantage estimators (docs/objectives.md, "advantages")
    EstimatorSpec("grpo_rloo", "grpo", dict(weight="token", shaping="none", **_TOK), "rloo"),
    EstimatorSpec("grpo_reinforce_pp", "grpo", dict(weight="token", shaping="none", **_TOK), "reinforce_pp"),
    EstimatorSpec("grpo_remax", "grpo", dict(weight="token", shaping="none", **_TOK), "remax"),
    EstimatorSpec("grpo_opo", "grpo", dict(weight="token", shaping="none", **_TOK), "opo"),
    EstimatorSpec("grpo_optimal_baseline", "grpo", dict(weight="token", shaping="none", **_TOK),
                  "optimal_baseline"),
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
DEFAULTS.update(mismatch=True, **MISMATCH_DEFAULTS)  # 6. the sampler/trainer mismatch study (mismatch.py)
QUICK.update(MISMATCH_QUICK)


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

    claims = evaluate_claims(cfg, by_G, by_kl, by_T, pos_ratio, by_reward)
    mm = None
    if cfg["mismatch"]:
        log("6/6 sampler/trainer mismatch: behaviour mu != pi_old, every mismatch level x mode")
        mm = run_mismatch_study(out_dir, cfg, seed=seed, log=log, plots=plots)
        claims.update(mm["claims"])

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
        f.write(summary_markdown(cfg, claims, by_G, by_kl, by_T, pos_ratio, by_reward, seconds, seed))
        if mm is not None:
            f.write("\n" + mm["markdown"])
            files.update(mm["files"])
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
