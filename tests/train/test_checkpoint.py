"""Atomic checkpoints: a checkpoint directory is complete or absent; keep-last-K; RNG state."""

import os
import random

import numpy as np
import pytest
import torch

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
