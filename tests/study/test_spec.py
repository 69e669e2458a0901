"""Study specs: the grid, labels and cell ids, config precedence, and errors that name the bad key."""

import os

import pytest

from ratiorl.study.spec import auto_label, load_spec, safe_label


def _spec(tmp_path, text, name="s.yaml", base=None):
    if base is not None:
        (tmp_path / "base.yaml").write_text(base)
    p = tmp_path / name
    p.write_text(text)
    return str(p)


BASE = "train: {steps: 7}\noptim: {lr: 0.001}\nlogging: {plots: false}\n"


def test_axes_product_labels_and_cell_ids(tmp_path):
    spec = load_spec(_spec(tmp_path, "seeds: 2\naxes:\n  objective.name: [snib, grpo]\n"
                                     "  rollout.num_generations: [4, 8]\n"))
    assert spec.seeds == [0, 1] and spec.name == "s"
    labels = [s.label for s in spec.settings]
    assert labels == ["objective=snib,rollout.num_generations=4", "objective=snib,rollout.num_generations=8",
                      "objective=grpo,rollout.num_generations=4", "objective=grpo,rollout.num_generations=8"]
    assert spec.settings[1].values == {"objective.name": "snib", "rollout.num_generations": 8}
    assert spec.cell_id(spec.settings[3], 1) == "objective=grpo,rollout.num_generations=8__seed1"
    assert len(spec.cells()) == 8
    assert spec.baseline_setting() is spec.settings[0]  # default: the first
    assert spec.metric_names("greedy") == ["reward/mean", "eval/greedy_acc"]
    assert spec.metric_names(None) == ["reward/mean", "eval/avg@k"]


def test_settings_times_axes_and_baseline_forms(tmp_path):
    spec = load_spec(_spec(tmp_path, "seeds: [3, 5]\nsettings:\n  - {label: sg, objective.name: snib}\n"
                                     "  - {label: fg, objective.name: snib_fg}\naxes:\n  reward.noise_sigma: [0.0, 0.5]\n"
                                     "baseline: {objective.name: snib_fg, reward.noise_sigma: 0.5}\n"))
    assert [s.label for s in spec.settings] == ["sg,reward.noise_sigma=0.0", "sg,reward.noise_sigma=0.5",
                                                "fg,reward.noise_sigma=0.0", "fg,reward.noise_sigma=0.5"]
    assert spec.baseline_setting().label == "fg,reward.noise_sigma=0.5"
    spec2 = load_spec(_spec(tmp_path, "axes: {objective.name: [grpo, snib]}\nbaseline: snib\n"))
    assert spec2.baseline_setting().label == "objective=snib"  # a bare axis value names its setting
    with pytest.raises(ValueError, match="baseline 'ppo' matches no setting.*objective=grpo, objective=snib"):
        load_spec(_spec(tmp_path, "axes: {objective.name: [grpo, snib]}\nbaseline: ppo\n"))


def test_labels_are_filesystem_safe():
    assert safe_label("a/b c:d") == "a_b_c_d"
    assert safe_label("..hidden") == "hidden"
    long = safe_label("x" * 300)
    assert len(long) == 120 and long != safe_label("x" * 299)
    assert auto_label({"task.options": {"n_digits": 3}, "objective.name": "grpo"}) == \
        'task.options={"n_digits":3},objective=grpo'
    assert auto_label({}) == "base"


def test_spec_key_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="unknown spec key 'sedes'; did you mean 'seeds'"):
        load_spec(_spec(tmp_path, "sedes: [0]\n"))
    with pytest.raises(ValueError, match="seeds: expected a non-empty list"):
        load_spec(_spec(tmp_path, "seeds: [0, x]\n"))
    with pytest.raises(ValueError, match="seeds: repeated seed"):
        load_spec(_spec(tmp_path, "seeds: [1, 1]\n"))
    with pytest.raises(ValueError, match="level: expected a confidence level"):
        load_spec(_spec(tmp_path, "level: 95\n"))
    with pytest.raises(ValueError, match="interval: expected 't' or 'bootstrap'"):
        load_spec(_spec(tmp_path, "interval: normal\n"))
    with pytest.raises(ValueError, match="axes.train.steps: expected a non-empty list"):
        load_spec(_spec(tmp_path, "axes: {train.steps: 5}\n"))
    with pytest.raises(ValueError, match="'seed' is set by the study"):
        load_spec(_spec(tmp_path, "axes: {seed: [1, 2]}\n"))
    with pytest.raises(ValueError, match="'out_dir' is set by the study"):
        load_spec(_spec(tmp_path, "overrides: {out_dir: x}\n"))
    with pytest.raises(ValueError, match="two settings have the label 'x'"):
        load_spec(_spec(tmp_path, "settings:\n  - {label: x, optim.lr: 0.1}\n  - {label: x, optim.lr: 0.2}\n"))
    with pytest.raises(ValueError, match="settings 'a' and axes both set optim.lr"):
        load_spec(_spec(tmp_path, "settings:\n  - {label: a, optim.lr: 0.1}\naxes: {optim.lr: [0.2]}\n"))


