"""Per-axis options, flat-key routing, declared capabilities and ``return_details``."""

import pickle

import pytest
import torch

import ratiorl
from ratiorl.objectives import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, WEIGHTS, Objective, Weight

from ._data import call, loss_and_grad, make_batch


def test_user_weight_option_reaches_the_function():
    seen = []

    @WEIGHTS.register("opt_test_scaled", level="token")
    def scaled(delta, info, *, alpha: float = 1.0):
        seen.append(alpha)
        return Weight(alpha * delta, "token", delta, metrics={"alpha_seen": alpha})

    try:
        d = make_batch(scale=0.3)
        obj = ratiorl.objective("grpo", weight="opt_test_scaled", weight_options={"alpha": 2.0}, beta=0.0)
        assert obj.alpha == 2.0 and obj.options("weight") == {"alpha": 2.0}
        out, g, _ = loss_and_grad(obj, d)
        assert seen[-1] == 2.0 and out.metrics["alpha_seen"] == 2.0
        # the option changes the loss: independent check against the token weight at alpha * delta
        # (token weight with clip on r^2 = exp(2 delta)): weight_max is exp(2 max delta)
        delta = (d["logp"] - d["old"])[d["mask"]]
        assert out.metrics["weight_max"] == pytest.approx(float(torch.exp(2.0 * delta).max()), rel=1e-12)
        # flat keys route to it too, and the signature default applies when not given
        assert ratiorl.objective("grpo", weight="opt_test_scaled", alpha=3.0).option("alpha") == 3.0
        assert ratiorl.objective("grpo", weight="opt_test_scaled").alpha == 1.0
        with pytest.raises(ValueError, match=r"'alpah'.*did you mean 'alpha'"):
            ratiorl.objective("grpo", weight="opt_test_scaled", weight_options={"alpah": 2.0})
    finally:
        del WEIGHTS["opt_test_scaled"]


def test_unknown_flat_key_names_the_nearest_valid_key():
    with pytest.raises(ValueError, match=r"\['pos_powr'\].*did you mean 'pos_power'.*valid keys:.*pos_clip_low"):
        ratiorl.objective("ctpo", pos_powr=0.7)
    with pytest.raises(ValueError, match=r"\['gama'\].*did you mean 'gamma'"):
        ratiorl.objective("ppo", gama=0.9)  # ppo's advantage is gae, which declares gamma
    with pytest.raises(ValueError, match=r"\['zzz'\] for objective 'grpo'; valid keys"):
        ratiorl.objective("grpo", zzz=1)


def test_range_checks_keep_their_messages():
    for kw, msg in [(dict(clip_low=1.0), r"clip_low must be in \[0, 1\) or None, got 1.0"),
                    (dict(clip_high=-0.1), "clip_high must be >= 0 or None"),
                    (dict(shaping="gate", tau_neg=0.0), "tau_pos and tau_neg must be > 0"),
                    (dict(aggregation="seq_mean_token_sum_norm", max_tokens=0), "max_tokens must be a positive int"),
                    (dict(weight="self_normalized", aggregation="sequence", normalize_scope="rows"),
                     "normalize_scope must be 'group' or 'batch'"),
                    (dict(shaping="weighted", rule="dgpo", m=0.0), "dgpo needs n > 0 and m > 0"),
                    (dict(weight="cumulative", max_log_weight=0.0), "max_log_weight must be > 0"),
                    (dict(beta=-1.0), "beta must be >= 0"), (dict(nonfinite="skip"), "nonfinite must be")]:
        with pytest.raises(ValueError, match=msg):
            ratiorl.objective("grpo", **kw)


def test_routing_options_and_replace():
    obj = ratiorl.objective("ctpo", shaping_options={"pos_power": 0.7})
    assert obj.options("shaping") == dict(pos_clip_low=0.025, pos_clip_high=0.05, pos_power=0.7, pos_dual_clip=0.05)
    assert obj.pos_power == 0.7 and obj.option("clip_low") is None and obj.option("clip_low", 0.2) == 0.2
    with pytest.raises(AttributeError, match="clip_low"):
        obj.clip_low  # noqa: B018 - position_clip has no clip_low
    # the preset's flat defaults that the new shaping does not declare are dropped silently
    fixed = ratiorl.objective("ctpo", shaping="dual_clip")
    assert fixed.options("shaping") == dict(clip_low=0.2, clip_high=0.2, dual_clip=3.0)
    # replace: flat keys routed, options merged, options of a changed axis dropped if not accepted
    dapo = ratiorl.objective("dapo")
    assert dapo.replace(clip_low=0.1).shaping_options == {"clip_low": 0.1, "clip_high": 0.28}
    assert dapo.replace(shaping_options={"clip_low": 0.1}).clip_high == 0.28
    gate = dapo.replace(shaping="gate")
    assert gate.shaping_options == {} and gate.options("shaping") == {"tau_pos": 1.0, "tau_neg": 1.05}
    assert gate.replace(shaping="clip").clip_high == 0.2  # dropped, so back to the signature default
    w = dapo.replace(shaping="weighted", rule="dgpo", n=2.0)
    assert w.clip_high == 0.28 and w.options("rule") == {"n": 2.0, "m": 2.0}
    with pytest.raises(ValueError, match=r"\['n'\]"):
        dapo.replace(n=2.0)  # no dgpo rule selected
    # dr_grpo: the generation limit goes to the aggregation that declares it, once
    dr = ratiorl.objective("dr_grpo")
    assert dr.max_tokens is None and dr.with_generation_limit(64).max_tokens == 64
    assert dr.replace(max_tokens=8).with_generation_limit(64).max_tokens == 8
    assert ratiorl.objective("grpo").with_generation_limit(64) == ratiorl.objective("grpo")


