"""The RL trainer on a random 1-layer model: every preset, resume, gradient accumulation, Ctrl-C."""

import json
import math
import os
import signal

import pytest
import torch

import ratiorl
from ratiorl.train import Trainer, train
from ratiorl.train.trainer import TIMING_PREFIXES

from .conftest import trainable_snapshot


@pytest.mark.parametrize("name", ratiorl.available_objectives())
def test_every_preset_runs_and_changes_weights(make_config, name):
    cfg = make_config(**{"objective.name": name})
    trainer = Trainer(cfg)
    try:
        before = trainable_snapshot(trainer)
        metrics = trainer.step()
        after = trainable_snapshot(trainer)
    finally:
        trainer.close()
    assert math.isfinite(metrics["loss"]), metrics
    assert math.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
    assert any(not torch.equal(before[k], after[k]) for k in before), f"{name}: no weight changed"
    if name == "ppo":
        assert math.isfinite(metrics["value_loss"])
        assert trainer.critic is not None
    if ratiorl.objective(name).beta > 0:
        assert "kl" in metrics


def _strip_timing(rows):
    return [{k: v for k, v in r.items() if not k.startswith(TIMING_PREFIXES)} for r in rows]


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("extra", [{}, {"objective.name": "grpo", "train.pf_ppo": "pow"}], ids=["snib", "pf_ppo"])
def test_resume_equals_straight_run(make_config, tmp_path, extra):
    # off-policy (2 mini-batches, lagging sampler), a schedule, a reference model with exact KL,
    # reward noise (its own RNG) and eval: everything a checkpoint must restore (and PF-PPO's resampling stream)
    kw = {"objective.name": "snib", "train.steps": 4, "train.mini_batches": 2, "rollout.sync_every": 3,
          "optim.schedule": "cosine", "optim.warmup_steps": 2, "eval.every": 2, "objective.kl_controller": "primal_dual",
          **extra}
    straight = make_config(out_dir=str(tmp_path / "straight"), **kw)
    s1 = train(straight)

    split = make_config(out_dir=str(tmp_path / "split"), **kw)
    s_half = train(split, until=2)
    assert s_half["steps"] == 2 and not s_half["finished"]
    s2 = train(split, resume=True)
    assert s2["finished"] and s2["steps"] == 4

    rows1 = _strip_timing(_read(tmp_path / "straight" / "metrics.jsonl"))
    rows2 = _strip_timing(_read(tmp_path / "split" / "metrics.jsonl"))
    assert [r["step"] for r in rows2] == [1, 2, 3, 4]
    assert rows1 == rows2

    w1 = torch.load(tmp_path / "straight" / "checkpoints" / "step_000004" / "state.pt", weights_only=False)
    w2 = torch.load(tmp_path / "split" / "checkpoints" / "step_000004" / "state.pt", weights_only=False)
    for k in w1["trainable"]:
        assert torch.equal(w1["trainable"][k], w2["trainable"][k]), k
    assert s1["eval_accuracy_after"] == s2["eval_accuracy_after"]


def test_resume_after_crash_drops_metrics_after_the_checkpoint(make_config, tmp_path):
    out = str(tmp_path / "crash")
    cfg = make_config(out_dir=out, **{"train.steps": 3, "checkpoint.every": 1})
    t = Trainer(cfg)
    t.run(until=2)  # checkpoints at steps 1 and 2
    t.logger.log(3, {"reward/mean": 123.0})  # a step logged, then a crash before its checkpoint
    t.close()
    t2 = Trainer(cfg, resume=True)
    assert t2.step_count == 2
    t2.close()
    assert [r["step"] for r in _read(os.path.join(out, "metrics.jsonl"))] == [1, 2]


@pytest.mark.parametrize("name", ["snib", "grpo", "dapo", "dr_grpo"])
def test_group_split_accumulation_gives_full_batch_gradient(make_config, name):
    cfg = make_config(**{"objective.name": name, "rollout.prompts_per_step": 6})
    t = Trainer(cfg)
    try:
        batch = t.advantages(t.collector.collect(t.draw, cfg.rollout.prompts_per_step))
        groups = batch.groups()
        N, S = float(batch.completion_mask.sum()), float(len(batch))

        def grads(split_into, n_micro):
            t.optimizer.zero_grad(set_to_none=True)
            for part in torch.tensor_split(torch.tensor(groups), split_into):
                t.update.backward(batch, part.tolist(), n_micro, N, S)
            return [p.grad.clone() for p in t.params]

        full = grads(1, 1)
        accumulated = grads(1, 3)  # one mini-batch in 3 micro-batches
        mini = grads(2, 2)  # two mini-batches' gradients summed, each in 2 micro-batches
    finally:
        t.close()
    assert sum(float(g.abs().sum()) for g in full) > 0
    for a, b, c in zip(full, accumulated, mini):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-6)


