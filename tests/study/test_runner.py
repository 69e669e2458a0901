"""The study runner: every cell as a subprocess, failures isolated and reported, reruns that
continue (finished cells untouched, checkpointed cells resumed, the rest restarted).

Most tests swap `python -m ratiorl train` for a small stand-in script (seconds per study) that
writes metrics.jsonl, checkpoints and summary.json as the trainer does and logs each call; one
test runs the real trainer on a tiny model."""

import argparse
import json
import os
import sys

import pytest

from ratiorl.study.command import add_arguments, main

FAKE_TRAIN = r'''
import json, os, signal, sys
import yaml

args = sys.argv[1:]
cfg = yaml.safe_load(open(args[args.index("--config") + 1]))
out, seed, steps = cfg["out_dir"], cfg["seed"], cfg["train"]["steps"]
cell = os.path.basename(out)
with open(os.environ["FAKE_TRAIN_CALLS"], "a") as f:
    f.write(json.dumps({"cell": cell, "argv": args}) + "\n")
level = 100 * cfg["optim"]["lr"] + 0.01 * seed  # the known value of this cell
start = 0
ck = os.path.join(out, "checkpoints")
if "--resume" in args:
    done = sorted(int(n[5:]) for n in os.listdir(ck) if n.startswith("step_"))
    start = done[-1]
    keep = [l for l in open(os.path.join(out, "metrics.jsonl")) if json.loads(l)["step"] <= start]
    open(os.path.join(out, "metrics.jsonl"), "w").writelines(keep)
elif os.path.exists(os.path.join(out, "metrics.jsonl")):
    print("already holds a run", file=sys.stderr)
    sys.exit(2)
fail = os.path.join(os.environ["FAKE_TRAIN_FAIL"], cell)
mode = open(fail).read().strip() if os.path.exists(fail) else ""
with open(os.path.join(out, "metrics.jsonl"), "a") as m:
    if start == 0:
        m.write(json.dumps({"step": 0, "eval/greedy_acc": 0.0}) + "\n")
    for s in range(start + 1, steps + 1):
        m.write(json.dumps({"step": s, "reward/mean": level}) + "\n")
        m.flush()
        if s == 2 and mode == "crash":
            print("Traceback: something broke at step 2", file=sys.stderr)
            sys.exit(3)
        if s == 2 and mode == "kill":
            d = os.path.join(ck, "step_000002")
            os.makedirs(d)
            open(os.path.join(d, "COMPLETE"), "w").write("2\n")
            os.kill(os.getpid(), signal.SIGKILL)
    m.write(json.dumps({"step": steps, "eval/greedy_acc": 2 * level}) + "\n")
json.dump({"finished": True, "steps": steps}, open(os.path.join(out, "summary.json"), "w"))
print(json.dumps({"finished": True}))
'''

STUDY_TEXT = """\
base: base.yaml
overrides: {train.steps: 4}
seeds: [0, 1, 2]
settings:
  - {label: slow, optim.lr: 0.001}
  - {label: fast, optim.lr: 0.003}
metrics: [reward/mean]
"""


