"""The RL trainer: five stages on one typed batch, in one loop you can read top to bottom.

    cfg = ratiorl.train.load_config("examples/snib.yaml", ["--train.steps", "50"])
    summary = ratiorl.train.train(cfg)                 # the whole run
    trainer = ratiorl.train.Trainer(cfg)               # or one step at a time (benchmarks)
    metrics = trainer.step()
    trainer.close()

One step (``Trainer.step``), each stage a module of ``ratiorl.train.stages`` that reads and
extends one ``ratiorl.rollout.Rollout``:

    sample      prompts -> completions, behaviour / old log-probs            stages/sample.py
    score       rewards (each function's and the total), correctness          stages/score.py
    advantages  reference log-probs, advantages (a critic's when declared)    stages/advantages.py
    update      epochs x mini-batches x micro-batches of the objective         stages/update.py
    report      the step's metrics and importance-weight diagnostics          stages/report.py

``sample`` and ``score`` run inside a collector (one draw, or DAPO dynamic sampling); the KL
controller is a hook after each step; ``run`` adds evaluation, logging, checkpoints and plots as
hooks (``ratiorl/train/hooks.py``). ``Trainer(cfg, resume=True)`` restores every part's state
from the newest checkpoint, so a resumed run continues with exactly the same numbers.
Under torchrun the ranks split each step's prompts (ratiorl/train/distributed.py); with
``train.parallel: fsdp`` the policy is sharded (ratiorl/train/fsdp.py) and its weights are
gathered for the rollout and evaluation (``full_weights``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Optional

import torch

from ratiorl.objectives import ADVANTAGES, KL_ESTIMATORS
from ratiorl.report.sinks import MetricsLogger, truncate_jsonl

from . import hooks as H
from .distributed import NullLogger, init_distributed
from .fsdp import FSDPPolicy, GatheringEngine
from .build import (build_controller, build_objective, build_optimizer, build_policy, build_scorer, build_task,
                    ensure_model)
from .checkpoint import (latest_checkpoint, load_newest_state, restore_trainer, save_checkpoint, seed_everything,
                         trainer_state)
from .config import TrainConfig
from .evaluate import reward_judge
from .prompts import render_task
from .run_dir import prepare_run_dir
from .stages.advantages import build_advantages
from .stages.report import Report
from .sampler import LaggingSampler, mismatch_sources, old_logp_source
from .stages.sample import PromptStream, Sample
from .stages.score import Score
from .stages.update import Update
from .summary import write_summary

TIMING_PREFIXES = ("time/", "throughput/")  # metrics that depend on the machine, not the seed


class Trainer:
    """Owns the policy, the stages, the hooks and the run folder. ``step()`` is one RL step."""

    def __init__(self, config: TrainConfig, resume: bool = False, console=None, *, overwrite: bool = False):
        from rich.console import Console  # noqa: PLC0415

        from ratiorl.rollout import HFRolloutEngine  # noqa: PLC0415

        self.cfg = cfg = config
        self.dist = init_distributed(cfg)  # torchrun: this rank's place; else one rank (distributed.py)
        self.console = (console or Console(stderr=True)) if self.dist.is_main else Console(stderr=True, quiet=True)
        self.t_start, self.wall_before = time.perf_counter(), 0.0
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        self.run_dir, self.ckpt_dir = cfg.out_dir, os.path.join(cfg.out_dir, "checkpoints")
        os.makedirs(self.run_dir, exist_ok=True)
        resume_from = self._prepare_run_dir(resume, overwrite)

        # ---- what the run learns from, and how
        self.task = build_task(cfg)
        if not self.task.train or not self.task.eval:
            raise ValueError(f"task {cfg.task.name!r} has an empty train or eval split")
        self.scorer = build_scorer(cfg, self.task)
        self.objective = obj = build_objective(cfg)
        advantage = ADVANTAGES.lookup(obj.advantage)
        controller = build_controller(cfg, obj.beta)
        # capabilities declared by the entries decide what is computed (never their names)
        kl_active = obj.beta > 0 or cfg.objective.kl_controller != "fixed"
        estimator = KL_ESTIMATORS.lookup(obj.kl_estimator)
        self.measure_token_kl = kl_active and getattr(estimator, "needs_token_kl", False)
        needs_critic = getattr(advantage, "needs_critic", False)
        need_ref_logp = (kl_active and getattr(estimator, "needs_ref_logp", False)) or (
            needs_critic and cfg.critic.kl_coef > 0)

        # ---- policy, reference, sampler
        model_path = self.dist.on_main(ensure_model, cfg, self.console)  # rank 0 builds a missing warm start
        self.policy = build_policy(cfg, model_path, needs_reference=kl_active or need_ref_logp)
        self.model, self.tokenizer = self.policy.model, self.policy.tokenizer
        self.task = render_task(self.task, self.tokenizer, cfg.task)  # chat template, system prompt
        self.eval_engine = HFRolloutEngine(self.model, self.tokenizer, decoder=cfg.rollout.decoder,
                                           draw=cfg.rollout.draw, attention=cfg.rollout.attention)
        # the sampler (mu): the policy's own model, or a copy in rollout.dtype lagging by policy_lag updates
        sharded = cfg.train.parallel == "fsdp" and self.dist.enabled
        self.sampler = LaggingSampler(self.model, self.tokenizer, cfg.rollout, self.eval_engine,
                                      GatheringEngine if sharded else HFRolloutEngine)  # a copy is taken whole
        self.engine = self.sampler.engine
        # fsdp: the policy sharded in place over the ranks (weights, gradients, optimizer state)
        self.fsdp = FSDPPolicy(self.policy, self.dist, cfg.rollout.num_generations) if sharded else None
        self.generator = torch.Generator(device=self.policy.device).manual_seed(cfg.seed + self.dist.rank)  # sampling

        # ---- the five stages
        sources = mismatch_sources(cfg.rollout, next(self.model.parameters()).dtype, cfg.train.autocast)
        self.old_logp_source = old_logp_source(cfg, obj, sources)  # "behaviour" | "forward" | "loglinear"
        forward = self.old_logp_source == "forward"
        self.stream = PromptStream(self.task.train, cfg.seed)
        self.sample = Sample(self.engine, self.stream, cfg.rollout, self.generator, self.policy if forward else None,
                             version=lambda: self.sampler.version, shard=(self.dist.rank, self.dist.world_size))
        self.score = Score(self.scorer, self.task.check, cfg.reward, cfg.rollout.max_new_tokens,
                           judge=reward_judge(self.scorer, cfg.eval))  # training accuracy = evaluation's
        self.collector = (H.DynamicSampling(cfg.train.max_sampling_tries) if cfg.train.dynamic_sampling
                          else H.OneDraw())
        # the method's declared needs pick the stage: critic (+ value pretraining), greedy baseline, ...
        self.advantages, self.critic, auxiliary = build_advantages(self, obj, need_ref_logp, model_path)
        self.params = self.policy.trainable_parameters()
        self.optimizer, self.scheduler = build_optimizer(cfg, self.params)
        self.update = Update(self.policy, obj, self.optimizer, self.scheduler, cfg,
                             auxiliary=auxiliary,
                             after_update=self.sampler.after_update, measure_token_kl=self.measure_token_kl,
                             measure_mismatch=forward and bool(sources), dist=self.dist, sharding=self.fsdp)
        self.report = Report(_diagnostics() if cfg.logging.diagnostics else None, self.console)

        # ---- hooks and the state a checkpoint restores
        self.kl_control = H.KLControl(controller)
        self.hooks = [self.kl_control]
        self.evaluation = H.Evaluation(self.evaluate, cfg.eval, cfg.train.steps)
        self.evaluation.all_ranks = self.fsdp is not None  # gathering the weights takes every rank
        self.step_count, self.last_step, self.last_batch = 0, cfg.train.steps, None
        self._stop_requested, self._bar = False, None
        if resume_from is not None:
            self.load_checkpoint(resume_from)
            self.dist.on_main(truncate_jsonl, os.path.join(self.run_dir, "metrics.jsonl"), self.step_count)
        self.logger = NullLogger() if not self.dist.is_main else MetricsLogger(
            self.run_dir, tensorboard=cfg.logging.tensorboard, purge_step=self.step_count + 1 if resume_from else None)

    def _prepare_run_dir(self, resume: bool, overwrite: bool) -> Optional[str]:
        """A used folder needs resume (same config, up to safe keys) or overwrite (moved aside)."""
        return self.dist.on_main(prepare_run_dir, self.cfg, self.run_dir, self.ckpt_dir, resume, overwrite,
                                 self.console.print)  # rank 0 decides; the others follow

    def set_objective(self, objective) -> None:
        """Swap the objective (the KL controller does this when it moves beta)."""
        self.objective = self.update.objective = objective

    def draw(self, n_prompts: int):
        """``n_prompts`` new groups, sampled and scored (what a collector asks for)."""
        return self.score(self.sample(n_prompts))

    # ------------------------------------------------------------------ one step
    def step(self) -> dict:
        """One rollout batch through the five stages, then the step hooks. Returns the metrics."""
        t0 = time.perf_counter()
        self.model.train(False)  # no dropout in RL (the sampler's log-probs would not match)
        with self.full_weights():  # the rollout: sampling, rewards, old / reference log-probs, advantages
            batch = self.collector.collect(self.draw, self.cfg.rollout.prompts_per_step // self.dist.world_size)
            t_collect = time.perf_counter()
            batch = self.advantages(batch)
        batch = self.update(batch)
        t_update = time.perf_counter()
        self.step_count += 1
        extra = {"lr": float(self.scheduler.get_last_lr()[0]), "beta": float(self.objective.beta),
                 "updates": float(self.update.updates), "data/epoch": float(self.stream.epoch),
                 "time/update": t_update - t_collect, "time/step": t_update - t0}
        metrics = self.dist.reduce_metrics(self.report(batch, self.objective, extra))  # over ranks
        for hook in self.hooks:
            hook.after_step(self, batch, metrics)
        self.last_batch = batch
        return metrics

    def evaluate(self) -> dict:
        """avg@k and pass@k (sampling at the eval temperature) and greedy accuracy on the eval split."""
        from .evaluate import evaluate_engine  # noqa: PLC0415

        cfg, e = self.cfg, self.cfg.eval
        temp = cfg.rollout.temperature if e.temperature is None else e.temperature
        args = (evaluate_engine, self.eval_engine, self.task.eval[: e.num_prompts], reward_judge(self.scorer, e))
        kw = dict(k=e.k, temperature=temp, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                  min_p=cfg.rollout.min_p, stop=list(cfg.rollout.stop), max_new_tokens=cfg.rollout.max_new_tokens,
                  seed=cfg.seed, greedy=e.greedy)
        if self.fsdp is None:
            return args[0](*args[1:], **kw)
        with self.full_weights():  # every rank gathers, rank 0 evaluates, all get its numbers
            return self.dist.on_main(*args, **kw)

    def full_weights(self):
        """A context with the policy's full weights (fsdp: gathered on every rank; else nothing to do)."""
        return self.fsdp.gathered() if self.fsdp is not None else contextlib.nullcontext()

    def save_model(self, save_dir: str) -> None:
        """The policy in Hugging Face format (fsdp: every rank gathers, rank 0 writes)."""
        if self.fsdp is not None:
            self.fsdp.save_pretrained(save_dir)
        elif self.dist.is_main:
            self.policy.save_pretrained(save_dir)

    # ------------------------------------------------------------------ the loop
    def run(self, until: Optional[int] = None) -> dict:
        """Train to ``train.steps`` (or stop after step ``until``) with the run hooks."""
        from .progress import StepProgress  # noqa: PLC0415

        cfg = self.cfg
        self.last_step = cfg.train.steps if until is None else min(until, cfg.train.steps)
        old_handler = _install_sigint(self._on_sigint)
        try:
            # a bar cannot redraw in a file or pipe: there the Logging hook prints a line per step instead;
            # each warning is shown once over the whole run (step-0 evaluation included)
            with StepProgress(total=cfg.train.steps, start=self.step_count,
                              enabled=cfg.logging.progress and self.dist.is_main and H.console_draws(self.console),
                              console=self.console) as self._bar, H.WarningsOnce():
                run_hooks = [self.evaluation, H.Logging(self._bar, cfg.logging.console_every, self.evaluation),
                             H.Checkpointing(cfg.checkpoint.every, cfg.train.steps)]
                if cfg.logging.plots:
                    run_hooks.append(H.Plots(self.run_dir, self.report.diagnostics, cfg.rollout.max_new_tokens))
                run_hooks = [h for h in run_hooks if self.dist.is_main or getattr(h, "all_ranks", False)]
                for hook in run_hooks:
                    getattr(hook, "before_run", lambda t: None)(self)
                while self.step_count < self.last_step and not self._stop_requested:
                    metrics = self.step()
                    for hook in run_hooks:
                        hook.after_step(self, self.last_batch, metrics)
        except KeyboardInterrupt:
            self.console.print(f"[red]interrupted during step {self.step_count + 1}; the newest complete "
                               f"checkpoint is {latest_checkpoint(self.ckpt_dir)}[/]")
            raise
        finally:
            self._bar = None
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
        finished = self.step_count >= cfg.train.steps
        path = self.save_checkpoint()
        if self._stop_requested:
            self.console.print(f"[yellow]stopped at step {self.step_count}; checkpoint {path}; continue with --resume[/]")
        if finished and cfg.checkpoint.save_final_model:
            self.save_model(os.path.join(self.run_dir, "model"))
        for hook in run_hooks:
            getattr(hook, "after_run", lambda t: None)(self)
        return self.dist.on_main(write_summary, cfg, self.run_dir, self.evaluation.before, self.evaluation.last,
                             steps=self.step_count, finished=finished, wall_seconds=self.wall_seconds(),
                             advantage=self.objective.advantage,
                             num_eval_prompts=min(cfg.eval.num_prompts, len(self.task.eval)))

    def note(self, text: str) -> None:
        """A line above the progress bar (or on the console when there is none)."""
        (self._bar.note if self._bar is not None else self.console.print)(text)

    def _on_sigint(self, signum, frame):
        if self._stop_requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop_requested = True
        self.console.print("\n[yellow]Ctrl-C: finishing this step, then writing a checkpoint "
                           "(press again to stop at once)[/]")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue with the same numbers."""
        return trainer_state(self)

    def save_checkpoint(self) -> str:
        state = self.state_dict()  # under torchrun every rank takes part (its RNG streams); rank 0 writes
        save_hf = self.cfg.checkpoint.save_hf
        full = self.fsdp.model_state_dict() if save_hf and self.fsdp is not None else None  # gathered by all

        def write(d: str) -> None:
            if save_hf and self.fsdp is not None:
                self.fsdp.save_pretrained(os.path.join(d, "model"), full)
            elif save_hf:
                self.policy.save_pretrained(os.path.join(d, "model"))
            torch.save(state, os.path.join(d, "state.pt"))

        return self.dist.on_main(save_checkpoint, self.ckpt_dir, self.step_count, write,
                                 keep_last=self.cfg.checkpoint.keep_last)

    def load_checkpoint(self, path: str) -> None:
        # weights_only=True; a checkpoint that fails to load falls back to the previous one
        where = "cpu" if self.fsdp is not None else self.policy.device  # fsdp: each rank keeps only its shards
        path, state = load_newest_state(os.path.dirname(path), where, self.console.print, newest=path)
        restore_trainer(self, state, path)
        self.console.print(f"resumed from {path} (step {self.step_count})")

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.t_start

    def close(self) -> None:
        self.logger.close()
        self.dist.close()


def _install_sigint(handler):
    try:
        return signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: Ctrl-C arrives as KeyboardInterrupt instead
        return None


def _diagnostics():
    """ratiorl.report.diagnostics, or None if it cannot be imported (diagnostics are optional)."""
    try:
        from ratiorl.report import diagnostics  # noqa: PLC0415
    except Exception:
        return None
    return diagnostics


def train(config: TrainConfig, resume: bool = False, until: Optional[int] = None, console=None,
          overwrite: bool = False) -> dict:
    """Run training from a config; returns the summary dict (also written to summary.json)."""
    trainer = Trainer(config, resume=resume, console=console, overwrite=overwrite)
    try:
        return trainer.run(until=until)
    finally:
        trainer.close()
