"""``summary.md`` of a lab run: the claims table and one section per experiment."""

from __future__ import annotations

import math


def _fmt(x, se=None, d=4):
    return f"{x:.{d}f}" if se is None else f"{x:.{d}f} ± {se:.{d}f}"


def summary_markdown(cfg, claims, by_G, by_kl, by_T, pos_ratio, by_reward, seconds, seed) -> str:
    """The Markdown report of one lab run (the claims table, then one section per experiment)."""
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
