"""The verl / TRL policy losses (GMPO, DPPO-TV/KL, Clip-Cov, KL-Cov, straight-through and abs KL,
entropy bonus, log-prob surrogate, VESPO, LUSPO, OPSM, top-entropy, count_empty, token_sum):
each against an independent float64 computation written here (values and gradients), and against
verl 0.9.1's own ``core_algos`` functions when verl is installed (skipped cleanly otherwise).
TRL's inline loss code is compared in test_trl_losses.py."""

from __future__ import annotations

import math

import pytest
import torch

import ratiorl

DT = torch.float64


def make(B=8, T=12, seed=0, spread=0.3, empty=True):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=DT) * 2.0 - 0.05
    logp = old + spread * torch.randn(B, T, generator=g, dtype=DT)
    ref = old + 0.2 * torch.randn(B, T, generator=g, dtype=DT)
    lengths = torch.randint(3, T + 1, (B,), generator=g)
    if empty:
        lengths[1] = 0  # an empty response
    mask = (torch.arange(T)[None, :] < lengths[:, None])
    adv = torch.randn(B, generator=g, dtype=DT)
    adv[2] = 0.0
    ent = torch.rand(B, T, generator=g, dtype=DT) * 2
    return dict(logp=logp, old=old, ref=ref, mask=mask, adv=adv, ent=ent)


def ours(obj, d, **kw):
    lp = d["logp"].clone().requires_grad_(True)
    out = obj(lp, d["old"], d["adv"], d["mask"], ref_logp=d["ref"], **kw)
    out.loss.backward()
    return out.loss.detach(), lp.grad, out


def reference(fn, d):
    lp = d["logp"].clone().requires_grad_(True)
    loss = fn(lp, d)
    loss.backward()
    return loss.detach(), lp.grad


def close(a, b, tol=1e-10):
    assert torch.allclose(a, b, atol=tol, rtol=tol), (a, b)


# ------------------------------------------------------------------ independent float64 references
def m_(d):
    return d["mask"].to(DT)


def token_mean(L, d):
    m = m_(d)
    return (L * m).sum() / m.sum()


def ref_gmpo(lp, d, lo=0.4, hi=0.4):
    m, A = m_(d), d["adv"]
    delta = lp - d["old"]
    clipped = torch.where(A[:, None] > 0, torch.clamp(delta, max=hi), torch.where(A[:, None] < 0, torch.clamp(delta, min=-lo), delta))
    n = m.sum(1)
    s = torch.exp((clipped * m).sum(1) / n.clamp_min(1))
    return (-A * s * (n > 0)).sum() / len(A)


def ref_dppo(lp, d, kind, lo=0.2, hi=0.2, c=20.0):
    A = d["adv"][:, None]
    p, po = lp.detach().exp(), d["old"].exp()
    if kind == "tv":
        valid = torch.where(A > 0, p - po <= hi, p - po >= -lo)
    else:
        bkl = po * (d["old"] - lp.detach()) + (1 - po) * torch.log((1 - po + 1e-8) / (1 - p + 1e-8))
        valid = torch.where(A > 0, (bkl <= hi) | (p <= po), (bkl <= lo) | (p >= po))
    F = torch.exp(lp.detach() - d["old"]).clamp(max=c) * valid
    return token_mean(-A * F * lp, d)


def ref_vespo(lp, d, kp=2.0, lp_=3.0, kn=3.0, ln=2.0):
    A = d["adv"][:, None]
    lw = ((lp.detach() - d["old"]) * m_(d)).sum(1, keepdim=True).clamp(math.log(1e-8), 20.0)
    k = torch.where(A >= 0, torch.full_like(A, kp), torch.full_like(A, kn))
    lam = torch.where(A >= 0, torch.full_like(A, lp_), torch.full_like(A, ln))
    phi = torch.exp(lam + k * lw - lam * torch.exp(lw))
    return token_mean(-A * phi * lp, d)


def ref_clip(lp, d, lo=0.2, hi=0.2):
    A = d["adv"][:, None]
    r = torch.exp(lp - d["old"])
    return torch.maximum(-A * r, -A * torch.clamp(r, 1 - lo, 1 + hi))


def ref_kl(lp, d, kind):
    k1 = lp - d["ref"]
    k2 = 0.5 * k1.square()
    k3 = torch.exp(-k1) + k1 - 1
    val = {"k1+": k1, "k3+": k3, "abs": k1.abs(), "abs+": k1.abs()}[kind]
    return k2 - k2.detach() + val.detach() if kind.endswith("+") else val


