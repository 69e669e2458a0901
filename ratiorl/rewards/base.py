"""Reward-function registry.

A reward function has the TRL signature::

    fn(completions: list[str], *, prompts: list[str], answers: list[str], **fields) -> list[float]

Extra dataset columns arrive in ``fields`` as lists aligned with ``completions``. A function
may return a :class:`Score` (a ``float`` with ``timed_out`` / ``error`` flags) instead of a
plain float so that :class:`~ratiorl.rewards.RewardScorer` can count timeouts.

A new reward is one factory registered with :func:`register_reward`. The factory's keyword-only
parameters are the reward's options and their defaults the defaults::

    @register_reward("length_penalty")
    def length_penalty(*, per_char: float = 0.01):
        def length_penalty(completions, *, prompts=None, answers=None, **fields):
            return [-per_char * len(c) for c in completions]
        return length_penalty

``get_reward(name, **kw)`` checks ``kw`` against the factory's signature, calls the factory
with it and returns the reward function.

Capabilities are declared at registration: ``@register_reward("math_verify", isolate=True)`` runs
each sample in a worker process that is killed when it overruns the time budget (for verifiers
that can hang on hostile input); without it a reward runs in a thread of this process (cheap, but
an overrunning sample can only be abandoned). See :mod:`ratiorl.rewards.isolation`.
"""

from __future__ import annotations

from typing import Callable

from .._registry import Registry, check_options

RewardFn = Callable[..., list]


class Score(float):
    """A float reward that remembers whether it came from a timeout or an error."""

    timed_out: bool
    error: str | None

    def __new__(cls, value: float, *, timed_out: bool = False, error: str | None = None):
        obj = super().__new__(cls, value)
        obj.timed_out = timed_out
        obj.error = error
        return obj

    def __repr__(self) -> str:
        flags = " timed_out" if self.timed_out else f" error={self.error!r}" if self.error else ""
        return f"Score({float(self)}{flags})"


REWARDS = Registry("reward")


def register_reward(name: str, *, isolate: bool = False):
    """Decorator for a factory ``factory(*, option=default, ...) -> reward_fn``.

    ``isolate=True``: score each sample in a worker process with a hard kill at the time budget
    (the factory must be importable by module and name, as a decorated module-level function is)."""
    return REWARDS.register(name, isolate=bool(isolate))


def available_rewards() -> list[str]:
    return REWARDS.names()


def get_reward(name: str, **kw) -> RewardFn:
    """Return the reward function ``name`` configured with ``kw``.

    Unknown names raise ``ValueError`` listing the valid ones; unknown options raise
    ``TypeError`` listing the valid options (the factory's parameters) and the closest one.
    """
    factory = REWARDS.lookup(name)
    check_options("reward", name, factory, kw)
    fn = factory(**kw)
    if not getattr(fn, "__name__", None) or fn.__name__ == "<lambda>":
        fn.__name__ = name
    try:  # what the scorer reads: the declared capability, and how a worker process rebuilds fn
        fn.isolate = bool(getattr(factory, "isolate", False))
        fn.rebuild = (factory, dict(kw))
    except AttributeError:  # a callable object without a __dict__: runs in-process
        pass
    return fn


def check_answers(completions, answers, name: str) -> None:
    if answers is None:
        raise ValueError(f"reward {name!r} needs answers=[...] aligned with completions")
    if len(answers) != len(completions):
        raise ValueError(f"reward {name!r}: {len(completions)} completions but {len(answers)} answers")
