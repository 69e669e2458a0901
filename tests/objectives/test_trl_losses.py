"""TRL 1.16's own loss code (GRPOTrainer.compute_loss, driven by _trl_harness) against ratiorl for
the TRL-only losses: loss_type "luspo" and "vespo", the off-policy sequence mask
(off_policy_mask_threshold -> token_selection="opsm"), top_entropy_quantile
(-> token_selection="top_entropy") and two-sided clipping (delta -> shaping="dual_clip"):
same loss value and same gradient."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("accelerate")

import ratiorl  # noqa: E402

from ._trl_harness import TRLLoss  # noqa: E402


@pytest.fixture(scope="module")
def trl():
    harness = TRLLoss()
    yield harness
    harness.close()


def data(seed, B=8, T=12, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 2.0 - 0.05
    logp = old + spread * torch.randn(B, T, generator=g)
    lengths = torch.randint(3, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.long)
    adv = torch.randn(B, generator=g)
    ent = torch.rand(B, T, generator=g) * 2
    mu = old + 0.5 * torch.rand(B, T, generator=g)  # the sampler's log-probs, off by up to 0.5 nats
    return dict(logp=logp, old=old, mask=mask, adv=adv, ent=ent, mu=mu)


def both(trl, cfg, obj, d, *, entropies=None, extra=None, kw=None):
    lp = d["logp"].clone().requires_grad_(True)
    t = trl.loss(trl.trainer(**cfg), lp, d["old"], d["adv"], d["mask"], entropies=entropies, extra_inputs=extra)
    t.backward()
    lp2 = d["logp"].clone().requires_grad_(True)
    out = obj(lp2, d["old"], d["adv"], d["mask"], **(kw or {}))
    out.loss.backward()
    return (t.detach(), lp.grad), (out.loss.detach(), lp2.grad), out


def check(a, b, tol=2e-6):
    torch.testing.assert_close(b[0], a[0], atol=tol, rtol=tol)
    torch.testing.assert_close(b[1], a[1], atol=tol, rtol=tol)


@pytest.mark.parametrize("seed", [0, 1])
def test_luspo(trl, seed):
    d = data(seed, spread=2e-4)  # inside and outside GSPO's tiny clip window
    cfg = dict(loss_type="luspo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4, beta=0.0)
    a, b, out = both(trl, cfg, ratiorl.objective("luspo"), d)
    check(a, b)


@pytest.mark.parametrize("seed", [0, 1])
def test_vespo(trl, seed):
    d = data(seed, spread=0.05)
    a, b, _ = both(trl, dict(loss_type="vespo", beta=0.0), ratiorl.objective("vespo"), d)
    check(a, b, 1e-5)


@pytest.mark.parametrize("sampler", [False, True])
def test_off_policy_sequence_mask(trl, sampler):
    d = data(3)
    cfg = dict(loss_type="bnpo", off_policy_mask_threshold=0.1, beta=0.0)
    obj = ratiorl.objective("bnpo", token_selection="opsm", opsm_threshold=0.1)
    extra = {"sampling_per_token_logps": d["mu"]} if sampler else None
    kw = {"behaviour_logp": d["mu"]} if sampler else None
    if not sampler:  # without a sampler, pi_old is the reference: make the policy drift instead
        d["logp"] = d["old"] - 0.3 * torch.rand_like(d["old"])
    a, b, out = both(trl, cfg, obj, d, extra=extra, kw=kw)
    assert 0 < out.metrics["selection_keep_frac"] < 1
    check(a, b)


@pytest.mark.parametrize("q", [0.2, 0.6])
def test_top_entropy_quantile(trl, q):
    d = data(4)
    cfg = dict(loss_type="bnpo", top_entropy_quantile=q, beta=0.0)
    obj = ratiorl.objective("bnpo", token_selection="top_entropy", top_entropy_quantile=q)
    a, b, out = both(trl, cfg, obj, d, entropies=d["ent"], kw={"entropy": d["ent"]})
    assert 0 < out.metrics["selection_keep_frac"] < 1
    check(a, b)


@pytest.mark.parametrize("delta", [1.3, 2.0])
def test_two_sided_clipping_is_dual_clip(trl, delta):
    d = data(5, spread=0.6)
    cfg = dict(loss_type="bnpo", delta=delta, beta=0.0)
    obj = ratiorl.objective("bnpo", shaping="dual_clip", dual_clip=delta)
    a, b, out = both(trl, cfg, obj, d)
    assert out.metrics["dual_clip_frac"] > 0
    check(a, b)
