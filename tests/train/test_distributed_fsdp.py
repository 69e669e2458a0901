"""``train.parallel: fsdp`` (FSDP2) under torch.distributed (gloo, 2 CPU processes).

* One update on a FIXED batch: 2 ranks with a sharded policy, each with half of the groups, end
  with the same gradients (summed over ranks), loss, gradient norm and weights as one process on
  the whole batch, for a token-mean objective (dapo), a sequence-level one (gspo) and SNIB; and
  with one rank's completions one token long (the ranks must still run the same sharded
  forwards); in the slow suite also with gradient clipping on, with LoRA and the exact KL, and
  with a lagging sampler refreshed from the gathered weights. Some cases then run a whole step
  (sampling with gathered weights, ranks generating different lengths).
* ``torchrun --nproc-per-node 2 -m ratiorl train --train.parallel fsdp``: finishes, writes full
  (unsharded) checkpoints that load in one process, and a resumed run ends with the very same
  weights and metrics as an uninterrupted one.
"""

import datetime
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from ratiorl.train import Trainer, load_config
from ratiorl.train.distributed import shard_prompts
from ratiorl.train.fsdp import full_tensor, gather_full, pad_completions, shard_like, transformer_blocks

from ..ports import free_port
from .conftest import tiny_overrides

WORLD = 2


def _settings(name: str, **extra) -> dict:
    # as in test_distributed.py: raw gradients compared (no clipping), a large AdamW eps, two
    # micro-batches per rank whose losses must use the global counts
    return {"objective.name": name, "optim.max_grad_norm": 0.0, "optim.eps": 1e-3, "train.grad_accum": 2, **extra}


CASES = {
    "dapo": _settings("dapo"),
    "gspo": _settings("gspo"),
    "snib": _settings("snib"),
    # rank 0's completions are one token long (set below): one scoring pass where rank 1 runs two
    "short": _settings("dapo"),
    # clipping on: the norm must be the global norm of the sharded gradients (AdamW's large eps
    # makes the step depend on the clipped scale)
    "dapo_clip": _settings("dapo", **{"optim.max_grad_norm": 1e-3}),
    # LoRA: only the adapters train; the exact KL runs the adapter-free reference through the shards
    "lora": _settings("snib", **{"lora.enabled": True, "lora.r": 4, "lora.target_modules": "[c_attn]",
                                 "objective.beta": 0.05, "objective.kl_estimator": "exact"}),
    # a separate sampler one update behind: refreshed from the gathered (full) policy weights
    "lag": _settings("dapo", **{"rollout.policy_lag": 1}),
}
STEP_AFTER = ("dapo", "lag", "lora")  # then one whole step: sampling with gathered weights, ranks of unequal lengths



def _result(trainer, batch) -> dict:
    """Full (gathered) trainable weights and gradients; every rank must call it (collectives)."""
    named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    return {"weights": {n: full_tensor(p.detach()).clone() for n, p in named},
            "grads": {n: full_tensor(p.grad.detach()).clone() for n, p in named},
            "metrics": {k: batch.update_metrics[k] for k in ("loss", "grad_norm", "entropy")}}


def _shorten(batch, groups):
    """``batch`` with the completions of ``groups`` cut to their first token."""
    b = batch.select(list(range(len(batch))))
    rows = torch.tensor(b.rows_of_groups(groups))
    for name in ("completion_mask", "behaviour_logp", "old_logp"):
        t = getattr(b, name)
        t[rows.unsqueeze(1), torch.arange(1, t.shape[1]).unsqueeze(0)] = 0
    return b


