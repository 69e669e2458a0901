"""Data parallel under torch.distributed (gloo, 2 CPU processes).

* One update on a FIXED batch: 2 ranks, each with half of the groups, end with the same gradients
  (summed over ranks), loss, gradient norm and weights as one process on the whole batch, for a
  token-mean objective (dapo), a sequence-level one (gspo) and SNIB (self-normalised over groups).
* ``torchrun --nproc-per-node 2 -m ratiorl train``: finishes, rank 0 writes one metrics.jsonl and
  the checkpoints (holding both ranks' RNG streams), and ``--resume`` continues it.
"""

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
from ratiorl.train.distributed import LOCAL, Dist, shard_prompts

from ..ports import free_port
from .conftest import tiny_overrides

OBJECTIVES = ("dapo", "gspo", "snib")
WORLD = 2


def _settings(name: str) -> dict:
    # no clipping: the raw gradients are compared (AdamW's first step, g / (|g| + eps), would hide a
    # factor of 2); a large eps so that float noise on gradient elements that are zero in theory (the
    # attention key bias) is not amplified to a full step; grad_accum 2 on each rank's 2 groups: the
    # counts must be global in every micro-batch
    return {"objective.name": name, "optim.max_grad_norm": 0.0, "optim.eps": 1e-3, "train.grad_accum": 2}



def _result(trainer, batch) -> dict:
    named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    return {"weights": {n: p.detach().clone() for n, p in named},
            "grads": {n: p.grad.detach().clone() for n, p in named},
            "metrics": {k: batch.update_metrics[k] for k in ("loss", "grad_norm", "entropy")}}


def _worker(rank, port, model_dir, out_root, batch_file, result_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        batches = torch.load(batch_file, weights_only=False)
        out = {}
        for name in OBJECTIVES:
            cfg = load_config(None, tiny_overrides(model_dir, os.path.join(out_root, f"dp_{name}"), **_settings(name)))
            trainer = Trainer(cfg)
            assert trainer.dist.enabled and trainer.dist.rank == rank and not trainer.dist.owns_group
            full = batches[name]
            mine = full.select_groups(shard_prompts(full.groups(), rank, WORLD))
            out[name] = _result(trainer, trainer.update(mine))
            trainer.close()
        torch.save(out, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_one_update_on_a_fixed_batch_equals_one_process(tiny_model_dir, tmp_path):
    batches, reference = {}, {}
    for name in OBJECTIVES:
        cfg = load_config(None, tiny_overrides(tiny_model_dir, str(tmp_path / f"single_{name}"), **_settings(name)))
        trainer = Trainer(cfg)
        assert trainer.dist is LOCAL
        batch = trainer.advantages(trainer.draw(cfg.rollout.prompts_per_step))
        assert batch.advantages.abs().sum() > 0  # reward noise: a non-zero gradient
        batches[name] = batch.select(list(range(len(batch))))  # a copy: update adds fields
        reference[name] = _result(trainer, trainer.update(batch))
        trainer.close()
    torch.save(batches, tmp_path / "batches.pt")

    mp.start_processes(_worker, args=(free_port(), tiny_model_dir, str(tmp_path), str(tmp_path / "batches.pt"),
                                      str(tmp_path / "result")), nprocs=WORLD, join=True, start_method="spawn")
    ranks = [torch.load(f"{tmp_path / 'result'}.{r}", weights_only=False) for r in range(WORLD)]
    for name in OBJECTIVES:
        ref = reference[name]
        for r in ranks:
            got = r[name]
            for k, g in ref["grads"].items():
                # averaged (not summed) gradients would be half of these
                torch.testing.assert_close(got["grads"][k], g, rtol=1e-5, atol=1e-7,
                                           msg=lambda m, name=name, k=k: f"{name} grad {k}: {m}")
                torch.testing.assert_close(got["weights"][k], ref["weights"][k], rtol=1e-5, atol=1e-6,
                                           msg=lambda m, name=name, k=k: f"{name} weight {k}: {m}")
            for k, v in ref["metrics"].items():
                assert got["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-7), (name, k)
        # the two ranks applied the very same update
        for k in ranks[0][name]["weights"]:
            assert torch.equal(ranks[0][name]["weights"][k], ranks[1][name]["weights"][k])


def test_local_dist_is_a_no_op():
    d = Dist()
    assert not d.enabled and d.is_main
    assert d.sum_floats([1.5, 2.0]) == [1.5, 2.0]
    m = {"reward/mean": 0.25, "length/max": 3.0}
    assert d.reduce_metrics(m) is m
    assert d.on_main(lambda a, b: a + b, 1, b=2) == 3
    assert d.gather({"x": 1}) == [{"x": 1}]
    assert shard_prompts(list(range(6)), 1, 2) == [3, 4, 5]
    assert shard_prompts(list(range(6)), 0, 3) + shard_prompts(list(range(6)), 1, 3) + \
        shard_prompts(list(range(6)), 2, 3) == list(range(6))
    with pytest.raises(ValueError, match="evenly"):
        shard_prompts(list(range(5)), 0, 2)


def test_parallel_modes(make_config):
    trainer = Trainer(make_config(**{"train.parallel": "fsdp"}))  # one process: nothing to shard
    assert trainer.fsdp is None and trainer.dist is LOCAL
    trainer.close()
    with pytest.raises(ValueError, match="train.parallel"):
        Trainer(make_config(**{"train.parallel": "zero3"}))


def _torchrun(config: str, *extra) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           "-m", "ratiorl", "train", "--config", config, *extra]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.slow  # two torchrun launches of 2 processes: about 25 s on a quiet machine, over a minute on a busy one
def test_torchrun_train_writes_one_log_and_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    overrides = dict(o.split("=", 1) for o in tiny_overrides(tiny_model_dir, str(out), **{
        "objective.name": "snib", "train.steps": 2, "checkpoint.every": 1, "threads": 1, "logging.plots": True}))
    cfg = {}
    for key, value in overrides.items():  # the dotted overrides as a nested YAML config
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))

    _torchrun(str(config))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # one writer: each step once
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["metrics.jsonl"]
    assert (out / "summary.json").exists() and (out / "plots").is_dir()
    state = torch.load(out / "checkpoints" / "step_000002" / "state.pt", weights_only=True)
    assert len(state["ranks"]) == WORLD
    g0, g1 = (r["rng"]["generator"] for r in state["ranks"])
    assert not torch.equal(g0, g1)  # each rank its own sampling stream
    assert state["ranks"][0]["stream"] == state["ranks"][1]["stream"]  # the same prompt stream position

    _torchrun(str(config), "--resume", "--train.steps", "3")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert (out / "checkpoints" / "step_000003").is_dir()
