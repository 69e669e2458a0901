"""Building a run's parts from its config: task, model path, policy, objective, optimizer, schedule,
KL controller. Each function is small and independent, so a script or a test can build one part
alone (``build_task(cfg)``) the way the trainer does.
"""

from __future__ import annotations

import math
import os

import torch

import ratiorl

from .config import DEFAULT_MODEL_PATH, TrainConfig, objective_from_config

AUTOCAST_DTYPES = {None: None, "bfloat16": torch.bfloat16}  # train.autocast -> Policy(autocast_dtype=...)


def build_task(cfg: TrainConfig):
    """The task of the run: a built-in one, or a JSONL / Hugging Face dataset."""
    from ratiorl.tasks import Task, get_task, load_hf_dataset, load_jsonl  # noqa: PLC0415

    t = cfg.task
    if t.name not in ("jsonl", "hf"):
        try:
            return get_task(t.name, seed=cfg.seed, **t.options)
        except TypeError as e:  # unknown task option
            raise ValueError(str(e)) from None
    fields = dict(prompt_field=t.prompt_field, answer_field=t.answer_field)
    try:
        if t.name == "jsonl":
            rows = load_jsonl(t.path, **fields)
            eval_rows = load_jsonl(t.eval_split, **fields) if t.eval_split else None
        else:
            rows = load_hf_dataset(t.path, split=t.split, **fields)
            eval_rows = load_hf_dataset(t.path, split=t.eval_split, **fields) if t.eval_split else None
    except FileNotFoundError as e:
        raise ValueError(f"task.path: {e}") from None
    if eval_rows is None:  # hold out a slice of the training data
        n_eval = max(1, min(200, len(rows) // 10))
        if len(rows) < 2:
            raise ValueError(f"{t.path}: need at least 2 examples to hold out an eval split")
        eval_rows, rows = rows[:n_eval], rows[n_eval:]
    return Task(name=os.path.basename(str(t.path)), train=rows, eval=eval_rows, reward="exact_match")


def reward_spec(cfg: TrainConfig, task_reward) -> list:
    """The run's rewards as ``[(name, weight, options), ...]``: the ``rewards:`` list when given,
    else ``reward.name`` (None = the task's default reward) with ``reward.options``."""
    if cfg.rewards:
        spec = []
        for i, entry in enumerate(cfg.rewards):
            if isinstance(entry, str):
                entry = {"name": entry}
            if not isinstance(entry, dict) or "name" not in entry or set(entry) - {"name", "weight", "options"}:
                raise ValueError(f"rewards[{i}]: expected {{name, weight, options}}, got {entry!r}")
            spec.append((str(entry["name"]), float(entry.get("weight", 1.0)), dict(entry.get("options") or {})))
        if cfg.reward.name is not None:
            raise ValueError("give either reward.name or a rewards: list, not both")
        return spec
    if cfg.reward.name is None and isinstance(task_reward, (list, tuple)):
        return list(task_reward)
    return [(cfg.reward.name or task_reward, 1.0, dict(cfg.reward.options))]


def build_scorer(cfg: TrainConfig, task):
    """A ``RewardScorer`` over the run's rewards (``reward_spec``) with the configured noise."""
    from ratiorl.rewards import RewardScorer  # noqa: PLC0415

    try:
        return RewardScorer(reward_spec(cfg, task.reward), noise_sigma=cfg.reward.noise_sigma, seed=cfg.seed,
                            timeout=cfg.reward.timeout)
    except TypeError as e:  # an unknown reward option
        raise ValueError(str(e)) from None


def build_objective(cfg: TrainConfig):
    """The run's objective (plugins imported first); an aggregation that declares
    ``uses_generation_limit`` (Dr.GRPO) gets ``max_tokens = rollout.max_new_tokens`` unless set."""
    from ratiorl.objectives import ADVANTAGES  # noqa: PLC0415

    obj = objective_from_config(cfg)
    if cfg.rollout.num_generations < 2 and getattr(ADVANTAGES.lookup(obj.advantage), "needs_groups", False):
        free = ", ".join(n for n, f in sorted(ADVANTAGES.items()) if not getattr(f, "needs_groups", False))
        raise ValueError(f"rollout.num_generations={cfg.rollout.num_generations} with objective.advantage="
                         f"{obj.advantage!r}: that advantage compares the completions of a group, so a group "
                         "of one gives every advantage 0; set rollout.num_generations >= 2 or an advantage "
                         f"without groups ({free})")
    return obj.with_generation_limit(cfg.rollout.max_new_tokens)


def build_controller(cfg: TrainConfig, beta: float):
    o = cfg.objective
    if o.kl_controller == "fixed":
        return ratiorl.FixedBeta(beta)
    if o.kl_controller == "primal_dual":
        return ratiorl.PrimalDualBeta(target=o.kl_target, lr=o.kl_lr, beta=beta)
    if beta <= 0:
        raise ValueError("objective.kl_controller=adaptive scales beta multiplicatively: set objective.beta > 0")
    return ratiorl.AdaptiveBeta(target=o.kl_target, horizon=o.kl_horizon, beta=beta)


def lr_lambda(optim, total_updates: int):
    """Multiplier of the base LR after `u` updates: linear warmup, then constant/linear/cosine."""

    def f(u: int) -> float:
        if optim.warmup_steps > 0 and u < optim.warmup_steps:
            return (u + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        frac = min(1.0, (u - optim.warmup_steps) / max(1, total_updates - optim.warmup_steps))
        lo = optim.min_lr_ratio
        if optim.schedule == "linear":
            return lo + (1 - lo) * (1 - frac)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * frac))

    return f


def ensure_model(cfg: TrainConfig, console=None) -> str:
    """The model path. A missing local folder under runs/ (the examples' default tiny model) is
    created with the config's `sft:` settings when `model.auto_create` is on; a name that looks like
    a hub id ("org/name") is left to `from_pretrained`; ``pkg:<module>`` is an installed package's folder."""
    from ratiorl.policy.loading import resolve_model_path  # noqa: PLC0415

    path = resolve_model_path(cfg.model.path)
    if os.path.exists(path):
        return path
    norm = os.path.normpath(path)
    if cfg.model.auto_create and (path == DEFAULT_MODEL_PATH or norm.split(os.sep)[0] == "runs"):
        from .sft import run_sft  # noqa: PLC0415

        if console is not None:
            console.print(f"[yellow]model {path} not found: creating it with `ratiorl sft` settings[/]")
        run_sft(path, cfg.sft)
        return path
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ValueError(f"model.path={path!r} does not exist (create the tiny model with `ratiorl sft --out {path}`)")
    return path  # a hub name: from_pretrained will say if it cannot be found


def build_policy(cfg: TrainConfig, model_path: str, needs_reference: bool):
    """``Policy.from_pretrained`` with the run's LoRA, dtype and device settings, and the training
    forward's speed options: ``train.length_buckets`` (length buckets: no padding computed),
    ``train.autocast`` (bf16 autocast, fp32 master weights) and ``model.gradient_checkpointing``."""
    from ratiorl.policy import Policy  # noqa: PLC0415

    lora = None
    if cfg.lora.enabled:
        lora = {"r": cfg.lora.r, "lora_alpha": cfg.lora.alpha, "lora_dropout": cfg.lora.dropout}
        # none given: every linear layer of attention and MLP (ratiorl.policy.lora)
        lora["target_modules"] = list(cfg.lora.target_modules) if cfg.lora.target_modules else "auto"
    from ratiorl.policy.loading import check_device  # noqa: PLC0415

    device = check_device(cfg.model.device)
    try:
        return Policy.from_pretrained(model_path, lora=lora, reference="auto" if needs_reference else "none",
                                      temperature=cfg.rollout.temperature, dtype=cfg.model.dtype, device=device,
                                      gguf_file=cfg.model.gguf_file, length_buckets=cfg.train.length_buckets,
                                      autocast_dtype=AUTOCAST_DTYPES[cfg.train.autocast],
                                      gradient_checkpointing=cfg.model.gradient_checkpointing)
    except OSError as e:
        raise ValueError(f"model.path={model_path!r} could not be loaded: {e}") from None


def build_optimizer(cfg: TrainConfig, params: list):
    """AdamW (fused where available) and its LR schedule over all of the run's updates."""
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                  weight_decay=o.weight_decay, **adamw_implementation(params))
    total_updates = cfg.train.steps * cfg.train.epochs * cfg.train.mini_batches
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o, total_updates))


def adamw_implementation(params) -> dict:
    """Keyword arguments that select the fastest AdamW implementation for `params`.

    ``torch.optim.AdamW`` only picks its multi-tensor (foreach) or fused kernels by itself for
    CUDA tensors; on CPU it runs the per-tensor Python loop (a dozen small ops per tensor). The
    fused kernel (CPU and CUDA, floating-point parameters) does the whole update in one pass and
    is what Hugging Face's Trainer, and so TRL, uses by default ("adamw_torch_fused").
    """
    if not params:
        return {}
    devices = {p.device.type for p in params}
    if devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params):
        return {"fused": True}
    return {}
