"""The RL trainer: one plain loop, read it top to bottom.

    cfg = ratiorl.train.load_config("examples/snib.yaml", ["--train.steps", "50"])
    summary = ratiorl.train.train(cfg)                 # the whole run
    # or, one step at a time (benchmarks):
    trainer = ratiorl.train.Trainer(cfg)
    metrics = trainer.step()                           # one rollout batch and its updates
    trainer.close()

One step (``Trainer.step``):

 1. take the next ``prompts_per_step`` training prompts (a seeded shuffle, epoch after epoch);
 2. the sampler (pi_old) generates ``num_generations`` completions per prompt, logging old_logp;
 3. rewards (+ optional DAPO overlong penalty); with ``dynamic_sampling`` groups whose rewards are
    all equal are dropped and refilled from more rollouts (at most ``max_sampling_tries``);
 4. advantages per group (``objective.advantage`` or the preset's default); for ``gae`` a critic
    gives values and the reward carries a per-token KL penalty (PPO's in-reward KL);
 5. ``epochs`` x ``mini_batches`` optimizer updates. The batch is always split ON GROUP
    BOUNDARIES (self-normalised weights need a whole group), each mini-batch again into
    ``grad_accum`` micro-batches, and every micro-batch loss is computed with the global
    ``num_tokens`` / ``num_sequences`` (of the whole rollout batch by default,
    ``train.count_scope``), so the accumulated gradient is exactly the gradient of the
    un-split loss;
 6. gradient-norm clipping, AdamW, LR schedule; every ``sync_every`` updates the sampler gets the
    policy's weights; the KL controller updates beta from the observed KL.

``Trainer.run`` wraps steps with evaluation (avg@k, pass@k, greedy accuracy), metrics
(metrics.jsonl, TensorBoard, progress bar), checkpoints (atomic; also on Ctrl-C) and plots.
``Trainer(cfg, resume=True)`` continues from the newest checkpoint in ``out_dir``: same weights,
optimizer, scheduler, RNG streams and data position, so the metrics continue exactly as if the
run had never stopped.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import signal
import time
from typing import Optional

import torch

import ratiorl
from ratiorl.report.sinks import MetricsLogger, truncate_jsonl

from .checkpoint import latest_checkpoint, rng_state, save_checkpoint, seed_everything, set_rng_state
from .config import DEFAULT_MODEL_PATH, TrainConfig, config_to_dict, save_config

TIMING_PREFIXES = ("time/", "throughput/")  # metrics that depend on the machine, not the seed


# ============================================================================ building blocks


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


def build_objective(cfg: TrainConfig):
    try:
        obj = ratiorl.objective(cfg.objective.name, **cfg.objective.overrides)
    except TypeError as e:
        raise ValueError(f"objective: {e}") from None
    if obj.aggregation == "seq_mean_token_sum_norm" and obj.max_tokens is None:
        # Dr.GRPO normalises by the generation limit, not by the (trimmed) padded length
        obj = obj.replace(max_tokens=cfg.rollout.max_new_tokens)
    return obj


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
    a hub id ("org/name") is left to `from_pretrained`."""
    path = cfg.model.path
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


