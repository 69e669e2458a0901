"""A real sampler/trainer mismatch in the trainer: a bf16 sampler, a lagging sampler, top-k, the
decision where pi_old comes from, and exact resume with lag snapshots pending."""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch

import ratiorl
from ratiorl.policy import Policy
from ratiorl.train import Trainer, train
from ratiorl.train.sampler import mismatch_sources, old_logp_source, sampler_version
from ratiorl.train.trainer import TIMING_PREFIXES


def _stats_with(policy, model, batch):
    """log-probs of ``batch`` under ``model`` with the policy's temperature, in float32."""
    scorer = Policy(model, policy.tokenizer, reference="none", temperature=policy.temperature)
    with torch.no_grad():
        return scorer.completion_stats(batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                       batch.completion_mask).logp


def test_sampler_version_rule():
    # no lag, sync every update: the sampler is always the current policy
    assert [sampler_version(u, 0, 1) for u in range(5)] == [0, 1, 2, 3, 4]
    # sync_every=3: refreshed at updates 3, 6, ... (the lag grows 0, 1, 2 between refreshes)
    assert [sampler_version(u, 0, 3) for u in range(8)] == [0, 0, 0, 3, 3, 3, 6, 6]
    # policy_lag=2: always two updates behind (the initial weights until then)
    assert [sampler_version(u, 2, 1) for u in range(6)] == [0, 0, 0, 1, 2, 3]
    assert [sampler_version(u, 1, 2) for u in range(7)] == [0, 0, 0, 2, 2, 4, 4]


def test_old_logp_source_decision():
    def cfg(**rollout):
        r = dict(dtype=None, policy_lag=0, sync_every=1, top_k=0, top_p=1.0, min_p=0.0, recompute_old_logp=False)
        r.update(rollout)
        return SimpleNamespace(rollout=SimpleNamespace(**r), train=SimpleNamespace(epochs=1, mini_batches=1))

    plain, corrected = ratiorl.objective("grpo"), ratiorl.objective("grpo", mismatch_level="token")
    loglinear = ratiorl.objective("grpo", proximal="loglinear")
    f32 = torch.float32
    assert mismatch_sources(cfg().rollout, f32) == []
    assert mismatch_sources(cfg(dtype="float32").rollout, f32) == []  # the policy's own dtype
    assert mismatch_sources(cfg().rollout, f32, "bfloat16") == ["train.autocast=bfloat16"]  # bf16 trainer forward
    assert mismatch_sources(cfg(dtype="bfloat16", policy_lag=2, top_k=5, top_p=0.9, min_p=0.1).rollout, f32) == [
        "dtype=bfloat16", "policy_lag=2", "top_k=5", "top_p=0.9", "min_p=0.1"]
    bf16 = cfg(dtype="bfloat16")
    src = mismatch_sources(bf16.rollout, f32)
    assert old_logp_source(bf16, plain, src) == "behaviour"  # one update, no correction: mu is pi_old
    assert old_logp_source(bf16, corrected, src) == "forward"  # a correction needs pi_old != mu
    assert old_logp_source(cfg(), corrected, []) == "behaviour"  # nothing to correct
    several = cfg(dtype="bfloat16")
    several.train.mini_batches = 2
    assert old_logp_source(several, plain, src) == "forward"  # the clip is against pi_old
    assert old_logp_source(cfg(), plain, []) == "behaviour"
    assert old_logp_source(cfg(recompute_old_logp=True), plain, []) == "forward"  # forced
    assert old_logp_source(bf16, loglinear, src) == "loglinear"  # no forward: interpolated


def test_bf16_sampler_measured_mismatch_and_training(make_config):
    cfg = make_config(**{"rollout.dtype": "bfloat16", "objective.name": "grpo", "objective.mismatch_level": "token",
                         "objective.mismatch_mode": "mask", "train.steps": 2})
    t = Trainer(cfg)
    try:
        assert t.engine is not t.eval_engine and t.old_logp_source == "forward"
        assert all(p.dtype == torch.bfloat16 for p in t.engine.model.parameters())
        assert all(p.dtype == torch.float32 for p in t.model.parameters())
        pi_old = copy.deepcopy(t.model)  # the policy at the start of the step
        m = t.step()
        b = t.last_batch
        mask = b.completion_mask.bool()
        # old_logp is the trainer's fp32 forward of pi_old, behaviour_logp the bf16 sampler's numbers
        torch.testing.assert_close(b.old_logp, _stats_with(t.policy, pi_old, b), rtol=0, atol=1e-5)
        gap = (b.old_logp - b.behaviour_logp)[mask]
        assert gap.abs().mean() > 1e-4 and gap.abs().max() < 0.5  # measurable, rounding-sized
        # the bf16 sampler's numbers: an independent bf16 forward of the same weights
        mu = _stats_with(t.policy, copy.deepcopy(pi_old).to(torch.bfloat16), b)
        assert (mu - b.behaviour_logp)[mask].abs().mean() < gap.abs().mean()
        assert m["sampler/abs_logp_diff"] == pytest.approx(float(gap.abs().mean()), rel=1e-4)
        assert m["sampler/kl_k1"] == pytest.approx(float(-gap.double().mean()), rel=1e-3, abs=1e-7)
        assert math.isfinite(m["objective/mismatch_kl_k3"]) and 0 < m["objective/mismatch_ess"] <= 1
        assert math.isfinite(m["loss"]) and m["grad_norm"] > 0
        # after the update the sampler holds the new weights, cast to bf16
        for k, v in t.model.state_dict().items():
            assert torch.equal(t.engine.model.state_dict()[k], v.to(torch.bfloat16)), k
        t.step()
    finally:
        t.close()