def test_ctrl_c_writes_a_checkpoint_and_resume_finishes(make_config, tmp_path):
    out = str(tmp_path / "sigint")
    cfg = make_config(out_dir=out, **{"train.steps": 3})
    t = Trainer(cfg)
    real_step = t.step

    def step_then_ctrl_c():
        m = real_step()
        if t.step_count == 1:
            signal.raise_signal(signal.SIGINT)  # handled: finish the step, checkpoint, stop
        return m

    t.step = step_then_ctrl_c
    summary = t.run()
    t.close()
    assert summary["steps"] == 1 and not summary["finished"]
    assert os.path.isfile(os.path.join(out, "checkpoints", "step_000001", "COMPLETE"))
    s2 = train(cfg, resume=True)
    assert s2["finished"] and s2["steps"] == 3


def test_dynamic_sampling_and_overlong_penalty(make_config):
    cfg = make_config(**{"objective.name": "dapo", "train.dynamic_sampling": True, "train.max_sampling_tries": 3,
                         "reward.overlong_penalty": 1.0, "reward.overlong_buffer": 2})
    t = Trainer(cfg)
    try:
        m = t.step()
    finally:
        t.close()
    assert 1 <= m["sampling/tries"] <= 3
    assert m["reward/zero_std_groups"] == 0.0  # uniform groups were dropped (noisy rewards always vary)
    assert math.isfinite(m["loss"])


def test_overlong_penalty_lowers_truncated_rewards(make_config):
    # max_new_tokens=4 and a random model: most completions hit the limit
    plain = Trainer(make_config(**{"reward.noise_sigma": 0.0}))
    penal = Trainer(make_config(**{"reward.noise_sigma": 0.0, "reward.overlong_penalty": 1.0,
                                   "reward.overlong_buffer": 2}))
    try:
        r0 = plain.draw(4)
        r1 = penal.draw(4)
    finally:
        plain.close()
        penal.close()
    assert torch.equal(r0.completion_ids, r1.completion_ids)  # same seed, same samples
    trunc = r1.truncated.bool()
    assert trunc.any()
    torch.testing.assert_close(r1.rewards[trunc], r0.rewards[trunc] - 1.0)


def test_eval_and_outputs(make_config, tmp_path):
    out = str(tmp_path / "outputs")
    cfg = make_config(out_dir=out, **{"train.steps": 2, "eval.every": 2, "eval.before": True, "eval.greedy": True,
                                      "logging.tensorboard": True, "logging.plots": True,
                                      "checkpoint.save_final_model": True})
    s = train(cfg)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "plots/learning_curves.png", "model/config.json"):
        assert os.path.exists(os.path.join(out, name)), name
    assert any(f.startswith("events") for f in os.listdir(os.path.join(out, "tensorboard")))
    rows = _read(os.path.join(out, "metrics.jsonl"))
    assert rows[0]["step"] == 0 and "eval/avg@k" in rows[0]
    assert 0.0 <= s["eval_accuracy_after"] <= 1.0
    assert s["eval_pass_at_2_after"] >= s["eval_accuracy_after"] == s["eval_avg_at_2_after"]
    # the saved config reloads to the same config
    from ratiorl.train import load_config
    assert load_config(os.path.join(out, "config.yaml")) == cfg


def test_diagnostics_plots_at_eval(make_config, tmp_path):
    # the four training diagnostics of issue 5 are drawn at each eval (F(r) only for `weighted` rules);
    # a failing plot only prints a warning, so their existence is what shows they worked
    out = str(tmp_path / "diag")
    cfg = make_config(out_dir=out, **{"objective.name": "dgpo", "train.steps": 2, "eval.every": 2,
                                      "logging.plots": True})
    train(cfg)
    for name in ("clip_by_position", "weight_histograms", "grad_norm_by_length", "gradient_weight"):
        path = os.path.join(out, "plots", f"{name}.png")
        assert os.path.getsize(path) > 0, name


