"""`ratiorl.integrations.RatioGRPOTrainer` against TRL 1.16's GRPOTrainer, on a tiny local GPT-2.

Real forward passes (no patched model): the same saved weights are loaded into a stock
GRPOTrainer and a RatioGRPOTrainer, both get the same hand-built inputs (fresh random each run),
and the loss values and the gradients w.r.t. every model parameter are compared.
"""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("accelerate")

import ratiorl  # noqa: E402
from ratiorl.integrations import RatioGRPOTrainer  # noqa: E402

from ..objectives._trl_harness import TRLLoss  # noqa: E402

SEED = int(os.environ.get("RATIORL_TEST_SEED", int.from_bytes(os.urandom(3), "little")))
G = 2  # num_generations


@pytest.fixture(scope="module")
def env():
    harness = TRLLoss()
    yield harness
    harness.close()


def _varied_reward(completions, **kwargs):
    return [float(sum(map(ord, c)) % 7) for c in completions]


def make_trainer(env, objective=None, **cfg):
    """A GRPOTrainer (objective=None) or RatioGRPOTrainer on a fresh copy of the tiny model."""
    from transformers import GPT2LMHeadModel
    from trl import GRPOConfig, GRPOTrainer

    base = dict(output_dir=str(env.workdir / "out"), report_to="none", use_cpu=True, bf16=False,
                per_device_train_batch_size=4, gradient_accumulation_steps=1, num_generations=G,
                max_completion_length=8, save_strategy="no", logging_strategy="no", disable_tqdm=True,
                disable_dropout=True)
    base.update(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = GRPOConfig(**base)
        kwargs = dict(model=GPT2LMHeadModel.from_pretrained(env.model_dir), reward_funcs=_varied_reward,
                      args=args, train_dataset=env.dataset, processing_class=env.tokenizer)
        if objective is None:
            return GRPOTrainer(**kwargs)
        return RatioGRPOTrainer(**kwargs, objective=objective)


def make_inputs(env, trainer, B=8, P=4, T=7, seed=0):
    """TRL-style inputs: left-padded prompts, right-padded completions (one empty), old and ref
    log-probs scattered around the current ones so that the clip bounds bind."""
    gen = torch.Generator().manual_seed(SEED + seed)
    print(f"make_inputs: RATIORL_TEST_SEED={SEED}")
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, :2] = 0
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[0], lengths[B // 2] = T, 0
    completion_mask = (torch.arange(T) < lengths[:, None]).long()
    inputs = {
        "prompt_ids": torch.randint(3, env.vocab_size, (B, P), generator=gen) * prompt_mask,
        "prompt_mask": prompt_mask,
        "completion_ids": torch.randint(3, env.vocab_size, (B, T), generator=gen) * completion_mask,
        "completion_mask": completion_mask,
        "advantages": torch.randn(B, generator=gen),
        "num_items_in_batch": completion_mask.sum(),
        "group_ids": torch.arange(B) // G,
    }
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([prompt_mask, completion_mask], 1), T)
    inputs["old_per_token_logps"] = logp + 0.3 * torch.randn(B, T, generator=gen)
    inputs["ref_per_token_logps"] = logp + 0.3 * torch.randn(B, T, generator=gen)
    return inputs


def loss_and_grads(trainer, inputs, accum=1):
    trainer.model.train()
    trainer.model.zero_grad()
    trainer.current_gradient_accumulation_steps = accum
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("accum", [1, 3])
@pytest.mark.parametrize("case", ["grpo_nokl", "grpo_k3", "dapo"])
def test_matches_stock_grpo_trainer(env, case, accum):
    beta = 0.0 if case != "grpo_k3" else 0.1
    loss_type = "dapo" if case == "dapo" else "grpo"
    eps_high = 0.28 if case == "dapo" else 0.2
    stock = make_trainer(env, loss_type=loss_type, epsilon=0.2, epsilon_high=eps_high, beta=beta,
                         use_bias_correction_kl=False)
    ours = make_trainer(env, objective=ratiorl.objective(loss_type, beta=beta, kl_estimator="k3",
                                                         kl_placement="loss"))
    assert ours.beta == beta and (ours.ref_model is not None) == (beta > 0)
    inputs = make_inputs(env, stock, seed=accum)
    if beta == 0:
        del inputs["ref_per_token_logps"]
    loss_stock, grads_stock = loss_and_grads(stock, inputs, accum)
    loss_ours, grads_ours = loss_and_grads(ours, inputs, accum)
    torch.testing.assert_close(loss_ours, loss_stock, rtol=1e-5, atol=1e-7)
    assert grads_ours.keys() == grads_stock.keys() and len(grads_ours) > 0
    for name in grads_stock:
        torch.testing.assert_close(grads_ours[name], grads_stock[name], rtol=1e-4, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for g in grads_ours.values())
    assert {"objective/clip_frac", "objective/ess"} <= set(ours._metrics["train"])
    assert ("objective/kl" in ours._metrics["train"]) == (beta > 0)