def cov(d):
    m = m_(d)
    A = d["adv"][:, None].expand_as(m)
    return (A - (A * m).sum() / m.sum()) * (d["logp"] - (d["logp"] * m).sum() / m.sum())


# ------------------------------------------------------------------ float64 tests
@pytest.mark.parametrize("seed", [0, 1])
def test_gmpo(seed):
    d = make(seed=seed, spread=0.5)
    a = ours(ratiorl.objective("gmpo"), d)
    b = reference(ref_gmpo, d)
    close(a[0], b[0]), close(a[1], b[1])
    assert a[2].metrics["clip_frac"] > 0  # the clip is exercised


@pytest.mark.parametrize("kind", ["tv", "kl"])
@pytest.mark.parametrize("seed", [0, 1])
def test_dppo(kind, seed):
    d = make(seed=seed, spread=0.5)
    a = ours(ratiorl.objective(f"dppo_{kind}", div_low=0.05, div_high=0.05, trunc_c=1.5), d)
    b = reference(lambda lp, d: ref_dppo(lp, d, kind, 0.05, 0.05, 1.5), d)
    close(a[0], b[0]), close(a[1], b[1])
    assert 0 < a[2].metrics["clip_frac"] < 1 and a[2].metrics["dual_clip_frac"] > 0


def test_vespo():
    d = make(spread=0.1)
    a = ours(ratiorl.objective("vespo"), d)
    b = reference(ref_vespo, d)
    close(a[0], b[0]), close(a[1], b[1])


def test_luspo_is_length_weighted_gspo():
    d = make()

    def ref(lp, d):
        m = m_(d)
        n = m.sum(1)
        s = torch.exp(((lp - d["old"]) * m).sum(1) / n.clamp_min(1))
        A = d["adv"]
        L = torch.maximum(-A * s, -A * torch.clamp(s, 1 - 3e-4, 1 + 4e-4))
        return (L * n).sum() / len(A)

    a, b = ours(ratiorl.objective("luspo"), d), reference(ref, d)
    close(a[0], b[0]), close(a[1], b[1])


@pytest.mark.parametrize("kind", ["k1+", "k3+", "abs", "abs+"])
def test_kl_estimators(kind):
    d = make()
    a = ours(ratiorl.objective("grpo", kl_estimator=kind, beta=0.3), d)
    b = reference(lambda lp, d: (lambda m: ((((ref_clip(lp, d) + 0.3 * ref_kl(lp, d, kind)) * m).sum(1)
                                              / m.sum(1).clamp_min(1)).sum() / len(d["adv"])))(m_(d)), d)
    close(a[0], b[0]), close(a[1], b[1])


def test_k3_max_kl_clamps_value_and_gradient():
    d = make()
    d["ref"] = d["logp"] + 4.0 * torch.sign(torch.randn_like(d["logp"]))  # k3 up to e^4 - 5 > 10
    obj = ratiorl.objective("bnpo", beta=1.0, kl_estimator="k3", max_kl=10.0)
    a = ours(obj, d)
    b = reference(lambda lp, d: token_mean(ref_clip(lp, d) + torch.clamp(torch.exp(d["ref"] - lp) - (d["ref"] - lp) - 1, max=10.0), d), d)
    close(a[0], b[0]), close(a[1], b[1])


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "sequence"])
def test_entropy_bonus(agg):
    d = make()
    ent = d["ent"].clone().requires_grad_(True)
    obj = ratiorl.objective("bnpo", aggregation=agg, entropy_coef=0.05)
    lp = d["logp"].clone().requires_grad_(True)
    out = obj(lp, d["old"], d["adv"], d["mask"], entropy=ent)
    out.loss.backward()
    base = ratiorl.objective("bnpo", aggregation=agg)(d["logp"], d["old"], d["adv"], d["mask"]).loss
    m = m_(d)
    if agg == "token_mean":
        H = (d["ent"] * m).sum() / m.sum()
        g = m / m.sum()
    else:
        H = ((d["ent"] * m).sum(1) / m.sum(1).clamp_min(1)).sum() / len(m)
        g = m / m.sum(1, keepdim=True).clamp_min(1) / len(m)
    close(out.loss.detach(), base - 0.05 * H)
    close(ent.grad, -0.05 * g)
    assert out.metrics["entropy"] == pytest.approx(float(H))
    with pytest.raises(ValueError, match="entropy="):
        obj(d["logp"], d["old"], d["adv"], d["mask"])
    assert obj.needs_entropy and not ratiorl.objective("bnpo").needs_entropy


