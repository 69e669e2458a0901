"""Properties of single axes: DGPO's F, SNIB's self-normalisation, metrics, registries."""

import pytest
import torch

import ratiorl
from ratiorl.objectives import RULES, WEIGHTS, Objective, Weight

from ._data import call, loss_and_grad, make_batch


def _F_of(obj, r, a):
    """F(r, A) read off the gradient: one token, token_mean, d loss / d logp = -F * A."""
    logp = torch.tensor([[torch.log(torch.tensor(r, dtype=torch.float64))]], requires_grad=True)
    old = torch.zeros(1, 1, dtype=torch.float64)
    out = obj(logp, old, torch.tensor([a], dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool))
    (g,) = torch.autograd.grad(out.loss, logp)
    return -g.item() / a


@pytest.mark.parametrize("n,m", [(1, 2), (2, 3), (0.5, 1.5)])
def test_dgpo_F_continuous_at_both_bounds_and_never_zero(n, m):
    obj = ratiorl.objective("dgpo", n=n, m=m, clip_low=0.2, clip_high=0.28)
    l, u = 0.8, 1.28
    eps = 1e-7
    # LN boundary (A < 0) and HP boundary (A > 0): left and right limits agree
    assert abs(_F_of(obj, l - eps, -1.0) - _F_of(obj, l + eps, -1.0)) < 1e-5
    assert abs(_F_of(obj, u - eps, 1.0) - _F_of(obj, u + eps, 1.0)) < 1e-5
    assert abs(_F_of(obj, l - eps, -1.0) - l) < 1e-5 and abs(_F_of(obj, u + eps, 1.0) - u) < 1e-5
    for r in torch.logspace(-3, 3, 61, dtype=torch.float64).tolist():
        for a in (-1.3, 0.7):
            assert _F_of(obj, r, a) > 0
    # and it really decays outside the trust region (not the identity)
    assert _F_of(obj, 0.4, -1.0) < 0.4 and _F_of(obj, 3.0, 1.0) < 3.0


def test_hard_clip_F_is_zero_outside_and_r_inside():
    obj = Objective(shaping="weighted", rule="hard")
    assert _F_of(obj, 0.5, -1.0) == 0.0 and _F_of(obj, 1.5, 1.0) == 0.0
    assert abs(_F_of(obj, 0.5, 1.0) - 0.5) < 1e-12 and abs(_F_of(obj, 1.1, -1.0) - 1.1) < 1e-12


def test_cispo_F_without_lower_bound_is_min_r_u():
    obj = ratiorl.objective("cispo")  # clip_low=None, clip_high=4.0
    for r in (0.01, 0.5, 2.0, 4.9):
        for a in (-1.0, 1.0):
            assert abs(_F_of(obj, r, a) - min(r, 5.0)) < 1e-9
    assert abs(_F_of(obj, 9.0, -1.0) - 5.0) < 1e-9


def test_aspo_F_reading():
    obj = ratiorl.objective("aspo")  # l=0.8, u=1.2, aspo 0.33 / 3.0
    assert abs(_F_of(obj, 1.1, 1.0) - 1 / 1.1) < 1e-9  # M, A>0: flipped ratio
    assert abs(_F_of(obj, 1.1, -1.0) - 1.1) < 1e-9  # M, A<0: r
    assert abs(_F_of(obj, 0.7, 1.0) - 1 / 0.7) < 1e-9  # LP above 1 - 0.33
    assert abs(_F_of(obj, 0.5, 1.0) - 0.67) < 1e-9  # LP below 1 - 0.33
    assert abs(_F_of(obj, 5.0, -1.0) - 4.0) < 1e-9  # HN: min(r, 1 + 3)
    assert _F_of(obj, 0.5, -1.0) == 0.0 and _F_of(obj, 1.5, 1.0) == 0.0


def test_gppo_and_ce_gppo_F():
    assert abs(_F_of(ratiorl.objective("gppo"), 0.5, -1.0) - 0.8) < 1e-12
    assert abs(_F_of(ratiorl.objective("gppo"), 1.5, 1.0) - 1.2) < 1e-12
    ce = ratiorl.objective("ce_gppo", beta1=0.5, beta2=2.0)
    assert abs(_F_of(ce, 0.5, -1.0) - 0.4) < 1e-12 and abs(_F_of(ce, 1.5, 1.0) - 2.4) < 1e-12


