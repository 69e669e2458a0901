"""Inputs checked at the door: each bad input fails with an error naming the argument."""

import math

import pytest
import torch

import ratiorl
from ratiorl.train import load_config
from ratiorl.train.build import build_objective

from ._data import call, make_batch


@pytest.mark.parametrize("bad, match", [(float("nan"), "NaN"), (0.5, "0/1"), (2.0, "0/1"), (-1.0, "0/1")])
def test_mask_must_hold_zero_and_one(bad, match):
    d = make_batch(seed=0)
    mask = d["mask"].clone().to(torch.float64)
    mask[0, 0] = bad
    with pytest.raises(ValueError, match=rf"mask.*{match}|{match}.*mask"):
        call(ratiorl.objective("grpo"), dict(d, mask=mask))


def test_valid_masks_of_every_dtype_pass():
    d = make_batch(seed=0)
    ref = call(ratiorl.objective("grpo"), d).loss
    for dtype in (torch.bool, torch.long, torch.float32, torch.float64):
        out = call(ratiorl.objective("grpo"), dict(d, mask=d["mask"].to(dtype)))
        assert torch.allclose(out.loss, ref)


@pytest.mark.parametrize("name", ["num_tokens", "num_sequences"])
@pytest.mark.parametrize("value", [0, 0.0, -3, float("nan"), torch.tensor(0.0), torch.tensor(float("nan"))])
def test_zero_or_nan_counts_are_rejected(name, value):
    d = make_batch(seed=1)
    with pytest.raises(ValueError, match=name):
        call(ratiorl.objective("grpo"), d, **{name: value})


def test_positive_tensor_count_is_accepted():
    d = make_batch(seed=1)
    out = call(ratiorl.objective("grpo"), d, num_tokens=torch.tensor(10.0), num_sequences=torch.tensor(6))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("key, value", [
    ("clip_low", -0.1), ("clip_low", math.nan), ("clip_high", -0.1), ("clip_high", math.nan),
    ("beta", -0.1), ("beta", math.nan), ("log_ratio_clamp", math.nan),
])
def test_negative_or_nan_clip_widths_and_betas(key, value):
    with pytest.raises(ValueError, match=key):
        ratiorl.objective("grpo", **{key: value})


def test_nan_options_of_other_entries():
    with pytest.raises(ValueError, match="dual_clip"):
        ratiorl.objective("grpo", shaping="dual_clip", dual_clip=math.nan)
    with pytest.raises(ValueError, match="max_log_weight"):
        ratiorl.objective("snib", max_log_weight=math.nan)


def test_one_generation_with_a_group_advantage_is_a_config_error():
    cfg = load_config(None, ["rollout.num_generations=1", "objective.advantage=group_norm"])
    with pytest.raises(ValueError, match=r"rollout\.num_generations.*objective\.advantage"):
        build_objective(cfg)
    ok = load_config(None, ["rollout.num_generations=1"])
    ok.objective.advantage = "none"  # REINFORCE without a baseline needs no groups
    assert build_objective(ok).advantage == "none"
    assert build_objective(load_config(None, ["rollout.num_generations=2"])).advantage == "group_norm"