def test_same_seed_same_metrics(make_config, tmp_path):
    a = train(make_config(out_dir=str(tmp_path / "a"), **{"train.steps": 2}))
    b = train(make_config(out_dir=str(tmp_path / "b"), **{"train.steps": 2}))
    assert a["steps"] == b["steps"]
    assert _strip_timing(_read(tmp_path / "a" / "metrics.jsonl")) == _strip_timing(_read(tmp_path / "b" / "metrics.jsonl"))


def test_bad_dataset_and_names_give_clear_errors(make_config, tmp_path):
    with pytest.raises(ValueError, match="no such JSONL file"):
        Trainer(make_config(**{"task.name": "jsonl", "task.path": str(tmp_path / "missing.jsonl")}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1=", "answer": "2"}\n' * 20)
    with pytest.raises(ValueError, match="missing field 'prompt'"):
        Trainer(make_config(**{"task.name": "jsonl", "task.path": str(bad)}))
    with pytest.raises(ValueError, match="valid tasks"):
        Trainer(make_config(**{"task.name": "no_such_task"}))
    with pytest.raises(ValueError, match="snib"):  # lists the valid objectives
        Trainer(make_config(**{"objective.name": "no_such_objective"}))


def test_jsonl_dataset_trains(make_config, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"q": f"{i}+1=", "a": str(i + 1)}) + "\n" for i in range(30)))
    t = Trainer(make_config(**{"task.name": "jsonl", "task.path": str(data), "task.prompt_field": "q",
                               "task.answer_field": "a"}))
    try:
        m = t.step()
    finally:
        t.close()
    assert len(t.task.eval) == 3 and len(t.task.train) == 27
    assert math.isfinite(m["loss"])


def test_lora_trains_only_adapters_and_uses_the_adapter_reference(make_config):
    cfg = make_config(**{"objective.name": "snib", "lora.enabled": True, "lora.r": 4,
                         "lora.target_modules": "[c_attn]"})
    t = Trainer(cfg)
    try:
        before = trainable_snapshot(t)
        m = t.step()
        after = trainable_snapshot(t)
    finally:
        t.close()
    assert before and all("lora_" in k for k in before)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert t.policy.reference == "adapter" and math.isfinite(m["kl"])


def test_lagging_sampler_and_recomputed_old_logp(make_config):
    cfg = make_config(**{"objective.name": "grpo", "train.mini_batches": 2, "rollout.sync_every": 4,
                         "rollout.recompute_old_logp": True, "train.count_scope": "mini_batch", "train.steps": 2})
    t = Trainer(cfg)
    try:
        t.step()
        # two updates so far, sync every 4: the sampler still has the initial weights
        assert any(not torch.equal(a, b) for a, b in zip(t.engine.model.parameters(), t.model.parameters()))
        m = t.step()
        assert all(torch.equal(a, b) for a, b in zip(t.engine.model.parameters(), t.model.parameters()))
    finally:
        t.close()
    assert m["updates"] == 4.0


@pytest.mark.parametrize("controller", ["primal_dual", "adaptive"])
def test_kl_controllers_move_beta(make_config, controller):
    cfg = make_config(**{"objective.name": "grpo", "objective.kl_controller": controller, "objective.kl_target": 1e-6,
                         "objective.kl_lr": 10.0, "objective.kl_horizon": 2, "train.steps": 2})
    t = Trainer(cfg)
    try:
        t.step()  # the first rollout is scored by a policy equal to the reference: KL = 0
        b1 = t.objective.beta
        m = t.step()
    finally:
        t.close()
    assert m["kl"] > 0 and m["beta"] == b1 and t.objective.beta > b1  # KL above target: beta goes up
    with pytest.raises(ValueError, match="objective.beta > 0"):
        Trainer(make_config(**{"objective.name": "bnpo", "objective.kl_controller": "adaptive"}))


def test_entropy_reaches_the_objective(make_config):
    # an entropy bonus and top-entropy token selection need the policy's per-token entropy
    cfg = make_config(**{"objective.name": "dapo", "objective.token_selection": "top_entropy",
                         "objective.token_selection_options": "{top_entropy_quantile: 0.5}",
                         "objective.entropy_coef": 0.01})
    t = Trainer(cfg)
    try:
        m = t.step()
    finally:
        t.close()
    assert 0.3 < m["objective/selection_keep_frac"] < 0.7  # about half of the tokens train
    assert m["objective/entropy"] == pytest.approx(m["entropy"], rel=1e-4)  # the bonus saw the same entropy
