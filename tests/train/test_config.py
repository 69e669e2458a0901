"""Config: YAML + dotted overrides, coercion, unknown keys listing the valid ones, round trip."""

import glob
import os

import pytest

from ratiorl.train import TrainConfig, load_config, save_config
from ratiorl.train.config import parse_overrides

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


def test_defaults_and_overrides_are_coerced():
    cfg = load_config(None, ["--objective.name", "snib", "--objective.beta", "0.05", "--optim.lr=3e-4",
                             "--train.steps", "7", "--eval.greedy", "false", "rollout.temperature=0.7"])
    assert cfg.objective.name == "snib"
    assert cfg.objective.overrides == {"beta": 0.05}
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.eval.greedy is False
    assert cfg.rollout.temperature == 0.7
    assert load_config(None, []) == TrainConfig()


def test_yaml_then_cli(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("objective:\n  name: grpo\n  beta: 0.0\n  clip_high: 0.28\ntrain:\n  steps: 3\n"
                 "task:\n  options: {n_digits: 1}\n")
    cfg = load_config(str(p), ["--train.steps", "5", "--objective.clip_high", "0.3"])
    assert cfg.train.steps == 5
    assert cfg.objective.overrides == {"beta": 0.0, "clip_high": 0.3}
    assert cfg.task.options == {"n_digits": 1}


def test_unknown_keys_list_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'optim.learning_rate'.*lr.*weight_decay"):
        load_config(None, ["--optim.learning_rate", "1e-3"])
    with pytest.raises(ValueError, match=r"valid keys at the top level: .*objective.*optim"):
        load_config(None, ["--optimizer.lr", "1e-3"])
    with pytest.raises(ValueError, match=r"objective.clip_hi.*clip_high"):
        load_config(None, ["--objective.clip_hi", "0.3"])
    p = tmp_path / "bad.yaml"
    p.write_text("rollout:\n  num_gens: 4\n")
    with pytest.raises(ValueError, match="rollout.num_gens.*num_generations"):
        load_config(str(p), [])


@pytest.mark.parametrize("override, msg", [
    (["--train.steps", "ten"], "expected an integer"),
    (["--train.steps", "2.5"], "expected an integer"),
    (["--optim.lr", "fast"], "expected a number"),
    (["--eval.greedy", "maybe"], "expected true/false"),
    (["--rollout.num_generations", "0"], "num_generations must be >= 1"),
    (["--optim.schedule", "step"], "constant, linear or cosine"),
    (["--train.mini_batches", "99"], "group boundaries"),
    (["--model", "x"], "is a section"),
    (["--train.steps.x", "1"], "is a value, not a section"),
])
def test_bad_values(override, msg):
    with pytest.raises(ValueError, match=msg):
        load_config(None, override)


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"), [])
    p = tmp_path / "broken.yaml"
    p.write_text("train: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(str(p), [])


def test_parse_overrides_forms():
    assert parse_overrides(["--a.b", "1", "--c=2", "d.e=3", "--flag"]) == [
        ("a.b", "1"), ("c", "2"), ("d.e", "3"), ("flag", "true")]
    with pytest.raises(ValueError, match="cannot parse"):
        parse_overrides(["loose"])


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["--objective.name", "ctpo", "--objective.pos_power", "0.4", "--lora.enabled", "true",
                             "--lora.target_modules", "[c_attn, c_proj]", "--task.options", "{n_digits: 1}"])
    path = tmp_path / "config.yaml"
    save_config(cfg, str(path))
    assert load_config(str(path), []) == cfg


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(EXAMPLES, "*.yaml"))),
                         ids=lambda p: os.path.basename(p))
def test_examples_load(path):
    cfg = load_config(path, [])
    import ratiorl

    ratiorl.objective(cfg.objective.name, **cfg.objective.overrides)  # valid objective settings


def test_every_family_has_an_example():
    names = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(EXAMPLES, "*.yaml"))}
    assert {"demo", "grpo", "snib", "ctpo", "dgpo", "ppo", "gspo"} <= names
