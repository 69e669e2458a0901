"""The run folder: one run per folder, never mixed, never lost.

* A fresh run into a folder that already holds a run (``metrics.jsonl`` or a checkpoint) is an
  error, unless ``overwrite`` (the old run is moved aside to ``<out_dir>.old-<timestamp>``, never
  deleted) or ``resume``.
* ``resume`` compares the saved ``config.yaml`` with the requested config and refuses any
  difference outside :data:`SAFE_TO_CHANGE` (run length, evaluation and logging intervals,
  checkpoint settings, CPU threads), listing the differing keys.
"""

from __future__ import annotations

import fnmatch
import os
import time
from typing import Optional

import yaml

from .checkpoint import latest_checkpoint
from .config import TrainConfig, config_from_dict, config_to_yaml, save_config

# keys a resumed run may change: they do not change the numbers of the steps already taken
SAFE_TO_CHANGE = ("train.steps", "eval.every", "eval.num_prompts", "logging.*", "checkpoint.*", "threads",
                  "out_dir", "model.auto_create")


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked (holds another run, or a different config)."""


def holds_run(run_dir: str, ckpt_dir: str) -> bool:
    """True when ``run_dir`` holds logged steps or a complete checkpoint of a run."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    return (os.path.exists(metrics) and os.path.getsize(metrics) > 0) or latest_checkpoint(ckpt_dir) is not None


def move_aside(run_dir: str) -> str:
    """Rename ``run_dir`` to ``<run_dir>.old-<timestamp>`` (a counter is added if that exists)."""
    base = f"{os.path.normpath(run_dir)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    dest, k = base, 1
    while os.path.exists(dest):
        dest, k = f"{base}-{k}", k + 1
    os.replace(run_dir, dest)
    return dest


def _flatten(d, prefix="") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(saved: dict, requested: dict) -> list:
    """Dotted keys whose values differ between two config dicts, minus :data:`SAFE_TO_CHANGE`."""
    a, b = _flatten(saved), _flatten(requested)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k, "<absent>") != b.get(k, "<absent>")
            and not any(fnmatch.fnmatchcase(k, pat) for pat in SAFE_TO_CHANGE)]


def check_resume_config(cfg: TrainConfig, run_dir: str) -> None:
    """Raise :class:`RunFolderError` when the requested config differs from the saved one in a key
    that is not safe to change."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return  # an old run without a saved config: nothing to compare with
    with open(path) as f:
        saved = yaml.safe_load(f) or {}
    try:  # keys added to the schema after the run started take their defaults, as the run did
        saved = yaml.safe_load(config_to_yaml(config_from_dict(saved))) or {}
    except ValueError:  # a key the schema no longer has: compare as saved, the difference is listed
        pass
    requested = yaml.safe_load(config_to_yaml(cfg)) or {}
    diff = config_differences(saved, requested)
    if diff:
        a, b = _flatten(saved), _flatten(requested)
        lines = "\n".join(f"  {k}: {a.get(k, '<absent>')!r} (saved) -> {b.get(k, '<absent>')!r} (requested)"
                          for k in diff)
        raise RunFolderError(
            f"--resume: the config differs from the one the run in {run_dir} was started with:\n{lines}\n"
            f"only these keys may change on resume: {', '.join(SAFE_TO_CHANGE)}; resume with the saved "
            f"config ({path}) or start a new run elsewhere (or --overwrite)")


def prepare_run_dir(cfg: TrainConfig, run_dir: str, ckpt_dir: str, resume: bool, overwrite: bool,
                    say=print) -> Optional[str]:
    """Make ``run_dir`` ready for this run; return the newest checkpoint to resume from (or None).

    Writes the requested config to ``run_dir/config.yaml`` (atomically)."""
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite exclude each other: continue the run or move it aside")
    resume_from = latest_checkpoint(ckpt_dir) if resume else None
    if resume:
        if resume_from is None:
            say(f"[yellow]--resume: no checkpoint in {ckpt_dir}; starting from scratch[/]")
        else:
            check_resume_config(cfg, run_dir)
    elif holds_run(run_dir, ckpt_dir):
        if not overwrite:
            raise RunFolderError(
                f"{run_dir} already holds a run (metrics.jsonl or checkpoints); continue it with --resume, "
                "move it aside with --overwrite (renamed to <out_dir>.old-<timestamp>, nothing is deleted), "
                "or choose another out_dir")
        dest = move_aside(run_dir)
        say(f"[yellow]--overwrite: moved the earlier run in {run_dir} to {dest}[/]")
    os.makedirs(run_dir, exist_ok=True)
    if resume_from is None:  # a fresh start: no metrics of an earlier (checkpoint-less) attempt
        metrics = os.path.join(run_dir, "metrics.jsonl")
        if os.path.exists(metrics):
            os.remove(metrics)
    save_config(cfg, os.path.join(run_dir, "config.yaml"))
    return resume_from