def test_logp_surrogate_and_dro():
    d = make()
    a = ours(ratiorl.objective("bnpo", shaping="logp", dro_beta=0.5), d)
    b = reference(lambda lp, d: token_mean(-d["adv"][:, None] * lp + 0.25 * (lp - d["old"]).square(), d), d)
    close(a[0], b[0]), close(a[1], b[1])


@pytest.mark.parametrize("q", [0.2, 0.5, 1.0])
def test_top_entropy(q):
    d = make()
    obj = ratiorl.objective("bnpo", token_selection="top_entropy", top_entropy_quantile=q)
    a = ours(obj, d, entropy=d["ent"])
    m = d["mask"]
    thr = torch.quantile(d["ent"][m], 1 - q)
    keep = ((d["ent"] >= thr) & m).to(DT)
    b = reference(lambda lp, d: token_mean(ref_clip(lp, d) * keep, d), d)
    close(a[0], b[0]), close(a[1], b[1])
    assert a[2].metrics["selection_keep_frac"] == pytest.approx(float(keep.sum() / m.sum()))
    assert obj.needs_entropy


def test_opsm_uses_behaviour_logp_when_given():
    d = make(spread=0.3)
    mu = d["old"] + 0.4 * torch.rand_like(d["old"])
    obj = ratiorl.objective("bnpo", token_selection="opsm", opsm_threshold=0.15)

    def keep_for(samp):
        m = m_(d)
        kl = ((samp - d["logp"]) * m).sum(1) / m.sum(1).clamp_min(1)
        return ((d["adv"] >= 0) | (kl <= 0.15)).to(DT)[:, None]

    for samp, kw in ((d["old"], {}), (mu, {"behaviour_logp": mu})):
        keep = keep_for(samp)
        assert 0 < float(keep.mean()) < 1
        a = ours(obj, d, **kw)
        b = reference(lambda lp, d: token_mean(ref_clip(lp, d) * keep, d), d)
        close(a[0], b[0]), close(a[1], b[1])


def test_clip_cov_drops_sampled_candidates():
    d = make(B=16, T=16, spread=0.3)
    obj = ratiorl.objective("clip_cov", clip_cov_ratio=0.05, clip_cov_lb=0.05, clip_cov_ub=5.0)
    torch.manual_seed(3)
    a = ours(obj, d)
    r = torch.exp(d["logp"] - d["old"])
    A = d["adv"][:, None]
    clipped = (-A * torch.clamp(r, 0.8, 1.2) > -A * r) & d["mask"]
    c = cov(d)
    cand = d["mask"] & ~clipped & (c > 0.05) & (c < 5.0)
    idx = torch.nonzero(cand)
    torch.manual_seed(3)
    k = max(int(0.05 * int(d["mask"].sum())), 1)
    idx = idx[torch.randperm(len(idx))[:min(k, len(idx))]]
    keep = torch.ones_like(r)
    keep[idx[:, 0], idx[:, 1]] = 0
    assert 0 < int((keep == 0).sum()) < int(cand.sum())
    b = reference(lambda lp, d: token_mean(ref_clip(lp, d) * keep, d), d)
    close(a[0], b[0]), close(a[1], b[1])


def test_kl_cov_penalises_top_covariance_tokens():
    d = make(B=16, T=16)
    obj = ratiorl.objective("kl_cov", kl_cov_ratio=0.05, ppo_kl_coef=2.0)
    a = ours(obj, d)
    m = d["mask"]
    c = cov(d)[m]
    k = max(1, int(c.numel() * 0.05))
    flag = torch.zeros_like(c)
    flag[torch.topk(c, k).indices] = 1
    F = torch.zeros_like(d["logp"])
    F[m] = flag

    def ref(lp, d):
        return token_mean(-d["adv"][:, None] * torch.exp(lp - d["old"]) + 2.0 * F * (lp - d["old"]).abs(), d)

    b = reference(ref, d)
    close(a[0], b[0]), close(a[1], b[1])


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm", "sequence"])
def test_count_empty_false_is_verls_denominator(agg):
    d = make()
    n_nonempty = int((d["mask"].sum(1) > 0).sum())
    on = ratiorl.objective("bnpo", aggregation=agg)(d["logp"], d["old"], d["adv"], d["mask"]).loss
    off = ratiorl.objective("bnpo", aggregation=agg, count_empty=False)(d["logp"], d["old"], d["adv"], d["mask"]).loss
    close(off, on * len(d["adv"]) / n_nonempty)
    given = ratiorl.objective("bnpo", aggregation=agg, count_empty=False)(
        d["logp"], d["old"], d["adv"], d["mask"], num_sequences=len(d["adv"])).loss
    close(given, on)  # a caller's global count wins


