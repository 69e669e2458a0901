"""Typed run configuration: nested dataclasses, loaded from YAML, overridden from the command line.

    cfg = load_config("examples/snib.yaml", ["--objective.name", "grpo", "--optim.lr=3e-4"])
    cfg.objective.name        # "grpo"
    save_config(cfg, "runs/x/config.yaml")

Every section is a dataclass; unknown keys raise ``ValueError`` listing the valid ones, values are
coerced to the annotated type (``"3e-4"`` -> 3e-4, ``"true"`` -> True). The one exception is the
``objective`` section: keys that are not fields of :class:`ObjectiveConfig` are hyperparameters of
the objective preset (``--objective.beta 0.1``) and are passed to ``ratiorl.objective(name, **kw)``,
which checks them against the fields of ``ratiorl.Objective``.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from .sft import SFTConfig

DEFAULT_MODEL_PATH = "runs/tiny-sft"  # what `ratiorl sft` writes; auto-created when missing


@dataclass
class ModelConfig:
    path: str = DEFAULT_MODEL_PATH  # HF name or local dir; AutoModelForCausalLM.from_pretrained
    auto_create: bool = True  # if `path` is missing locally, build it with `ratiorl sft` settings
    device: str = "cpu"
    dtype: Optional[str] = None  # None = checkpoint dtype; "float32" | "bfloat16" | "float16"


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Optional[list] = None  # None = PEFT's default for the architecture


@dataclass
class RolloutConfig:
    prompts_per_step: int = 8  # prompts in one rollout batch
    num_generations: int = 8  # G completions per prompt (one group)
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    sync_every: int = 1  # optimizer updates between sampler (pi_old) refreshes
    recompute_old_logp: bool = False  # recompute pi_old log-probs with a full forward pass


@dataclass
class TaskConfig:
    name: str = "addition"  # built-in task, or "jsonl" / "hf" with `path`
    path: Optional[str] = None  # JSONL file or HF dataset name/dir (for name=jsonl|hf)
    split: str = "train"
    eval_split: Optional[str] = None  # HF only; default: hold out `eval_size` training rows
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    options: dict = field(default_factory=dict)  # extra keyword arguments for get_task


@dataclass
class RewardConfig:
    name: Optional[str] = None  # None = the task's default reward
    options: dict = field(default_factory=dict)  # keyword arguments for get_reward
    noise_sigma: float = 0.0
    overlong_penalty: float = 0.0  # DAPO soft overlong punishment factor (0 = off)
    overlong_buffer: int = 4  # tokens before max_new_tokens where the penalty ramps up


@dataclass
class ObjectiveConfig:
    name: str = "grpo"  # preset name (`ratiorl objectives` lists them)
    advantage: Optional[str] = None  # None = the preset's default (obj.advantage)
    advantage_options: dict = field(default_factory=dict)  # e.g. {gamma: 1.0, lam: 0.95}
    kl_controller: str = "fixed"  # fixed | primal_dual | adaptive
    kl_target: float = 0.01
    kl_lr: float = 0.1  # primal_dual step size
    kl_horizon: int = 10000  # adaptive controller horizon
    overrides: dict = field(default_factory=dict)  # passed to ratiorl.objective(name, **overrides)


@dataclass
class CriticConfig:
    """Used by advantage methods `gae` / `gae_length_adaptive` (the `ppo` preset)."""

    lr: float = 1e-3
    value_coef: float = 0.5
    value_clip: float = 0.2  # PPO value clipping (0 = off)
    kl_coef: float = 0.05  # in-reward KL penalty coefficient (per token, k1 vs reference)
    whiten_advantages: bool = True  # normalise GAE advantages over the batch's tokens


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 = no clipping
    schedule: str = "constant"  # constant | linear | cosine
    warmup_steps: int = 0  # in optimizer updates
    min_lr_ratio: float = 0.0  # final lr / lr for linear and cosine


@dataclass
class TrainLoopConfig:
    steps: int = 100  # rollout batches (one "step" = one rollout batch and its updates)
    epochs: int = 1  # passes over each rollout batch
    mini_batches: int = 1  # optimizer updates per epoch; the batch is split on group boundaries
    grad_accum: int = 1  # micro-batches per mini-batch (also on group boundaries)
    count_scope: str = "rollout"  # num_tokens/num_sequences of the whole rollout | "mini_batch"
    dynamic_sampling: bool = False  # DAPO: drop groups with zero reward variance and refill
    max_sampling_tries: int = 4  # rollouts per step at most when refilling


@dataclass
class EvalConfig:
    every: int = 10  # steps between evaluations (0 = only before and after training)
    num_prompts: int = 64  # eval prompts (first n of the eval split)
    k: int = 4  # samples per prompt for avg@k and pass@k
    temperature: Optional[float] = None  # None = rollout temperature
    greedy: bool = True  # also report greedy exact-match accuracy
    before: bool = True  # evaluate at step 0
    headline: str = "avg@k"  # which number summary.json calls eval_accuracy: avg@k | greedy | pass@k


@dataclass
class CheckpointConfig:
    every: int = 50  # steps between checkpoints (0 = only at the end and on Ctrl-C)
    keep_last: int = 2
    save_hf: bool = True  # also write checkpoint/model in Hugging Face format (save_pretrained)
    save_final_model: bool = True  # run_dir/model with save_pretrained


@dataclass
class LoggingConfig:
    progress: bool = True  # rich progress bar
    console_every: int = 0  # print a metrics line every n steps (0 = never)
    tensorboard: bool = True
    plots: bool = True
    diagnostics: bool = True  # cheap scalars from ratiorl.report.diagnostics


@dataclass
class TrainConfig:
    seed: int = 0
    out_dir: str = "runs/default"
    threads: Optional[int] = None  # torch CPU threads for the run (None = torch's default)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)  # how `model.auto_create` / `ratiorl sft` build the model


# ----------------------------------------------------------------------------- coercion

_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert `value` (from YAML or a command-line string) to the annotated type `tp`."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        return _coerce(value, args[0], where)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if tp is list or origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return list(value)
    if tp is dict or origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"{where}: unsupported config type {tp!r}")


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _parse_scalar(text: str) -> Any:
    """A command-line value for a key without a declared type (objective hyperparameters)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _objective_fields() -> Optional[list]:
    """Valid hyperparameter names of ratiorl.Objective, or None if it is not importable."""
    try:
        from ratiorl.objectives import Objective  # noqa: PLC0415
    except Exception:  # objectives not available: ratiorl.objective() will check later
        return None
    if not dataclasses.is_dataclass(Objective):
        return None
    return sorted(f.name for f in dataclasses.fields(Objective) if f.name != "name")