def test_policy_lag_samples_with_the_weights_of_k_updates_ago(make_config):
    lag = 3
    cfg = make_config(**{"rollout.policy_lag": lag, "train.mini_batches": 2, "train.steps": 4,
                         "objective.name": "grpo"})
    t = Trainer(cfg)
    try:
        assert t.old_logp_source == "forward"  # lag + several updates: the clip is against pi_old
        versions = {0: copy.deepcopy(t.model.state_dict())}
        inner = t.update.after_update

        def record(updates):
            versions[updates] = copy.deepcopy(t.model.state_dict())
            inner(updates)

        t.update.after_update = record
        for _ in range(cfg.train.steps):
            u = t.update.updates
            want = max(0, u - lag)
            held = t.engine.model.state_dict()
            assert all(torch.equal(held[k], versions[want][k]) for k in versions[want]), (u, want)
            if want > 0:  # not vacuous: the held weights differ from the current ones
                assert any(not torch.equal(held[k], v) for k, v in t.model.state_dict().items())
            assert len(t.sampler.snapshots) <= lag
            t.step()
            b = t.last_batch
            assert (b.behaviour_version == want).all()
            stale = copy.deepcopy(t.model)
            stale.load_state_dict(versions[want])
            torch.testing.assert_close(b.behaviour_logp, _stats_with(t.policy, stale, b), rtol=1e-4, atol=1e-4)
        assert t.update.updates == 8
    finally:
        t.close()


def test_top_k_in_the_trainer_and_loglinear_proximal(make_config):
    cfg = make_config(**{"rollout.top_k": 4, "train.mini_batches": 2, "objective.name": "grpo"})
    t = Trainer(cfg)
    try:
        assert t.engine is t.eval_engine and t.old_logp_source == "forward"  # truncation alone needs no copy
        m = t.step()
        b = t.last_batch
        gap = (b.behaviour_logp - b.old_logp)[b.completion_mask.bool()]
        assert (gap >= -1e-4).all() and gap.max() > 1e-3  # renormalised over 4 tokens: log mu >= log pi_old
        assert m["sampler/kl_k1"] > 0
    finally:
        t.close()
    cfg = make_config(**{"rollout.policy_lag": 1, "objective.name": "grpo", "objective.proximal": "loglinear",
                         "train.steps": 2})
    t = Trainer(cfg)
    try:
        assert t.old_logp_source == "loglinear"
        for _ in range(2):
            m = t.step()
        assert math.isfinite(m["loss"]) and (t.last_batch.behaviour_version == 0).all()
    finally:
        t.close()


def _rows(path):
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(TIMING_PREFIXES)} for line in f]


def test_resume_with_a_bf16_lagging_sampler_is_exact(make_config, tmp_path):
    # at the step-2 checkpoint 4 updates are done, the sampler holds version 1 and versions 2..4
    # wait as snapshots: all of it must come back
    kw = {"rollout.dtype": "bfloat16", "rollout.policy_lag": 3, "train.mini_batches": 2, "train.steps": 4,
          "objective.name": "snib", "objective.mismatch_level": "self_normalized"}
    straight = make_config(out_dir=str(tmp_path / "straight"), **kw)
    train(straight)
    split = make_config(out_dir=str(tmp_path / "split"), **kw)
    assert not train(split, until=2)["finished"]
    state = torch.load(tmp_path / "split" / "checkpoints" / "step_000002" / "state.pt", weights_only=True)
    assert state["sampler_sync"]["version"] == 1 and sorted(state["sampler_sync"]["snapshots"]) == [2, 3, 4]
    assert train(split, resume=True)["finished"]
    rows1, rows2 = _rows(tmp_path / "straight" / "metrics.jsonl"), _rows(tmp_path / "split" / "metrics.jsonl")
    assert [r["step"] for r in rows2] == [1, 2, 3, 4] and rows1 == rows2
    assert rows1[-1]["sampler/abs_logp_diff"] > 0
    w1 = torch.load(tmp_path / "straight" / "checkpoints" / "step_000004" / "state.pt", weights_only=True)
    w2 = torch.load(tmp_path / "split" / "checkpoints" / "step_000004" / "state.pt", weights_only=True)
    for k in w1["trainable"]:
        assert torch.equal(w1["trainable"][k], w2["trainable"][k]), k


def test_bad_rollout_options(make_config):
    for key, value, msg in [("rollout.top_k", -1, "top_k"), ("rollout.policy_lag", -2, "policy_lag"),
                            ("rollout.dtype", "int8", "rollout.dtype"), ("rollout.top_p", 1.5, "top_p")]:
        with pytest.raises(ValueError, match=msg):
            make_config(**{key: value})