def test_cell_config_precedence(tmp_path):
    path = _spec(tmp_path, "base: base.yaml\noverrides: {train.steps: 3, eval: {every: 2}}\n"
                           "settings:\n  - {label: a, optim.lr: 0.01, objective: {name: snib, beta: 0.2}}\n"
                           "  - {label: b, task.options.n_train: 64}\n", base=BASE)
    spec = load_spec(path, extra=["train.steps=4"])
    cfgs = spec.build_configs(str(tmp_path / "study"))
    a = cfgs["a__seed1"]
    assert a.train.steps == 4  # base 7 <- overrides 3 <- command line 4
    assert a.optim.lr == 0.01 and a.eval.every == 2 and a.objective.name == "snib"
    assert a.objective.overrides == {"beta": 0.2}
    assert a.seed == 1 and a.out_dir == os.path.abspath(str(tmp_path / "study" / "cells" / "a__seed1"))
    assert a.logging.plots is False and a.logging.progress is False
    b = cfgs["b__seed0"]
    assert b.optim.lr == 0.001 and b.task.options == {"n_train": 64} and b.objective.name == "grpo"


@pytest.mark.parametrize("text,match", [
    ("axes: {optim.lrr: [0.1]}\n", r"setting 'optim.lrr=0.1' \(seed 0\): unknown config key 'optim.lrr'; did you mean 'optim.lr'"),
    ("settings:\n  - {label: nb, objective.advantage: nonee}\n", r"setting 'nb' \(seed 0\): objective:"),
    ("settings:\n  - {label: t, objective.name: snibb}\n", r"setting 't' \(seed 0\): objective:.*snib"),
    ("overrides: {train.steps: many}\n", r"train.steps: expected an integer"),
    ("overrides: {task.name: additon}\n", r"additon"),
    ("overrides: {reward.name: exact_matc}\n", r"unknown reward 'exact_matc'; did you mean 'exact_match'"),
])
def test_bad_cell_configs_fail_before_running(tmp_path, text, match):
    spec = load_spec(_spec(tmp_path, "base: base.yaml\n" + text, base=BASE))
    with pytest.raises(ValueError, match=match):
        spec.build_configs(str(tmp_path / "study"))


def test_missing_base_is_reported(tmp_path):
    spec = load_spec(_spec(tmp_path, "base: nowhere.yaml\n"))
    with pytest.raises(ValueError, match="base: config file not found"):
        spec.build_configs(str(tmp_path / "study"))


def test_shipped_specs_build(tmp_path):
    """Every spec under examples/studies builds every cell's config (no typo in a shipped study)."""
    root = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "studies")
    names = sorted(n for n in os.listdir(root) if n.endswith(".yaml"))
    assert {"snib_ablations.yaml", "reward_noise.yaml", "snib_beta.yaml", "grad_std_by_length.yaml",
            "ctpo_clip_by_position.yaml", "dgpo_baselines.yaml", "mismatch.yaml"} <= set(names)
    for n in names:
        spec = load_spec(os.path.join(root, n))
        cfgs = spec.build_configs(str(tmp_path / n))
        assert len(cfgs) == len(spec.settings) * len(spec.seeds) >= 6, n
        assert len(spec.seeds) >= 3, n
        with open(os.path.join(root, n)) as f:
            head = f.read(2000)
        assert "cells" in head and "min" in head, f"{n}: the header states the size and runtime"
