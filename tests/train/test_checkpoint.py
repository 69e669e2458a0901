"""Atomic checkpoints: a checkpoint directory is complete or absent; keep-last-K; RNG state."""

import os
import random

import numpy as np
import pytest
import torch
import yaml

from ratiorl.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _writer(payload):
    def write(d):
        with open(os.path.join(d, "a.txt"), "w") as f:
            f.write(payload)
        os.makedirs(os.path.join(d, "model"))
        torch.save({"x": torch.arange(3)}, os.path.join(d, "model", "w.pt"))

    return write


def test_save_list_and_keep_last(tmp_path):
    d = str(tmp_path / "ckpt")
    for step in (1, 2, 3, 4):
        save_checkpoint(d, step, _writer(str(step)), keep_last=2)
    assert [s for s, _ in list_checkpoints(d)] == [3, 4]
    assert latest_checkpoint(d).endswith("step_000004")
    assert sorted(os.listdir(d)) == ["step_000003", "step_000004"]  # no temporaries left
    with open(os.path.join(latest_checkpoint(d), "a.txt")) as f:
        assert f.read() == "4"


def test_a_crash_while_writing_leaves_no_checkpoint(tmp_path):
    d = str(tmp_path / "ckpt")
    save_checkpoint(d, 1, _writer("one"), keep_last=3)

    def crash(tmp):
        _writer("two")(tmp)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(d, 2, crash, keep_last=3)
    assert [s for s, _ in list_checkpoints(d)] == [1]
    assert sorted(os.listdir(d)) == ["step_000001"]
    # a directory left by a killed process (no COMPLETE marker) is never taken as a checkpoint
    os.makedirs(os.path.join(d, "step_000009"))
    assert latest_checkpoint(d).endswith("step_000001")


def test_resaving_a_step_replaces_it_whole(tmp_path):
    d = str(tmp_path / "ckpt")
    save_checkpoint(d, 5, _writer("old"), keep_last=2)
    save_checkpoint(d, 5, _writer("new"), keep_last=2)
    with open(os.path.join(d, "step_000005", "a.txt")) as f:
        assert f.read() == "new"
    assert sorted(os.listdir(d)) == ["step_000005"]


def test_rng_state_round_trip():
    g = torch.Generator().manual_seed(3)
    state = rng_state(g)
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)), float(torch.rand(1, generator=g)))
    set_rng_state(state, g)
    b = (random.random(), float(np.random.rand()), float(torch.rand(1)), float(torch.rand(1, generator=g)))
    assert a == b


# ----------------------------------------------------------------------------- safe loading

from ratiorl.train.checkpoint import CheckpointError, load_newest_state, load_state  # noqa: E402


def test_rng_state_is_loadable_with_weights_only(tmp_path):
    g = torch.Generator().manual_seed(5)
    random.gauss(0, 1)  # a cached Gaussian in Python's state
    np.random.standard_normal()
    torch.save(rng_state(g), tmp_path / "rng.pt")
    state = torch.load(tmp_path / "rng.pt", weights_only=True)
    a = (random.random(), random.gauss(0, 1), float(np.random.rand()), float(torch.rand(1)),
         float(torch.rand(1, generator=g)))
    set_rng_state(state, g)
    b = (random.random(), random.gauss(0, 1), float(np.random.rand()), float(torch.rand(1)),
         float(torch.rand(1, generator=g)))
    assert a == b


def _state_writer(step, extra=None):
    def write(d):
        torch.save({"step": step, "w": torch.full((2,), float(step)), **(extra or {})}, os.path.join(d, "state.pt"))

    return write


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_loading_uses_weights_only_and_rejects_pickled_objects(tmp_path, monkeypatch):
    d = str(tmp_path / "ckpt")
    save_checkpoint(d, 1, _state_writer(1), keep_last=3)
    seen = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("weights_only")) or real(*a, **k))
    assert load_state(latest_checkpoint(d))["step"] == 1
    assert seen == [True]
    monkeypatch.undo()

    save_checkpoint(d, 2, _state_writer(2, {"evil": _Evil()}), keep_last=3)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="pickled Python objects") as e:
        load_state(latest_checkpoint(d))
    assert e.value.unsafe
    with pytest.raises(CheckpointError, match="pickled"):  # never skipped in favour of an older one
        load_newest_state(d, warn=lambda m: None)
    assert not os.path.exists(tmp_path / "pwned")


def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path):
    d = str(tmp_path / "ckpt")
    for step in (1, 2, 3):
        save_checkpoint(d, step, _state_writer(step), keep_last=3)
    with open(os.path.join(d, "step_000003", "state.pt"), "r+b") as f:
        f.truncate(50)
    warnings = []
    path, state = load_newest_state(d, warn=warnings.append)
    assert path.endswith("step_000002") and state["step"] == 2 and torch.equal(state["w"], torch.full((2,), 2.0))
    assert len(warnings) == 1 and "step_000003" in warnings[0] and "previous" in warnings[0]
    # `newest` bounds the search: starting at step 2 never looks at step 3
    path, _ = load_newest_state(d, warn=warnings.append, newest=os.path.join(d, "step_000002"))
    assert path.endswith("step_000002") and len(warnings) == 1
    for step in (1, 2):
        with open(os.path.join(d, f"step_{step:06d}", "state.pt"), "wb") as f:
            f.write(b"garbage")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_newest_state(d, warn=warnings.append)