@pytest.mark.parametrize("objective", [
    ratiorl.objective("snib", kl_estimator="k3"),  # beta 0.1, is_weighted KL
    ratiorl.objective("ctpo"),
])
def test_snib_ctpo_equal_direct_objective_call(env, objective):
    trainer = make_trainer(env, objective=objective)
    inputs = make_inputs(env, trainer, seed=7)
    loss, grads = loss_and_grads(trainer, inputs)
    assert torch.isfinite(loss)
    assert any(g.abs().sum() > 0 for g in grads.values())

    trainer.model.zero_grad()
    T = inputs["completion_ids"].size(1)
    logp, _, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
        torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), T)
    direct = objective(logp, inputs["old_per_token_logps"], inputs["advantages"], inputs["completion_mask"],
                       group_ids=inputs["group_ids"], ref_logp=inputs["ref_per_token_logps"])
    direct.loss.backward()
    torch.testing.assert_close(loss, direct.loss.detach(), rtol=1e-6, atol=1e-8)
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-8, msg=name)


def test_train_two_steps_with_snib_changes_weights(env):
    """Two optimizer steps of two accumulated micro-batches each (steps_per_generation=1)."""
    trainer = make_trainer(env, objective=ratiorl.objective("snib", beta=0.0), max_steps=2, learning_rate=1e-2,
                           gradient_accumulation_steps=2, steps_per_generation=1,
                           logging_strategy="steps", logging_steps=1, scale_rewards="none")
    seen = []
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, *args, **kwargs):
        seen.append({k: inputs[k].clone() for k in ("group_ids", "prompt_ids", "prompt_mask")})
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording_compute_loss
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    # the group ids attached before TRL's shuffle still name the prompt each row answers
    assert len(seen) == 4
    for batch in seen:
        for g in batch["group_ids"].unique():
            rows = batch["group_ids"] == g
            assert int(rows.sum()) == G
            assert (batch["prompt_ids"][rows] == batch["prompt_ids"][rows][0]).all()
            assert (batch["prompt_mask"][rows] == batch["prompt_mask"][rows][0]).all()
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, "no parameter moved"
    assert trainer.state.global_step == 2
    logged = [h for h in trainer.state.log_history if "objective/ess" in h]
    assert len(logged) == 2 and all(0 < h["objective/ess"] <= 1 for h in logged)


def test_exact_kl_is_rejected(env):
    with pytest.raises(ValueError, match=r"kl_estimator='exact'.*k3.*ratiorl"):
        make_trainer(env, objective="snib")  # snib's preset KL is the exact one
    make_trainer(env, objective=ratiorl.objective("snib", beta=0.0))  # fine without KL


def test_config_errors(env):
    with pytest.raises(ValueError, match="whole groups"):
        make_trainer(env, objective=ratiorl.objective("snib", beta=0.0), gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="conflicts"):
        make_trainer(env, objective="grpo", beta=0.5)  # grpo's beta is 0.04


def test_integrations_import_is_lazy_and_names_the_extra():
    import subprocess

    code = "import sys, ratiorl.integrations; assert 'trl' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    # without TRL: an ImportError that says how to install it
    code = ("import sys; sys.modules['trl'] = None\n"
            "try:\n    from ratiorl.integrations import RatioGRPOTrainer\n"
            "except ImportError as e:\n    assert \"pip install 'ratiorl[trl]'\" in str(e), e\n"
            "else:\n    raise SystemExit('no ImportError')")
    subprocess.run([sys.executable, "-c", code], check=True)
