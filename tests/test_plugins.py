"""Plugins: a user's .py file registers a new weight with its own option, named from the config.

The weight is trained with through the real command line (`ratiorl train --plugins FILE ...`);
the option value has to reach the function, and the weight's own metrics have to reach the
run's metrics.jsonl (objective metrics are logged with an ``objective/`` prefix).
"""

import json
import os
import sys

import pytest
import yaml

from ratiorl.cli import main

from .train.conftest import _few_threads, tiny_overrides  # noqa: F401 (autouse fixture: one thread)

PLUGIN = '''
import json

import torch

from ratiorl.objectives import WEIGHTS
from ratiorl.objectives.weights import Weight

SEEN = {seen!r}


@WEIGHTS.register("tilted_token", level="token")
def tilted(delta, info, *, tilt: float = 1.0):
    # w_t = r_t ** tilt: a tempered token ratio
    with open(SEEN, "a") as f:
        f.write(json.dumps(tilt) + "\\n")
    return Weight(delta * tilt, "token", delta, metrics={{"tilt_value": torch.tensor(float(tilt))}})
'''


@pytest.fixture
def plugin(tmp_path):
    """Path of the plugin file and of the file it records each `tilt` it receives in."""
    from ratiorl.objectives import WEIGHTS

    seen = tmp_path / "seen.jsonl"
    path = tmp_path / "tilted_plugin.py"
    path.write_text(PLUGIN.format(seen=str(seen)))
    before = set(sys.modules)
    yield str(path), seen
    WEIGHTS.pop("tilted_token", None)
    for name in set(sys.modules) - before:
        if name.startswith("ratiorl_plugin_"):
            del sys.modules[name]


def _seen(path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _objective_metric(run_dir, key) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r[key] for r in rows if key in r]


def _tiny_yaml(tmp_path, tiny_model_dir, out, objective: dict) -> str:
    data = {}
    for item in tiny_overrides(tiny_model_dir, out, **{"train.steps": 2}):
        key, value = item.split("=", 1)
        node = data
        *sections, leaf = key.split(".")
        for s in sections:
            node = node.setdefault(s, {})
        node[leaf] = yaml.safe_load(value)
    data["objective"] = objective
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_plugin_weight_from_the_command_line(plugin, tiny_model_dir, tmp_path, capsys):
    plugin_path, seen = plugin
    out = str(tmp_path / "run")
    config = _tiny_yaml(tmp_path, tiny_model_dir, out, {"name": "grpo"})
    rc = main(["train", "--config", config, "--plugins", plugin_path, "--objective.weight", "tilted_token",
               "--objective.weight_options.tilt", "0.5"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    values = _seen(seen)
    assert values and all(v == 0.5 for v in values)  # the option, not the signature default 1.0
    logged = _objective_metric(out, "objective/tilt_value")
    assert len(logged) >= 2 and all(v == pytest.approx(0.5) for v in logged)
    with open(os.path.join(out, "config.yaml")) as f:
        saved = yaml.safe_load(f)
    assert saved["plugins"] == [plugin_path]
    assert saved["objective"]["weight"] == "tilted_token" and saved["objective"]["weight_options"] == {"tilt": 0.5}


def test_plugin_weight_from_yaml(plugin, tiny_model_dir, tmp_path, capsys):
    plugin_path, seen = plugin
    out = str(tmp_path / "run")
    config = _tiny_yaml(tmp_path, tiny_model_dir, out,
                        {"name": "grpo", "weight": "tilted_token", "weight_options": {"tilt": 0.25}})
    rc = main(["train", "--config", config, f"--plugins={plugin_path}"])
    assert rc == 0, capsys.readouterr().err
    values = _seen(seen)
    assert values and all(v == 0.25 for v in values)
    assert all(v == pytest.approx(0.25) for v in _objective_metric(out, "objective/tilt_value"))


def test_unregistered_weight_and_missing_plugin_are_user_errors(plugin, tiny_model_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    config = _tiny_yaml(tmp_path, tiny_model_dir, out, {"name": "grpo", "weight": "tilted_token"})
    assert main(["train", "--config", config, "--plugins", str(tmp_path / "missing.py")]) == 2
    assert "plugin file not found" in capsys.readouterr().err
    assert main(["train", "--config", config]) == 2  # no plugin: the weight is unknown
    err = capsys.readouterr().err
    assert "tilted_token" in err and "Traceback" not in err
