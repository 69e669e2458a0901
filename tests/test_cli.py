"""The `ratiorl` command line: every sub-command end to end on a tiny model, and its user errors."""

import json
import os

from ratiorl.cli import main

from .train.conftest import _few_threads, tiny_overrides  # noqa: F401 (autouse fixture: one thread)


def _train_args(tiny_model_dir, out, **kw):
    return ["train"] + ["--" + a for a in tiny_overrides(tiny_model_dir, out, **kw)]


def test_objectives_lists_every_preset(capsys):
    import ratiorl

    assert main(["objectives"]) == 0
    out = capsys.readouterr().out
    for name in ratiorl.available_objectives():
        assert name in out


def test_train_resume_compare_report(tiny_model_dir, tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(_train_args(tiny_model_dir, a, **{"train.steps": 2, "objective.name": "grpo"})) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["objective"] == "grpo"
    assert main(_train_args(tiny_model_dir, b, **{"train.steps": 1, "objective.name": "snib"})) == 0
    capsys.readouterr()
    assert main(_train_args(tiny_model_dir, b, **{"train.steps": 2, "objective.name": "snib"}) + ["--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2

    png = str(tmp_path / "cmp.png")
    assert main(["compare", a, b, "--out", png]) == 0
    assert os.path.getsize(png) > 1000
    assert main(["report", a]) == 0
    assert os.path.exists(os.path.join(a, "report.html")) and os.path.exists(os.path.join(a, "report.md"))


def test_user_errors_exit_2_without_traceback(tiny_model_dir, tmp_path, capsys):
    out = str(tmp_path / "x")
    assert main(_train_args(tiny_model_dir, out) + ["--optim.learnrate", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optim.learnrate'" in err and "lr" in err and "Traceback" not in err

    assert main(_train_args(tiny_model_dir, out, **{"train.steps": "many"})) == 2
    assert "expected an integer" in capsys.readouterr().err

    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err

    assert main(_train_args(tiny_model_dir, out, **{"task.name": "jsonl", "task.path": str(tmp_path / "no.jsonl")})) == 2
    assert "no such JSONL file" in capsys.readouterr().err

    assert main(["eval", "--model", str(tmp_path / "nomodel")]) == 2
    assert "no such run, model folder or hub name" in capsys.readouterr().err

    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "c.png")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_eval_a_saved_model(tiny_model_dir, capsys):
    assert main(["eval", "--model", tiny_model_dir, "--k", "2", "--num-prompts", "4", "--max-new-tokens", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0.0 <= out["eval/avg@k"] <= out["eval/pass@k"] <= 1.0
    assert out["eval/num_prompts"] == 4


def test_sft_writes_a_loadable_model(tmp_path, capsys):
    out = str(tmp_path / "sft")
    assert main(["sft", "--out", out, "--steps", "3", "--batch_size", "4",
                 "--model_sizes", "{n_layer: 1, n_head: 2, n_embd: 32}"]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.n_embd == 32
    assert AutoTokenizer.from_pretrained(out)("1+2=")["input_ids"]


def test_demo_end_to_end_tiny(tmp_path, capsys):
    # the real demo (examples/demo.yaml) with everything shrunk to seconds
    out = str(tmp_path / "demo")
    args = ["demo", "--out", out, "--sft.steps", "3", "--sft.batch_size", "4",
            "--sft.model_sizes", "{n_layer: 1, n_head: 2, n_embd: 32}", "--train.steps", "1",
            "--rollout.prompts_per_step", "2", "--rollout.num_generations", "2", "--eval.num_prompts", "4",
            "--eval.k", "2", "--logging.progress", "false", "--logging.plots", "false",
            "--logging.tensorboard", "false"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "eval accuracy before RL" in text and "eval accuracy after RL" in text
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    for key in ("objective", "steps", "wall_seconds", "eval_accuracy_before", "eval_accuracy_after", "eval_metric"):
        assert key in s
    assert s["objective"] == "snib" and s["steps"] == 1
    assert os.path.exists(os.path.join(out, "sft-model", "config.json"))


def test_lab_passes_options_to_run_lab(tmp_path, monkeypatch, capsys):
    import ratiorl.lab

    seen = {}

    def fake_run_lab(out_dir, seed=0, quick=False, **kw):
        seen.update(out_dir=out_dir, seed=seed, quick=quick, **kw)
        return {"claims": {}, "runtime_s": 0.0}

    monkeypatch.setattr(ratiorl.lab, "run_lab", fake_run_lab)
    assert main(["lab", "--out", str(tmp_path), "--seed", "3", "--quick", "--K", "100"]) == 0
    assert seen == {"out_dir": str(tmp_path), "seed": 3, "quick": True, "K": 100}
    assert json.loads(capsys.readouterr().out)["claims"] == {}


def test_config_show_prints_the_full_resolved_config(tmp_path, capsys):
    import yaml

    from ratiorl.train.config import TrainConfig, config_to_dict, load_config

    example = os.path.join(os.path.dirname(__file__), "..", "examples", "snib.yaml")
    args = ["--train.steps", "5", "--objective.clip_low=0.3", "--objective.shaping_options.pos_power", "0.7"]
    assert main(["config", "--show", "--config", example] + args + ["--plugins", "json"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == config_to_dict(load_config(example, args + ["plugins=json"]))
    assert set(shown) == set(config_to_dict(TrainConfig()))  # every section, defaults filled
    assert shown["train"]["steps"] == 5 and shown["train"]["epochs"] == 1 and shown["plugins"] == ["json"]
    assert shown["objective"]["overrides"] == {"beta": 0.1, "clip_low": 0.3}
    assert shown["objective"]["shaping_options"] == {"pos_power": 0.7}
    path = tmp_path / "shown.yaml"
    path.write_text(yaml.safe_dump(shown))
    assert load_config(str(path), []) == load_config(example, args + ["plugins=json"])  # loadable as is

    assert main(["config", "--train.stesp", "5"]) == 2
    assert "did you mean 'train.steps'?" in capsys.readouterr().err


def test_every_command_takes_plugins(tmp_path, capsys):
    from ratiorl.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        assert any("--plugins" in a.option_strings for a in sub._actions), name
    assert main(["objectives", "--plugins", "json"]) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path), "--plugins", "no_such_plugin_mod"]) == 2
    assert "cannot import plugin module 'no_such_plugin_mod'" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "ratiorl", "config", "--train.steps", "3"],
                         check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "steps: 3" in res.stdout


def test_demo_seed_seeds_the_warm_start_too(tmp_path):
    from ratiorl.train.demo import demo_config

    cfg = demo_config(str(tmp_path / "d"), overrides=["--seed", "3"])
    assert (cfg.seed, cfg.sft.seed) == (3, 3)
    cfg = demo_config(str(tmp_path / "d"), overrides=["--seed", "3", "--sft.seed", "5"])  # explicit wins
    assert (cfg.seed, cfg.sft.seed) == (3, 5)
    assert demo_config(str(tmp_path / "d")).sft.target_accuracy == 0.40  # a fixed quality, not a step count
