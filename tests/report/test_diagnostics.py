"""ratiorl.report.diagnostics, checked against direct (loop / numpy) computations."""

import math

import numpy as np
import pytest
import torch

import ratiorl
from ratiorl.report import diagnostics as D


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    B, T = 24, 12
    old = -2 * torch.rand(B, T, generator=g)
    logp = old + 0.15 * torch.randn(B, T, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[3] = 0  # an empty response
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    logp = torch.where(mask > 0, logp, torch.full_like(logp, float("nan")))  # padding is ignored
    A = torch.randn(B, generator=g)
    gid = torch.arange(B) // 4
    return logp, old, mask, A, gid, lengths


def _valid_tokens(logp, old, mask):
    """Python lists per sequence of (position, delta) for valid tokens."""
    out = []
    for i in range(mask.shape[0]):
        seq = [(t + 1, float(logp[i, t] - old[i, t])) for t in range(mask.shape[1]) if mask[i, t] > 0]
        out.append(seq)
    return out


def test_ess_matches_direct_formula():
    g = torch.Generator().manual_seed(1)
    lw = torch.randn(10, generator=g, dtype=torch.float64)
    w = lw.exp()
    assert math.isclose(D.ess(lw), float(w.sum() ** 2 / (10 * (w * w).sum())), rel_tol=1e-12)
    gid = torch.tensor([0] * 4 + [1] * 6)
    per = [float(w[gid == k].sum() ** 2 / ((gid == k).sum() * (w[gid == k] ** 2).sum())) for k in (0, 1)]
    assert math.isclose(D.ess(lw, gid), sum(per) / 2, rel_tol=1e-12)
    assert math.isclose(D.ess(lw + 5000.0), D.ess(lw), rel_tol=1e-9)  # log space: no overflow
    assert math.isclose(D.ess(torch.zeros(7)), 1.0)


def test_self_normalized_weights_average_to_one_per_group():
    lw = torch.tensor([0.3, -1.0, 2.0, 0.5, 7.0], dtype=torch.float64)
    gid = torch.tensor([4, 4, 4, 9, 2])
    lsn = D.self_normalized_log_weights(lw, gid)
    assert math.isclose(float(lsn[:3].exp().mean()), 1.0, rel_tol=1e-12)
    assert float(lsn[3]) == 0.0 and float(lsn[4]) == 0.0  # groups of one


@pytest.mark.parametrize("weight", ["cumulative", "token"])
@pytest.mark.parametrize("use_adv", [False, True])
def test_clip_fraction_by_position_matches_loop(batch, weight, use_adv):
    logp, old, mask, A, _, _ = batch
    kw = dict(clip_low=0.2, clip_high=0.28, pos_clip_low=0.025, pos_clip_high=0.05, pos_power=0.5)
    out = D.clip_fraction_by_position(logp, old, mask, weight=weight, advantages=A if use_adv else None, **kw)
    per = {}
    for i, seq in enumerate(_valid_tokens(logp, old, mask)):
        S = 0.0
        for t, d in seq:
            S += d
            x = S if weight == "cumulative" else d
            lo_a, hi_a = -0.025 * t**0.5, 0.05 * t**0.5
            below_f, above_f = x < math.log(0.8), x > math.log(1.28)
            below_a, above_a = x < lo_a, x > hi_a
            if use_adv:
                neg, pos = float(A[i]) < 0, float(A[i]) > 0
                below_f, above_f, below_a, above_a = below_f and neg, above_f and pos, below_a and neg, above_a and pos
            per.setdefault(t, []).append((below_f or above_f, below_a or above_a, x))
    for k, t in enumerate(out["position"]):
        rows = per[t]
        assert out["count"][k] == len(rows)
        assert math.isclose(out["clip_frac_fixed"][k], np.mean([r[0] for r in rows]), abs_tol=1e-6)
        assert math.isclose(out["clip_frac_adaptive"][k], np.mean([r[1] for r in rows]), abs_tol=1e-6)
        xs = np.array([r[2] for r in rows])
        assert math.isclose(out["log_ratio_mean"][k], xs.mean(), abs_tol=1e-5)
        if len(xs) > 1:
            assert math.isclose(out["log_ratio_std"][k], xs.std(ddof=1), rel_tol=1e-3, abs_tol=1e-5)


def test_weight_histograms_match_direct(batch):
    logp, old, mask, _, gid, lengths = batch
    h = D.weight_histograms(logp, old, mask, gid, clip=0.2)
    seqs = _valid_tokens(logp, old, mask)
    keep = [i for i, s in enumerate(seqs) if s]
    lw = np.array([sum(d for _, d in seqs[i]) for i in keep])
    assert np.allclose(h["log_w"].numpy(), lw, atol=1e-5)
    g = gid[keep].numpy()
    lsn = np.array([lw[j] - np.log(np.mean(np.exp(lw[g == g[j]]))) for j in range(len(lw))])
    assert np.allclose(h["log_w_normalized"].numpy(), lsn, atol=1e-5)
    got = h["log_w_normalized"].double().numpy()  # same values; avoids float32 ties at the bounds
    assert math.isclose(h["frac_unclipped"], np.mean((got >= np.log(0.8)) & (got <= np.log(1.2))), abs_tol=1e-6)
    w = np.exp(lw)
    assert math.isclose(h["ess_raw"], w.sum() ** 2 / (len(w) * (w**2).sum()), rel_tol=1e-5)


def _table_F(rule, r, A, l, u):
    """The gradient weights of DGPO sec. 3 (Table 1, eqs. 2-10), written out directly."""
    LN, HP = (r < l) & (A < 0), (r > u) & (A > 0)
    LP, HN = (r < l) & (A > 0), (r > u) & (A < 0)
    F = r.copy()
    if rule == "hard":
        F[LN | HP] = 0
    elif rule == "cispo":
        F = np.clip(r, l, u)
    elif rule == "gppo":
        F[LN], F[HP] = l, u
    elif rule == "ce_gppo":
        F[LN], F[HP] = 0.75 * l, 1.0 * u
    elif rule == "aspo":
        F = 1 / r if A > 0 else r.copy()
        F = np.where(LP, np.where(r < 1 - 0.33, 1 - 0.33, np.minimum(1 / r, 1 + 3.0)), F)
        F = np.where(HN, np.minimum(r, 1 + 3.0), F)
        F = np.where(LN | HP, 0.0, F)
    elif rule == "dgpo":
        F = np.where(LN, r**2 / l, F)
        F = np.where(HP, u**0.5 * r**0.5, F)
    return F


@pytest.mark.parametrize("rule", ["hard", "cispo", "gppo", "ce_gppo", "aspo", "dgpo"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_gradient_weight_matches_dgpo_table(rule, sign):
    r = np.linspace(0.31, 2.9, 60)  # avoids the bounds themselves
    F = D.gradient_weight(rule, torch.tensor(r), sign, clip_low=0.2, clip_high=0.2).double().numpy()
    assert np.allclose(F, _table_F(rule, r, sign, 0.8, 1.2), rtol=1e-5, atol=1e-6)


def test_gradient_weight_of_cispo_preset_uses_its_bounds():
    """cispo's preset: clip_low=None, clip_high=4.0, so F = min(r, 5)."""
    r = torch.tensor([0.1, 1.0, 4.0, 6.0, 9.0])
    assert torch.allclose(D.gradient_weight("cispo", r, 1.0), torch.tensor([0.1, 1.0, 4.0, 5.0, 5.0]))


def test_dgpo_gradient_weight_is_continuous_at_the_bounds():
    for sign, b in ((-1.0, 0.8), (1.0, 1.2)):
        r = torch.tensor([b - 1e-4, b + 1e-4])
        F = D.gradient_weight("dgpo", r, sign, clip_low=0.2, clip_high=0.2)
        assert abs(float(F[1] - F[0])) < 1e-3


def test_gradient_weight_of_hard_rule_equals_clip_objective():
    r = torch.linspace(0.3, 2.5, 50)
    clip = ratiorl.objective("grpo", aggregation="token_mean", beta=0.0)
    for sign in (1.0, -1.0):
        assert torch.allclose(D.gradient_weight("hard", r, sign), D.gradient_weight(clip, r, sign), atol=1e-6)


def test_per_sequence_grad_norms_match_rowwise_autograd(batch):
    _, old, mask, A, gid, _ = batch
    logp = (old + 0.1).clone().requires_grad_(True)
    obj = ratiorl.objective("grpo", beta=0.0)
    loss = obj(logp, old, A, mask, group_ids=gid).loss
    norms = D.per_sequence_grad_norms(loss, logp, mask)
    (g,) = torch.autograd.grad(loss, logp)
    direct = torch.stack([g[i][mask[i] > 0].double().norm() for i in range(g.shape[0])])
    assert torch.allclose(norms, direct, atol=1e-9)


def test_grad_norm_by_length_matches_direct(batch):
    *_, lengths = batch
    g = torch.Generator().manual_seed(4)
    norms = torch.rand(lengths.shape[0], generator=g, dtype=torch.float64)
    lw = torch.randn(lengths.shape[0], generator=g, dtype=torch.float64)
    out = D.grad_norm_by_length(norms, lengths, buckets=(4, 8), log_w=lw)
    assert out["labels"] == ["<=4", "5-8", ">8"]
    L = lengths.numpy()
    for k, sel in enumerate([L <= 4, (L > 4) & (L <= 8), L > 8]):
        v = norms.numpy()[sel]
        assert out["count"][k] == len(v)
        assert math.isclose(out["mean"][k], v.mean(), rel_tol=1e-12)
        assert math.isclose(out["std"][k], v.std(ddof=1), rel_tol=1e-9)
    assert math.isclose(out["corr_length_abs_log_w"], np.corrcoef(L, np.abs(lw.numpy()))[0, 1], rel_tol=1e-9)
    # (B, T) per-token gradients are reduced to norms over valid tokens
    grads = torch.randn(lengths.shape[0], 12, generator=g, dtype=torch.float64)
    mask = (torch.arange(12)[None] < lengths[:, None]).double()
    a = D.grad_norm_by_length(grads, lengths, buckets=(4, 8), mask=mask)
    b = D.grad_norm_by_length((grads * mask).norm(dim=-1), lengths, buckets=(4, 8))
    assert a["mean"] == pytest.approx(b["mean"], nan_ok=True)


def test_step_scalars_match_direct(batch):
    logp, old, mask, A, gid, lengths = batch
    s = D.step_scalars(ratiorl.objective("grpo", clip_low=0.2, clip_high=0.2), logp, old, None, mask, gid)
    seqs = _valid_tokens(logp, old, mask)
    toks = [(t, d, S) for seq in seqs for (t, d), S in zip(seq, np.cumsum([d for _, d in seq]))]
    d = np.array([x[1] for x in toks])
    S = np.array([x[2] for x in toks])
    t = np.array([x[0] for x in toks])
    lo, hi = np.log(0.8), np.log(1.2)
    assert math.isclose(s["log_ratio_mean"], d.mean(), abs_tol=1e-6)
    assert math.isclose(s["log_ratio_std"], d.std(ddof=1), rel_tol=1e-4)
    assert math.isclose(s["token_clip_frac"], np.mean((d < lo) | (d > hi)), abs_tol=1e-6)
    assert math.isclose(s["cumulative_clip_frac"], np.mean((S < lo) | (S > hi)), abs_tol=1e-6)
    adaptive = (S < -0.025 * np.sqrt(t)) | (S > 0.05 * np.sqrt(t))
    assert math.isclose(s["cumulative_clip_frac_adaptive"], adaptive.mean(), abs_tol=1e-6)
    early = t <= t.max() / 2
    assert math.isclose(s["cumulative_clip_frac_early"], np.mean(((S < lo) | (S > hi))[early]), abs_tol=1e-6)
    assert math.isclose(s["kl_k1"], -d.mean(), abs_tol=1e-6)
    assert math.isclose(s["kl_k3"], np.mean(np.exp(d) - d - 1), rel_tol=1e-4)
    lw = np.array([sum(x for _, x in seq) for seq in seqs if seq])
    assert math.isclose(s["seq_log_w_std"], lw.std(ddof=1), rel_tol=1e-4)
    w = np.exp(lw)
    assert math.isclose(s["ess_raw"], w.sum() ** 2 / (len(w) * (w**2).sum()), rel_tol=1e-5)
    assert math.isclose(s["length_mean"], float(lengths.float().mean()), rel_tol=1e-6)
    assert all(math.isfinite(v) for v in s.values())
    # with advantages only active clipping counts, so the fraction can only fall
    s2 = D.step_scalars(ratiorl.objective("grpo"), logp, old, A, mask, gid, prefix="diag/")
    assert s2["diag/token_clip_frac"] <= s["token_clip_frac"]


def test_plots_write_pngs(tmp_path, batch):
    logp, old, mask, A, gid, lengths = batch
    paths = [
        D.plot_clip_by_position([D.clip_fraction_by_position(logp, old, mask)], str(tmp_path / "clip.png"), ["step 1"]),
        D.plot_weight_histograms(D.weight_histograms(logp, old, mask, gid), str(tmp_path / "hist.png")),
        D.plot_gradient_weights(["hard", "cispo", "gppo", "ce_gppo", "aspo", "dgpo"], str(tmp_path / "F.png")),
        D.plot_grad_norm_by_length(
            {"grpo": D.grad_norm_by_length(torch.rand(len(lengths)), lengths, buckets=(4, 8))},
            str(tmp_path / "len.png"),
        ),
    ]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- one code path: the objective


def test_step_scalars_report_the_objective_itself(batch):
    logp, old, mask, A, gid, _ = batch
    obj = ratiorl.objective("dapo", clip_low=0.1, clip_high=0.15)
    s = D.step_scalars(obj, logp, old, A, mask, gid)
    clean = torch.where(mask > 0, logp, old)
    direct = obj(clean, old, A, mask, group_ids=gid).metrics
    for k in ("clip_frac", "clip_frac_low", "weight_max", "ess"):
        assert s[f"objective_{k}"] == pytest.approx(direct[k], rel=1e-6, abs=1e-7), k
    # the token clip window is the objective's: independent count with dapo's bounds
    seqs = _valid_tokens(logp, old, mask)
    hits = [(d < np.log(0.9) and A[i] < 0) or (d > np.log(1.15) and A[i] > 0)
            for i, seq in enumerate(seqs) for _, d in seq]
    assert s["token_clip_frac"] == pytest.approx(np.mean(hits), abs=1e-6) and 0 < s["token_clip_frac"]
    assert s["objective_clip_frac"] == pytest.approx(s["token_clip_frac"], abs=1e-6)  # dapo is that clip


def test_clip_fraction_by_position_includes_the_objective(batch):
    logp, old, mask, A, gid, _ = batch
    obj = ratiorl.objective("snib", beta=0.0, per_position_metrics=True)
    c = D.clip_fraction_by_position(logp, old, mask, advantages=A, obj=obj, group_ids=gid)
    clean = torch.where(mask > 0, logp, old)
    by_pos = obj(clean, old, A, mask, group_ids=gid).metrics["clip_frac_by_position"]
    T = len(c["position"])
    assert c["objective"] == "snib" and T > 0
    assert c["clip_frac_objective"] == pytest.approx(by_pos[:T], abs=1e-6) and max(c["clip_frac_objective"]) > 0


def test_a_new_weight_shows_up_without_touching_report(batch):
    from ratiorl.objectives import WEIGHTS, Weight

    @WEIGHTS.register("diag_test_half", level="token")
    def half(delta, info, *, alpha: float = 0.5):
        return Weight(alpha * delta, "token", delta, metrics={"half_alpha": alpha, "half_mean": delta.mean()})

    try:
        logp, old, mask, A, gid, _ = batch
        obj = ratiorl.objective("grpo", weight="diag_test_half", weight_options={"alpha": 0.25})
        s = D.step_scalars(obj, logp, old, A, mask, gid)
        assert s["objective_half_alpha"] == 0.25
        d = torch.where(mask > 0, logp - old, torch.zeros_like(old))
        assert s["objective_half_mean"] == pytest.approx(float(d.mean()), abs=1e-6)
        # its weight exp(alpha * delta) is what the objective's metrics describe
        r = torch.exp(0.25 * d)[mask > 0]
        assert s["objective_weight_max"] == pytest.approx(float(r.max()), rel=1e-6)
    finally:
        del WEIGHTS["diag_test_half"]


@pytest.mark.parametrize("name,n_png", [("grpo", 3), ("snib", 3), ("dgpo", 4), ("ctpo", 3)])
def test_plot_step_writes_pngs(tmp_path, batch, name, n_png):
    logp, old, mask, A, gid, _ = batch
    paths = D.plot_step(ratiorl.objective(name), logp, old, A, mask, gid, out_dir=str(tmp_path),
                        max_new_tokens=12, label="step 3")
    names = sorted(p.rsplit("/", 1)[-1] for p in paths)
    expected = ["clip_by_position.png", "grad_norm_by_length.png", "weight_histograms.png"]
    assert names == sorted(expected + (["gradient_weight.png"] if n_png == 4 else []))
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_gradient_weight_of_an_objective_uses_its_rule_options():
    r = torch.tensor([0.5, 1.0, 1.5])
    obj = ratiorl.objective("dgpo", n=2.0, m=3.0, clip_low=0.2, clip_high=0.2)
    F = D.gradient_weight(obj, r, -1.0).double()
    assert F[0].item() == pytest.approx(0.5**3 / 0.8**2, rel=1e-5)  # LN: r^(n+1) / l^n
    F = D.gradient_weight(obj, r, 1.0).double()
    assert F[2].item() == pytest.approx(1.2 ** (1 / 3) * 1.5 ** (2 / 3), rel=1e-5)  # HP: u^(1/m) r^(1-1/m)
