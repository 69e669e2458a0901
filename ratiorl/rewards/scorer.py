"""RewardScorer: weighted sum of reward functions, failure isolation, optional noise."""

from __future__ import annotations

import concurrent.futures
import logging
import math
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .base import Score, get_reward, register_reward
from .isolation import run_in_thread, worker_pool

_TIMEOUT_ERRORS = (TimeoutError, subprocess.TimeoutExpired, concurrent.futures.TimeoutError)


def _resolve(item) -> tuple[str, Callable, float]:
    """Accepts fn, "name", (fn_or_name, weight) or (name, weight, {options})."""
    options: dict[str, Any] = {}
    if isinstance(item, (tuple, list)):
        if len(item) == 2:
            target, weight = item
        elif len(item) == 3:
            target, weight, options = item
        else:
            raise ValueError(f"reward spec entry must be (fn_or_name, weight[, options]), got {item!r}")
    else:
        target, weight = item, 1.0
    if isinstance(target, str):
        fn = get_reward(target, **dict(options or {}))
        name = target
    elif callable(target):
        if options:
            raise ValueError("options can only be given with a reward name, not a function")
        fn = target
        name = getattr(target, "__name__", None) or type(target).__name__
    else:
        raise TypeError(f"reward must be a callable or a registered name, got {target!r}")
    weight = float(weight)
    if not math.isfinite(weight):
        raise ValueError(f"reward weight for {name!r} must be finite, got {weight}")
    return name, fn, weight


def parse_reward_spec(spec) -> list[tuple[str, Callable, float]]:
    """Normalise a reward spec into ``[(name, fn, weight), ...]`` with unique names."""
    if isinstance(spec, str) or callable(spec):
        spec = [spec]
    elif isinstance(spec, dict):
        spec = list(spec.items())
    entries = [_resolve(item) for item in spec]
    if not entries:
        raise ValueError("reward spec is empty; give at least one reward function")
    seen: dict[str, int] = {}
    out = []
    for name, fn, weight in entries:
        k = seen.get(name, 0)
        seen[name] = k + 1
        out.append((name if k == 0 else f"{name}_{k}", fn, weight))
    return out


def _slice_fields(fields: dict, i: int, batch: int) -> dict:
    return {k: ([v[i]] if isinstance(v, (list, tuple)) and len(v) == batch else v)
            for k, v in fields.items()}


def _one(completions, prompts, answers, fields, i: int) -> tuple:
    b = len(completions)
    return ([completions[i]], None if prompts is None else [prompts[i]],
            None if answers is None else [answers[i]], _slice_fields(fields, i, b))


def _clean(value) -> tuple[float, str | None]:
    """(score, problem) where problem is None, 'error' or 'timeout'."""
    if value is None:  # TRL convention: reward not applicable to this sample
        return 0.0, None
    if isinstance(value, tuple):  # (float, timed_out, error) from a worker process
        value = Score(value[0], timed_out=value[1], error=value[2])
    if getattr(value, "timed_out", False):
        return 0.0, "timeout"
    if getattr(value, "error", None):
        return 0.0, "error"
    try:
        x = float(value)
    except (TypeError, ValueError):
        return 0.0, "error"
    return (x, None) if math.isfinite(x) else (0.0, "error")


DEFAULT_TIMEOUT = 10.0  # seconds per sample for each reward function
REPORT_EVERY = 30.0  # seconds between two reports of the same reward and problem
_reported: dict = {}
_report_lock = threading.Lock()
logger = logging.getLogger("ratiorl.rewards")


def report_problem(name: str, problem: str, completion: str, detail) -> None:
    """A rate-limited warning naming the reward, the problem and the sample (first 200 chars)."""
    key = (name, problem)
    now = time.monotonic()
    with _report_lock:
        last, skipped = _reported.get(key, (None, 0))
        if last is not None and now - last < REPORT_EVERY:
            _reported[key] = (last, skipped + 1)
            return
        _reported[key] = (now, 0)
    more = f" ({skipped} more since the last report)" if skipped else ""
    what = "timed out" if problem == "timeout" else "failed"
    logger.warning("reward %r %s on a sample, scored 0%s: %s; sample: %r", name, what, more, detail,
                   str(completion)[:200])


