"""KL controllers and the errors users see."""

import pytest
import torch

import ratiorl
from ratiorl.objectives import AdaptiveBeta, FixedBeta, Objective, PrimalDualBeta

from ._data import call, make_batch


def test_fixed_beta():
    c = FixedBeta(0.3)
    assert c.beta == 0.3 and c.update(10.0) == 0.3 and c.update(0.0) == 0.3


def test_primal_dual_beta():
    c = PrimalDualBeta(target=0.1, lr=0.5, beta=0.2)
    b = c.update(0.3)  # KL above target: beta grows by lr * (KL - target)
    assert abs(b - (0.2 + 0.5 * 0.2)) < 1e-12 and c.beta == b
    b = c.update(0.0)  # below target: shrinks
    assert abs(b - (0.3 - 0.05)) < 1e-12
    for _ in range(20):
        b = c.update(0.0)
    assert b == 0.0  # projected onto beta >= 0


def test_adaptive_beta():
    c = AdaptiveBeta(target=0.1, horizon=10, beta=0.5)
    assert abs(c.update(0.15) - 0.5 * (1 + 0.2 / 10)) < 1e-12  # error 0.5 clipped to 0.2
    before = c.beta
    assert abs(c.update(0.09) - before * (1 - 0.1 / 10)) < 1e-12
    c2 = AdaptiveBeta(target=0.1, horizon=10, beta=0.5)
    assert abs(c2.update(0.1, n_steps=4) - 0.5) < 1e-12


def test_controller_errors():
    with pytest.raises(ValueError):
        PrimalDualBeta(target=0.1, lr=0.0)
    with pytest.raises(ValueError):
        AdaptiveBeta(target=0.0, horizon=1)
    with pytest.raises(ValueError):
        FixedBeta(-1.0)


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match=r"unknown objective 'grpoo'.*grpo.*snib"):
        ratiorl.objective("grpoo")
    with pytest.raises(ValueError, match=r"unknown weight 'tokn'.*cumulative.*token"):
        Objective(weight="tokn")
    with pytest.raises(ValueError, match=r"unknown shaping.*position_clip"):
        Objective(shaping="clipp")
    with pytest.raises(ValueError, match=r"unknown aggregation.*token_mean"):
        Objective(aggregation="mean")
    with pytest.raises(ValueError, match=r"unknown KL estimator.*k3"):
        Objective(kl_estimator="k4")
    with pytest.raises(ValueError, match=r"unknown KL placement.*is_weighted"):
        Objective(kl_placement="reward")
    with pytest.raises(ValueError, match=r"unknown weighted rule.*dgpo"):
        Objective(shaping="weighted", rule="dgpoo")
    with pytest.raises(ValueError, match=r"needs rule.*dgpo"):
        Objective(shaping="weighted")
    with pytest.raises(ValueError, match=r"unknown advantage method.*rloo"):
        Objective(advantage="ppo")


def test_unknown_override_lists_valid_keys():
    with pytest.raises(ValueError, match=r"\['clip_lo'\].*did you mean 'clip_low'.*valid keys:.*clip_high"):
        ratiorl.objective("grpo", clip_lo=0.1)
    # an option that exists, but not on any selected entry (grpo's shaping is clip, not dual_clip)
    with pytest.raises(ValueError, match=r"\['dual_clip'\].*valid keys:.*clip_low"):
        ratiorl.objective("grpo", dual_clip=2.0)
    with pytest.raises(ValueError, match=r"\['normalize_scop'\].*did you mean 'normalize_scope'"):
        ratiorl.objective("snib").replace(normalize_scop="batch")
    # explicit per-axis options are checked against the entry's signature
    with pytest.raises(ValueError, match=r"shaping 'position_clip' got unknown option\(s\) 'pos_powr' "
                                         r"\(did you mean 'pos_power'\?\); valid options: pos_clip_low"):
        ratiorl.objective("ctpo", shaping_options={"pos_powr": 0.7})
    with pytest.raises(ValueError, match=r"advantage method 'group_mean' got unknown option\(s\) 'eps'"):
        ratiorl.advantages(torch.randn(4), None, method="group_mean", eps=1e-3)


def test_meaningless_combinations_say_why():
    with pytest.raises(ValueError, match="one value per sequence"):
        ratiorl.objective("snib", shaping="position_clip")
    with pytest.raises(ValueError, match="per token"):
        ratiorl.objective("grpo", kl_placement="is_weighted")
    # without a KL term the placement is unused, so a token-level weight is fine
    ratiorl.objective("vanilla_is", weight="sequence_token", beta=0.0)
    with pytest.raises(ValueError, match="per token"):
        ratiorl.objective("vanilla_is", weight="sequence_token", beta=0.1)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        ratiorl.objective("ppo", dual_clip=0.5)
    with pytest.raises(ValueError, match="clip_low"):
        ratiorl.objective("grpo", clip_low=1.5)
    # a sequence-level weight with a plain clip is fine
    ratiorl.objective("snib", shaping="dual_clip")


def test_exact_kl_without_token_kl():
    d = make_batch()
    with pytest.raises(ValueError, match=r"token_kl.*supply it, or pick\s+another estimator"):
        ratiorl.objective("snib")(d["logp"], d["old"], d["adv"], d["mask"], group_ids=d["group_ids"])
    # fine with beta = 0
    ratiorl.objective("snib", beta=0.0)(d["logp"], d["old"], d["adv"], d["mask"], group_ids=d["group_ids"])


def test_sampled_kl_without_ref():
    d = make_batch()
    with pytest.raises(ValueError, match="ref_logp"):
        ratiorl.objective("grpo")(d["logp"], d["old"], d["adv"], d["mask"])


@pytest.mark.parametrize(
    "tensor,bad,pattern",
    [
        ("old", lambda t: t[:, :-1], r"old_logp has shape \(6, 6\) but logp has shape \(6, 7\)"),
        ("mask", lambda t: t[:-1], r"mask has shape \(5, 7\)"),
        ("ref", lambda t: t.T, r"ref_logp has shape \(7, 6\)"),
        ("adv", lambda t: t[:-1], r"advantages has shape \(5,\); expected \(B,\) = \(6,\)"),
        ("group_ids", lambda t: t[:3], r"group_ids must be a \(B,\) = \(6,\)"),
        ("logp", lambda t: t[0], r"logp must have shape \(B, T\), got \(7,\)"),
        ("logp", lambda t: (t * 100).long(), r"logp must be a floating-point tensor, got dtype torch.int64"),
        ("adv", lambda t: t.tolist(), r"advantages must be a torch.Tensor"),
    ],
)
def test_shape_and_dtype_errors_name_the_tensor(tensor, bad, pattern):
    d = make_batch()
    d[tensor] = bad(d[tensor])
    with pytest.raises(ValueError, match=pattern):
        call(ratiorl.objective("grpo"), d)