def test_token_sum():
    d = make()
    a = ours(ratiorl.objective("bnpo", aggregation="token_sum"), d)
    b = reference(lambda lp, d: (ref_clip(lp, d) * m_(d)).sum(), d)
    close(a[0], b[0]), close(a[1], b[1])


def test_options_checked_and_composable():
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        ratiorl.objective("grpo", token_selection="top_entropy", top_entropy_quantile=0.0)
    with pytest.raises(ValueError, match="entropy_coef"):
        ratiorl.objective("grpo", entropy_coef=-1.0)
    with pytest.raises(ValueError, match="valid token selections"):
        ratiorl.objective("grpo", token_selection="nope")
    with pytest.raises(ValueError, match="clips each token"):
        ratiorl.objective("gmpo", weight="geometric")
    # composable: GMPO's clip on CTPO's cumulative weight with an OPSM, DPPO with a KL and top-entropy
    d = make()
    for obj in (ratiorl.objective("gmpo", weight="cumulative", token_selection="opsm"),
                ratiorl.objective("dppo_tv", beta=0.1, kl_estimator="k3+", token_selection="top_entropy"),
                ratiorl.objective("vespo", token_selection="clip_cov", entropy_coef=0.01)):
        loss, grad, _ = ours(obj, d, entropy=d["ent"])
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().sum() > 0


# ------------------------------------------------------------------ against verl's own code
@pytest.fixture(scope="module")
def verl():
    pytest.importorskip("verl")
    try:
        from verl.trainer.ppo import core_algos
    except Exception as e:  # an installed but unimportable verl
        pytest.skip(f"verl.trainer.ppo.core_algos not importable: {e}")
    return core_algos


def _Cfg(**kw):
    """verl's own ActorConfig (its defaults, e.g. clip_ratio_c=3.0) with the given fields."""
    from verl.workers.config import ActorConfig
    from verl.workers.config.actor import PolicyLossConfig

    pl = PolicyLossConfig(**kw.pop("policy_loss", {}))
    return ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, use_dynamic_bsz=False, ppo_mini_batch_size=1,
                       rollout_n=1, policy_loss=pl, **kw)


def verl_loss(fn, d, cfg, agg="token-mean"):
    lp = d["logp"].clone().requires_grad_(True)
    A = d["adv"][:, None].expand_as(lp).clone()
    loss, _ = fn(old_log_prob=d["old"], log_prob=lp, advantages=A, response_mask=d["mask"].to(DT),
                 loss_agg_mode=agg, config=cfg)
    loss.backward()
    return loss.detach(), lp.grad


