"""Config: YAML + dotted overrides, coercion, unknown keys listing the valid ones, round trip,
plugins and the objective built from a config."""

import glob
import os
import sys

import pytest

from ratiorl.train import TrainConfig, config_from_dict, load_config, save_config
from ratiorl.train.config import (
    config_to_dict,
    import_plugins,
    objective_from_config,
    objective_kwargs,
    parse_overrides,
    parse_value,
)

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
    p = tmp_path / "bad.yaml"
    p.write_text("rollout:\n  num_gens: 4\n")
    with pytest.raises(ValueError, match="rollout.num_gens.*num_generations"):
        load_config(str(p), [])


def test_unknown_keys_suggest_the_nearest_one():
    with pytest.raises(ValueError) as e:
        load_config(None, ["--train.stesp", "50"])
    assert str(e.value).startswith("unknown config key 'train.stesp'; did you mean 'train.steps'? "
                                   "valid keys under 'train': autocast, count_scope, ")
    with pytest.raises(ValueError, match=r"'optimizer.lr'; did you mean 'optim.lr'\? valid keys at the top level"):
        load_config(None, ["--optimizer.lr", "1e-3"])
    with pytest.raises(ValueError, match=r"did you mean 'objective.weight_options.tilt'\?"):
        load_config(None, ["--objective.weight_option.tilt", "0.5"])
    with pytest.raises(ValueError) as e:
        load_config(None, ["--train.zzzzzz", "1"])
    assert "did you mean" not in str(e.value) and "valid keys under 'train'" in str(e.value)


def test_unknown_objective_hyperparameters_are_checked_by_the_objective():
    cfg = load_config(None, ["--objective.clip_hi", "0.3"])  # a flat key: stored, checked later
    assert cfg.objective.overrides == {"clip_hi": 0.3}
    with pytest.raises(ValueError, match=r"^objective: .*clip_hi.*clip_high"):
        objective_from_config(cfg)


@pytest.mark.parametrize("override, msg", [
    (["--train.steps", "ten"], "expected an integer"),
    (["--train.steps", "2.5"], "expected an integer"),
    (["--optim.lr", "fast"], "expected a number"),
    (["--eval.greedy", "maybe"], "expected true/false"),
    (["--train.steps", "null"], "train.steps: expected an integer"),
    (["--task.options", "[1, 2]"], "task.options: expected a mapping"),
    (["--rollout.num_generations", "0"], "num_generations must be >= 1"),
    (["--optim.schedule", "step"], "constant, linear or cosine"),
    (["--train.mini_batches", "99"], "group boundaries"),
    (["--model", "x"], "is a section"),
    (["--train.steps.x", "1"], "is a value, not a section"),
])
def test_bad_values(override, msg):
    with pytest.raises(ValueError, match=msg):
        load_config(None, override)


def test_bad_values_from_a_mapping():
    with pytest.raises(ValueError, match=r"model.path: expected a string, got \['x'\]"):
        config_from_dict({"model": {"path": ["x"]}})
    with pytest.raises(ValueError, match="train.steps: expected an integer, got True"):
        config_from_dict({"train": {"steps": True}})
    assert config_from_dict({"train": {"steps": 2.0}}).train.steps == 2  # an integral float is an integer
    assert load_config(None, ["--model.path", "[x]"]).model.path == "[x]"  # command-line text for a str stays text


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
                             "--lora.target_modules", "[c_attn, c_proj]", "--task.options", "{n_digits: 1}",
                             "--objective.shaping_options.pos_power", "0.7", "--plugins", "json,os.path"])
    path = tmp_path / "config.yaml"
    save_config(cfg, str(path))
    assert load_config(str(path), []) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_values_inside_dict_fields_and_untyped_values():
    cfg = load_config(None, ["--objective.shaping_options.pos_power", "0.7", "--objective.weight", "cumulative",
                             "--objective.weight_options={max_log_weight: 10}", "objective.clip_low=0.3",
                             "--objective.flag", "--objective.seq", "[a, b]", "--task.options.n_train", "64",
                             "--sft.model_sizes", "{n_layer: 1}"])
    o = cfg.objective
    assert o.shaping_options == {"pos_power": 0.7} and o.weight == "cumulative"
    assert o.weight_options == {"max_log_weight": 10} and o.shaping is None
    assert o.overrides == {"clip_low": 0.3, "flag": True, "seq": ["a", "b"]}
    assert cfg.task.options == {"n_train": 64}
    assert cfg.sft.model_sizes == {"n_layer": 1}  # a whole mapping replaces the default, not merged into it
    assert parse_value("0.1") == 0.1 and parse_value("true") is True and parse_value("{a: 1}") == {"a": 1}
    assert parse_value("[a, b") == "[a, b" and parse_value("abc") == "abc"