def _pad_to(t: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
    extra = width - t.shape[1]
    if extra <= 0:
        return t
    pad = torch.full((t.shape[0], extra), value, dtype=t.dtype, device=t.device)
    return torch.cat([pad, t] if left else [t, pad], 1)


def concat_rollouts(parts: list) -> dict:
    """Concatenate rollout dicts (padding prompts on the left, completions on the right)."""
    if len(parts) == 1:
        return parts[0]
    Tp = max(p["prompt_ids"].shape[1] for p in parts)
    Tc = max(p["completion_ids"].shape[1] for p in parts)
    out = {}
    for key in parts[0]:
        vals = [p[key] for p in parts]
        if isinstance(vals[0], list):
            out[key] = [x for v in vals for x in v]
        elif key in ("prompt_ids", "prompt_mask"):
            pad_value = parts[0]["pad_id"] if key == "prompt_ids" else 0
            out[key] = torch.cat([_pad_to(v, Tp, pad_value, left=True) for v in vals])
        elif key in ("completion_ids", "completion_mask", "old_logp", "ref_logp", "old_values"):
            if vals[0] is None:
                out[key] = None
                continue
            pad_value = parts[0]["pad_id"] if key == "completion_ids" else 0
            out[key] = torch.cat([_pad_to(v, Tc, pad_value, left=False) for v in vals])
        elif isinstance(vals[0], torch.Tensor):
            out[key] = torch.cat(vals)
        elif key in ("gen_seconds", "reward_seconds"):
            out[key] = sum(vals)
        else:
            out[key] = vals[0]
    return out


def select_groups(roll: dict, groups: list, G: int) -> dict:
    """Keep whole groups (in the given order) and renumber them 0..len(groups)-1."""
    rows = [g * G + j for g in groups for j in range(G)]
    idx = torch.tensor(rows, dtype=torch.long)
    out = {}
    for key, v in roll.items():
        if isinstance(v, list):
            out[key] = [v[i] for i in rows]
        elif isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == len(roll["rewards"]):
            out[key] = v.index_select(0, idx.to(v.device))
        else:
            out[key] = v
    out["group_ids"] = torch.arange(len(groups)).repeat_interleave(G)
    return out


def _trim(prompt_ids, prompt_mask, completion_mask):
    """Column ranges that drop all-padding prompt columns (left) and completion columns (right)."""
    has_p = prompt_mask.any(0).nonzero()
    p0 = int(has_p[0]) if len(has_p) else prompt_ids.shape[1] - 1
    has_c = completion_mask.any(0).nonzero()
    c1 = int(has_c[-1]) + 1 if len(has_c) else 1
    return p0, c1


def _adamw_impl(params) -> dict:
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


def _mean(xs):
    return sum(xs) / len(xs) if xs else 0.0


# ============================================================================ the trainer


class Trainer:
    """Owns the policy, sampler, optimizer and run folder. ``step()`` is one RL step."""

    def __init__(self, config: TrainConfig, resume: bool = False, console=None):
        from rich.console import Console  # noqa: PLC0415

        from ratiorl.policy import Policy  # noqa: PLC0415
        from ratiorl.rewards import RewardScorer  # noqa: PLC0415
        from ratiorl.rollout import HFRolloutEngine  # noqa: PLC0415

        self.cfg = cfg = config
        self.console = console or Console(stderr=True)
        self.t_start = time.perf_counter()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        self.run_dir = cfg.out_dir
        os.makedirs(self.run_dir, exist_ok=True)
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        resume_from = latest_checkpoint(self.ckpt_dir) if resume else None
        if resume and resume_from is None:
            self.console.print(f"[yellow]--resume: no checkpoint in {self.ckpt_dir}; starting from scratch[/]")
        if resume_from is None and os.path.exists(os.path.join(self.run_dir, "metrics.jsonl")):
            truncate_jsonl(os.path.join(self.run_dir, "metrics.jsonl"), None)  # a fresh run: new file
            if latest_checkpoint(self.ckpt_dir) is not None:
                self.console.print(f"[yellow]{self.run_dir} holds checkpoints of an earlier run; starting over "
                                   "(use --resume to continue it)[/]")
        save_config(cfg, os.path.join(self.run_dir, "config.yaml"))

        # ---- data, reward, objective
        self.task = build_task(cfg)
        if not self.task.train or not self.task.eval:
            raise ValueError(f"task {cfg.task.name!r} has an empty train or eval split")
        reward_name = cfg.reward.name or self.task.reward
        spec = [(reward_name, 1.0, cfg.reward.options)] if cfg.reward.options else reward_name
        self.scorer = RewardScorer(spec, noise_sigma=cfg.reward.noise_sigma, seed=cfg.seed)
        self.obj = build_objective(cfg)
        self.adv_method = cfg.objective.advantage or self.obj.advantage
        ratiorl.objectives.ADVANTAGES.lookup(self.adv_method)  # unknown name -> ValueError
        self.use_critic = self.adv_method.startswith("gae")
        self.controller = build_controller(cfg, self.obj.beta)
        self.kl_active = self.obj.beta > 0 or cfg.objective.kl_controller != "fixed"
        self.need_exact_kl = self.kl_active and self.obj.kl_estimator == "exact"
        self.need_ref_logp = (self.kl_active and not self.need_exact_kl) or (
            self.use_critic and cfg.critic.kl_coef > 0
        )

        # ---- policy, reference, sampler
        model_path = ensure_model(cfg, self.console)
        lora = None
        if cfg.lora.enabled:
            lora = {"r": cfg.lora.r, "lora_alpha": cfg.lora.alpha, "lora_dropout": cfg.lora.dropout}
            if cfg.lora.target_modules:
                lora["target_modules"] = cfg.lora.target_modules
        device = cfg.model.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        needs_ref = self.kl_active or self.need_ref_logp
        try:
            self.policy = Policy.from_pretrained(
                model_path, lora=lora, reference="auto" if needs_ref else "none",
                temperature=cfg.rollout.temperature, dtype=cfg.model.dtype, device=device,
            )
        except OSError as e:
            raise ValueError(f"model.path={model_path!r} could not be loaded: {e}") from None
        self.model, self.tokenizer = self.policy.model, self.policy.tokenizer
        self.eval_engine = HFRolloutEngine(self.model, self.tokenizer)
        if cfg.rollout.sync_every == 1:
            self.engine = self.eval_engine  # the sampler is the policy at rollout time
        else:  # a lagging sampler (pi_old) needs its own copy of the weights
            sampler = copy.deepcopy(self.model)
            for p in sampler.parameters():
                p.requires_grad_(False)
            self.engine = HFRolloutEngine(sampler, self.tokenizer)

        # ---- critic (gae advantages)
        self.critic = self.critic_opt = None
        if self.use_critic:
            from .critic import ValueModel  # noqa: PLC0415

            base = self.policy.name_or_path or model_path
            self.critic = ValueModel.from_pretrained(base, device=self.policy.device)
            self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=cfg.critic.lr)

        # ---- optimizer and schedule
        o = cfg.optim
        self.params = self.policy.trainable_parameters()
        self.optimizer = torch.optim.AdamW(
            self.params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
            **_adamw_impl(self.params),
        )
        total_updates = cfg.train.steps * cfg.train.epochs * cfg.train.mini_batches
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(o, total_updates))

        # ---- state that a checkpoint restores
        self.generator = torch.Generator(device=self.policy.device).manual_seed(cfg.seed)  # sampling stream
        self.step_count = 0
        self.updates = 0
        self.data_epoch = 0
        self.data_pos = 0
        self.eval_before: dict = {}
        self.last_eval: dict = {}
        self.wall_before = 0.0  # wall seconds of earlier sessions of a resumed run
        self._order_cache = (None, None)
        self._stop_requested = False
        if resume_from is not None:
            self.load_checkpoint(resume_from)
            truncate_jsonl(os.path.join(self.run_dir, "metrics.jsonl"), self.step_count)
        self.logger = MetricsLogger(self.run_dir, tensorboard=cfg.logging.tensorboard,
                                    purge_step=self.step_count + 1 if resume_from else None)
        self._diag = _load_diagnostics() if cfg.logging.diagnostics else None

    # ------------------------------------------------------------------ data

    def _order(self, epoch: int) -> list:
        if self._order_cache[0] != epoch:
            order = list(range(len(self.task.train)))
            random.Random(f"ratiorl.train/{self.cfg.seed}/{epoch}").shuffle(order)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def next_examples(self, n: int) -> list:
        out = []
        while len(out) < n:
            order = self._order(self.data_epoch)
            if self.data_pos >= len(order):
                self.data_epoch, self.data_pos = self.data_epoch + 1, 0
                continue
            out.append(self.task.train[order[self.data_pos]])
            self.data_pos += 1
        return out

    # ------------------------------------------------------------------ rollout + reward

    def rollout(self, examples: list) -> dict:
        """Generate G completions per example, score them; returns a dict of row-aligned tensors."""
        cfg = self.cfg
        r = cfg.rollout
        prompts = [e["prompt"] for e in examples]
        t0 = time.perf_counter()
        b = self.engine.generate(prompts, r.num_generations, max_new_tokens=r.max_new_tokens,
                                 temperature=r.temperature, top_p=r.top_p, generator=self.generator)
        t1 = time.perf_counter()
        rows = b.prompt_index.tolist()
        answers = [examples[i]["answer"] for i in rows]
        extra = {k: [examples[i][k] for i in rows] for k in examples[0]
                 if k not in ("prompt", "answer", "completion")}
        rewards, rmetrics = self.scorer(b.completion_texts, prompts=[prompts[i] for i in rows],
                                        answers=answers, **extra)
        correct = torch.tensor([float(self.task.check(t, a)) for t, a in zip(b.completion_texts, answers)])
        lengths = b.completion_mask.sum(1)
        if cfg.reward.overlong_penalty > 0:  # DAPO soft overlong punishment
            buf = max(1, cfg.reward.overlong_buffer)
            over = (lengths.float() - (r.max_new_tokens - buf)).clamp(min=0) / buf
            rewards = rewards - cfg.reward.overlong_penalty * over.clamp(max=1.0)
        old_logp = b.old_logp.float()
        if r.recompute_old_logp:
            old_logp = self._score_with(self.engine.model, b)
        return dict(
            prompt_ids=b.prompt_ids, prompt_mask=b.prompt_mask, completion_ids=b.completion_ids,
            completion_mask=b.completion_mask, old_logp=old_logp, group_ids=b.group_ids.clone(),
            rewards=rewards.float(), correct=correct, truncated=b.truncated.float(),
            texts=list(b.completion_texts), answers=answers, pad_id=self.engine.pad_token_id,
            reward_metrics=rmetrics, gen_seconds=t1 - t0, reward_seconds=time.perf_counter() - t1,
        )

    @torch.no_grad()
    def _score_with(self, model, b) -> torch.Tensor:
        from ratiorl.policy import Policy  # noqa: PLC0415

        scorer = Policy(model, self.tokenizer, reference="none", temperature=self.cfg.rollout.temperature)
        return scorer.completion_stats(b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask).logp

    def collect(self) -> tuple:
        """One rollout batch of `prompts_per_step` groups (DAPO dynamic sampling if enabled)."""
        cfg = self.cfg
        P, G = cfg.rollout.prompts_per_step, cfg.rollout.num_generations
        if not cfg.train.dynamic_sampling:
            roll = self.rollout(self.next_examples(P))
            return roll, {"sampling/tries": 1.0, "sampling/kept_groups": float(P)}
        kept, seen, tries, last = [], 0, 0, None
        while len(kept) == 0 or sum(len(k["rewards"]) for k in kept) < P * G:
            if tries >= cfg.train.max_sampling_tries:
                break
            roll = last = self.rollout(self.next_examples(P))
            tries += 1
            std = roll["rewards"].view(P, G).std(1, unbiased=False)
            good = [g for g in range(P) if std[g] > 1e-6]
            seen += P
            if good:
                kept.append(select_groups(roll, good, G))
        if kept:
            roll = concat_rollouts(kept)
            n = len(roll["rewards"]) // G
            have = min(n, P)
            roll = select_groups(roll, list(range(have)), G)
        else:  # every group was uniform: train on the last batch (its advantages are 0)
            roll = last
        n_groups = len(roll["rewards"]) // G
        return roll, {"sampling/tries": float(tries), "sampling/kept_groups": float(n_groups),
                      "sampling/seen_groups": float(seen)}

    # ------------------------------------------------------------------ advantages

    @torch.no_grad()
    def compute_advantages(self, roll: dict) -> dict:
        cfg = self.cfg
        mask = roll["completion_mask"]
        extra = {}
        if self.need_ref_logp:
            st = self.policy.completion_stats(roll["prompt_ids"], roll["prompt_mask"],
                                              roll["completion_ids"], mask, with_ref_logp=True)
            roll["ref_logp"] = st.ref_logp
        else:
            roll["ref_logp"] = None
        if not self.use_critic:
            roll["advantages"] = ratiorl.advantages(roll["rewards"], roll["group_ids"], method=self.adv_method,
                                                    **cfg.objective.advantage_options)
            roll["old_values"] = roll["returns"] = None
            return extra
        values = self.critic(roll["prompt_ids"], roll["prompt_mask"], roll["completion_ids"], mask)
        m = mask.float()
        lengths = m.sum(1).long()
        token_rewards = torch.zeros_like(m)
        if roll["ref_logp"] is not None and cfg.critic.kl_coef > 0:  # in-reward KL (k1 at sample time)
            kl_tok = (roll["old_logp"] - roll["ref_logp"]) * m
            token_rewards -= cfg.critic.kl_coef * kl_tok
            extra["kl_in_reward"] = float(kl_tok.sum() / m.sum().clamp(min=1))
        rows = torch.arange(len(lengths))
        token_rewards[rows, (lengths - 1).clamp(min=0)] += roll["rewards"] * (lengths > 0)
        adv = ratiorl.advantages(token_rewards, None, method=self.adv_method, values=values, mask=mask,
                                 **cfg.objective.advantage_options)
        roll["returns"] = (adv + values) * m
        roll["old_values"] = values
        if cfg.critic.whiten_advantages:
            n = m.sum().clamp(min=1)
            mu = (adv * m).sum() / n
            sd = (((adv - mu) * m) ** 2).sum().div(n).sqrt()
            adv = (adv - mu) / (sd + 1e-8) * m
        roll["advantages"] = adv
        extra["value/mean"] = float((values * m).sum() / m.sum().clamp(min=1))
        return extra

    # ------------------------------------------------------------------ one micro-batch

    def micro_batch_loss(self, roll: dict, rows: list, num_tokens: float, num_sequences: float) -> tuple:
        """Objective (+ value) loss of `rows` (whole groups) with global counts; not backpropagated."""
        idx = torch.tensor(rows, dtype=torch.long)
        pick = lambda key: roll[key].index_select(0, idx)  # noqa: E731
        p_ids, p_mask, c_ids, c_mask = (pick(k) for k in ("prompt_ids", "prompt_mask", "completion_ids",
                                                           "completion_mask"))
        p0, c1 = _trim(p_ids, p_mask, c_mask)
        p_ids, p_mask, c_ids, c_mask = p_ids[:, p0:], p_mask[:, p0:], c_ids[:, :c1], c_mask[:, :c1]
        old_logp = pick("old_logp")[:, :c1]
        adv = pick("advantages")
        if adv.dim() == 2:
            adv = adv[:, :c1]
        ref_logp = pick("ref_logp")[:, :c1] if roll["ref_logp"] is not None else None
        gids = pick("group_ids")
        gids = gids - gids.min()

        stats = self.policy.completion_stats(p_ids, p_mask, c_ids, c_mask, with_entropy=True,
                                             with_kl=self.need_exact_kl)
        out = self.obj(stats.logp, old_logp, adv, c_mask, group_ids=gids, ref_logp=ref_logp,
                       token_kl=stats.token_kl, num_tokens=num_tokens, num_sequences=num_sequences)
        loss = out.loss
        m = c_mask.float()
        ntok = m.sum().clamp(min=1)
        metrics = {f"objective/{k}": float(v) for k, v in out.metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        metrics["entropy"] = float((stats.entropy.detach() * m).sum() / ntok)
        if stats.token_kl is not None:
            metrics["kl"] = float((stats.token_kl.detach() * m).sum() / ntok)
        elif ref_logp is not None:
            d = (ref_logp - stats.logp.detach()) * m
            metrics["kl"] = float(((d.exp() - d - 1) * m).sum() / ntok)  # k3
        metrics["policy_loss"] = float(loss.detach())
        if self.critic is not None:
            from .critic import value_loss  # noqa: PLC0415

            values = self.critic(p_ids, p_mask, c_ids, c_mask)
            vloss = value_loss(values, pick("old_values")[:, :c1], pick("returns")[:, :c1], c_mask,
                               self.cfg.critic.value_clip, num_tokens)
            loss = loss + self.cfg.critic.value_coef * vloss
            metrics["value_loss"] = float(vloss.detach())
        return loss, metrics, stats

    def backward_minibatch(self, roll: dict, groups: list, n_micro: int, num_tokens: float,
                           num_sequences: float) -> tuple:
        """Accumulate the gradient of the groups `groups` in `n_micro` micro-batches (group boundaries).

        With the same global `num_tokens` / `num_sequences`, the accumulated gradient does not depend
        on `n_micro`, and summing it over disjoint group sets gives the gradient of their union.
        """
        G = self.cfg.rollout.num_generations
        chunks = torch.tensor_split(torch.tensor(groups), min(n_micro, len(groups)))
        loss_total, metrics_list, weights = 0.0, [], []
        first_stats = first_rows = None
        for chunk in chunks:
            rows = [g * G + j for g in chunk.tolist() for j in range(G)]
            loss, metrics, stats = self.micro_batch_loss(roll, rows, num_tokens, num_sequences)
            loss.backward()
            loss_total += float(loss.detach())
            metrics_list.append(metrics)
            weights.append(len(rows))
            if first_stats is None:
                first_stats, first_rows = stats, rows
        return loss_total, metrics_list, weights, first_stats, first_rows

    # ------------------------------------------------------------------ the step

    def step(self) -> dict:
        """One rollout batch and its `epochs x mini_batches` updates. Returns the step's metrics."""
        cfg, G = self.cfg, self.cfg.rollout.num_generations
        t0 = time.perf_counter()
        self.model.train(False)  # no dropout in RL (the sampler's log-probs would not match)

        # 1-3. rollout and rewards
        roll, sample_metrics = self.collect()
        t_roll = time.perf_counter()
        # 4. advantages (and reference log-probs, critic values)
        adv_metrics = self.compute_advantages(roll)
        n_groups = len(roll["rewards"]) // G
        mask = roll["completion_mask"]

        # 5. epochs x mini-batches x micro-batches, all split on group boundaries
        groups = list(range(n_groups))
        mini = [c.tolist() for c in torch.tensor_split(torch.tensor(groups), min(cfg.train.mini_batches, n_groups))]
        micro_metrics, update_metrics, micro_weights = [], [], []
        diag_input = None
        for _epoch in range(cfg.train.epochs):
            for mb_groups in mini:
                mb_rows = [g * G + j for g in mb_groups for j in range(G)]
                if cfg.train.count_scope == "rollout":
                    num_tokens, num_sequences = float(mask.sum()), float(len(roll["rewards"]))
                else:
                    num_tokens = float(mask[mb_rows].sum())
                    num_sequences = float(len(mb_rows))
                self.optimizer.zero_grad(set_to_none=True)
                if self.critic_opt is not None:
                    self.critic_opt.zero_grad(set_to_none=True)
                loss_total, mm, mw, stats0, rows0 = self.backward_minibatch(
                    roll, mb_groups, cfg.train.grad_accum, num_tokens, num_sequences)
                micro_metrics += mm
                micro_weights += mw
                diag_input = (rows0, stats0.logp.detach())  # the last update is the most off-policy
                max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
                finite = math.isfinite(grad_norm)
                if finite:
                    self.optimizer.step()
                    if self.critic_opt is not None:
                        torch.nn.utils.clip_grad_norm_(self.critic.parameters(), max_norm)
                        self.critic_opt.step()
                self.scheduler.step()
                self.updates += 1
                update_metrics.append({"loss": loss_total, "grad_norm": grad_norm, "skipped": float(not finite)})
                # 6. sampler <- policy every `sync_every` updates
                if self.engine is not self.eval_engine and self.updates % cfg.rollout.sync_every == 0:
                    self.engine.load_weights(self.model)
        t_update = time.perf_counter()
        diag_scalars = self._diagnostic_scalars(roll, *diag_input) if self._diag is not None else {}

        # KL controller
        kl_obs = _weighted_mean(micro_metrics, micro_weights, "kl")
        beta = self.controller.beta
        if kl_obs is not None:
            new_beta = self.controller.update(kl_obs)
            if new_beta != self.obj.beta:
                self.obj = self.obj.replace(beta=float(new_beta))
        self.step_count += 1

        # metrics
        lengths = mask.sum(1).float()
        gen_tokens = float(lengths.sum())
        step_seconds = time.perf_counter() - t0
        rewards = roll["rewards"]
        std_g = rewards.view(-1, G).std(1, unbiased=False)
        m = {
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std(unbiased=False)),
            "reward/zero_std_groups": float((std_g <= 1e-6).float().mean()),
            "accuracy": float(roll["correct"].mean()),
            "length/mean": float(lengths.mean()),
            "length/max": float(lengths.max()),
            "length/truncated_frac": float(roll["truncated"].mean()),
            "loss": _mean([u["loss"] for u in update_metrics]),
            "grad_norm": _mean([u["grad_norm"] for u in update_metrics]),
            "skipped_updates": sum(u["skipped"] for u in update_metrics),
            "lr": float(self.scheduler.get_last_lr()[0]),
            "beta": float(beta),
            "updates": float(self.updates),
            "data/epoch": float(self.data_epoch),
            "time/rollout": roll["gen_seconds"],
            "time/reward": roll["reward_seconds"],
            "time/update": t_update - t_roll,
            "time/step": step_seconds,
            "throughput/tokens_per_s": gen_tokens / max(step_seconds, 1e-9),
        }
        for k, v in roll["reward_metrics"].items():
            if k.startswith("reward/"):
                m[f"reward/fn/{k[len('reward/'):]}"] = float(v)
        m["reward/errors"] = float(roll["reward_metrics"].get("reward_errors", 0))
        keys = sorted({k for mm in micro_metrics for k in mm})
        for k in keys:
            v = _weighted_mean(micro_metrics, micro_weights, k)
            if v is not None:
                m[k] = v
        m.update(sample_metrics)
        m.update(adv_metrics)
        m.update({f"diag/{k}": v for k, v in diag_scalars.items()})
        return m

    def _diag_batch(self, roll, rows, logp) -> dict:
        idx = torch.tensor(rows, dtype=torch.long)
        c1 = logp.shape[1]
        adv = roll["advantages"][idx]
        return dict(logp=logp, old_logp=roll["old_logp"][idx][:, :c1], mask=roll["completion_mask"][idx][:, :c1],
                    advantages=adv[:, :c1] if adv.dim() == 2 else adv, group_ids=roll["group_ids"][idx])

    def _diagnostic_scalars(self, roll, rows, logp) -> dict:
        """Cheap scalars from ratiorl.report.diagnostics on the first micro-batch of the step's last
        update (the most off-policy one); the batch is kept for the diagnostics plots at eval."""
        try:
            batch = self._diag_batch(roll, rows, logp)
            self._last_diag_batch = batch
            o = self.obj
            return self._diag.step_scalars(**batch, clip_low=o.clip_low, clip_high=o.clip_high,
                                           pos_clip_low=o.pos_clip_low, pos_clip_high=o.pos_clip_high,
                                           pos_power=o.pos_power, prefix="")
        except Exception as e:  # diagnostics must never break training
            self.console.print(f"[yellow]diagnostics disabled: {type(e).__name__}: {e}[/]")
            self._diag = None
            return {}

    def plot_diagnostics(self) -> None:
        """Diagnostics plots of the last step: CTPO Fig. 1 (clip rate by position), SNIB Fig. 2 (weight
        histograms), SNIB Table 4a (gradient norm by length), DGPO Fig. 2 (F(r), `weighted` only)."""
        batch = getattr(self, "_last_diag_batch", None)
        if self._diag is None or batch is None:
            return
        d, o = self._diag, self.obj
        out = os.path.join(self.run_dir, "plots")
        try:
            curve = d.clip_fraction_by_position(batch["logp"], batch["old_logp"], batch["mask"],
                                                advantages=batch["advantages"], clip_low=o.clip_low,
                                                clip_high=o.clip_high, pos_clip_low=o.pos_clip_low,
                                                pos_clip_high=o.pos_clip_high, pos_power=o.pos_power)
            d.plot_clip_by_position(curve, os.path.join(out, "clip_by_position.png"), labels=[f"step {self.step_count}"])
            hist = d.weight_histograms(batch["logp"], batch["old_logp"], batch["mask"], batch["group_ids"],
                                       clip=o.clip_low if o.clip_low is not None else 0.2)
            d.plot_weight_histograms(hist, os.path.join(out, "weight_histograms.png"))
            # SNIB Table 4a: per-sequence policy-gradient norm (in log-prob space) by response length
            logp = batch["logp"].detach().clone().requires_grad_(True)
            pg = o.replace(beta=0.0)(logp, batch["old_logp"], batch["advantages"], batch["mask"],
                                     group_ids=batch["group_ids"])
            norms = d.per_sequence_grad_norms(pg.loss, logp, batch["mask"])
            M = self.cfg.rollout.max_new_tokens
            edges = sorted({max(1, M // 4), max(1, M // 2)})
            by_len = d.grad_norm_by_length(norms, batch["mask"].sum(1), buckets=edges)
            d.plot_grad_norm_by_length(by_len, os.path.join(out, "grad_norm_by_length.png"))
            # DGPO Fig. 2: the gradient weight F(r) of a `weighted` objective (fixed for the run)
            f_path = os.path.join(out, "gradient_weight.png")
            if o.shaping == "weighted" and not os.path.exists(f_path):
                d.plot_gradient_weights([o.rule], f_path, clip_low=o.clip_low, clip_high=o.clip_high)
        except Exception as e:  # a plot must never stop training
            self.console.print(f"[yellow]diagnostics plots failed: {type(e).__name__}: {e}[/]")

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict:
        """avg@k and pass@k (sampling at the eval temperature) and greedy accuracy on the eval split."""
        from .evaluate import evaluate_engine  # noqa: PLC0415

        cfg, e = self.cfg, self.cfg.eval
        temp = cfg.rollout.temperature if e.temperature is None else e.temperature
        return evaluate_engine(self.eval_engine, self.task.eval[: e.num_prompts], self.task.check, k=e.k,
                               temperature=temp, top_p=cfg.rollout.top_p,
                               max_new_tokens=cfg.rollout.max_new_tokens, seed=cfg.seed, greedy=e.greedy)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> str:
        cfg = self.cfg

        def write(d: str) -> None:
            if cfg.checkpoint.save_hf:
                self.policy.save_pretrained(os.path.join(d, "model"))
            state = {
                "step": self.step_count,
                "updates": self.updates,
                "data_epoch": self.data_epoch,
                "data_pos": self.data_pos,
                "trainable": {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad},
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "controller": dict(vars(self.controller)),
                "beta": self.obj.beta,
                "rng": rng_state(self.generator),
                "scorer_rng": self.scorer._gen.get_state() if hasattr(self.scorer, "_gen") else None,
                "sampler": (None if self.engine is self.eval_engine else
                            {k: v.clone() for k, v in self.engine.model.state_dict().items()}),
                "critic": self.critic.state_dict() if self.critic is not None else None,
                "critic_opt": self.critic_opt.state_dict() if self.critic_opt is not None else None,
                "eval_before": self.eval_before,
                "last_eval": self.last_eval,
                "wall_seconds": self.wall_seconds(),
                "config": config_to_dict(cfg),
            }
            torch.save(state, os.path.join(d, "state.pt"))

        return save_checkpoint(self.ckpt_dir, self.step_count, write, keep_last=cfg.checkpoint.keep_last)

    def load_checkpoint(self, path: str) -> None:
        state = torch.load(os.path.join(path, "state.pt"), map_location=self.policy.device, weights_only=False)
        named = dict(self.model.named_parameters())
        missing = [n for n in state["trainable"] if n not in named]
        if missing:
            raise ValueError(f"checkpoint {path} does not match the model (e.g. {missing[0]}); "
                             "resume with the config the run was started with")
        with torch.no_grad():
            for n, v in state["trainable"].items():
                named[n].copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        vars(self.controller).update(state["controller"])
        self.obj = self.obj.replace(beta=float(state["beta"]))
        set_rng_state(state["rng"], self.generator)
        if state.get("scorer_rng") is not None and hasattr(self.scorer, "_gen"):
            self.scorer._gen.set_state(state["scorer_rng"])
        if state.get("sampler") is not None and self.engine is not self.eval_engine:
            self.engine.model.load_state_dict(state["sampler"])
        elif self.engine is not self.eval_engine:
            self.engine.load_weights(self.model)
        if self.critic is not None and state.get("critic") is not None:
            self.critic.load_state_dict(state["critic"])
            self.critic_opt.load_state_dict(state["critic_opt"])
        self.step_count, self.updates = state["step"], state["updates"]
        self.data_epoch, self.data_pos = state["data_epoch"], state["data_pos"]
        self.eval_before, self.last_eval = state.get("eval_before", {}), state.get("last_eval", {})
        self.wall_before = state.get("wall_seconds", 0.0)
        self.console.print(f"resumed from {path} (step {self.step_count})")

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.t_start

    # ------------------------------------------------------------------ the loop

    def _on_sigint(self, signum, frame):
        if self._stop_requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop_requested = True
        self.console.print("\n[yellow]Ctrl-C: finishing this step, then writing a checkpoint "
                           "(press again to stop at once)[/]")

    def run(self, until: Optional[int] = None) -> dict:
        """Train to `train.steps` (or stop after step `until`), with eval, logging and checkpoints."""
        from .progress import StepProgress  # noqa: PLC0415

        cfg = self.cfg
        last = cfg.train.steps if until is None else min(until, cfg.train.steps)
        old_handler = None
        try:
            old_handler = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread: Ctrl-C arrives as KeyboardInterrupt instead
            pass
        try:
            if self.step_count == 0 and cfg.eval.before and not self.eval_before:
                self.eval_before = self.evaluate()
                self.last_eval = self.eval_before
                self.logger.log(0, self.eval_before)
                self._print_eval(0, self.eval_before)
            with StepProgress(total=cfg.train.steps, start=self.step_count, enabled=cfg.logging.progress,
                              console=self.console) as bar:
                while self.step_count < last and not self._stop_requested:
                    metrics = self.step()
                    s = self.step_count
                    if (cfg.eval.every > 0 and s % cfg.eval.every == 0) or s == cfg.train.steps:
                        ev = self.evaluate()
                        metrics.update(ev)
                        self.last_eval = ev
                        bar.note(f"step {s}: " + _eval_line(ev))
                    self.logger.log(s, metrics)
                    bar.update(s, metrics, self.last_eval)
                    if cfg.logging.console_every and s % cfg.logging.console_every == 0:
                        bar.note(_console_line(s, metrics))
                    if cfg.checkpoint.every > 0 and s % cfg.checkpoint.every == 0 and s < cfg.train.steps:
                        self.save_checkpoint()
                    if cfg.logging.plots and "eval/avg@k" in metrics and s < last:
                        self.plot()
        except KeyboardInterrupt:
            self.console.print(f"[red]interrupted during step {self.step_count + 1}; the newest complete "
                               f"checkpoint is {latest_checkpoint(self.ckpt_dir)}[/]")
            raise
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
        finished = self.step_count >= cfg.train.steps
        path = self.save_checkpoint()
        if self._stop_requested:
            self.console.print(f"[yellow]stopped at step {self.step_count}; checkpoint {path}; "
                               f"continue with --resume[/]")
        if finished and cfg.checkpoint.save_final_model:
            self.policy.save_pretrained(os.path.join(self.run_dir, "model"))
        if cfg.logging.plots:
            self.plot()
        return self.write_summary(finished)

    def _print_eval(self, step, ev):
        self.console.print(f"step {step}: " + _eval_line(ev))

    def plot(self) -> None:
        from ratiorl.report.plots import plot_learning_curves  # noqa: PLC0415

        try:
            plot_learning_curves(self.run_dir)
        except Exception as e:  # a plot must never stop training
            self.console.print(f"[yellow]plotting failed: {type(e).__name__}: {e}[/]")
        self.plot_diagnostics()

    def write_summary(self, finished: bool) -> dict:
        cfg = self.cfg
        before, after = self.eval_before, self.last_eval
        temp = after.get("eval/temperature", cfg.rollout.temperature)
        n = min(cfg.eval.num_prompts, len(self.task.eval))
        k = cfg.eval.k
        metric_text = {
            "avg@k": f"avg@{k}: exact-match accuracy averaged over {k} samples per prompt at temperature {temp}",
            "pass@k": f"pass@{k}: fraction of prompts with a correct answer among {k} samples at temperature {temp}",
            "greedy": "greedy: exact-match accuracy of the greedy (temperature 0) answer",
        }[cfg.eval.headline] + f", on {n} held-out prompts"
        key = {"avg@k": "eval/avg@k", "pass@k": "eval/pass@k", "greedy": "eval/greedy_acc"}[cfg.eval.headline]
        summary = {
            "objective": cfg.objective.name,
            "advantage": self.adv_method,
            "task": cfg.task.name,
            "model": cfg.model.path,
            "steps": self.step_count,
            "finished": finished,
            "wall_seconds": round(self.wall_seconds(), 2),
            "seed": cfg.seed,
            "eval_metric": metric_text,
            "eval_accuracy_before": before.get(key),
            "eval_accuracy_after": after.get(key),
            f"eval_avg_at_{k}_before": before.get("eval/avg@k"),
            f"eval_avg_at_{k}_after": after.get("eval/avg@k"),
            f"eval_pass_at_{k}_before": before.get("eval/pass@k"),
            f"eval_pass_at_{k}_after": after.get("eval/pass@k"),
            "greedy_accuracy_before": before.get("eval/greedy_acc"),
            "greedy_accuracy_after": after.get("eval/greedy_acc"),
            "eval_temperature": temp,
            "run_dir": self.run_dir,
        }
        tmp = os.path.join(self.run_dir, "summary.json.tmp")
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(tmp, os.path.join(self.run_dir, "summary.json"))
        return summary

    def close(self) -> None:
        self.logger.close()


# ============================================================================ helpers


def _weighted_mean(rows: list, weights: list, key: str):
    pairs = [(r[key], w) for r, w in zip(rows, weights) if key in r and math.isfinite(r[key])]
    if not pairs:
        return None
    return sum(v * w for v, w in pairs) / sum(w for _, w in pairs)


def _eval_line(ev: dict) -> str:
    k = int(ev.get("eval/k", 0))
    s = f"avg@{k} {ev['eval/avg@k']:.3f}  pass@{k} {ev['eval/pass@k']:.3f}"
    if "eval/greedy_acc" in ev:
        s += f"  greedy {ev['eval/greedy_acc']:.3f}"
    return s


def _console_line(step: int, m: dict) -> str:
    parts = [f"step {step}", f"reward {m['reward/mean']:.3f}", f"acc {m['accuracy']:.3f}",
             f"loss {m['loss']:.4f}"]
    if "kl" in m:
        parts.append(f"kl {m['kl']:.4f}")
    if "objective/clip_frac" in m:
        parts.append(f"clip {m['objective/clip_frac']:.3f}")
    return "  ".join(parts)


def _load_diagnostics():
    """ratiorl.report.diagnostics, or None if it is unavailable."""
    try:
        from ratiorl.report import diagnostics  # noqa: PLC0415
    except Exception:
        return None
    return diagnostics if hasattr(diagnostics, "step_scalars") else None


def train(config: TrainConfig, resume: bool = False, until: Optional[int] = None, console=None) -> dict:
    """Run training from a config; returns the summary dict (also written to summary.json)."""
    trainer = Trainer(config, resume=resume, console=console)
    try:
        return trainer.run(until=until)
    finally:
        trainer.close()