@pytest.fixture
def study(tmp_path, monkeypatch):
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN)
    calls, fail = tmp_path / "calls.jsonl", tmp_path / "fail"
    fail.mkdir()
    monkeypatch.setenv("FAKE_TRAIN_CALLS", str(calls))
    monkeypatch.setenv("FAKE_TRAIN_FAIL", str(fail))
    # the stand-in never loads the model; an existing folder keeps the study from building one
    (tmp_path / "base.yaml").write_text(f"model: {{path: {tmp_path}}}\nlogging: {{plots: false}}\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(STUDY_TEXT)
    out = tmp_path / "study"

    class Study:
        dir = str(out)

        @staticmethod
        def run(*extra, spec_text=None):
            if spec_text is not None:
                spec.write_text(spec_text)
            p = argparse.ArgumentParser()
            add_arguments(p)
            args = p.parse_args([str(spec), "--out", str(out), "--no-report", *extra])
            return main(args, train_command=[sys.executable, str(fake)])

        @staticmethod
        def calls():
            if not calls.exists():
                return []
            return [json.loads(line) for line in calls.read_text().splitlines()]

        @staticmethod
        def fail(cell, mode):
            (fail / cell).write_text(mode)

        @staticmethod
        def heal(cell):
            (fail / cell).unlink()

        @staticmethod
        def cell(cid, name=""):
            return os.path.join(str(out), "cells", cid, name)

        @staticmethod
        def results():
            with open(os.path.join(str(out), "results.json")) as f:
                return json.load(f)

    return Study


def _read(path):
    with open(path) as f:
        return f.read()


CELLS = [f"{label}__seed{k}" for label in ("slow", "fast") for k in range(3)]


def test_study_runs_every_cell_and_compares(study, capsys):
    assert study.run() == 0
    assert sorted(c["cell"] for c in study.calls()) == sorted(CELLS)
    assert all(c["argv"][-1].endswith("config.yaml") for c in study.calls())  # fresh runs: no flags
    for cid in CELLS:
        assert os.path.exists(study.cell(cid, "DONE"))
        assert "=== " in _read(study.cell(cid, "train.log"))  # the cell's output goes to its log
    with open(os.path.join(study.dir, "study.yaml")) as f:
        assert f.read() == STUDY_TEXT
    res = study.results()
    slow, fast = res["settings"]
    assert slow["stats"]["reward/mean"]["final"]["mean"] == pytest.approx(0.11)  # 0.1 + 0.01 * mean seed
    assert fast["stats"]["reward/mean"]["auc"]["mean"] == pytest.approx(0.31)
    d_final, _ = res["differences"]
    assert (d_final["a"], d_final["b"], d_final["summary"]) == ("fast", "slow", "final")
    assert d_final["mean"] == pytest.approx(0.2) and d_final["resolved"]  # equal per-seed offsets: exact
    out = capsys.readouterr().out
    assert "reward/mean" in out and "higher" in out
    assert os.path.exists(os.path.join(study.dir, "table.txt"))


def test_failed_cell_is_reported_and_a_rerun_continues(study, capsys):
    study.fail("fast__seed1", "crash")
    assert study.run() == 1
    err = capsys.readouterr().err
    assert "fast__seed1" in err and "exit status 3" in err and study.cell("fast__seed1", "train.log") in err
    assert "something broke at step 2" in err  # the log's last line is shown
    assert not os.path.exists(study.cell("fast__seed1", "DONE"))
    done = [c for c in CELLS if c != "fast__seed1"]
    assert all(os.path.exists(study.cell(c, "DONE")) for c in done)  # the others still ran
    assert study.results()["settings"][1]["missing"] == ["fast__seed1"]
    before = {c: (os.stat(study.cell(c, "metrics.jsonl")).st_mtime_ns, _read(study.cell(c, "metrics.jsonl")))
              for c in done}

    study.heal("fast__seed1")
    assert study.run() == 0
    calls = study.calls()
    assert len(calls) == 7 and calls[-1]["cell"] == "fast__seed1"  # only the failed cell ran again
    assert calls[-1]["argv"][-1] == "--overwrite"  # logged steps, no checkpoint: restarted
    after = {c: (os.stat(study.cell(c, "metrics.jsonl")).st_mtime_ns, _read(study.cell(c, "metrics.jsonl")))
             for c in done}
    assert after == before
    attempts = os.listdir(os.path.join(study.dir, "attempts"))  # the failed attempt is kept aside
    assert len(attempts) == 1 and attempts[0].startswith("fast__seed1.old-")
    assert study.results()["settings"][1]["missing"] == []

    assert study.run() == 0 and len(study.calls()) == 7  # everything done: nothing runs


def test_killed_cell_resumes_from_its_checkpoint(study):
    study.fail("slow__seed2", "kill")
    assert study.run() == 1
    study.heal("slow__seed2")
    assert study.run() == 0
    last = study.calls()[-1]
    assert last["cell"] == "slow__seed2" and last["argv"][-1] == "--resume"
    rows = [json.loads(line) for line in _read(study.cell("slow__seed2", "metrics.jsonl")).splitlines()]
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2, 3, 4]  # continued, nothing twice


def test_finished_run_without_done_marker_is_not_rerun(study):
    assert study.run() == 0
    os.remove(study.cell("fast__seed0", "DONE"))  # the study died between the run's end and DONE
    assert study.run() == 0
    assert len(study.calls()) == 6 and os.path.exists(study.cell("fast__seed0", "DONE"))


def test_rerun_with_another_spec_is_refused(study, capsys):
    assert study.run() == 0
    capsys.readouterr()
    assert study.run(spec_text=STUDY_TEXT.replace("[0, 1, 2]", "[0, 1, 2, 3]")) == 2
    assert "different spec (differs in: seeds)" in capsys.readouterr().err
    assert study.run("--set", "train.steps=5", spec_text=STUDY_TEXT) == 2  # the cells' configs would change
    assert "differs in: train.steps" in capsys.readouterr().err
    # analysis keys may change: the statistics are recomputed, nothing runs
    assert study.run(spec_text=STUDY_TEXT + "level: 0.9\ninterval: bootstrap\n") == 0
    assert study.results()["level"] == 0.9 and study.results()["interval"] == "bootstrap"
    assert len(study.calls()) == 6


def test_config_typo_runs_nothing(study, capsys):
    assert study.run(spec_text=STUDY_TEXT.replace("optim.lr: 0.003", "optim.lrr: 0.003")) == 2
    err = capsys.readouterr().err
    assert "setting 'fast' (seed 0): unknown config key 'optim.lrr'; did you mean 'optim.lr'" in err
    assert study.calls() == [] and not os.path.exists(study.dir)


