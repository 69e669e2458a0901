"""Running a study: every cell is an ordinary run folder, trained by its own subprocess.

    outcome = run_study(load_spec("examples/studies/snib_ablations.yaml"), "runs/studies/snib", jobs=2)

For each cell ``DIR/cells/<cell_id>/`` the runner writes the cell's config.yaml and runs
``python -m ratiorl train --config DIR/cells/<cell_id>/config.yaml`` with the cell's output
(stdout and stderr) appended to ``train.log``. When the run ends with exit status 0 and a finished
``summary.json``, ``DONE`` is written (atomically). On a rerun:

* a cell with ``DONE`` is never rerun;
* a cell whose run finished but whose ``DONE`` is missing (the study was killed at that moment)
  is marked done without running;
* a cell with a complete checkpoint continues with ``--resume``;
* a cell that logged steps but has no checkpoint is moved aside to ``DIR/attempts/`` and started
  again (``--overwrite``); nothing is deleted.

A failing cell does not stop the others; ``StudyOutcome.failed`` lists it with its log. Cells run in
their own process session, so Ctrl-C reaches the study alone, which passes it on once to each
running cell (they finish the step, write a checkpoint and stop) and starts no new cells.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Optional

import yaml

from .spec import ANALYSIS_KEYS, DONE, StudySpec, read_spec_file

TRAIN_COMMAND = (sys.executable, "-m", "ratiorl", "train")
RUNNING = "RUNNING"  # pid of the training process while a cell runs
# keys that may differ between a cell's saved config and the spec's: they do not change the numbers
IGNORED_KEYS = ("out_dir", "threads", "logging.", "model.auto_create")


@dataclass
class CellPlan:
    cell_id: str
    label: str
    seed: int
    run_dir: str
    config: object  # TrainConfig
    action: str  # done | finished | resume | restart | new


@dataclass
class Failure:
    cell_id: str
    returncode: Optional[int]
    log: str
    reason: str


@dataclass
class StudyOutcome:
    study_dir: str
    cells: list = field(default_factory=list)  # every CellPlan
    ran: list = field(default_factory=list)  # cell ids run to the end now
    skipped: list = field(default_factory=list)  # cell ids finished before
    failed: list = field(default_factory=list)  # Failure
    interrupted: bool = False


def _flatten(d, prefix="") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, requested: dict) -> list:
    """Dotted keys whose values differ, leaving out :data:`IGNORED_KEYS`."""
    a, b = _flatten(saved), _flatten(requested)
    return [k for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")
            and not any(k == p or (p.endswith(".") and k.startswith(p)) for p in IGNORED_KEYS)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _finished_summary(run_dir: str) -> bool:
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            return bool(json.load(f).get("finished"))
    except (OSError, ValueError, AttributeError):
        return False


# ----------------------------------------------------------------------------- the study folder


def check_study_folder(spec: StudySpec, study_dir: str) -> None:
    """``DIR/study.yaml`` holds the spec a study was started with: a rerun may change only the
    analysis keys (metrics, level, interval, baseline, ...), anything else is an error."""
    path = os.path.join(study_dir, "study.yaml")
    if not os.path.exists(path):
        return
    old = read_spec_file(path)
    new = spec.raw
    changed = sorted(k for k in set(old) | set(new) if k not in ANALYSIS_KEYS and old.get(k) != new.get(k))
    if changed:
        raise ValueError(f"{study_dir} holds a study started with a different spec (differs in: {', '.join(changed)}); "
                         f"rerun with the same spec ({path}) or choose another --out")


def write_spec_copy(spec: StudySpec, study_dir: str) -> None:
    with open(spec.path) as f:
        text = f.read()
    _write_atomic(os.path.join(study_dir, "study.yaml"), text)


def plan_cells(spec: StudySpec, study_dir: str, configs: dict) -> list:
    """What to do with each cell; raises if a cell folder holds a run of another config or is being
    run by a live process."""
    from ratiorl.train.checkpoint import latest_checkpoint  # noqa: PLC0415
    from ratiorl.train.config import config_to_yaml  # noqa: PLC0415
    from ratiorl.train.run_dir import holds_run  # noqa: PLC0415

    plans = []
    for setting, seed in spec.cells():
        cid = spec.cell_id(setting, seed)
        run_dir = os.path.join(study_dir, "cells", cid)
        cfg = configs[cid]
        pid = _read_pid(os.path.join(run_dir, RUNNING))
        if pid is not None and pid != os.getpid() and _pid_alive(pid):
            raise ValueError(f"cell {cid} is being run by process {pid} (left by a study that was stopped?); "
                             f"wait for it or stop it, then rerun")
        saved_path = os.path.join(run_dir, "config.yaml")
        if os.path.exists(saved_path):
            with open(saved_path) as f:
                saved = yaml.safe_load(f) or {}
            diff = config_changes(saved, yaml.safe_load(config_to_yaml(cfg)))
            if diff:
                raise ValueError(f"cell {cid} in {study_dir} was run with another config (differs in: "
                                 f"{', '.join(diff)}); the spec or its base config changed: use another --out")
        if os.path.exists(os.path.join(run_dir, DONE)):
            action = "done"
        elif _finished_summary(run_dir):
            action = "finished"
        elif latest_checkpoint(os.path.join(run_dir, "checkpoints")) is not None:
            action = "resume"
        elif holds_run(run_dir, os.path.join(run_dir, "checkpoints")):
            action = "restart"
        else:
            action = "new"
        plans.append(CellPlan(cid, setting.label, seed, run_dir, cfg, action))
    return plans


def ensure_models(configs: dict, say) -> None:
    """Create each missing auto-created model once, before the cells start (several cells sharing
    one warm start would otherwise all build it at once)."""
    from ratiorl.train.build import ensure_model  # noqa: PLC0415

    seen = set()
    for cfg in configs.values():
        key = cfg.model.path
        if key in seen:
            continue
        seen.add(key)
        if not os.path.exists(key):
            say(f"model {key}: not found, creating it")
            ensure_model(cfg, None)


# ----------------------------------------------------------------------------- running


def _move_aside(run_dir: str, study_dir: str) -> str:
    attempts = os.path.join(study_dir, "attempts")
    os.makedirs(attempts, exist_ok=True)
    base = os.path.join(attempts, f"{os.path.basename(run_dir)}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    dest, k = base, 1
    while os.path.exists(dest):
        dest, k = f"{base}-{k}", k + 1
    os.replace(run_dir, dest)
    return dest


class _Runner:
    def __init__(self, study_dir: str, train_command, jobs: int, say):
        self.study_dir, self.train_command, self.jobs, self.say = study_dir, list(train_command), jobs, say
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.live = {}  # cell_id -> Popen

    def env(self) -> dict:
        env = dict(os.environ)
        if self.jobs > 1 and "OMP_NUM_THREADS" not in env:  # parallel cells share the cores
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.jobs))
        return env

    def run(self, plan: CellPlan) -> tuple:
        """('ran' | 'failed' | 'stopped', Failure or None); an error of the runner itself (a
        folder that cannot be written, a command that cannot start) fails this cell only."""
        try:
            return self.run_cell(plan)
        except Exception as e:  # noqa: BLE001 - reported with the cell, the other cells go on
            return "failed", Failure(plan.cell_id, None, os.path.join(plan.run_dir, "train.log"),
                                     f"could not run the cell: {type(e).__name__}: {e}")

    def run_cell(self, plan: CellPlan) -> tuple:
        from ratiorl.train.config import save_config  # noqa: PLC0415

        if self.stop.is_set():
            return "stopped", None
        flags = {"resume": ["--resume"], "restart": ["--overwrite"]}.get(plan.action, [])
        if plan.action == "restart":
            dest = _move_aside(plan.run_dir, self.study_dir)
            self.say(f"{plan.cell_id}: logged steps but no checkpoint; moved to {dest}, starting again")
        os.makedirs(plan.run_dir, exist_ok=True)
        cfg_path = os.path.join(plan.run_dir, "config.yaml")
        save_config(plan.config, cfg_path)
        log_path = os.path.join(plan.run_dir, "train.log")
        cmd = self.train_command + ["--config", cfg_path] + flags
        t0 = time.perf_counter()
        with open(log_path, "a") as log:
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env(), start_new_session=True)
            _write_atomic(os.path.join(plan.run_dir, RUNNING), str(proc.pid))
            with self.lock:
                self.live[plan.cell_id] = proc
            try:
                rc = proc.wait()
            finally:
                with self.lock:
                    self.live.pop(plan.cell_id, None)
                try:
                    os.remove(os.path.join(plan.run_dir, RUNNING))
                except OSError:
                    pass
        seconds = time.perf_counter() - t0
        if rc == 0 and _finished_summary(plan.run_dir):
            mark_done(plan.run_dir, seconds=seconds)
            return "ran", None
        reason = f"exit status {rc}" if rc != 0 else "stopped before the last step (summary.json: finished false)"
        if self.stop.is_set():
            return "stopped", Failure(plan.cell_id, rc, log_path, "interrupted: " + reason)
        return "failed", Failure(plan.cell_id, rc, log_path, reason)

    def interrupt(self) -> None:
        self.stop.set()
        with self.lock:
            procs = list(self.live.values())
        for p in procs:
            try:
                p.send_signal(signal.SIGINT)
            except OSError:
                pass


def mark_done(run_dir: str, seconds: Optional[float] = None) -> None:
    info = {"finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    if seconds is not None:
        info["seconds"] = round(seconds, 2)
    _write_atomic(os.path.join(run_dir, DONE), json.dumps(info) + "\n")


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f.read()[-4000:].splitlines() if ln.strip()]
        return lines[-1] if lines else ""
    except OSError:
        return ""


def run_study(spec: StudySpec, study_dir: str, jobs: Optional[int] = None, train_command=None, say=print,
              dry_run: bool = False) -> StudyOutcome:
    """Validate every cell's config, then run the cells that are not done (``jobs`` at a time)."""
    jobs = int(jobs or spec.jobs)
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    check_study_folder(spec, study_dir)
    configs = spec.build_configs(study_dir)  # every config is checked before anything runs
    plans = plan_cells(spec, study_dir, configs)
    outcome = StudyOutcome(study_dir=study_dir, cells=plans)
    todo = [p for p in plans if p.action not in ("done", "finished")]
    counts = {a: sum(p.action == a for p in plans) for a in ("done", "finished", "resume", "restart", "new")}
    say(f"study {spec.name}: {len(spec.settings)} settings x {len(spec.seeds)} seeds = {len(plans)} cells "
        f"({', '.join(f'{n} {a}' for a, n in counts.items() if n)}) -> {study_dir}")
    if dry_run:
        for p in plans:
            say(f"  {p.action:8s} {p.cell_id}")
        for path in sorted({p.config.model.path for p in todo if not os.path.exists(p.config.model.path)}):
            say(f"  model {path} is missing: it will be created first (model.auto_create, the config's sft: settings)")
        return outcome
    os.makedirs(os.path.join(study_dir, "cells"), exist_ok=True)
    write_spec_copy(spec, study_dir)
    for p in plans:
        if p.action == "finished":  # the run ended but the study stopped before writing DONE
            mark_done(p.run_dir)
        if p.action in ("done", "finished"):
            outcome.skipped.append(p.cell_id)
    if not todo:
        return outcome
    ensure_models({p.cell_id: p.config for p in todo}, say)
    runner = _Runner(study_dir, train_command or TRAIN_COMMAND, jobs, say)
    total, finished = len(todo), 0
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(runner.run, p): p for p in todo}
        pending = set(futures)
        while pending:
            try:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            except KeyboardInterrupt:
                if not outcome.interrupted:
                    say("interrupted: the running cells finish their step and write a checkpoint; rerun to continue "
                        "(Ctrl-C again stops them at once)")
                outcome.interrupted = True
                runner.interrupt()
                continue
            for fut in done:
                plan = futures[fut]
                status, failure = fut.result()
                if status == "stopped":
                    if failure is not None:
                        say(f"{plan.cell_id}: stopped; a rerun continues it")
                    continue
                finished += 1
                if status == "ran":
                    outcome.ran.append(plan.cell_id)
                    say(f"[{finished}/{total}] {plan.cell_id}: done")
                else:
                    outcome.failed.append(failure)
                    say(f"[{finished}/{total}] {plan.cell_id}: FAILED ({failure.reason}); log {failure.log}"
                        + (f"\n    {_last_line(failure.log)}" if _last_line(failure.log) else ""))
    return outcome


__all__ = ["run_study", "plan_cells", "check_study_folder", "config_changes", "mark_done", "StudyOutcome",
           "CellPlan", "Failure", "TRAIN_COMMAND", "RUNNING"]