def _set(cfg: TrainConfig, dotted: str, value: Any, from_cli: bool) -> None:
    parts = dotted.split(".")
    node: Any = cfg
    path = []
    for i, key in enumerate(parts):
        path.append(key)
        where = ".".join(path)
        last = i == len(parts) - 1
        if isinstance(node, ObjectiveConfig) and key not in _hints(ObjectiveConfig):
            # an objective hyperparameter: objective.beta -> objective.overrides["beta"]
            if not last:
                raise ValueError(f"unknown config key {dotted!r}")
            valid_obj = _objective_fields()
            if valid_obj is not None and key not in valid_obj:
                valid = sorted(set(_hints(ObjectiveConfig)) | set(valid_obj))
                raise ValueError(
                    f"unknown config key {where!r}; valid keys under 'objective': {', '.join(valid)}"
                )
            node.overrides[key] = _parse_scalar(value) if from_cli and isinstance(value, str) else value
            return
        if not dataclasses.is_dataclass(node) or key not in _hints(type(node)):
            prefix = ".".join(path[:-1])
            valid = sorted(_hints(type(node))) if dataclasses.is_dataclass(node) else []
            scope = f"under {prefix!r}" if prefix else "at the top level"
            raise ValueError(f"unknown config key {where!r}; valid keys {scope}: {', '.join(valid)}")
        tp = _hints(type(node))[key]
        if last:
            if dataclasses.is_dataclass(getattr(node, key)):
                if not isinstance(value, dict):
                    raise ValueError(f"{where}: is a section, expected a mapping, got {value!r}")
                for sub_key, sub_value in value.items():
                    _set(cfg, f"{where}.{sub_key}", sub_value, from_cli)
                return
            setattr(node, key, _coerce(value, tp, where))
            return
        node = getattr(node, key)
        if not dataclasses.is_dataclass(node):
            raise ValueError(f"config key {where!r} is a value, not a section (in {dotted!r})")


def _flatten(d: dict, prefix: str = "") -> list:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("options", "advantage_options", "overrides", "task_options",
                                             "model_sizes"):
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, v))
    return out


def parse_overrides(args: list) -> list:
    """['--a.b', '1', '--c=2', 'd.e=3'] -> [('a.b', '1'), ('c', '2'), ('d.e', '3')]."""
    pairs = []
    i = 0
    while i < len(args):
        arg = args[i]
        key = arg[2:] if arg.startswith("--") else arg
        if "=" in key:
            k, v = key.split("=", 1)
            pairs.append((k, v))
            i += 1
        elif arg.startswith("--"):
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                # a bare flag: --eval.greedy means true
                pairs.append((key, "true"))
                i += 1
            else:
                pairs.append((key, args[i + 1]))
                i += 2
        else:
            raise ValueError(f"cannot parse override {arg!r}; use --section.key value or section.key=value")
    return [(k.replace("-", "_"), v) for k, v in pairs]


def load_config(yaml_path: Optional[str] = None, overrides: Optional[list] = None) -> TrainConfig:
    """Defaults <- YAML file <- dotted overrides. Raises ValueError on unknown keys or bad values."""
    cfg = TrainConfig()
    if yaml_path is not None:
        if not os.path.exists(yaml_path):
            raise ValueError(f"config file not found: {yaml_path}")
        with open(yaml_path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"{yaml_path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{yaml_path}: expected a mapping at the top level")
        for key, value in _flatten(data):
            _set(cfg, key, value, from_cli=False)
    for key, value in parse_overrides(list(overrides or [])):
        _set(cfg, key, value, from_cli=True)
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> TrainConfig:
    cfg = TrainConfig()
    for key, value in _flatten(data):
        _set(cfg, key, value, from_cli=False)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Checks that do not need the model; ratiorl.objective() checks the objective itself."""

    def need(cond, msg):
        if not cond:
            raise ValueError(msg)

    need(cfg.rollout.prompts_per_step >= 1, "rollout.prompts_per_step must be >= 1")
    need(cfg.rollout.num_generations >= 1, "rollout.num_generations must be >= 1")
    need(cfg.rollout.max_new_tokens >= 1, "rollout.max_new_tokens must be >= 1")
    need(cfg.rollout.temperature > 0, "rollout.temperature must be > 0")
    need(cfg.rollout.sync_every >= 1, "rollout.sync_every must be >= 1")
    need(cfg.train.steps >= 0, "train.steps must be >= 0")
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


def config_to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)
