"""Hooks on the training loop: what varies between runs without branching inside the loop.

A hook has any of ``before_run(trainer)``, ``after_step(trainer, batch, metrics)`` (may add
metrics) and ``after_run(trainer)``, plus ``state_dict()`` / ``load_state_dict(state)`` when it
holds state that a checkpoint must restore. ``Trainer.step`` runs ``trainer.hooks`` (the KL
controller); ``Trainer.run`` adds the run hooks, in this order: evaluation, logging,
checkpoints, plots. Under data parallel (torchrun) the run hooks run on rank 0 only, except those
with ``all_ranks = True`` (checkpoints: every rank hands over its RNG streams, rank 0 writes).

Collectors (``OneDraw``, ``DynamicSampling``) decide how a step's batch is drawn from the
``sample`` and ``score`` stages.

Console: the rich console flushes after every line it prints, so a log file sees each line when
it is printed. A progress bar cannot redraw in a file or a pipe; there ``Logging`` prints a plain
line every step instead (or every ``logging.console_every`` steps). ``WarningsOnce`` shows each
distinct warning once while a run's loop runs: Python's own "show once per location" memory is
wiped whenever any code changes the warning filters (``warnings.catch_warnings``, which
matplotlib and torch enter often), so library warnings would otherwise come back every step.
"""

from __future__ import annotations

import os
import warnings


from ratiorl.rollout import Rollout


# ----------------------------------------------------------------------------- collectors


class OneDraw:
    """One sampled and scored batch of ``prompts_per_step`` groups."""

    def collect(self, draw, n_prompts: int) -> Rollout:
        batch = draw(n_prompts)
        batch.counters = {**batch.counters, "sampling/tries": 1.0, "sampling/kept_groups": float(batch.num_groups)}
        return batch


class DynamicSampling:
    """DAPO dynamic sampling (tutorial sec. 7.2): drop groups whose rewards are all equal (zero
    advantage, no gradient) and draw again until ``prompts_per_step`` informative groups are
    kept, at most ``max_tries`` draws. When every group of every draw was uniform, the last draw
    is used as it is (its advantages are 0)."""

    def __init__(self, max_tries: int):
        self.max_tries = max_tries

    def collect(self, draw, n_prompts: int) -> Rollout:
        kept, kept_groups, seen, tries, last, totals = [], 0, 0, 0, None, {}
        while kept_groups < n_prompts and tries < self.max_tries:
            batch = last = draw(n_prompts)
            tries += 1
            seen += batch.num_groups
            totals = {k: totals.get(k, 0.0) + v for k, v in batch.counters.items()}  # every draw's cost
            ids, std = batch.group_reward_std()
            varies = {int(g) for g, sd in zip(ids, std) if sd > 1e-6}
            informative = [g for g in batch.groups() if g in varies]
            if informative:
                kept.append(batch.select_groups(informative))
                kept_groups += len(informative)
        if kept:
            batch = Rollout.concat(kept)
            batch = batch.select_groups(batch.groups()[:n_prompts])
        else:
            batch = last
        batch.counters = {**totals, "sampling/tries": float(tries), "sampling/kept_groups": float(batch.num_groups),
                          "sampling/seen_groups": float(seen)}
        return batch


# ----------------------------------------------------------------------------- step hooks


class KLControl:
    """Moves the objective's beta after each step from the observed KL (``metrics["kl"]``): fixed,
    primal-dual or adaptive controller (``ratiorl.FixedBeta`` / ``PrimalDualBeta`` / ``AdaptiveBeta``)."""

    def __init__(self, controller):
        self.controller = controller

    def after_step(self, trainer, batch, metrics) -> None:
        if "kl" not in metrics:
            return
        beta = self.controller.update(metrics["kl"])
        if beta != trainer.objective.beta:
            trainer.set_objective(trainer.objective.replace(beta=float(beta)))

    def state_dict(self) -> dict:
        return {"controller": dict(vars(self.controller))}

    def load_state_dict(self, state: dict) -> None:
        vars(self.controller).update(state["controller"])


# ----------------------------------------------------------------------------- run hooks


