"""RatioGRPOTrainer: Liger guard, TRL's vLLM IS correction as ratiorl's mismatch correction, and
2 CPU processes under `accelerate launch` (global counts and group ids)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("accelerate")

import ratiorl  # noqa: E402
from ratiorl.integrations.trl import RatioGRPOTrainer, check_no_liger_loss, mismatch_from_trl  # noqa: E402

from ..objectives._trl_harness import TRLLoss  # noqa: E402
from ..ports import free_port  # noqa: E402


def test_liger_loss_is_an_error():
    from trl import GRPOConfig

    args = GRPOConfig(output_dir="/tmp/unused", report_to="none", use_cpu=True)
    check_no_liger_loss(args)  # default: fine
    args.use_liger_loss = True  # the attribute TRL releases with a Liger GRPO loss read
    with pytest.raises(ValueError, match="Liger loss path"):
        RatioGRPOTrainer(model=None, reward_funcs=[], args=args, objective="dapo")
    fused = SimpleNamespace(use_liger_kernel=True, liger_kernel_config={"fused_linear_cross_entropy": True})
    with pytest.raises(ValueError, match="bypass"):
        check_no_liger_loss(fused)
    check_no_liger_loss(SimpleNamespace(use_liger_kernel=True, liger_kernel_config=None))  # kernels only


def _trl_is_ratio(mode, old, mu, mask, lo, hi):
    """TRL 1.16's vLLM importance-sampling ratio (grpo_trainer.py), written out independently."""
    d = (old - mu) * mask
    d = d.sum(-1, keepdim=True) if mode.startswith("sequence") else d
    r = torch.exp(d)
    if mode.endswith("truncate"):
        return torch.clamp(r, min=lo, max=hi)
    bad = (r < (lo if lo is not None else -math.inf)) | (r > (hi if hi is not None else math.inf))
    return r.masked_fill(bad, 0.0)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_vllm_is_correction_becomes_the_mismatch_correction(mode):
    args = SimpleNamespace(use_vllm=True, vllm_importance_sampling_correction=True, vllm_importance_sampling_mode=mode,
                           vllm_importance_sampling_clip_min=0.7 if mode != "sequence_mask" else None,
                           vllm_importance_sampling_clip_max=1.3)
    obj = mismatch_from_trl(ratiorl.objective("dapo"), args)
    assert args.vllm_importance_sampling_correction is False  # TRL's own correction is off: applied once
    assert obj.uses_mismatch
    g = torch.Generator().manual_seed(4)
    B, T = 6, 5
    mask = (torch.arange(T) < torch.tensor([5, 3, 4, 1, 5, 2])[:, None]).double()
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) - 0.2
    mu = old + 0.15 * torch.randn(B, T, generator=g, dtype=torch.float64)
    logp = (old + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_()
    A = torch.randn(B, generator=g, dtype=torch.float64)
    loss = obj(logp, old, A, mask, behaviour_logp=mu.clamp(max=0)).loss
    # TRL: per-token clipped loss (dapo: eps 0.2 / 0.28) times the IS ratio, summed over tokens / N
    r = torch.exp(logp - old)
    L = -torch.minimum(r * A[:, None], r.clamp(0.8, 1.28) * A[:, None])
    ref = (L * _trl_is_ratio(mode, old, mu.clamp(max=0), mask, args.vllm_importance_sampling_clip_min, 1.3)
           * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    gl, = torch.autograd.grad(loss, logp)
    gr, = torch.autograd.grad(ref, logp)
    torch.testing.assert_close(gl, gr, rtol=1e-10, atol=1e-12)


def test_objective_with_own_mismatch_turns_trl_correction_off():
    args = SimpleNamespace(use_vllm=True, vllm_importance_sampling_correction=True,
                           vllm_importance_sampling_mode="sequence_mask")
    mine = ratiorl.objective("dapo", mismatch_level="token", mismatch_mode="truncate", mismatch_high=2.0)
    with pytest.warns(UserWarning, match="switched off"):
        obj = mismatch_from_trl(mine, args)
    assert obj == mine and args.vllm_importance_sampling_correction is False
    off = SimpleNamespace(use_vllm=False, vllm_importance_sampling_correction=True)
    assert mismatch_from_trl(ratiorl.objective("dapo"), off) == ratiorl.objective("dapo")  # no vLLM: inert


@pytest.fixture(scope="module")
def env():
    harness = TRLLoss()
    yield harness
    harness.close()


def test_compute_loss_passes_trl_sampling_logps_as_behaviour_logp(env):
    import warnings

    from transformers import GPT2LMHeadModel
    from trl import GRPOConfig

    obj = ratiorl.objective("dapo", mismatch_level="token", mismatch_mode="mask", mismatch_low=0.8, mismatch_high=1.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = GRPOConfig(output_dir=str(env.workdir / "o"), report_to="none", use_cpu=True, bf16=False,
                          per_device_train_batch_size=4, num_generations=2, max_completion_length=8,
                          disable_dropout=True)
        trainer = RatioGRPOTrainer(model=GPT2LMHeadModel.from_pretrained(env.model_dir), reward_funcs=lambda **k: [0.0],
                                   args=args, train_dataset=env.dataset, processing_class=env.tokenizer, objective=obj)
    g = torch.Generator().manual_seed(1)
    B, P, T = 4, 3, 5
    cm = (torch.arange(T) < torch.tensor([5, 2, 4, 3])[:, None]).long()
    inputs = {"prompt_ids": torch.randint(3, env.vocab_size, (B, P), generator=g), "prompt_mask": torch.ones(B, P).long(),
              "completion_ids": torch.randint(3, env.vocab_size, (B, T), generator=g) * cm, "completion_mask": cm,
              "advantages": torch.randn(B, generator=g), "num_items_in_batch": cm.sum(),
              "group_ids": torch.arange(B) // 2}
    with torch.no_grad():
        logp = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], cm], 1), T)[0]
    inputs["old_per_token_logps"] = logp + 0.05 * torch.randn(B, T, generator=g)
    mu = (inputs["old_per_token_logps"] + 0.2 * torch.randn(B, T, generator=g)).clamp(max=0)
    mu[0, 1] = float("nan")  # a token vLLM could not score: no correction there
    inputs["sampling_per_token_logps"] = mu
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    mu_ref = mu.clone()
    mu_ref[0, 1] = inputs["old_per_token_logps"][0, 1]
    ref = obj(logp, inputs["old_per_token_logps"], inputs["advantages"], cm.float(), behaviour_logp=mu_ref,
              num_tokens=cm.sum().float())
    torch.testing.assert_close(loss.detach(), ref.loss, rtol=1e-5, atol=1e-7)
    without = obj.replace(mismatch_level="none")(logp, inputs["old_per_token_logps"], inputs["advantages"], cm.float())
    assert abs(float(ref.loss - without.loss)) > 1e-6  # the correction changed something
    inputs.pop("sampling_per_token_logps")
    with pytest.raises(ValueError, match="sampler's log-probs"):
        trainer.compute_loss(trainer.model, inputs)



