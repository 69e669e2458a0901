"""Every preset (and some cross-axis compositions) against the plain-loop float64 reference."""

import pytest
import torch

import ratiorl

from ._data import loss_and_grad, make_batch
from ._reference import reference_loss

# the verl / TRL presets (GMPO, DPPO, Clip-/KL-Cov, LUSPO, VESPO) have their own independent float64
# references and verl/TRL comparisons in test_verl_trl_losses.py and test_trl_losses.py
_OWN_REFERENCE = {"gmpo", "dppo_tv", "dppo_kl", "clip_cov", "kl_cov", "vespo"}
PRESETS = [n for n in ratiorl.available_objectives() if n not in _OWN_REFERENCE]


def _reference(obj, d, **kw):
    logp = d["logp"].detach().clone().requires_grad_(True)
    kl = d["token_kl"].detach().clone().requires_grad_(True)
    loss = reference_loss(obj, logp, d["old"], d["adv"], d["mask"], d["group_ids"], d["ref"], kl, **kw)
    gl, gk = torch.autograd.grad(loss, (logp, kl), allow_unused=True)
    return loss, gl, (torch.zeros_like(kl) if gk is None else gk)


def _check(obj, d, **kw):
    out, gl, gk = loss_and_grad(obj, d, **kw)
    ref_loss, ref_gl, ref_gk = _reference(obj, d, **kw)
    assert out.loss.dtype == torch.float64
    torch.testing.assert_close(out.loss, ref_loss.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gl, ref_gl, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(gk, ref_gk, rtol=1e-8, atol=1e-12)
    return out, gl


@pytest.mark.parametrize("name", PRESETS)
def test_preset_matches_reference(name):
    obj = ratiorl.objective(name)
    d = make_batch()
    _check(obj, d)
    # the comparison is not vacuous: on a larger batch the gradient is non-zero, and clipping
    # presets really clip
    _, gl = _check(obj, make_batch(B=12, T=10, scale=0.05))
    assert gl.abs().sum() > 0
    if obj.shaping in ("clip", "dual_clip", "position_clip") and obj.level == "token" and name != "gspo_token":
        out, _ = _check(obj, make_batch(B=12, T=10, scale=0.5))
        assert out.metrics["clip_frac"] > 0


@pytest.mark.parametrize("name", PRESETS)
def test_preset_matches_reference_with_kl_and_global_counts(name):
    obj = ratiorl.objective(name)
    if obj.beta == 0:
        obj = obj.replace(beta=0.07)
    d = make_batch(scale=0.15)
    _check(obj, d, num_tokens=40, num_sequences=9)


@pytest.mark.parametrize("name", [n for n in PRESETS if ratiorl.objective(n).level == "token"])
def test_token_level_advantages(name):
    _check(ratiorl.objective(name), make_batch(token_adv=True))


@pytest.mark.parametrize("placement", ["loss", "loss_is"])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "exact"])
@pytest.mark.parametrize("base", ["grpo", "gspo", "ctpo", "snib"])
def test_kl_estimators_and_placements(base, estimator, placement):
    obj = ratiorl.objective(base, beta=0.2, kl_estimator=estimator, kl_placement=placement)
    _check(obj, make_batch(scale=0.1))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(weight="cumulative", shaping="weighted", rule="dgpo"),
        dict(weight="cumulative", shaping="weighted", rule="aspo"),
        dict(weight="sequence_token", shaping="clip"),
        dict(weight="geometric", shaping="weighted", rule="gppo", aggregation="token_mean"),
        dict(weight="self_normalized", normalize_scope="batch"),
        dict(weight="self_normalized_fg", shaping="gate", aggregation="seq_mean_token_mean"),
        dict(weight="sequence", shaping="none", aggregation="seq_mean_token_sum"),
        dict(weight="token", shaping="weighted", rule="cispo", clip_low=0.2, clip_high=0.28),
        dict(weight="token", shaping="weighted", rule="ce_gppo", beta1=0.5, beta2=1.2),
        dict(weight="token", shaping="clip", clip_low=None, clip_high=0.3, aggregation="sequence"),
        dict(weight="geometric_token", shaping="position_clip", pos_power=1.0),
        dict(weight="token", shaping="dual_clip", dual_clip=1.5, aggregation="seq_mean_token_sum_norm", max_tokens=11),
    ],
)
def test_compositions_match_reference(overrides):
    obj = ratiorl.objective("bnpo", **overrides)  # bnpo: token weight, clip 0.2, token_mean
    _check(obj, make_batch(scale=0.4))


@pytest.mark.parametrize("name", ["ctpo", "ctpo_fixed", "grpo", "gspo", "snib", "dgpo"])
def test_mask_with_holes_matches_reference(name):
    # masked-out tokens inside a response (e.g. tool outputs): pos_t counts valid tokens only
    d = make_batch(B=6, T=9, scale=0.1)
    holes = torch.rand(6, 9) < 0.3
    holes[:, 0] = False
    d["mask"] = d["mask"] & ~holes
    _check(ratiorl.objective(name), d)