def _check_uneven_shards(rank):
    """A dim 0 of 5 over 2 ranks (shards of 3 and 2): shard_like cuts as FSDP does, gather_full
    puts it back together."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    lin = fully_shard(torch.nn.Linear(3, 5), mesh=init_device_mesh("cpu", (WORLD,)))
    assert lin.weight.to_local().shape[0] == (3 if rank == 0 else 2)
    full = torch.arange(15.0).view(5, 3)
    mine = shard_like(full, lin.weight)
    assert torch.equal(mine.to_local(), full[:3] if rank == 0 else full[3:])
    back = gather_full({"w": [mine]}, keep=rank == 0)
    assert torch.equal(back["w"][0], full) if rank == 0 else back["w"][0] is None
    assert shard_like(full, full) is full  # not sharded: unchanged


def _worker(rank, port, model_dir, out_root, batch_file, result_file, names):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))  # a mismatched collective fails, not hangs
    try:
        _check_uneven_shards(rank)
        batches = torch.load(batch_file, weights_only=False)
        out = {}
        for name in names:
            settings = CASES[name]
            overrides = tiny_overrides(model_dir, os.path.join(out_root, f"fsdp_{name}"),
                                       **{**settings, "train.parallel": "fsdp"})
            trainer = Trainer(load_config(None, overrides))
            assert trainer.fsdp is not None and trainer.dist.rank == rank
            assert all(p.grad is None for p in trainer.params)
            local = {n: p.to_local().numel() for n, p in trainer.model.named_parameters()}
            full = batches[name]
            mine = full.select_groups(shard_prompts(full.groups(), rank, WORLD))
            if name == "short":
                assert mine.trim().completion_ids.shape[1] == (1 if rank == 0 else 4)
            out[name] = _result(trainer, trainer.update(mine))
            out[name]["local_numel"] = local
            if name in STEP_AFTER:
                metrics = trainer.step()
                out[name]["step"] = {k: metrics[k] for k in ("loss", "grad_norm", "updates", "reward/mean")}
                out[name]["sampler"] = {n: p.detach().clone() for n, p in trainer.engine.model.named_parameters()}
            trainer.close()
        torch.save(out, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def _compare_with_one_process(names, model_dir, tmp_path) -> dict:
    """One update of each case in one process, then with fsdp on 2 ranks; asserts they agree and
    returns the single-process results."""
    batches, reference = {}, {}
    for name in names:
        settings = CASES[name]
        cfg = load_config(None, tiny_overrides(model_dir, str(tmp_path / f"single_{name}"), **settings))
        trainer = Trainer(cfg)
        assert trainer.fsdp is None  # one process: nothing to shard
        batch = trainer.advantages(trainer.draw(cfg.rollout.prompts_per_step))
        if name == "short":
            batch = _shorten(batch, shard_prompts(batch.groups(), 0, WORLD))
            assert batch.trim().completion_ids.shape[1] == 4
        assert batch.advantages.abs().sum() > 0  # reward noise: a non-zero gradient
        batches[name] = batch.select(list(range(len(batch))))  # a copy: update adds fields
        reference[name] = _result(trainer, trainer.update(batch))
        reference[name]["numel"] = {n: p.numel() for n, p in trainer.model.named_parameters()}
        trainer.close()
    torch.save(batches, tmp_path / "batches.pt")

    mp.start_processes(_worker, args=(free_port(), model_dir, str(tmp_path), str(tmp_path / "batches.pt"),
                                      str(tmp_path / "result"), list(names)), nprocs=WORLD, join=True,
                       start_method="spawn")
    ranks = [torch.load(f"{tmp_path / 'result'}.{r}", weights_only=False) for r in range(WORLD)]
    for name in names:
        ref = reference[name]
        # sharded: each rank held its part of every parameter, the parts adding up to the whole
        for k, n in ref["numel"].items():
            parts = [r[name]["local_numel"][k] for r in ranks]
            assert sum(parts) == n and max(parts) < n, (name, k, parts)
        if name == "lora":
            assert ref["weights"] and all("lora_" in k for k in ref["weights"])
        for r in ranks:
            got = r[name]
            assert set(got["weights"]) == set(ref["weights"])
            for k, g in ref["grads"].items():
                # averaged (not summed) gradients would be half of these
                torch.testing.assert_close(got["grads"][k], g, rtol=1e-5, atol=1e-7,
                                           msg=lambda m, name=name, k=k: f"{name} grad {k}: {m}")
                torch.testing.assert_close(got["weights"][k], ref["weights"][k], rtol=1e-5, atol=1e-6,
                                           msg=lambda m, name=name, k=k: f"{name} weight {k}: {m}")
            for k, v in ref["metrics"].items():
                assert got["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-7), (name, k)
        for k in ranks[0][name]["weights"]:  # the two ranks hold the very same model
            assert torch.equal(ranks[0][name]["weights"][k], ranks[1][name]["weights"][k])
        if name in STEP_AFTER:  # a whole step ran; its metrics are reduced over the ranks
            assert ranks[0][name]["step"] == ranks[1][name]["step"]
            assert ranks[0][name]["step"]["updates"] == 2.0
        if name == "lag":  # after update 2 the sampler holds version 1: the weights of the fixed-batch update
            for r in ranks:
                for k, v in ref["weights"].items():
                    torch.testing.assert_close(r[name]["sampler"][k], r[name]["weights"][k], rtol=0, atol=0)
    return reference


def test_one_update_on_a_fixed_batch_equals_one_process(tiny_model_dir, tmp_path):
    _compare_with_one_process(("dapo", "gspo", "snib", "short"), tiny_model_dir, tmp_path)


@pytest.mark.slow  # three more cases through 2 processes: about 40 s
def test_one_update_with_clipping_lora_and_a_lagging_sampler_equals_one_process(tiny_model_dir, tmp_path):
    reference = _compare_with_one_process(("dapo", "dapo_clip", "lora", "lag"), tiny_model_dir, tmp_path)
    clip = reference["dapo_clip"]
    assert clip["metrics"]["grad_norm"] > 1e-3  # the clip was active ...
    assert not torch.allclose(clip["weights"]["transformer.wte.weight"],  # ... and changed the step
                              reference["dapo"]["weights"]["transformer.wte.weight"])


def test_pad_completions_and_blocks(tiny_model_dir, make_config):
    trainer = Trainer(make_config())
    batch = trainer.draw(2).trim()
    wide = pad_completions(batch, batch.completion_ids.shape[1] + 2)
    assert wide.completion_ids.shape[1] == batch.completion_ids.shape[1] + 2
    assert wide.completion_mask[:, -2:].sum() == 0 and wide.old_logp[:, -2:].abs().sum() == 0
    assert torch.equal(wide.trim().completion_ids, batch.completion_ids)  # padding only
    assert pad_completions(batch, 1) is batch
    blocks = transformer_blocks(trainer.model)
    assert blocks == list(trainer.model.transformer.h)  # GPT-2 declares GPT2Block as its block
    trainer.close()


def _torchrun(config: str, *extra, parallel: str = "fsdp") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           "-m", "ratiorl", "train", "--config", config, "--train.parallel", parallel, *extra]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _config(tmp_path, model_dir, out, **kw) -> str:
    overrides = dict(o.split("=", 1) for o in tiny_overrides(model_dir, str(out), **{
        "objective.name": "snib", "train.steps": 3, "checkpoint.every": 1, "threads": 1,
        "checkpoint.save_hf": True, "checkpoint.save_final_model": True, "checkpoint.keep_last": 3, "eval.every": 2,
        # an FSDP-managed model samples through transformers' forward; the ddp run must too, for its
        # first step to be the same float for float (the lean decoder differs in the last bits)
        "rollout.decoder": "hf",
        **kw}))
    cfg = {}
    for key, value in overrides.items():  # the dotted overrides as a nested YAML config
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _rows(out) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # four torchrun launches of 2 processes: about a minute and a half
def test_torchrun_fsdp_trains_checkpoints_and_resumes_exactly(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    straight, resumed, ddp = tmp_path / "straight", tmp_path / "resumed", tmp_path / "ddp"
    _torchrun(_config(tmp_path, tiny_model_dir, straight))
    _torchrun(_config(tmp_path, tiny_model_dir, resumed), "--train.steps", "2")
    _torchrun(_config(tmp_path, tiny_model_dir, resumed), "--resume")
    _torchrun(_config(tmp_path, tiny_model_dir, ddp), "--train.steps", "1", parallel="ddp")

    # the first step samples with the same weights under ddp: the same rollouts, the same update
    first_fsdp, first_ddp = _rows(straight)[0], _rows(ddp)[0]
    assert first_fsdp["step"] == first_ddp["step"] == 1
    for k, v in first_ddp.items():
        if not k.startswith(("time/", "throughput/", "eval/")):  # (the 1-step ddp run evaluates at its end)
            assert first_fsdp[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k

    rows_a, rows_b = _rows(straight), _rows(resumed)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [1, 2, 3]  # rank 0 alone writes
    timing = ("time/", "throughput/")
    for a, b in zip(rows_a, rows_b):
        assert {k: v for k, v in a.items() if not k.startswith(timing)} == \
            {k: v for k, v in b.items() if not k.startswith(timing)}
    assert any(k.startswith("eval/") for k in rows_a[1]) and any(k.startswith("eval/") for k in rows_a[2])
    assert json.loads((resumed / "summary.json").read_text())["steps"] == 3

    sa = torch.load(straight / "checkpoints" / "step_000003" / "state.pt", weights_only=True)
    sb = torch.load(resumed / "checkpoints" / "step_000003" / "state.pt", weights_only=True)
    assert len(sa["ranks"]) == WORLD
    for k, v in sa["trainable"].items():  # full tensors, bit-identical after the resume
        assert torch.equal(v, sb["trainable"][k]), k
    # the checkpoint holds whole (unsharded) tensors: one process loads them as they are
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert {k: v.shape for k, v in sa["trainable"].items()} == \
        {k: v.shape for k, v in model.named_parameters() if k in sa["trainable"]}
    exp_avg = sa["update"]["optimizer"]["state"][0]["exp_avg"]
    assert exp_avg.shape == next(model.parameters()).shape and exp_avg.abs().sum() > 0
    # the Hugging Face folders of the checkpoint and of the final model are the trained weights
    for folder in (straight / "checkpoints" / "step_000003" / "model", straight / "model"):
        saved = dict(AutoModelForCausalLM.from_pretrained(str(folder)).named_parameters())
        for k, v in sa["trainable"].items():
            assert torch.equal(saved[k].detach(), v), (folder, k)