def _per_sample(fn, completions, prompts, answers, fields, timeout):
    """Each sample alone, in a thread with its own budget: [(value, problem, detail)]."""
    out = []
    for i in range(len(completions)):
        c, p, a, f = _one(completions, prompts, answers, fields, i)
        status, value = run_in_thread(lambda: list(fn(c, prompts=p, answers=a, **f)), timeout)
        if status == "timeout":
            out.append((0.0, "timeout", f"over the {timeout:g} s budget"))
        elif status == "error":
            kind = "timeout" if isinstance(value, _TIMEOUT_ERRORS) else "error"
            out.append((0.0, kind, f"{type(value).__name__}: {value}"))
        elif len(value) != 1:
            out.append((0.0, "error", f"reward returned {len(value)} values for 1 completion"))
        else:
            out.append((value[0], None, None))
    return out


def call_reward_safely(fn: Callable, completions: list[str], prompts, answers, fields: dict, *,
                       timeout: float | None = DEFAULT_TIMEOUT, name: str | None = None
                       ) -> tuple[list[float], list[str | None]]:
    """Score the batch with ``fn`` under a per-sample time budget of ``timeout`` seconds.

    A reward declared ``isolate=True`` runs each sample in a worker process killed at the budget;
    any other runs the batch in a thread (deadline ``timeout x batch size``) and, if that raises
    or overruns, each sample alone with its own budget. ``timeout=None``: no budget (the batch is
    called in this thread). Returns the scores and, per sample, ``None`` / ``"error"`` /
    ``"timeout"``; a failed sample scores 0 and is reported (rate-limited warning with the
    sample). Never raises because of a completion.
    """
    b = len(completions)
    name = name or getattr(fn, "__name__", None) or type(fn).__name__
    if getattr(fn, "isolate", False) and b:
        target, options = getattr(fn, "rebuild", None) or (fn, None)
        key = (id(target), repr(sorted((options or {}).items())))
        samples = [_one(completions, prompts, answers, fields, i) for i in range(b)]
        raw = worker_pool().run(key, target, options, samples, timeout)
        triples = [(v[0], None, None) if p is None else (v, p, d) for v, p, d in raw]
    else:
        call = lambda: list(fn(completions, prompts=prompts, answers=answers, **fields))  # noqa: E731
        if timeout is None:
            try:
                status, values = "ok", call()
            except Exception as e:
                status, values = "error", e
        else:
            status, values = run_in_thread(call, timeout * max(1, b))
        if status == "ok" and len(values) == b:
            triples = [(v, None, None) for v in values]
        else:
            triples = _per_sample(fn, completions, prompts, answers, fields, timeout)
    scores, problems = [], []
    for i, (value, problem, detail) in enumerate(triples):
        score, found = (0.0, problem) if problem else _clean(value)
        if found and not problem:
            detail = f"returned {value!r}"
        if found:
            report_problem(name, found, completions[i], detail)
        scores.append(score)
        problems.append(found)
    return scores, problems


def weighted_sum(spec) -> Callable:
    """A single reward function computing ``sum_k w_k * fn_k`` per sample (no noise, no metrics).

    Failures of a component score 0 for that component, as in :class:`RewardScorer`.
    """
    entries = parse_reward_spec(spec)

    def weighted(completions, *, prompts=None, answers=None, **fields):
        total = [0.0] * len(completions)
        for _, fn, w in entries:
            scores, _ = call_reward_safely(fn, list(completions), prompts, answers, fields)
            total = [t + w * s for t, s in zip(total, scores)]
        return total

    return weighted


@dataclass
class RewardScores:
    """What :meth:`RewardScorer.score` returns for a batch of B completions.

    ``total``: float32 ``(B,)``, the weighted sum of the reward functions plus the noise (what
    training uses). ``per_function``: ``{name: float32 (B,)}``, each function's raw, unweighted
    score (0 where it failed), in spec order. ``metrics``: the scalar metrics of
    :class:`RewardScorer` (``reward/<name>``, ``reward_mean``, ``reward_errors``, ...).
    """

    total: torch.Tensor
    per_function: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


