"""The training pass's options from the config: length buckets, bf16 autocast with fp32 master
weights, gradient checkpointing; and the keys of the sampler's decoder (validated here)."""

import math

import pytest
import torch

from ratiorl.train import Trainer, load_config
from ratiorl.train.build import build_policy

from .conftest import tiny_overrides, trainable_snapshot


def test_config_keys_reach_the_policy(make_config, tiny_model_dir):
    cfg = make_config()
    assert (cfg.train.autocast, cfg.train.length_buckets, cfg.model.gradient_checkpointing) == (None, 4, False)
    assert cfg.rollout.decoder == "auto"
    policy = build_policy(cfg, tiny_model_dir, needs_reference=False)
    assert (policy.length_buckets, policy.autocast_dtype, policy.gradient_checkpointing) == (4, None, False)
    cfg = make_config(**{"train.autocast": "bfloat16", "train.length_buckets": 2, "model.gradient_checkpointing": True,
                         "lora.enabled": True})
    policy = build_policy(cfg, tiny_model_dir, needs_reference=True)
    assert (policy.length_buckets, policy.autocast_dtype, policy.gradient_checkpointing) == (2, torch.bfloat16, True)
    assert policy.hf_model.is_activation_checkpointing


def test_rollout_attention_reaches_every_engine(make_config):
    trainer = Trainer(make_config(**{"rollout.attention": "torch", "rollout.dtype": "bfloat16"}))
    try:
        assert trainer.engine is not trainer.eval_engine  # the bf16 sampler has an engine of its own
        assert trainer.engine.attention == trainer.eval_engine.attention == "torch"
        assert trainer.engine.lean_decoder().attention is None
    finally:
        trainer.close()


@pytest.mark.parametrize("key,value,message", [
    ("train.autocast", "float16", "train.autocast must be null"),
    ("train.length_buckets", 0, "train.length_buckets must be >= 1"),
    ("rollout.decoder", "vllm", "rollout.decoder must be auto"),
    ("rollout.attention", "flash", "rollout.attention must be auto"),
])
def test_bad_values_are_named(tiny_model_dir, tmp_path, key, value, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, tiny_overrides(tiny_model_dir, str(tmp_path / "run"), **{key: value}))


@pytest.mark.parametrize("extra", [
    {"train.autocast": "bfloat16"},
    {"train.autocast": "bfloat16", "lora.enabled": True, "objective.name": "grpo", "objective.beta": 0.05},
    {"model.gradient_checkpointing": True, "lora.enabled": True},
], ids=["autocast", "autocast-lora-kl", "checkpointing-lora"])
def test_a_step_keeps_fp32_weights_gradients_and_optimizer_state(make_config, extra):
    trainer = Trainer(make_config(**extra))
    try:
        before = trainable_snapshot(trainer)
        metrics = trainer.step()
        after = trainable_snapshot(trainer)
        assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
        assert any(not torch.equal(before[k], after[k]) for k in before)
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
        params = trainer.policy.trainable_parameters()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
        state = [t for s in trainer.optimizer.state.values() for k, t in s.items() if k != "step"]
        assert state and all(t.dtype == torch.float32 for t in state)
        assert not trainer.model.training  # checkpointing's training mode does not leak
    finally:
        trainer.close()
