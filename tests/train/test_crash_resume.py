"""SIGKILL a training run at random moments, resume it each time: the result equals a straight run.

The run is ``python -m ratiorl train ... --resume`` in a subprocess with a checkpoint every step;
each launch is killed (SIGKILL, the whole process group) after a random delay drawn from a seeded
stream, until the kill budget is spent; then it runs to the end. ``metrics.jsonl`` (minus the
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


def _wait_started(proc, config_path, launched, limit=120.0):
    """Block until this launch has rewritten config.yaml (imports done, run folder prepared)."""
    t_end = time.monotonic() + limit
    while time.monotonic() < t_end and proc.poll() is None:
        try:
            if os.stat(config_path).st_mtime >= launched:
                return True
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    return False


def _args(tiny_model_dir, run, steps):
    return ["--" + a for a in tiny_overrides(tiny_model_dir, run, **{**SETTINGS, "train.steps": steps})]


def kill_and_resume(tiny_model_dir, tmp_path, kills, seed, steps=STEPS):
    """Returns (kills delivered, launches, kills that landed after the first checkpoint, seconds)."""
    log_path = str(tmp_path / "stderr.log")
    log = open(log_path, "ab")
    proc = None

    def run_once(run, delay=None):
        """One launch; killed ``delay`` seconds after it prepared the run folder (None: to the end).
        Returns (killed, seconds from the folder being prepared to the exit)."""
        nonlocal proc
        launched = time.time() - 1.0  # mtime granularity
        proc = _launch(_args(tiny_model_dir, run, steps), log)
        started = _wait_started(proc, os.path.join(run, "config.yaml"), launched)
        t0 = time.monotonic()
        if delay is not None and started:
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                return True, time.monotonic() - t0
        rc = proc.wait(timeout=600)
        if rc != 0:
            raise AssertionError(f"run failed with {rc}:\n" + open(log_path).read()[-3000:])
        return False, time.monotonic() - t0

    try:
        straight = str(tmp_path / "straight")
        _, run_seconds = run_once(straight)  # uninterrupted; its length spreads the kills over a run

        run = str(tmp_path / "killed")
        ckpts = os.path.join(run, "checkpoints")
        rng = random.Random(seed)
        delivered = launches = in_training = 0
        t0 = time.perf_counter()
        while delivered < kills:
            before = latest_checkpoint(ckpts)
            done = 0 if before is None else int(os.path.basename(before).split("_")[1])
            # spread over what is left of the run (its start-up stays in: ~30% of a launch)
            killed, _ = run_once(run, rng.uniform(0.0, run_seconds * (0.3 + 0.7 * (steps - done) / steps)))
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

    assert _rows(run) == _rows(straight)
    assert [r["step"] for r in _rows(run)] == list(range(1, steps + 1))
    a, b = load_state(latest_checkpoint(os.path.join(straight, "checkpoints"))), load_state(latest_checkpoint(ckpts))
    assert a["step"] == b["step"] == steps
    assert a["trainable"].keys() == b["trainable"].keys()
    for k in a["trainable"]:
        assert torch.equal(a["trainable"][k], b["trainable"][k]), k
    assert [n for n in os.listdir(ckpts) if n.startswith(".")] == []  # no temporaries left
    return delivered, launches, in_training, seconds


def test_sigkill_at_random_points_then_resume_equals_a_straight_run(tiny_model_dir, tmp_path):
    delivered, launches, in_training, seconds = kill_and_resume(tiny_model_dir, tmp_path, kills=5, seed=0)
    assert delivered == 5 and launches >= 6
    assert in_training >= 1  # at least one kill landed after a step's checkpoint


@pytest.mark.slow
def test_a_hundred_sigkills_then_resume_equals_a_straight_run(tiny_model_dir, tmp_path):
    delivered, launches, in_training, seconds = kill_and_resume(tiny_model_dir, tmp_path, kills=100, seed=1,
                                                               steps=20)
    assert delivered == 100 and in_training >= 20
    print(f"100 SIGKILLs: {launches} launches, {in_training} kills after a checkpoint, {seconds:.0f} s")