def test_parallel_jobs_give_the_same_results(study, tmp_path):
    assert study.run("--jobs", "3") == 0
    assert sorted(c["cell"] for c in study.calls()) == sorted(CELLS)
    res = study.results()
    assert res["differences"][0]["mean"] == pytest.approx(0.2)


def test_dry_run_lists_cells_and_runs_nothing(study, capsys):
    assert study.run("--dry-run") == 0
    err = capsys.readouterr().err
    assert "2 settings x 3 seeds = 6 cells (6 new)" in err and "new      fast__seed2" in err
    assert study.calls() == []


def test_a_cell_run_by_a_live_process_is_refused(study, capsys):
    assert study.run() == 0
    os.remove(study.cell("slow__seed0", "DONE"))
    with open(study.cell("slow__seed0", "RUNNING"), "w") as f:
        f.write(str(os.getppid()))  # a live process that is not this one
    assert study.run() == 2
    assert f"being run by process {os.getppid()}" in capsys.readouterr().err


def test_real_training_cell(tiny_model_dir, tmp_path):
    """One cell through `python -m ratiorl train` on the tiny model."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"""\
overrides:
  model.path: {tiny_model_dir}
  rollout: {{prompts_per_step: 2, num_generations: 2, max_new_tokens: 3}}
  reward.noise_sigma: 1.0
  train.steps: 2
  eval: {{every: 0, num_prompts: 4, k: 2}}
  checkpoint: {{every: 0, save_hf: false, save_final_model: false}}
  logging: {{tensorboard: false, plots: false}}
  task.options: {{n_train: 64, n_eval: 16}}
  threads: 1
seeds: [0]
""")
    p = argparse.ArgumentParser()
    add_arguments(p)
    out = tmp_path / "study"
    assert main(p.parse_args([str(spec), "--out", str(out), "--no-report"])) == 0
    cell = out / "cells" / "base__seed0"
    assert (cell / "DONE").exists() and json.loads((cell / "summary.json").read_text())["finished"]
    rows = [json.loads(line) for line in (cell / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2]
    res = json.loads((out / "results.json").read_text())
    assert res["metrics"] == ["reward/mean", "eval/avg@k"] and res["settings"][0]["stats"]["reward/mean"]["final"]["n"] == 1


@pytest.mark.slow
def test_real_study_with_a_failing_setting(tiny_model_dir, tmp_path, capsys):
    """Real training: a setting whose model folder is empty fails in its own processes; the other
    setting's cells finish, and the failures are listed with their logs (exit status 1)."""
    empty = tmp_path / "empty_model"
    empty.mkdir()
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"""\
overrides:
  rollout: {{prompts_per_step: 2, num_generations: 2, max_new_tokens: 3}}
  reward.noise_sigma: 1.0
  train.steps: 2
  eval: {{every: 0, num_prompts: 4, k: 2}}
  checkpoint: {{every: 0, save_hf: false, save_final_model: false}}
  logging: {{tensorboard: false, plots: false}}
  task.options: {{n_train: 64, n_eval: 16}}
  threads: 1
seeds: [0, 1]
settings:
  - {{label: good, model.path: {tiny_model_dir}}}
  - {{label: broken, model.path: {empty}}}
""")
    p = argparse.ArgumentParser()
    add_arguments(p)
    out = tmp_path / "study"
    assert main(p.parse_args([str(spec), "--out", str(out), "--no-report", "--jobs", "2"])) == 1
    err = capsys.readouterr().err
    for k in (0, 1):
        assert (out / "cells" / f"good__seed{k}" / "DONE").exists()
        assert not (out / "cells" / f"broken__seed{k}" / "DONE").exists()
        assert f"broken__seed{k}: exit status 2; log {out / 'cells' / f'broken__seed{k}' / 'train.log'}" in err
    assert "model_type" in (out / "cells" / "broken__seed0" / "train.log").read_text()  # the error is in the log
    res = json.loads((out / "results.json").read_text())
    assert res["settings"][0]["stats"]["reward/mean"]["final"]["n"] == 2
    assert res["settings"][1]["missing"] == ["broken__seed0", "broken__seed1"]


def test_a_command_that_cannot_start_fails_its_cells_only(study, tmp_path, capsys):
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([str(tmp_path / "spec.yaml"), "--out", study.dir, "--no-report"])
    assert main(args, train_command=[str(tmp_path / "no_such_program")]) == 1
    err = capsys.readouterr().err
    assert "6 of 6 cells failed" in err and "could not run the cell: FileNotFoundError" in err


def test_summarize_only(study, capsys):
    assert study.run() == 0
    os.remove(os.path.join(study.dir, "results.json"))
    assert study.run("--summarize") == 0 and len(study.calls()) == 6
    assert study.results()["differences"][0]["mean"] == pytest.approx(0.2)
    capsys.readouterr()
    assert study.run("--summarize", spec_text=STUDY_TEXT.replace("[0, 1, 2]", "[0, 1]")) == 2
    assert "different spec" in capsys.readouterr().err
