"""VAPO pieces in the trainer: the preset, value pretraining, decoupled critic lambda, the NLL term
on correct samples; and the advantage stage's declared inputs (ReMax greedy baseline, GDPO's reward
components, the optimal token baseline's token stats) and PF-PPO resampling."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import ratiorl
from ratiorl.train import Trainer
from ratiorl.train.critic import NLLLoss
from ratiorl.train.stages.advantage_inputs import PFPPO, pf_ppo_weights

from .conftest import trainable_snapshot


def test_vapo_preset_runs_with_pretraining_and_nll(make_config):
    cfg = make_config(**{"objective.name": "vapo", "critic.pretrain_steps": 2, "critic.kl_coef": 0.0,
                         "train.nll_coef": 0.1, "train.nll_threshold": 0.0})
    t = Trainer(cfg)
    try:
        obj = t.objective
        assert (obj.advantage, obj.clip_low, obj.clip_high, obj.aggregation) == (
            "gae_length_adaptive", 0.2, 0.28, "token_mean")
        policy0 = trainable_snapshot(t)
        head0 = t.critic.model.head.weight.detach().clone()
        counters = t.advantages.pretraining(t.advantages)  # what the first step runs first
        assert t.critic.pretrained_steps == 2 and counters["critic/pretrain_steps"] == 2.0
        assert not torch.equal(head0, t.critic.model.head.weight)  # the critic learned ...
        for n, p in trainable_snapshot(t).items():  # ... and the policy did not move
            assert torch.equal(p, policy0[n]), n
        metrics = t.step()
        assert t.critic.pretrained_steps == 2  # not again
        assert "nll_loss" in metrics and metrics["nll_loss"] > 0
        assert "value_loss" in metrics
        b = t.last_batch
        # decoupled lambda: the critic's targets are Monte Carlo returns (lambda = 1, gamma = 1, no KL)
        m = b.completion_mask.float()
        r = torch.zeros_like(m)
        L = m.sum(1).long()
        r[torch.arange(len(L)), L - 1] = b.rewards
        mc = r.flip(-1).cumsum(-1).flip(-1) * m
        torch.testing.assert_close(b.returns, mc, atol=1e-5, rtol=1e-5)
        assert t.critic.state_dict()["pretrained_steps"] == 2
    finally:
        t.close()


def test_nll_loss_splits_exactly():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(6, 5, generator=g)
    mask = (torch.arange(5)[None, :] < torch.tensor([[5], [3], [4], [1], [5], [2]])).float()
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.5])
    batch = SimpleNamespace(rewards=rewards, completion_mask=mask)
    nll = NLLLoss(0.1, threshold=1.0)
    nll.begin(batch)
    sel = (rewards >= 1.0).double()
    want = -0.1 * float((logp.double() * mask * sel[:, None]).sum() / (mask * sel[:, None]).sum())
    whole, _ = nll.loss(batch, 0.0, logp)
    parts = sum(float(nll.loss(SimpleNamespace(rewards=rewards[s], completion_mask=mask[s]), 0.0, logp[s])[0])
                for s in (slice(0, 2), slice(2, 6)))
    assert float(whole) == pytest.approx(want, rel=1e-6) and parts == pytest.approx(want, rel=1e-6)


def test_remax_greedy_baseline_in_trainer(make_config):
    t = Trainer(make_config(**{"objective.advantage": "remax"}))
    try:
        t.step()
        b = t.last_batch
        base = b.rewards - b.advantages
        for g in b.groups():
            rows = b.rows_of_groups([g])
            assert torch.allclose(base[rows], base[rows[0]].expand(len(rows)))
    finally:
        t.close()


@pytest.mark.parametrize("method", ["gdpo", "optimal_baseline", "reinforce_pp", "opo"])
def test_declared_inputs_in_trainer(make_config, method):
    t = Trainer(make_config(**{"objective.advantage": method}))
    try:
        metrics = t.step()
        b = t.last_batch
        assert torch.isfinite(b.advantages).all()
        if method == "gdpo":  # GDPO reads the raw per-function scores (reward noise is on the total only)
            want = ratiorl.advantages(b.rewards, b.group_ids, method="gdpo", mask=b.completion_mask,
                                      components=b.reward_components)
            torch.testing.assert_close(b.advantages, want)
        else:
            assert b.advantages.abs().sum() > 0 and metrics["grad_norm"] > 0
    finally:
        t.close()


def test_pf_ppo_matches_verl():
    try:
        from verl.trainer.ppo.core_algos import compute_pf_ppo_reweight_data  # noqa: PLC0415
    except Exception:  # noqa: BLE001
        pytest.skip("verl is not installed")
    scores = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 3.0, -2.0, 1.5])
    for method in ("pow", "max_min", "max_random"):
        w = pf_ppo_weights(scores, method, 2.0)
        torch.manual_seed(3)
        ours = torch.multinomial(w, len(scores), replacement=True)
        torch.manual_seed(3)
        data = SimpleNamespace(batch={"token_level_scores": scores[:, None], "i": torch.arange(8)},
                               non_tensor_batch={}, meta_info={})

        class Batch(dict):
            batch_size = None

        data.batch = Batch(data.batch)
        out = compute_pf_ppo_reweight_data(data, method, 2.0)
        assert torch.equal(out.batch["i"], ours), method
    with pytest.raises(ValueError, match="pf_ppo"):
        PFPPO("nope")


def test_pf_ppo_in_trainer(make_config):
    t = Trainer(make_config(**{"train.pf_ppo": "max_min"}))
    try:
        metrics = t.step()
        b = t.last_batch
        assert set(b.rewards.tolist()) <= {float(b.rewards.max()), float(b.rewards.min())}
        assert 0 < metrics["pf_ppo/unique_frac"] <= 1
    finally:
        t.close()
