"""Typed run configuration: nested dataclasses, loaded from YAML, overridden from the command line.

    cfg = load_config("examples/snib.yaml", ["--objective.name", "grpo", "--optim.lr=3e-4"])
    cfg.objective.name        # "grpo"
    obj = objective_from_config(cfg)          # imports cfg.plugins, then ratiorl.objective(...)
    save_config(cfg, "runs/x/config.yaml")

Every section is a dataclass (:mod:`ratiorl.train.config_schema`, the one source of defaults),
checked by OmegaConf structured configs: values are converted to the annotated type
(``"3e-4"`` -> 3e-4, ``"true"`` -> True) or rejected with an error naming the key, and an
unknown key names the valid keys of its section and the closest one. Overrides come in any of
the forms ``--train.steps 50``, ``--train.steps=50``, ``train.steps=50``, and a bare
``--eval.greedy`` means true. A dotted key may reach into a dict field
(``--objective.shaping_options.pos_power 0.7``); values for such untyped places are read as
YAML scalars. Keys under ``objective`` that are not fields of :class:`ObjectiveConfig` are flat
objective hyperparameters (``--objective.beta 0.1``); they go to ``objective.overrides`` and
``ratiorl.objective()`` checks them.

``plugins`` lists modules or ``.py`` files to import before anything is built, so that what
they register (``@WEIGHTS.register("my_weight")``) can be named in the config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import math
import os
import re
import sys
from typing import Iterable, Optional, Union

import yaml

from .config_load import build_config, parse_overrides, parse_value, read_yaml
from .config_schema import (
    DEFAULT_MODEL_PATH,
    CheckpointConfig,
    CriticConfig,
    EvalConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    RewardConfig,
    RolloutConfig,
    SFTConfig,
    TaskConfig,
    TrainConfig,
    TrainLoopConfig,
)

# objective axes that can be swapped from the config; all but kl_placement take <axis>_options
OBJECTIVE_AXES = ("weight", "shaping", "rule", "aggregation", "kl_estimator", "kl_placement", "token_selection")


def load_config(yaml_path: Optional[str] = None, overrides: Optional[Iterable[str]] = None) -> TrainConfig:
    """Defaults <- YAML file <- dotted overrides. Raises ValueError on unknown keys or bad values."""
    data = read_yaml(yaml_path) if yaml_path is not None else {}
    cfg = build_config(data, overrides)
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> TrainConfig:
    """A nested mapping (e.g. ``config_to_dict`` output or a parsed YAML document) -> TrainConfig."""
    cfg = build_config(data)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Checks that do not need the model; ratiorl.objective() checks the objective itself."""

    def need(cond, msg):
        if not cond:
            raise ValueError(msg)

    need(cfg.rollout.prompts_per_step >= 1, "rollout.prompts_per_step must be >= 1")
    need(cfg.rollout.num_generations >= 1, "rollout.num_generations must be >= 1")
    need(math.isfinite(cfg.reward.timeout) and cfg.reward.timeout > 0, "reward.timeout must be a number of seconds > 0")
    need(cfg.rollout.max_new_tokens >= 1, "rollout.max_new_tokens must be >= 1")
    need(cfg.rollout.temperature > 0, "rollout.temperature must be > 0")
    need(cfg.rollout.sync_every >= 1, "rollout.sync_every must be >= 1")
    need(0.0 < cfg.rollout.top_p <= 1.0, f"rollout.top_p must be in (0, 1], got {cfg.rollout.top_p}")
    need(cfg.rollout.top_k >= 0, f"rollout.top_k must be >= 0 (0 = off), got {cfg.rollout.top_k}")
    need(0.0 <= cfg.rollout.min_p < 1.0, f"rollout.min_p must be in [0, 1) (0 = off), got {cfg.rollout.min_p}")
    need(all(isinstance(s, str) and s for s in cfg.rollout.stop),
         f"rollout.stop must be a list of non-empty strings, got {list(cfg.rollout.stop)}")
    need(cfg.rollout.policy_lag >= 0, f"rollout.policy_lag must be >= 0 (updates), got {cfg.rollout.policy_lag}")
    need(cfg.rollout.dtype in (None, "float32", "bfloat16", "float16"),
         f"rollout.dtype must be null (the policy's), float32, bfloat16 or float16, got {cfg.rollout.dtype!r}")
    need(cfg.rollout.draw in ("auto", "multinomial", "inverse_cdf"),
         f"rollout.draw must be auto, multinomial or inverse_cdf, got {cfg.rollout.draw!r}")
    need(cfg.rollout.attention in ("auto", "native", "torch"),
         f"rollout.attention must be auto (the native kernel where it builds), native or torch, got {cfg.rollout.attention!r}")
    need(cfg.rollout.decoder in ("auto", "hf"),
         f"rollout.decoder must be auto (the lean decoder when the architecture has one) or hf, got {cfg.rollout.decoder!r}")
    need(cfg.train.steps >= 0, "train.steps must be >= 0")
    need(cfg.train.autocast in (None, "bfloat16"),
         f"train.autocast must be null (off) or bfloat16, got {cfg.train.autocast!r}")
    need(cfg.train.length_buckets >= 1, f"train.length_buckets must be >= 1 (1 = off), got {cfg.train.length_buckets}")
    need(isinstance(cfg.model.gradient_checkpointing, bool),
         f"model.gradient_checkpointing must be true or false, got {cfg.model.gradient_checkpointing!r}")
    need(cfg.train.epochs >= 1, "train.epochs must be >= 1")
    need(cfg.train.mini_batches >= 1, "train.mini_batches must be >= 1")
    need(cfg.train.grad_accum >= 1, "train.grad_accum must be >= 1")
    need(
        cfg.train.mini_batches * cfg.train.grad_accum <= cfg.rollout.prompts_per_step,
        "train.mini_batches * train.grad_accum must be <= rollout.prompts_per_step "
        "(the batch is split on group boundaries, one group = one prompt)",
    )
    need(cfg.train.count_scope in ("rollout", "mini_batch"), "train.count_scope must be 'rollout' or 'mini_batch'")
    need(cfg.optim.schedule in ("constant", "linear", "cosine"), "optim.schedule must be constant, linear or cosine")
    need(cfg.optim.lr > 0, "optim.lr must be > 0")
    need(
        cfg.objective.kl_controller in ("fixed", "primal_dual", "adaptive"),
        "objective.kl_controller must be fixed, primal_dual or adaptive",
    )
    need(cfg.task.name not in ("jsonl", "hf") or cfg.task.path, f"task.name={cfg.task.name} needs task.path")
    need(cfg.eval.k >= 1, "eval.k must be >= 1")
    need(cfg.eval.headline in ("avg@k", "greedy", "pass@k"), "eval.headline must be avg@k, greedy or pass@k")
    need(cfg.eval.headline != "greedy" or cfg.eval.greedy, "eval.headline=greedy needs eval.greedy=true")
    need(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last must be >= 1")
    need(all(isinstance(p, str) and p.strip() for p in cfg.plugins),
         "plugins must be a list of module names or .py file paths")


def config_to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: TrainConfig) -> str:
    """The full resolved config (every default filled in) as YAML, loadable by load_config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: TrainConfig, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(config_to_yaml(cfg))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- plugins


def _is_path(entry: str) -> bool:
    return entry.endswith(".py") or "/" in entry or os.sep in entry


def _import_file(path: str):
    full = os.path.realpath(os.path.expanduser(path))
    if not os.path.isfile(full):
        raise ValueError(f"plugin file not found: {path}")
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(full))[0])
    name = f"ratiorl_plugin_{stem}_{hashlib.sha1(full.encode()).hexdigest()[:10]}"
    if name in sys.modules:  # imported already (by the CLI, then again by the trainer): once only
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, full)
    if spec is None or spec.loader is None:
        raise ValueError(f"plugin {path!r} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def import_plugins(plugins: Union[Iterable[str], str, None]) -> list:
    """Import each plugin once: a module name (``my_pkg.losses``) or a path to a ``.py`` file
    (imported under a unique module name). ``"a,b"`` is split on commas. Returns the modules.
    A missing file or module raises ValueError naming it; errors inside a plugin propagate."""
    if isinstance(plugins, str):
        plugins = plugins.split(",")
    modules = []
    for entry in plugins or []:
        entry = str(entry).strip()
        if not entry:
            continue
        if _is_path(entry):
            modules.append(_import_file(entry))
            continue
        try:
            modules.append(importlib.import_module(entry))
        except ImportError as e:
            raise ValueError(f"cannot import plugin module {entry!r}: {e}") from None
    return modules


def objective_kwargs(cfg: TrainConfig) -> dict:
    """Keyword arguments of ``ratiorl.objective(cfg.objective.name, **kw)`` for this config:
    the axes that are set, their non-empty options, the advantage method and flat overrides."""
    o = cfg.objective
    kw = {}
    for axis in OBJECTIVE_AXES + ("advantage",):
        if getattr(o, axis) is not None:
            kw[axis] = getattr(o, axis)
        options = getattr(o, f"{axis}_options", None)
        if options:
            kw[f"{axis}_options"] = dict(options)
    clash = sorted(set(kw) & set(o.overrides))
    if clash:
        raise ValueError(f"objective: {', '.join(clash)} given both as a field and in objective.overrides")
    kw.update(o.overrides)
    return kw


def objective_from_config(cfg: TrainConfig):
    """Import ``cfg.plugins``, then build the ``ratiorl.Objective`` the config describes.
    Bad objective settings raise ValueError prefixed ``objective: ``."""
    import_plugins(cfg.plugins)
    import ratiorl  # noqa: PLC0415

    kw = objective_kwargs(cfg)
    try:
        return ratiorl.objective(cfg.objective.name, **kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"objective: {e}") from None


__all__ = [
    "DEFAULT_MODEL_PATH", "TrainConfig", "ModelConfig", "LoraConfig", "RolloutConfig", "TaskConfig",
    "RewardConfig", "ObjectiveConfig", "CriticConfig", "OptimConfig", "TrainLoopConfig", "EvalConfig",
    "CheckpointConfig", "LoggingConfig", "SFTConfig", "OBJECTIVE_AXES", "load_config",
    "config_from_dict", "config_to_dict", "config_to_yaml", "save_config", "validate",
    "parse_overrides", "parse_value", "import_plugins", "objective_kwargs", "objective_from_config",
]