class Evaluation:
    """avg@k, pass@k and greedy accuracy before training, every ``eval.every`` steps and at the end."""

    def __init__(self, evaluate, eval_cfg, total_steps: int):
        self.evaluate, self.cfg, self.total = evaluate, eval_cfg, total_steps
        self.before: dict = {}
        self.last: dict = {}

    def before_run(self, trainer) -> None:
        if trainer.step_count == 0 and self.cfg.before and not self.before:
            self.before = self.last = self.evaluate()
            trainer.logger.log(0, self.before)
            trainer.console.print("step 0: " + eval_line(self.before))

    def after_step(self, trainer, batch, metrics) -> None:
        s = trainer.step_count
        if (self.cfg.every > 0 and s % self.cfg.every == 0) or s == self.total:
            self.last = self.evaluate()
            metrics.update(self.last)
            trainer.note(f"step {s}: " + eval_line(self.last))

    def state_dict(self) -> dict:
        return {"before": self.before, "last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.before, self.last = state["before"], state["last"]


_PLAIN_SHOWWARNING = warnings.showwarning


class WarningsOnce:
    """While installed (``with WarningsOnce():`` or ``install()`` / ``uninstall()``), each distinct
    warning (category, message, file, line) is shown once; later ones are dropped. It wraps
    ``warnings.showwarning``, which runs only for warnings the filters let through, and which
    ``warnings.catch_warnings`` restores on exit, so it outlives the filter changes that make
    Python forget what it has shown."""

    def __init__(self):
        self.seen: set = set()
        self._previous = None
        self._active = False
        self._hook = self._show

    def _show(self, message, category, filename, lineno, file=None, line=None):
        key = (category, str(message), filename, lineno)
        if key in self.seen:
            return
        self.seen.add(key)
        # uninstalled while another hook installed over this one still forwards here: show it plainly
        (self._previous or _PLAIN_SHOWWARNING)(message, category, filename, lineno, file, line)

    def install(self) -> "WarningsOnce":
        self._active = True
        if self._previous is None:
            self._previous = warnings.showwarning
            warnings.showwarning = self._hook
        return self

    def uninstall(self) -> None:
        self._active = False
        if self._previous is not None and warnings.showwarning is self._hook:
            restored = self._previous  # skip hooks below that were uninstalled while covered by this one
            while isinstance(getattr(restored, "__self__", None), WarningsOnce) and not restored.__self__._active:
                restored = restored.__self__._previous or _PLAIN_SHOWWARNING
            warnings.showwarning = restored
            self._previous = None
        # else another hook was installed over this one and still forwards to it: keep forwarding

    __enter__ = install

    def __exit__(self, *exc) -> None:
        self.uninstall()


def console_draws(console) -> bool:
    """Whether a progress bar can redraw on ``console`` (a terminal, not a file or a pipe)."""
    return bool(getattr(console, "is_terminal", False)) and not getattr(console, "is_dumb_terminal", False)


class Logging:
    """metrics.jsonl / TensorBoard (``trainer.logger``), the progress bar and a console line every
    ``logging.console_every`` steps; every step when ``logging.progress`` asks for a bar that
    cannot draw (the console is a file or a pipe) and ``console_every`` is 0. (The trainer shows
    each warning once over the run's loop with ``WarningsOnce``.)"""

    def __init__(self, bar, console_every: int, evaluation: Evaluation):
        self.bar, self.console_every, self.evaluation = bar, console_every, evaluation

    def after_step(self, trainer, batch, metrics) -> None:
        s = trainer.step_count
        trainer.logger.log(s, metrics)
        self.bar.update(s, metrics, self.evaluation.last)
        every = self.console_every
        if not every and trainer.cfg.logging.progress and not console_draws(trainer.console):
            every = 1  # a bar shows nothing until the end in a file: a line per step instead
        if every and s % every == 0:
            self.bar.note(console_line(s, metrics))


class Checkpointing:
    """A checkpoint every ``checkpoint.every`` steps (the final one is written by ``run``)."""

    all_ranks = True  # a collective under torchrun (``Trainer.save_checkpoint`` gathers, rank 0 writes)

    def __init__(self, every: int, total_steps: int):
        self.every, self.total = every, total_steps

    def after_step(self, trainer, batch, metrics) -> None:
        s = trainer.step_count
        if self.every > 0 and s % self.every == 0 and s < self.total:
            trainer.save_checkpoint()


class Plots:
    """Learning curves and the importance-weight diagnostics plots after each evaluation: clip rate
    by position (CTPO Fig. 1), weight histograms (SNIB Fig. 2), gradient norm by length (SNIB
    Table 4a) and, for gradient-weight shapings, F(r) (DGPO Fig. 2)."""

    def __init__(self, run_dir: str, diagnostics, max_new_tokens: int):
        self.run_dir, self.diagnostics, self.max_new_tokens = run_dir, diagnostics, max_new_tokens

    def after_step(self, trainer, batch, metrics) -> None:
        if "eval/avg@k" in metrics and trainer.step_count < trainer.last_step:
            self.draw(trainer, batch)

    def after_run(self, trainer) -> None:
        self.draw(trainer, trainer.last_batch)

    def draw(self, trainer, batch) -> None:
        from ratiorl.report.plots import plot_learning_curves  # noqa: PLC0415

        from .stages.report import diagnostic_rows  # noqa: PLC0415

        try:
            plot_learning_curves(self.run_dir)
        except Exception as e:  # a plot must never stop training
            trainer.console.print(f"[yellow]plotting failed: {type(e).__name__}: {e}[/]")
        if self.diagnostics is None or batch is None or batch.policy_logp is None:
            return
        rows = diagnostic_rows(batch)
        try:
            self.diagnostics.plot_step(trainer.objective, rows.policy_logp, rows.old_logp, rows.advantages,
                                       rows.completion_mask, rows.group_ids, out_dir=os.path.join(self.run_dir, "plots"),
                                       max_new_tokens=self.max_new_tokens, label=f"step {trainer.step_count}")
        except Exception as e:  # a plot must never stop training
            trainer.console.print(f"[yellow]diagnostics plots failed: {type(e).__name__}: {e}[/]")


# ----------------------------------------------------------------------------- lines


def eval_line(ev: dict) -> str:
    k = int(ev.get("eval/k", 0))
    s = f"avg@{k} {ev['eval/avg@k']:.3f}  pass@{k} {ev['eval/pass@k']:.3f}"
    if "eval/greedy_acc" in ev:
        s += f"  greedy {ev['eval/greedy_acc']:.3f}"
    return s


def console_line(step: int, m: dict) -> str:
    parts = [f"step {step}", f"reward {m['reward/mean']:.3f}", f"acc {m['accuracy']:.3f}", f"loss {m['loss']:.4f}"]
    if "kl" in m:
        parts.append(f"kl {m['kl']:.4f}")
    if "objective/clip_frac" in m:
        parts.append(f"clip {m['objective/clip_frac']:.3f}")
    return "  ".join(parts)


__all__ = ["OneDraw", "DynamicSampling", "KLControl", "Evaluation", "Logging", "Checkpointing", "Plots",
           "WarningsOnce", "console_draws", "eval_line", "console_line"]
