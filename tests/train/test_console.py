"""The console in a log file: each line is in the file when it is printed (not when the process
ends), a line per step when the progress bar cannot draw, and each warning shown once per run."""

import os
import select
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from ratiorl.train.hooks import WarningsOnce, console_draws
from tests.train.conftest import tiny_overrides

# Imported by the run (--plugins): after the Logging hook of step 1 has run, say "ready" through a
# FIFO and wait for "go" through another, so the test reads the log while the run is held there.
# Every step raises the same warning, and the plots of each evaluation enter warnings.catch_warnings.
PLUGIN = '''
import os, warnings
from ratiorl.train import hooks, trainer

_after_step = hooks.Logging.after_step
def after_step(self, t, batch, metrics):
    _after_step(self, t, batch, metrics)
    if t.step_count == 1:
        with open(os.environ["RATIORL_TEST_READY"], "w") as f:
            f.write("ready\\n")
        with open(os.environ["RATIORL_TEST_GO"]) as f:
            f.read()
hooks.Logging.after_step = after_step

_step = trainer.Trainer.step
def step(self):
    warnings.warn("a warning raised every step", UserWarning)
    with warnings.catch_warnings():  # what matplotlib does: Python forgets the warnings it showed
        warnings.simplefilter("ignore", DeprecationWarning)
    return _step(self)
trainer.Trainer.step = step
'''


def wait_readable(fd, proc, log, timeout=300):
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        proc.kill()
        raise AssertionError("the run never reached step 1:\n" + Path(log).read_text())


@pytest.mark.parametrize("progress", [True, False])
def test_lines_reach_a_log_file_while_the_run_goes_on(tiny_model_dir, tmp_path, progress):
    plugin = tmp_path / "hold_at_step_1.py"
    plugin.write_text(PLUGIN)
    ready, go = str(tmp_path / "ready"), str(tmp_path / "go")
    os.mkfifo(ready)
    os.mkfifo(go)
    log = str(tmp_path / "run.log")
    overrides = tiny_overrides(tiny_model_dir, str(tmp_path / "run"), **{
        "train.steps": 3, "logging.progress": progress, "logging.console_every": 0 if progress else 1,
        "eval.every": 1, "eval.num_prompts": 2, "eval.k": 1})
    env = {**os.environ, "RATIORL_TEST_READY": ready, "RATIORL_TEST_GO": go, "PYTHONWARNINGS": "default"}
    env.pop("PYTHONUNBUFFERED", None)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ratiorl", "train", "--plugins", str(plugin),
                                 *[f"--{o}" for o in overrides]], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        fd = os.open(ready, os.O_RDONLY | os.O_NONBLOCK)
        try:
            wait_readable(fd, proc, log)
            assert os.read(fd, 100) == b"ready\n"
        finally:
            os.close(fd)
        held = Path(log).read_text()  # the run waits at step 1 until "go"
        assert proc.poll() is None
        with open(go, "w") as f:
            f.write("go\n")
        assert proc.wait(timeout=300) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = held.splitlines()
    assert any(line.startswith("step 1  reward") for line in lines), held  # the step's line, in the file already
    assert any(line.startswith("step 1: avg@1") for line in lines), held  # and the evaluation's
    final = Path(log).read_text()
    for s in (2, 3):
        assert f"step {s}  reward" in final
    assert final.count("UserWarning: a warning raised every step") == 1, final  # three steps, one warning


def test_warnings_once_outlives_filter_changes():
    def warn():
        warnings.warn("probe", UserWarning)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        for _ in range(3):
            warn()
            with warnings.catch_warnings():  # resets Python's memory of what it has shown
                pass
        assert len(seen) == 3  # the problem: once per location is forgotten
        del seen[:]
        with WarningsOnce():
            for _ in range(3):
                warn()
                warnings.warn("another", RuntimeWarning)
                with warnings.catch_warnings():
                    pass
        assert [str(w.message) for w in seen] == ["probe", "another"]
        warn()  # uninstalled: shown again
        assert len(seen) == 3


def test_console_draws():
    from io import StringIO

    from rich.console import Console

    assert not console_draws(Console(file=StringIO()))
    assert console_draws(Console(file=StringIO(), force_terminal=True))


def test_nested_warnings_once_in_the_trainers_order_keeps_warnings_working():
    """The trainer wraps its loop in one WarningsOnce and the Logging hook installs a second one
    that it removes only after the loop's `with` block has exited (a saved LoRA adapter warned in
    between and crashed: the outer hook had forgotten where to forward)."""
    from ratiorl.train.hooks import WarningsOnce

    def original(message, category, filename, lineno, file=None, line=None):
        shown.append(str(message))

    shown = []
    saved = warnings.showwarning
    warnings.showwarning = original
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            outer = WarningsOnce().install()
            inner = WarningsOnce().install()  # Logging.before_run
            warnings.warn("in the loop")
            outer.uninstall()  # the loop's `with` block ends first
            for _ in range(2):  # went to the outer hook, which called None before the fix
                warnings.warn("while saving the model")
            inner.uninstall()  # Logging.after_run
            assert warnings.showwarning is original  # everything restored
            warnings.warn("after the run")
    finally:
        warnings.showwarning = saved
    assert shown == ["in the loop", "while saving the model", "after the run"]