def _group_sums(weight, d, scope="group"):
    """sum_{i in g} w_i for each group, through the public API (shaping none, sequence aggregation)."""
    opts = {"normalize_scope": scope} if weight.startswith("self_normalized") else {}
    obj = Objective(weight=weight, shaping="none", aggregation="sequence", weight_options=opts)
    sums = {}
    B = d["mask"].shape[0]
    for gid in d["group_ids"].unique().tolist():
        adv = -(d["group_ids"] == gid).double()  # loss = (1/B) sum_{i in g} w_i
        out = obj(d["logp"], d["old"], adv, d["mask"], group_ids=d["group_ids"])
        sums[gid] = out.loss.item() * B
    return sums


@pytest.mark.parametrize("weight", ["self_normalized", "self_normalized_fg"])
def test_snib_weights_average_to_one_per_group(weight):
    groups = torch.tensor([5, 5, 5, 9, 9, -1, 5, 9])  # last group is a single sequence
    d = make_batch(B=8, scale=0.8, groups=groups, with_empty=False)
    sums = _group_sums(weight, d)
    for gid, s in sums.items():
        size = int((groups == gid).sum())
        assert abs(s - size) < 1e-9, (gid, s, size)
    # the raw sequence weight does not (the test could fail)
    raw = _group_sums("sequence", d)
    assert any(abs(s - int((groups == g).sum())) > 1e-3 for g, s in raw.items())


def test_group_of_one_gets_weight_exactly_one():
    d = make_batch(B=4, scale=2.0, groups=torch.tensor([0, 1, 2, 3]), with_empty=False)
    obj = Objective(weight="self_normalized", shaping="none", aggregation="sequence")
    out = call(obj, d)
    assert out.metrics["weight_mean"] == 1.0 and out.metrics["weight_max"] == 1.0


def test_snib_batch_scope_and_empty_response_excluded_from_normaliser():
    d = make_batch(B=6, scale=0.5, groups=torch.tensor([0, 0, 0, 1, 1, 1]), with_empty=True)
    sums = _group_sums("self_normalized", d, scope="batch")
    assert abs(sum(sums.values()) - 5) < 1e-9  # 5 non-empty responses share one normaliser


def test_snib_requires_group_ids():
    d = make_batch()
    with pytest.raises(ValueError, match="group_ids"):
        ratiorl.objective("snib")(d["logp"], d["old"], d["adv"], d["mask"], token_kl=d["token_kl"])


def test_snib_sg_vs_fg_gradients_differ_only_through_normaliser():
    d = make_batch(scale=0.5)
    _, g_sg, _ = loss_and_grad(ratiorl.objective("snib", beta=0.0, shaping="none"), d)
    _, g_fg, _ = loss_and_grad(ratiorl.objective("snib_fg", beta=0.0, shaping="none"), d)
    assert not torch.allclose(g_sg, g_fg)
    # fg: sum_i w~_i is constant (= |g|) within groups, so with A = 1 its gradient vanishes
    d["adv"] = torch.ones_like(d["adv"])
    _, g_fg1, _ = loss_and_grad(ratiorl.objective("snib_fg", beta=0.0, shaping="none"), d)
    assert g_fg1.abs().max() < 1e-12