def test_yaml_objective_section_forms(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("plugins: [mod_a, path/to/file.py]\n"
                 "objective: {name: snib, beta: 0.1, weight: tilted, weight_options: {tilt: 0.5},\n"
                 "            shaping_options: {clip_low: 0.1}}\n")
    cfg = load_config(str(p), ["--objective.weight_options.extra", "2", "--train.steps=3"])
    assert cfg.plugins == ["mod_a", "path/to/file.py"]
    assert cfg.objective.overrides == {"beta": 0.1}
    assert cfg.objective.weight_options == {"tilt": 0.5, "extra": 2}
    assert objective_kwargs(cfg) == {"weight": "tilted", "weight_options": {"tilt": 0.5, "extra": 2},
                                     "shaping_options": {"clip_low": 0.1}, "beta": 0.1}
    assert load_config(str(p), ["--plugins", "x.py"]).plugins == ["x.py"]  # the command line replaces the list
    assert load_config(None, ["--out_dir", "runs/${objective.name}"]).out_dir == "runs/grpo"


def test_objective_from_config_calls_ratiorl_objective(monkeypatch):
    import ratiorl

    seen = []

    def fake(name, **kw):
        seen.append((name, kw))
        if "bad" in kw:
            raise TypeError("unknown option 'bad'")
        return "obj"

    monkeypatch.setattr(ratiorl, "objective", fake)
    cfg = load_config(None, ["--objective.name", "ctpo", "--objective.shaping", "dual_clip",
                             "--objective.advantage", "gae", "--objective.advantage_options.lam", "0.9",
                             "--objective.beta", "0.05", "--objective.aggregation_options", "{}"])
    assert objective_from_config(cfg) == "obj"
    assert seen == [("ctpo", {"shaping": "dual_clip", "advantage": "gae", "advantage_options": {"lam": 0.9},
                              "beta": 0.05})]
    cfg.objective.overrides["bad"] = 1
    with pytest.raises(ValueError, match="^objective: unknown option 'bad'"):
        objective_from_config(cfg)


def test_import_plugins(tmp_path):
    with pytest.raises(ValueError, match="plugin file not found: .*nope.py"):
        import_plugins([str(tmp_path / "nope.py")])
    with pytest.raises(ValueError, match="cannot import plugin module 'no_such_plugin_mod'"):
        import_plugins("no_such_plugin_mod")
    p = tmp_path / "counting.py"
    p.write_text("import builtins\nbuiltins._ratiorl_test_count = getattr(builtins, '_ratiorl_test_count', 0) + 1\n")
    import builtins

    try:
        mods = import_plugins(f"json, {p}")
        import_plugins([str(p)])  # a second import (CLI, then the trainer) runs the file once
        assert mods[0] is sys.modules["json"] and mods[1].__file__ == str(p)
        assert builtins._ratiorl_test_count == 1
    finally:
        sys.modules.pop(mods[1].__name__, None)
        del builtins._ratiorl_test_count


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(EXAMPLES, "*.yaml"))),
                         ids=lambda p: os.path.basename(p))
def test_examples_load(path):
    cfg = load_config(path, [])
    objective_from_config(cfg)  # valid objective settings


def test_every_family_has_an_example():
    names = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(EXAMPLES, "*.yaml"))}
    assert {"demo", "grpo", "snib", "ctpo", "dgpo", "ppo", "gspo"} <= names