@pytest.mark.slow  # about 30 s on 2 cores: two processes import torch/TRL, build 4 trainers, one real step
def test_accelerate_launch_two_cpu_processes(env, tmp_path):
    # `accelerate launch --cpu` uses its single-process launcher (multi-CPU needs mpirun); the
    # torch.distributed launcher with ACCELERATE_USE_CPU=1 gives 2 gloo CPU ranks
    worker = Path(__file__).with_name("_accelerate_worker.py")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(worker), str(env.model_dir), str(tmp_path)]
    envv = {**os.environ, "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=envv, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["world"] == 2 and res["backend"] == "gloo"
    for preset, r in res["a"].items():  # 2 ranks + averaged gradients == 1 process on the whole batch
        assert r["max_diff"] <= 1e-5 * max(1.0, r["scale"]), (preset, r)
    # the check can fail: local token counts give a different token-mean gradient
    assert res["a"]["dapo"]["local_counts_diff"] > 1e-3
    b = res["b"]
    assert b["global_step"] == 1 and b["moved"] and b["weights_equal_across_ranks"]
    for mb in b["micro_batches"]:
        assert mb["whole_groups"] and mb["same_prompt"] and mb["disjoint"]
        assert mb["num_items"] == mb["global_tokens"]  # TRL's count is the global one