@pytest.mark.parametrize("name,verl_name,cfg,kw,value", [
    ("gmpo", "geo_mean", dict(clip_ratio_low=0.4, clip_ratio_high=0.4), {}, True),
    ("gmpo", "geo_mean", {}, dict(log_clip_low=0.2, log_clip_high=0.2), True),
    ("dppo_tv", "dppo_tv", dict(clip_ratio_low=0.05, clip_ratio_high=0.08), dict(div_low=0.05, div_high=0.08, trunc_c=3.0),
     True),
    ("dppo_tv", "dppo_tv", dict(clip_ratio_low=0.05, clip_ratio_high=0.08, clip_ratio_c=1.5),
     dict(div_low=0.05, div_high=0.08, trunc_c=1.5), True),
    ("dppo_kl", "dppo_kl", dict(clip_ratio_low=0.01, clip_ratio_high=0.02, clip_ratio_c=1.5),
     dict(div_low=0.01, div_high=0.02, trunc_c=1.5), True),
    ("bnpo", "vanilla", dict(clip_ratio_c=3.0), dict(shaping="dual_clip", dual_clip=3.0), True),
    ("cispo", "cispo", dict(clip_ratio_low=0.2, clip_ratio_high=0.28), dict(clip_low=0.2, clip_high=0.28), False),
    ("bnpo", "gpg", {}, dict(shaping="logp"), True),
    ("bnpo", "dro", dict(policy_loss=dict(dro_beta=0.3)), dict(shaping="logp", dro_beta=0.3), True),
    ("kl_cov", "kl_cov", dict(policy_loss=dict(kl_cov_ratio=0.05, ppo_kl_coef=1.0)), dict(kl_cov_ratio=0.05), True),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_verl(verl, name, verl_name, cfg, kw, value, seed):
    d = make(B=16, T=16, seed=seed, spread=0.4, empty=False)
    fn = verl.get_policy_loss_fn(verl_name)
    b = verl_loss(fn, d, _Cfg(**cfg))
    a = ours(ratiorl.objective(name, aggregation="sequence" if name == "gmpo" else "token_mean", **kw), d)
    if value:  # cispo: ratiorl reports the clipped value -A v (docs: conventions), the gradient is verl's
        close(a[0], b[0], 1e-9)
    close(a[1], b[1], 1e-9)


def test_clip_cov_matches_verl(verl):
    d = make(B=16, T=16, spread=0.3, empty=False)
    cfg = _Cfg(policy_loss=dict(clip_cov_ratio=0.05, clip_cov_lb=0.05, clip_cov_ub=5.0))
    torch.manual_seed(7)
    b = verl_loss(verl.get_policy_loss_fn("clip_cov"), d, cfg)
    torch.manual_seed(7)
    a = ours(ratiorl.objective("clip_cov", clip_cov_ratio=0.05, clip_cov_lb=0.05, clip_cov_ub=5.0), d)
    assert a[2].metrics["selection_keep_frac"] < 1
    close(a[0], b[0], 1e-9), close(a[1], b[1], 1e-9)


@pytest.mark.parametrize("verl_name,ours_name,kw", [
    ("k1+", "k1+", {}), ("kl+", "k1+", {}), ("low_var_kl+", "k3+", dict(max_kl=10.0)), ("k3+", "k3+", dict(max_kl=10.0)),
    ("low_var_kl", "k3", dict(max_kl=10.0)), ("abs", "abs", {}), ("abs+", "abs+", {}), ("mse", "k2", {}), ("k2+", "k2", {}),
    ("kl", "k1", {}),
])
def test_kl_penalty_matches_verl(verl, verl_name, ours_name, kw):
    d = make(empty=False)
    d["ref"] = d["logp"] + 3.0 * torch.randn_like(d["logp"])  # k3 beyond verl's clamp at 10 on some tokens
    lp = d["logp"].clone().requires_grad_(True)
    kl_v = verl.kl_penalty(lp, d["ref"], verl_name)
    (kl_v * m_(d)).sum().backward()
    g_v = lp.grad
    obj = ratiorl.objective("bnpo", shaping="none", beta=1.0, kl_estimator=ours_name, **kw)
    lp2 = d["logp"].clone().requires_grad_(True)
    out = obj(lp2, d["old"], torch.zeros_like(d["adv"]), d["mask"], ref_logp=d["ref"], return_details=True)
    close(out.details.token_kl * m_(d), kl_v.detach() * m_(d), 1e-9)
    out.loss.backward()
    close(lp2.grad * m_(d).sum(), g_v, 1e-9)


@pytest.mark.parametrize("mode,agg,kw", [
    ("token-mean", "token_mean", {}),
    ("seq-mean-token-mean", "seq_mean_token_mean", dict(count_empty=False)),
    ("seq-mean-token-sum", "seq_mean_token_sum", dict(count_empty=False)),
    ("seq-mean-token-sum-norm", "seq_mean_token_sum_norm", dict(count_empty=False)),
    ("token-sum", "token_sum", {}),
])
def test_agg_loss_matches_verl(verl, mode, agg, kw):
    d = make()  # with an empty row: verl leaves it out of B'
    L = torch.randn(d["logp"].shape, dtype=DT, generator=torch.Generator().manual_seed(5))
    v = verl.agg_loss(L, d["mask"].to(DT), mode)
    from ratiorl.objectives import AGGREGATIONS
    from ratiorl.objectives._batch import BatchInfo
    info = BatchInfo(d["mask"].to(DT), None, None, None, 0)
    close(AGGREGATIONS[agg](L, info, **kw), v, 1e-9)


def test_entropy_bonus_matches_verl_actor(verl):
    d = make()
    ent = d["ent"]
    for mode, agg in (("token-mean", "token_mean"), ("seq-mean-token-mean", "seq_mean_token_mean")):
        H = verl.agg_loss(ent, d["mask"].to(DT), mode)
        extra = {} if agg == "token_mean" else dict(count_empty=False)
        obj = ratiorl.objective("bnpo", aggregation=agg, entropy_coef=0.1, **extra)
        base = ratiorl.objective("bnpo", aggregation=agg, **extra)
        diff = obj(d["logp"], d["old"], d["adv"], d["mask"], entropy=ent).loss - base(
            d["logp"], d["old"], d["adv"], d["mask"]).loss
        close(diff, -0.1 * H, 1e-9)
