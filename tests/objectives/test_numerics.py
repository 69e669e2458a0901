"""Numerics (docs/objectives.md, "numerics"): long sequences, low precision, empty responses,
non-finite inputs."""

import pytest
import torch

import ratiorl
from ratiorl.objectives import WEIGHTS, Objective

from ._data import call, loss_and_grad, make_batch

ALL = ratiorl.available_objectives()


def _long_batch(T=8192, dtype=torch.float32):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    B = 5
    old = -torch.rand(B, T, generator=g) * 3
    delta = (torch.rand(B, T, generator=g) - 0.5)  # |delta| <= 0.5
    delta[0] = 0.5  # sum = +4096: exp would overflow
    delta[1] = -0.5  # sum = -4096: exp would underflow to 0
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[3, T // 2:] = False
    return dict(logp=(old + delta).to(dtype), old=old, adv=torch.tensor([1.0, -1.0, 0.5, -2.0, 1.5]),
                mask=mask, group_ids=torch.tensor([0, 0, 0, 1, 1]), ref=old + 0.1, token_kl=torch.rand(B, T) * 0.1)


@pytest.mark.parametrize("shaping", ["none", "clip"])
@pytest.mark.parametrize("weight", sorted(WEIGHTS))
def test_long_sequences_finite_loss_and_grad(weight, shaping):
    d = _long_batch()
    agg = "sequence" if WEIGHTS[weight].level == "sequence" else "token_mean"
    obj = Objective(weight=weight, shaping=shaping, aggregation=agg, beta=0.1, kl_estimator="exact",
                    kl_placement="is_weighted" if agg == "sequence" else "loss_is")
    out, g, gk = loss_and_grad(obj, d)
    assert torch.isfinite(out.loss)
    assert torch.isfinite(g).all() and torch.isfinite(gk).all()
    assert all(v == v and abs(v) != float("inf") for v in out.metrics.values())


@pytest.mark.parametrize("name", ALL)
def test_long_sequences_every_preset(name):
    out, g, gk = loss_and_grad(ratiorl.objective(name), _long_batch(T=2048))
    assert torch.isfinite(out.loss) and torch.isfinite(g).all() and torch.isfinite(gk).all()


def test_self_normalized_long_is_bounded_by_group_size():
    d = _long_batch()
    obj = Objective(weight="self_normalized", shaping="none", aggregation="sequence")
    out = call(obj, d)
    assert out.metrics["weight_max"] <= 3.0 + 1e-4  # largest group has 3 members
    assert out.metrics["weight_max"] > 2.9  # the +4096 sequence dominates its group


@pytest.mark.parametrize("name", ALL)
def test_bf16_inputs(name):
    d = make_batch(dtype=torch.float32, scale=0.1)
    obj = ratiorl.objective(name)
    out32, g32, _ = loss_and_grad(obj, d)
    d16 = dict(d, logp=d["logp"].bfloat16(), old=d["old"].bfloat16())
    out16, g16, _ = loss_and_grad(obj, d16)
    assert out16.loss.dtype == torch.float32  # summed in float32
    assert g16.dtype == torch.bfloat16
    assert torch.isfinite(out16.loss) and torch.isfinite(g16.float()).all()
    # bf16 rounding of logp perturbs the ratios by ~1e-2 relative at most
    assert abs(out16.loss.item() - out32.loss.item()) < 0.1 * (abs(out32.loss.item()) + 0.1)


@pytest.mark.parametrize("name", ALL)
def test_empty_responses_contribute_zero(name):
    obj = ratiorl.objective(name)
    d = make_batch(with_empty=True)
    assert d["mask"][2].sum() == 0
    out, g, gk = loss_and_grad(obj, d)
    assert (g[2] == 0).all() and (gk[2] == 0).all()
    # whatever the empty row holds, the loss does not move
    d2 = dict(d)
    for k in ("logp", "old", "ref", "token_kl"):
        d2[k] = d[k].clone()
        d2[k][2] = torch.randn_like(d2[k][2]) - 1.0
    d2["adv"] = d["adv"].clone()
    d2["adv"][2] = 123.0
    assert torch.equal(call(obj, d2).loss, out.loss)


@pytest.mark.parametrize("name", ALL)
def test_all_empty_batch_is_zero(name):
    d = make_batch(B=4, lengths=[0, 0, 0, 0])
    out, g, _ = loss_and_grad(ratiorl.objective(name), d)
    assert out.loss.item() == 0.0 and (g == 0).all()


@pytest.mark.parametrize("tensor", ["logp", "old", "adv", "ref", "token_kl"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_raises_naming_tensor(tensor, bad):
    name = {"old": "old_logp", "adv": "advantages", "ref": "ref_logp"}.get(tensor, tensor)
    d = make_batch()
    d[tensor] = d[tensor].clone()
    if d[tensor].dim() == 1:
        d[tensor][4] = bad
    else:
        d[tensor][4, 0] = bad
    obj = ratiorl.objective("grpo", kl_estimator="exact" if tensor == "token_kl" else "k3")
    with pytest.raises(ValueError, match=rf"^{name} contains NaN/inf"):
        call(obj, d)


def test_nonfinite_on_padding_is_ignored():
    d = make_batch(lengths=[7, 3, 0, 4, 7, 2])
    base = call(ratiorl.objective("grpo"), d).loss
    d["logp"] = d["logp"].clone()
    row = 3
    d["logp"][row][~d["mask"][row]] = float("nan")
    d["ref"] = d["ref"].clone()
    d["ref"][row][~d["mask"][row]] = -float("inf")
    torch.testing.assert_close(call(ratiorl.objective("grpo"), d).loss, base)


@pytest.mark.parametrize("name", ["grpo", "dapo", "gspo", "snib", "ctpo", "cispo"])
def test_nonfinite_mask_drops_sequences(name):
    d = make_batch(B=7, groups=torch.tensor([0, 0, 0, 1, 1, 1, 2]))
    obj = ratiorl.objective(name, nonfinite="mask")
    d["logp"] = d["logp"].clone()
    d["logp"][4, 0] = float("nan")
    d["adv"] = d["adv"].clone()
    d["adv"][6] = float("inf")
    logp = d["logp"].clone().requires_grad_(True)
    out = call(obj, d, logp=logp)
    assert out.metrics["nonfinite_dropped"] == 2.0
    (g,) = torch.autograd.grad(out.loss, logp)
    assert torch.isfinite(out.loss) and torch.isfinite(g).all()
    assert (g[4] == 0).all() and (g[6] == 0).all()
    keep = torch.tensor([0, 1, 2, 3, 5])
    dk = {k: v[keep] for k, v in d.items()}
    torch.testing.assert_close(out.loss, call(obj, dk).loss)


def test_extreme_log_ratio_is_clamped():
    d = make_batch(with_empty=False)
    d["logp"] = d["logp"].clone()
    d["logp"][0, 0] = -1e4  # log-ratio -1e4 -> clamped to -20
    out, g, _ = loss_and_grad(ratiorl.objective("reinforce"), d)
    assert torch.isfinite(out.loss) and torch.isfinite(g).all()
    assert g[0, 0] == 0  # beyond the clamp, no gradient


def test_masked_clamp_matches_torch_clamp():
    from ratiorl.objectives._ops import clamp_abs, masked_clamp

    x = (torch.randn(5, 9, dtype=torch.float64) * 2).requires_grad_(True)
    lo = torch.randn(5, 1, dtype=torch.float64) - 1
    hi = lo + 1.5
    g = torch.randn(5, 9, dtype=torch.float64)
    ours = masked_clamp(x, lo, hi, (x.detach() >= lo) & (x.detach() <= hi))
    ref = torch.clamp(x, lo, hi)
    assert torch.equal(ours, ref)
    (ga,) = torch.autograd.grad((ours * g).sum(), x)
    (gb,) = torch.autograd.grad((ref * g).sum(), x)
    assert torch.equal(ga, gb) and (ga == 0).any() and (ga != 0).any()
    ours, ref = clamp_abs(x, 1.0), torch.clamp(x, -1.0, 1.0)
    assert torch.equal(ours, ref)
    assert torch.equal(torch.autograd.grad(ours.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0])


def test_sequence_weight_saturates_at_max_log_weight():
    d = _long_batch()
    d["logp"][2] = d["old"][2] + 1e-3  # summed log-ratio 8.2: inside the bound
    obj = Objective(weight="sequence", shaping="none", aggregation="sequence")
    out, g, _ = loss_and_grad(obj, d)
    assert abs(out.metrics["weight_max"] / torch.exp(torch.tensor(20.0)).item() - 1) < 1e-5
    assert (g[0] == 0).all()  # saturated (+4096 summed log-ratio): no gradient, like a clipped token
    assert (g[2] != 0).any()