def test_objectives_hash_compare_and_pickle():
    a, b = ratiorl.objective("dgpo", n=2.0), ratiorl.objective("dgpo", rule_options={"n": 2.0})
    assert a == b and hash(a) == hash(b) and a != ratiorl.objective("dgpo")
    c = pickle.loads(pickle.dumps(a))
    assert c == a and c.n == 2.0
    d = make_batch()
    torch.testing.assert_close(call(c, d).loss, call(a, d).loss)
    opts = {"clip_low": 0.3}
    e = Objective(shaping_options=opts)
    opts["clip_low"] = 0.9  # the objective keeps its own copy
    assert e.clip_low == 0.3


def test_capabilities_are_read_from_attributes():
    @ADVANTAGES.register("cap_test_critic", needs_critic=True, token_level=True)
    def critic_adv(rewards, index, G, values=None, mask=None, *, scale: float = 1.0):
        return scale * (rewards[:, None] - values) * mask

    @AGGREGATIONS.register("cap_test_limit", level="token", uses_generation_limit=True)
    def limit(L, info, *, max_tokens=None):
        return (L * info.mask).sum() / (info.num_sequences * (max_tokens or info.T))

    @KL_ESTIMATORS.register("cap_test_full", needs_token_kl=True)
    def full(logp, ref_logp, token_kl, info):
        return 2.0 * token_kl

    try:
        obj = ratiorl.objective("grpo", advantage="cap_test_critic", aggregation="cap_test_limit",
                                kl_estimator="cap_test_full")
        assert obj.needs_critic and not ratiorl.objective("grpo").needs_critic and ratiorl.objective("ppo").needs_critic
        assert obj.needs_token_kl and not obj.needs_ref_logp and not obj.replace(beta=0.0).needs_token_kl
        assert obj.with_generation_limit(9).max_tokens == 9
        assert not obj.needs_groups  # neither the token weight nor this advantage uses groups
        assert ratiorl.objective("grpo").needs_groups and not ratiorl.objective("grpo").loss_needs_groups
        snib = ratiorl.objective("snib")
        assert snib.loss_needs_groups and not snib.replace(normalize_scope="batch").loss_needs_groups
        # the custom advantage runs per token (ignoring groups) with its option
        values, mask = torch.rand(3, 4), torch.ones(3, 4)
        A = ratiorl.advantages(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0, 0, 1]), method="cap_test_critic",
                               values=values, mask=mask, scale=0.5)
        torch.testing.assert_close(A, 0.5 * (torch.tensor([1.0, 0.0, 2.0])[:, None] - values))
        # and the custom estimator gets token_kl: missing token_kl is a clear error
        d = make_batch()
        with pytest.raises(ValueError, match="cap_test_full.*needs token_kl"):
            obj(d["logp"], d["old"], d["adv"], d["mask"], ref_logp=d["ref"])
        out = call(obj, d)
        kl = 2.0 * (d["token_kl"] * d["mask"]).sum() / d["mask"].sum()
        assert out.metrics["kl"] == pytest.approx(float(kl), rel=1e-12)
    finally:
        del ADVANTAGES["cap_test_critic"], AGGREGATIONS["cap_test_limit"], KL_ESTIMATORS["cap_test_full"]


@pytest.mark.parametrize("name", ["grpo", "gspo", "ctpo", "ppo", "snib", "dgpo"])
def test_details_match_metrics(name):
    d = make_batch(B=12, T=10, scale=0.5)
    obj = ratiorl.objective(name, per_position_metrics=True)
    out = call(obj, d, return_details=True)
    det = out.details
    assert call(obj, d).details is None
    mask = d["mask"]
    valid = mask if det.level == "token" else mask.any(1)
    n = valid.sum()
    assert det.level == obj.level and det.weight.shape == valid.shape and not det.weight.requires_grad
    low = int(det.clipped_low.sum()) if det.clipped_low is not None else 0
    high = int(det.clipped_high.sum()) if det.clipped_high is not None else 0
    n = int(n)
    assert (low + high) / n == pytest.approx(out.metrics["clip_frac"], abs=1e-12)
    if name != "gspo":
        assert out.metrics["clip_frac"] > 0  # the check is not vacuous
    by_pos = (det.clipped_by_token.sum(0) / mask.sum(0).clamp_min(1)).tolist()
    assert by_pos == pytest.approx(out.metrics["clip_frac_by_position"], abs=1e-12)
    w = det.weight[valid]
    assert float(w.max()) == pytest.approx(out.metrics["weight_max"], rel=1e-12)
    torch.testing.assert_close(det.log_weight.exp(), det.weight)
    if obj.beta > 0:
        kl = (det.token_kl * mask).sum() / mask.sum()
        assert float(kl) == pytest.approx(out.metrics["kl"], rel=1e-12)
    else:
        assert det.token_kl is None
    if det.clipped_dual is not None:
        assert int(det.clipped_dual.sum()) / n == pytest.approx(out.metrics["dual_clip_frac"], abs=1e-12)