def test_saving_the_same_step_twice_keeps_a_valid_newest_checkpoint(tmp_path, monkeypatch):
    d = str(tmp_path / "ckpt")
    save_checkpoint(d, 4, _state_writer(4), keep_last=2)
    save_checkpoint(d, 5, _state_writer(5), keep_last=2)
    # a crash between moving the old step 5 aside and moving the new one in
    real_replace = os.replace
    calls = []

    def crashing_replace(src, dst):
        calls.append((src, dst))
        if ".tmp_step_" in str(src):
            raise KeyboardInterrupt  # killed right here
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(d, 5, _state_writer(5), keep_last=2)
    monkeypatch.undo()
    assert any(".old_step_000005" in str(dst) for _, dst in calls)  # the old copy was moved aside
    assert [s for s, _ in list_checkpoints(d)] == [4, 5]  # ... and is back: the newest is not lost
    assert load_state(latest_checkpoint(d))["step"] == 5
    save_checkpoint(d, 5, _state_writer(5), keep_last=2)  # a clean re-save afterwards
    assert sorted(os.listdir(d)) == ["step_000004", "step_000005"]
    assert load_state(latest_checkpoint(d))["step"] == 5


# ----------------------------------------------------------------------------- run folders

from ratiorl.train.run_dir import RunFolderError, config_differences, prepare_run_dir  # noqa: E402
from ratiorl.train import load_config  # noqa: E402


def _used_run(tmp_path, *overrides):
    cfg = load_config(None, [f"out_dir={tmp_path / 'run'}", *overrides])
    run = str(tmp_path / "run")
    prepare_run_dir(cfg, run, os.path.join(run, "checkpoints"), resume=False, overwrite=False, say=lambda m: None)
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.write('{"step": 1}\n')
    save_checkpoint(os.path.join(run, "checkpoints"), 1, _state_writer(1))
    return cfg, run


def test_a_fresh_run_into_a_used_folder_is_an_error(tmp_path):
    cfg, run = _used_run(tmp_path)
    with pytest.raises(RunFolderError, match="--resume.*--overwrite"):
        prepare_run_dir(cfg, run, os.path.join(run, "checkpoints"), resume=False, overwrite=False)
    assert os.path.exists(os.path.join(run, "metrics.jsonl"))


def test_overwrite_moves_the_old_run_aside(tmp_path):
    cfg, run = _used_run(tmp_path)
    said = []
    assert prepare_run_dir(cfg, run, os.path.join(run, "checkpoints"), False, True, said.append) is None
    aside = [n for n in os.listdir(tmp_path) if n.startswith("run.old-")]
    assert len(aside) == 1 and aside[0] in said[0]
    assert os.path.exists(tmp_path / aside[0] / "checkpoints" / "step_000001" / "state.pt")  # nothing deleted
    assert sorted(os.listdir(run)) == ["config.yaml"]
    _used_run(tmp_path)  # twice in the same second: a second, distinct folder
    prepare_run_dir(cfg, run, os.path.join(run, "checkpoints"), False, True, said.append)
    assert len([n for n in os.listdir(tmp_path) if n.startswith("run.old-")]) == 2


def test_resume_refuses_a_different_config_listing_the_keys(tmp_path):
    cfg, run = _used_run(tmp_path, "objective.name=snib", "optim.lr=1e-3")
    ck = os.path.join(run, "checkpoints")
    other = load_config(None, [f"out_dir={run}", "objective.name=grpo", "optim.lr=1e-3", "seed=3"])
    with pytest.raises(RunFolderError) as e:
        prepare_run_dir(other, run, ck, resume=True, overwrite=False)
    assert "objective.name" in str(e.value) and "seed" in str(e.value) and "optim.lr" not in str(e.value)
    safe = load_config(None, [f"out_dir={run}", "objective.name=snib", "optim.lr=1e-3", "train.steps=999",
                              "eval.every=7", "logging.console_every=3", "checkpoint.keep_last=5", "threads=2"])
    assert prepare_run_dir(safe, run, ck, resume=True, overwrite=False).endswith("step_000001")
    assert config_differences({"a": {"b": 1}}, {"a": {"b": 2}, "train": {"steps": 3}}) == ["a.b"]
    with pytest.raises(RunFolderError, match="exclude"):
        prepare_run_dir(safe, run, ck, resume=True, overwrite=True)


def test_resume_accepts_a_saved_config_without_a_key_added_later_at_its_default(tmp_path):
    # a run started before `reward.timeout` existed: the saved config lacks it; the default is what it ran with
    cfg, run = _used_run(tmp_path, "objective.name=snib")
    path = os.path.join(run, "config.yaml")
    with open(path) as f:
        saved = yaml.safe_load(f)
    del saved["reward"]["timeout"]
    with open(path, "w") as f:
        yaml.safe_dump(saved, f)
    ck = os.path.join(run, "checkpoints")
    assert prepare_run_dir(cfg, run, ck, resume=True, overwrite=False).endswith("step_000001")
    changed = load_config(None, [f"out_dir={run}", "objective.name=snib", "reward.timeout=3"])
    with pytest.raises(RunFolderError, match="reward.timeout"):
        prepare_run_dir(changed, run, ck, resume=True, overwrite=False)
