"""A study spec: a YAML file that names a grid of runs (settings x seeds) and how to compare them.

    base: ../demo.yaml            # config every cell starts from (relative to this file)
    overrides: {train.steps: 60}  # applied to every cell
    seeds: [0, 1, 2]              # or a count: 3 -> [0, 1, 2]
    axes:                         # the product of the axes (any dotted config key) ...
      objective.name: [snib, grpo]
    settings:                     # ... and/or explicit named settings (product with the axes)
      - {label: no-baseline, objective.advantage: none}
    baseline: snib                # a label, or a mapping of axis values; default: the first setting
    metrics: [reward/mean]        # default: reward/mean and the eval headline
    level: 0.95                   # confidence level of every interval
    interval: t                   # or bootstrap
    final_fraction: 0.2           # "final" = mean of the last 20% of a curve's points
    jobs: 1                       # cells run at once (the CLI's --jobs wins)

``load_spec(path)`` checks the spec's own keys; ``spec.build_configs(study_dir)`` builds every
cell's config with the project's config validation (and the objective, task and reward names), so
the runner fails on a typo in a config key before any cell runs. docs/studies.md describes the format.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional


DONE = "DONE"  # the marker written into a cell folder when its run finished
STUDY_KEYS = ("name", "description", "base", "overrides", "seeds", "axes", "settings", "baseline", "metrics",
             "level", "interval", "final_fraction", "jobs")
ANALYSIS_KEYS = ("name", "description", "baseline", "metrics", "level", "interval", "final_fraction", "jobs")
RESERVED_KEYS = ("seed", "out_dir")  # set by the study for each cell
HEADLINE_METRIC = {"avg@k": "eval/avg@k", "pass@k": "eval/pass@k", "greedy": "eval/greedy_acc"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+@-]")
MAX_LABEL = 120


def safe_label(text: str) -> str:
    """A readable, filesystem-safe label: characters outside ``A-Za-z0-9._,=+@-`` become ``_``;
    a label over 120 characters is cut and ends with a hash of the whole text."""
    label = _UNSAFE.sub("_", str(text)).lstrip(".") or "_"
    if len(label) > MAX_LABEL:
        label = label[: MAX_LABEL - 9] + "-" + hashlib.sha1(str(text).encode()).hexdigest()[:8]
    return label


def _value_text(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _key_text(key: str) -> str:
    """objective.name -> objective; other keys stay dotted."""
    return key[: -len(".name")] if key.endswith(".name") and key.count(".") == 1 else key


def auto_label(values: dict) -> str:
    return ",".join(f"{_key_text(k)}={_value_text(v)}" for k, v in values.items()) or "base"


@dataclass
class Setting:
    """One point of the grid without the seed: its label and the config values it sets."""

    label: str
    values: dict = field(default_factory=dict)


def _error(path: str, msg: str) -> ValueError:
    return ValueError(f"{path}: {msg}")


def _unknown(path: str, where: str, key: str, valid) -> ValueError:
    near = difflib.get_close_matches(key, list(valid), n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ";"
    return _error(path, f"unknown {where} key {key!r}{hint} valid keys: {', '.join(valid)}")


@dataclass
class StudySpec:
    path: str
    raw: dict
    name: str
    base: Optional[str]  # absolute path of the base config (None: the defaults)
    overrides: dict
    seeds: list
    settings: list
    baseline: Any = None
    metrics: Optional[list] = None
    level: float = 0.95
    interval: str = "t"
    final_fraction: float = 0.2
    jobs: int = 1
    extra: list = field(default_factory=list)  # command-line overrides ["key=value", ...] for every cell

    # ------------------------------------------------------------------ cells
    def cell_id(self, setting: Setting, seed: int) -> str:
        return f"{setting.label}__seed{seed}"

    def cells(self) -> list:
        """[(setting, seed), ...] setting by setting."""
        return [(s, seed) for s in self.settings for seed in self.seeds]

    def baseline_setting(self) -> Setting:
        b = self.baseline
        if b is None:
            return self.settings[0]
        if isinstance(b, dict):
            for s in self.settings:
                if all(k in s.values and s.values[k] == v for k, v in b.items()):
                    return s
        else:
            for s in self.settings:
                if s.label == str(b) or s.label == safe_label(str(b)):
                    return s
            # `baseline: snib` in a grid over objective.name: the one setting with that value
            hits = [s for s in self.settings if any(_value_text(v) == str(b) for v in s.values.values())]
            if len(hits) == 1:
                return hits[0]
            if hits:
                raise _error(self.path, f"baseline {b!r} matches several settings ({', '.join(s.label for s in hits)}); "
                                        "give a label or a mapping of axis values")
        raise _error(self.path, f"baseline {b!r} matches no setting; the settings are: "
                                f"{', '.join(s.label for s in self.settings)}")

    def metric_names(self, headline: Optional[str] = None) -> list:
        """The metrics to compare: the spec's, else reward/mean and the eval headline."""
        if self.metrics:
            return list(self.metrics)
        return default_metrics(headline)

    # ------------------------------------------------------------------ configs
    def cell_config(self, setting: Setting, seed: int, out_dir: str):
        """The TrainConfig of one cell: base <- overrides <- setting <- command-line overrides <- seed, out_dir."""
        from ratiorl.train.config import validate  # noqa: PLC0415
        from ratiorl.train.config_load import ConfigBuilder, parse_overrides, read_yaml  # noqa: PLC0415

        b = ConfigBuilder()
        if self.base:
            b.update(read_yaml(self.base))
        for key, value in self.overrides.items():
            b.set(str(key), value)
        for key, value in setting.values.items():
            b.set(str(key), value)
        for key, value in parse_overrides(self.extra):
            if key in RESERVED_KEYS:
                raise ValueError(f"{key} is set by the study for each cell; use `seeds:` in the spec")
            b.set(key, value, from_cli=True)
        b.set("seed", int(seed))
        b.set("out_dir", out_dir)
        b.set("logging.progress", False)  # the cell's console goes to train.log, not a terminal
        cfg = b.build()
        validate(cfg)
        return cfg

    def build_configs(self, study_dir: str, check_parts: bool = True) -> dict:
        """{cell_id: TrainConfig} for every cell; a ValueError names the setting and the bad key.
        ``check_parts``: also build each setting's objective and task and look up its rewards."""
        if self.base and not os.path.exists(self.base):
            raise _error(self.path, f"base: config file not found: {self.base} (a path relative to the spec)")
        out = {}
        for setting in self.settings:
            for i, seed in enumerate(self.seeds):
                cid = self.cell_id(setting, seed)
                try:
                    cfg = self.cell_config(setting, seed, os.path.abspath(os.path.join(study_dir, "cells", cid)))
                    if check_parts and i == 0:
                        check_parts_of(cfg)
                except ValueError as e:
                    raise _error(self.path, f"setting {setting.label!r} (seed {seed}): {e}") from None
                out[cid] = cfg
        return out