class RewardScorer:
    """Turn completions into a reward tensor, robustly.

    ``spec``: a list of ``(fn_or_name, weight)`` (or ``(name, weight, options)``), a single
    name/function, or a ``{name: weight}`` dict. ``noise_sigma`` adds ``N(0, sigma^2)`` noise to
    the weighted sum (for reward-noise robustness studies); the noise stream is reproducible
    from ``seed`` (successive calls draw successive noise).

    ``scorer.score(completions, prompts=..., answers=..., **fields)`` returns
    :class:`RewardScores` (the total, each function's raw scores, the metrics);
    ``scorer(completions, ...)`` returns ``(rewards, metrics)``, i.e. ``(scores.total,
    scores.metrics)``: ``rewards`` is a float32 tensor ``(B,)``; ``metrics`` has ``reward/<name>`` (mean of each
    function's raw score), ``reward_mean`` / ``reward_std`` (of the returned rewards),
    ``reward_clean_mean`` (before noise), ``reward_errors`` and ``reward_timeouts`` (counts
    of failed samples, summed over functions). Every function runs under a per-sample budget of
    ``timeout`` seconds (see :func:`call_reward_safely`); a reward function that raises or times
    out scores 0 for the affected samples and is reported with the sample (a rate-limited warning
    on the ``ratiorl.rewards`` logger); this call never raises because of a completion.
    ``rng_state()`` / ``set_rng_state(state)`` save and restore the noise stream (checkpoints).
    """

    def __init__(self, spec: Sequence | str | Callable | dict, noise_sigma: float = 0.0, seed: int = 0,
                 timeout: float | None = DEFAULT_TIMEOUT):
        self.entries = parse_reward_spec(spec)
        if timeout is not None and not (math.isfinite(float(timeout)) and timeout > 0):
            raise ValueError(f"timeout must be a number of seconds > 0 or None, got {timeout}")
        self.timeout = None if timeout is None else float(timeout)
        noise_sigma = float(noise_sigma)
        if not math.isfinite(noise_sigma) or noise_sigma < 0:
            raise ValueError(f"noise_sigma must be a finite number >= 0, got {noise_sigma}")
        self.noise_sigma = noise_sigma
        self.seed = int(seed)
        self._gen = torch.Generator().manual_seed(self.seed)

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.entries]

    def rng_state(self) -> torch.Tensor:
        """The state of the noise generator (a uint8 tensor), for :meth:`set_rng_state`."""
        return self._gen.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Restore a state from :meth:`rng_state`: the next calls draw the same noise as then."""
        self._gen.set_state(state)

    def __call__(self, completions: Sequence[str], *, prompts: Sequence[str] | None = None,
                 answers: Sequence[str] | None = None, **fields) -> tuple[torch.Tensor, dict]:
        scores = self.score(completions, prompts=prompts, answers=answers, **fields)
        return scores.total, scores.metrics

    def score(self, completions: Sequence[str], *, prompts: Sequence[str] | None = None,
              answers: Sequence[str] | None = None, **fields) -> RewardScores:
        """Score a batch: the noisy weighted total, each function's raw scores and the metrics."""
        completions = [c if isinstance(c, str) else str(c) for c in completions]
        b = len(completions)
        prompts = None if prompts is None else list(prompts)
        answers = None if answers is None else list(answers)
        for label, seq in (("prompts", prompts), ("answers", answers)):
            if seq is not None and len(seq) != b:
                raise ValueError(f"RewardScorer: {b} completions but {len(seq)} {label}")
        total = torch.zeros(b, dtype=torch.float64)
        metrics: dict[str, float] = {}
        per_function: dict[str, torch.Tensor] = {}
        errors = timeouts = 0
        for name, fn, weight in self.entries:
            scores, problems = call_reward_safely(fn, completions, prompts, answers, fields, timeout=self.timeout,
                                                  name=name)
            errors += sum(p == "error" for p in problems)
            timeouts += sum(p == "timeout" for p in problems)
            s = torch.tensor(scores, dtype=torch.float64)
            per_function[name] = s.to(torch.float32)
            metrics[f"reward/{name}"] = float(s.mean()) if b else 0.0
            total += weight * s
        metrics["reward_clean_mean"] = float(total.mean()) if b else 0.0
        if self.noise_sigma > 0 and b:
            total = total + self.noise_sigma * torch.randn(b, generator=self._gen, dtype=torch.float64)
        rewards = total.to(torch.float32)
        metrics["reward_mean"] = float(rewards.mean()) if b else 0.0
        metrics["reward_std"] = float(rewards.std(unbiased=False)) if b else 0.0
        metrics["reward_errors"] = int(errors)
        metrics["reward_timeouts"] = int(timeouts)
        return RewardScores(total=rewards, per_function=per_function, metrics=metrics)

    def __repr__(self) -> str:
        parts = ", ".join(f"({n!r}, {w})" for n, _, w in self.entries)
        return f"RewardScorer([{parts}], noise_sigma={self.noise_sigma}, seed={self.seed})"


@register_reward("weighted")
def _weighted_factory(*, components=()):
    """``get_reward("weighted", components=[("exact_match", 1.0), ("format", 0.1)])``."""
    return weighted_sum(list(components))