def test_metrics_content():
    d = make_batch(scale=0.4, with_empty=False)
    obj = ratiorl.objective("grpo", per_position_metrics=True)
    out = call(obj, d)
    m = out.metrics
    for k in ("clip_frac", "clip_frac_low", "clip_frac_high", "weight_mean", "weight_max", "ess", "kl"):
        assert isinstance(m[k], float), k
    mask = d["mask"]
    r = torch.exp(d["logp"] - d["old"])[mask]
    a = d["adv"][:, None].expand_as(mask)[mask]
    low = ((r < 0.8) & (a < 0)).double().mean().item()
    high = ((r > 1.2) & (a > 0)).double().mean().item()
    assert abs(m["clip_frac_low"] - low) < 1e-9 and abs(m["clip_frac_high"] - high) < 1e-9
    assert abs(m["clip_frac"] - low - high) < 1e-9 and m["clip_frac"] > 0
    assert abs(m["weight_mean"] - r.mean().item()) < 1e-9 and abs(m["weight_max"] - r.max().item()) < 1e-9
    assert abs(m["ess"] - (r.sum() ** 2 / (len(r) * (r**2).sum())).item()) < 1e-9 and 0 < m["ess"] <= 1
    by_pos = m["clip_frac_by_position"]
    assert isinstance(by_pos, list) and len(by_pos) == mask.shape[1]
    clipped = (((torch.exp(d["logp"] - d["old"]) < 0.8) & (d["adv"][:, None] < 0)) |
               ((torch.exp(d["logp"] - d["old"]) > 1.2) & (d["adv"][:, None] > 0))) & mask
    exp_pos = (clipped.double().sum(0) / mask.double().sum(0).clamp_min(1)).tolist()
    assert max(abs(x - y) for x, y in zip(by_pos, exp_pos)) < 1e-12
    assert "clip_frac_by_position" not in call(ratiorl.objective("grpo"), d).metrics
    assert "kl" not in call(ratiorl.objective("dapo"), d).metrics


def test_registering_a_new_weight_composes_with_everything():
    @WEIGHTS.register("half_token_test", level="token")
    def half_token(delta, info):
        return Weight(0.5 * delta, "token", delta)

    try:
        d = make_batch()
        out, g, _ = loss_and_grad(ratiorl.objective("dgpo", weight="half_token_test"), d)
        assert torch.isfinite(out.loss) and g.abs().sum() > 0
        with pytest.raises(ValueError, match="already registered"):
            WEIGHTS.register("half_token_test")(half_token)
    finally:
        del WEIGHTS["half_token_test"]


def test_presets_and_exports():
    names = ratiorl.available_objectives()
    assert names == sorted(names)
    assert set(names) >= {"reinforce", "ppo", "grpo", "bnpo", "dr_grpo", "dapo", "gspo", "gspo_token", "sapo",
                          "cispo", "gppo", "ce_gppo", "aspo", "dgpo", "vanilla_is", "snib", "snib_fg", "ctpo",
                          "ctpo_fixed", "gmpo", "dppo_tv", "dppo_kl", "clip_cov", "kl_cov", "luspo", "vespo"}
    assert ratiorl.objective("ppo").advantage == "gae"
    assert ratiorl.objective("snib").advantage == "group_mean"
    assert ratiorl.objective("grpo").beta == 0.04 and ratiorl.objective("grpo").kl_estimator == "k3"
    assert ratiorl.objective("dapo").clip_high == 0.28
    assert ratiorl.objective("cispo").clip_low is None and ratiorl.objective("cispo").clip_high == 4.0
    assert set(RULES) == {"hard", "cispo", "gppo", "ce_gppo", "aspo", "dgpo"}
    for n in ("objective", "available_objectives", "advantages", "Objective", "ObjectiveOutput", "FixedBeta",
              "PrimalDualBeta", "AdaptiveBeta"):
        assert getattr(ratiorl, n) is getattr(ratiorl.objectives, n)
    obj = ratiorl.objective("grpo")
    with pytest.raises(Exception):
        obj.beta = 1.0  # frozen


@pytest.mark.parametrize("overrides", [dict(aspo_clip_high=0.1, aspo_clip_low=0.1), dict(aspo_clip_low=0.5, clip_low=0.1),
                                       dict(aspo_clip_low=0.1), dict(aspo_clip_high=0.15), dict(clip_high=5.0)])
def test_aspo_unusual_parameters_match_reference(overrides):
    from ._reference import reference_loss

    obj = ratiorl.objective("aspo", **overrides)
    d = make_batch(B=12, T=14, scale=0.5, token_adv=True)  # big enough to populate every region
    out, g, _ = loss_and_grad(obj, d)
    logp = d["logp"].clone().requires_grad_(True)
    ref = reference_loss(obj, logp, d["old"], d["adv"], d["mask"], d["group_ids"], d["ref"], d["token_kl"])
    (g_ref,) = torch.autograd.grad(ref, logp)
    torch.testing.assert_close(out.loss, ref.detach())
    torch.testing.assert_close(g, g_ref)