def default_metrics(headline: Optional[str]) -> list:
    return ["reward/mean", HEADLINE_METRIC.get(headline or "avg@k", "eval/avg@k")]


def check_parts_of(cfg) -> None:
    """Build what can be built without the model: the objective, a built-in task, the reward names."""
    from ratiorl.rewards import available_rewards  # noqa: PLC0415
    from ratiorl.train.build import build_objective, build_task, reward_spec  # noqa: PLC0415

    build_objective(cfg)
    if cfg.task.name in ("jsonl", "hf"):
        if cfg.task.name == "jsonl" and not os.path.exists(str(cfg.task.path)):
            raise ValueError(f"task.path: {cfg.task.path} not found")
        return
    task = build_task(cfg)
    known = set(available_rewards())
    for name, _, _ in reward_spec(cfg, task.reward):
        if isinstance(name, str) and name not in known:
            near = difflib.get_close_matches(name, sorted(known), n=1)
            raise ValueError(f"unknown reward {name!r}" + (f"; did you mean {near[0]!r}?" if near else "")
                             + f" known rewards: {', '.join(sorted(known))}")


# ----------------------------------------------------------------------------- parsing


def read_spec_file(path: str) -> dict:
    from ratiorl.train.config_load import read_yaml  # noqa: PLC0415

    data = read_yaml(path, what="study spec")
    if not data:
        raise _error(path, "expected a mapping at the top level (base, overrides, seeds, axes or settings, ...)")
    return data


def _seeds(path: str, value: Any) -> list:
    if isinstance(value, bool):
        raise _error(path, f"seeds: expected a list of integers or a count, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise _error(path, f"seeds: a count must be >= 1, got {value}")
        return list(range(value))
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in value):
        raise _error(path, f"seeds: expected a non-empty list of integers or a count, got {value!r}")
    if len(set(value)) != len(value):
        raise _error(path, f"seeds: repeated seed in {value}")
    return list(value)


def _check_keys(path: str, where: str, values: dict) -> None:
    for key in values:
        if not isinstance(key, str) or not key:
            raise _error(path, f"{where}: config keys must be non-empty strings, got {key!r}")
        if key in RESERVED_KEYS or key.split(".")[0] in RESERVED_KEYS:
            raise _error(path, f"{where}: {key!r} is set by the study for each cell (use `seeds:` for seeds)")


