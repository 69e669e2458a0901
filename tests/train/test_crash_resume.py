"""SIGKILL a training run at random moments, resume it each time: the result equals a straight run.

The run is ``python -m ratiorl train ... --resume`` in a subprocess with a checkpoint every step;
each launch is killed (SIGKILL, the whole process group) after a random delay drawn from a seeded
stream -- half of the launches during start-up or the first steps, half a step or two after their
first new checkpoint, so that kills land among the steps and checkpoint writes too -- until the kill
budget is spent; then it runs to the end. ``metrics.jsonl`` (minus the
``time/`` and ``throughput/`` keys) and the final weights must equal those of an uninterrupted run.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from ratiorl.train.checkpoint import latest_checkpoint, load_state
from ratiorl.train.trainer import TIMING_PREFIXES

from .conftest import tiny_overrides

STEPS = 6
SETTINGS = {"train.steps": STEPS, "objective.name": "snib", "train.mini_batches": 2, "checkpoint.every": 1,
            "checkpoint.keep_last": 2, "eval.every": 3, "threads": 1}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rows(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING_PREFIXES)} for r in rows]


def _launch(args, log):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-m", "ratiorl", "train", *args, "--resume"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)


def _mtime_ns(path):
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return None


def _wait_started(proc, config_path, before, limit=120.0):
    """Block until this launch has rewritten config.yaml (imports done, run folder prepared): its
    mtime differs from ``before``, the one it had when the launch began (None: no file yet)."""
    t_end = time.monotonic() + limit
    while time.monotonic() < t_end and proc.poll() is None:
        now = _mtime_ns(config_path)
        if now is not None and now != before:
            return True
        time.sleep(0.01)
    return False


def _seconds_per_step(ckpts):
    """One step (with its checkpoint) of a finished run: the last two checkpoints' completion times."""
    done = sorted(os.path.join(ckpts, n, "COMPLETE") for n in os.listdir(ckpts) if n.startswith("step_"))
    return max(os.stat(done[-1]).st_mtime - os.stat(done[-2]).st_mtime, 0.005)


def _args(tiny_model_dir, run, steps):
    return ["--" + a for a in tiny_overrides(tiny_model_dir, run, **{**SETTINGS, "train.steps": steps})]


def kill_and_resume(tiny_model_dir, tmp_path, kills, seed, steps=STEPS):
    """Returns (kills delivered, launches, kills that landed after the first checkpoint, seconds)."""
    log_path = str(tmp_path / "stderr.log")
    log = open(log_path, "ab")
    proc = None

    def run_once(run, delay=None, after_a_step=False):
        """One launch; killed ``delay`` seconds after it prepared the run folder -- or, with
        ``after_a_step``, after it wrote its first new checkpoint (None: to the end).
        Returns (killed, seconds from the folder being prepared to the exit, seconds from the first
        new checkpoint to the exit)."""
        nonlocal proc
        config_path, ckpts = os.path.join(run, "config.yaml"), os.path.join(run, "checkpoints")
        before, first_ckpt = _mtime_ns(config_path), latest_checkpoint(ckpts)  # the previous launch's
        proc = _launch(_args(tiny_model_dir, run, steps), log)
        started = _wait_started(proc, config_path, before)
        t0 = time.monotonic()
        if after_a_step:  # wait for progress: this kill lands while steps and checkpoints are written
            while proc.poll() is None and latest_checkpoint(ckpts) == first_ckpt:
                time.sleep(0.005)
        t1 = time.monotonic()
        if delay is not None and started:
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                return True, time.monotonic() - t0, time.monotonic() - t1
        rc = proc.wait(timeout=600)
        if rc != 0:
            raise AssertionError(f"run failed with {rc}:\n" + open(log_path).read()[-3000:])
        return False, time.monotonic() - t0, time.monotonic() - t1

    try:
        straight = str(tmp_path / "straight")
        # uninterrupted; its length spreads the kills over a run
        _, run_seconds, _ = run_once(straight)
        _, _, train_seconds = run_once(str(tmp_path / "probe"), delay=1e9, after_a_step=True)
        step_seconds = _seconds_per_step(os.path.join(straight, "checkpoints"))
        startup_seconds = max(run_seconds - train_seconds, 0.1)

        # the killed runs: when one reaches the end before every kill is delivered (the machine got
        # faster than the step time measured above), the next kills go to a new run folder
        runs = [str(tmp_path / "killed0")]
        run, ckpts = runs[-1], os.path.join(runs[-1], "checkpoints")
        rng = random.Random(seed)
        delivered = launches = in_training = 0
        t0 = time.perf_counter()
        while delivered < kills:
            before = latest_checkpoint(ckpts)
            if before is not None and int(os.path.basename(before).split("_")[1]) == steps:
                runs.append(str(tmp_path / f"killed{len(runs)}"))
                run, ckpts = runs[-1], os.path.join(runs[-1], "checkpoints")
                continue
            if rng.random() < 0.5:  # start-up (imports, loading, the checkpoint read) or the first steps
                killed, _, _ = run_once(run, rng.uniform(0.0, startup_seconds + 3 * step_seconds))
            else:  # among the steps and checkpoint writes, about 1.5 steps after the first new one
                killed, _, _ = run_once(run, rng.uniform(0.0, 3 * step_seconds), after_a_step=True)
            launches += 1
            delivered += killed
            in_training += killed and latest_checkpoint(ckpts) != before
            assert launches < 5 * kills + 10, "no progress"
        run_once(run)
        launches += 1
        seconds = time.perf_counter() - t0
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()

    a = load_state(latest_checkpoint(os.path.join(straight, "checkpoints")))
    for run in runs:  # every killed-and-resumed run equals the straight one
        ckpts = os.path.join(run, "checkpoints")
        assert _rows(run) == _rows(straight)
        assert [r["step"] for r in _rows(run)] == list(range(1, steps + 1))
        b = load_state(latest_checkpoint(ckpts))
        assert a["step"] == b["step"] == steps
        assert a["trainable"].keys() == b["trainable"].keys()
        for k in a["trainable"]:
            assert torch.equal(a["trainable"][k], b["trainable"][k]), k
        assert [n for n in os.listdir(ckpts) if n.startswith(".")] == []  # no temporaries left
    return delivered, launches, in_training, seconds


def test_sigkill_at_random_points_then_resume_equals_a_straight_run(tiny_model_dir, tmp_path):
    delivered, launches, in_training, seconds = kill_and_resume(tiny_model_dir, tmp_path, kills=5, seed=0, steps=12)
    assert delivered == 5 and launches >= 6
    assert in_training >= 1  # at least one kill landed after a step's checkpoint


@pytest.mark.slow
def test_a_hundred_sigkills_then_resume_equals_a_straight_run(tiny_model_dir, tmp_path):
    delivered, launches, in_training, seconds = kill_and_resume(tiny_model_dir, tmp_path, kills=100, seed=1,
                                                               steps=200)
    assert delivered == 100 and in_training >= 20
    print(f"100 SIGKILLs: {launches} launches, {in_training} kills after a checkpoint, {seconds:.0f} s")