def _settings(path: str, data: dict) -> list:
    explicit = data.get("settings")
    axes = data.get("axes")
    points = [Setting(label="", values={})]
    if explicit is not None:
        if not isinstance(explicit, list) or not explicit:
            raise _error(path, "settings: expected a non-empty list of mappings ({label: ..., key: value, ...})")
        points = []
        for i, entry in enumerate(explicit):
            if not isinstance(entry, dict):
                raise _error(path, f"settings[{i}]: expected a mapping, got {entry!r}")
            values = {k: v for k, v in entry.items() if k != "label"}
            _check_keys(path, f"settings[{i}]", values)
            label = entry.get("label")
            points.append(Setting(label=safe_label(label) if label is not None else auto_label(values), values=values))
    if axes is not None:
        if not isinstance(axes, dict) or not axes:
            raise _error(path, "axes: expected a mapping of config keys to lists of values")
        _check_keys(path, "axes", axes)
        for key, values in axes.items():
            if not isinstance(values, list) or not values:
                raise _error(path, f"axes.{key}: expected a non-empty list of values, got {values!r}")
        grid = []
        for point in points:
            for combo in itertools.product(*axes.values()):
                values = dict(zip(axes.keys(), combo))
                clash = sorted(set(values) & set(point.values))
                if clash:
                    raise _error(path, f"settings {point.label!r} and axes both set {', '.join(clash)}")
                label = auto_label(values)
                grid.append(Setting(label=safe_label(f"{point.label},{label}" if point.label else label),
                                    values={**point.values, **values}))
        points = grid
    for p in points:
        if not p.label:
            p.label = safe_label(auto_label(p.values))
    seen = {}
    for p in points:
        if p.label in seen:
            raise _error(path, f"two settings have the label {p.label!r}: {seen[p.label]} and {p.values}; "
                               "give them distinct labels")
        seen[p.label] = p.values
    return points


def load_spec(path: str, extra: Optional[list] = None, data: Optional[dict] = None) -> StudySpec:
    """Read and check a study spec (its own keys; ``spec.build_configs(dir)`` checks the cells' configs).
    ``extra``: command-line overrides for every cell; ``data``: the parsed spec (else read ``path``)."""
    data = read_spec_file(path) if data is None else data
    for key in data:
        if key not in STUDY_KEYS:
            raise _unknown(path, "spec", str(key), STUDY_KEYS)
    base = data.get("base")
    if base is not None:
        if not isinstance(base, str):
            raise _error(path, f"base: expected a path to a config file, got {base!r}")
        base = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), os.path.expanduser(base)))
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise _error(path, f"overrides: expected a mapping of config keys to values, got {overrides!r}")
    _check_keys(path, "overrides", overrides)
    level = data.get("level", 0.95)
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise _error(path, f"level: expected a confidence level in (0, 1) such as 0.95, got {level!r}")
    interval = data.get("interval", "t")
    if interval not in ("t", "bootstrap"):
        raise _error(path, f"interval: expected 't' or 'bootstrap', got {interval!r}")
    frac = data.get("final_fraction", 0.2)
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 1:
        raise _error(path, f"final_fraction: expected a fraction in (0, 1], got {frac!r}")
    jobs = data.get("jobs", 1)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise _error(path, f"jobs: expected an integer >= 1, got {jobs!r}")
    metrics = data.get("metrics")
    if metrics is not None and (not isinstance(metrics, list) or not metrics
                                or not all(isinstance(m, str) and m for m in metrics)):
        raise _error(path, f"metrics: expected a non-empty list of metric names (metrics.jsonl keys), got {metrics!r}")
    name = data.get("name") or os.path.splitext(os.path.basename(path))[0]
    spec = StudySpec(path=path, raw=data, name=str(name), base=base, overrides=overrides,
                     seeds=_seeds(path, data.get("seeds", [0, 1, 2])), settings=_settings(path, data),
                     baseline=data.get("baseline"), metrics=metrics, level=float(level), interval=interval,
                     final_fraction=float(frac), jobs=jobs, extra=list(extra or []))
    spec.baseline_setting()  # a baseline that names no setting fails here
    return spec


__all__ = ["StudySpec", "Setting", "load_spec", "read_spec_file", "safe_label", "auto_label", "default_metrics",
           "check_parts_of", "DONE", "STUDY_KEYS", "ANALYSIS_KEYS", "HEADLINE_METRIC"]
