"""Task dataclass and the task registry.

A task is a pair of disjoint prompt/answer splits plus a checker. Built-in tasks are
generated offline from a seed, so ``get_task(name, seed=s)`` always returns the same data.
A new task is one function decorated with :func:`register_task`::

    @register_task("my_task")
    def my_task(rng, *, n_train=1000, n_eval=200, width=3):
        ...
        return dict(train=[...], eval=[...], reward="exact_match", checker=my_checker)

The task's options are its keyword-only parameters (after the seeded ``rng``) and their defaults
the defaults; ``get_task`` checks the options it is given against that signature.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

from .._registry import Registry, check_options

Example = dict[str, Any]


def exact_checker(completion: str, answer: str) -> bool:
    """True when the completion equals the answer up to surrounding whitespace."""
    return str(completion).strip() == str(answer).strip()


@dataclass
class Task:
    """A verifiable task.

    ``train`` and ``eval`` are lists of dicts with at least ``"prompt"`` and ``"answer"``
    (built-in tasks also carry ``"completion"``: a reference completion, which is what a
    supervised warm-up should train on). ``reward`` is the default reward spec, something
    :class:`ratiorl.rewards.RewardScorer` accepts (a name or a list of ``(name, weight)``).
    """

    name: str
    train: list[Example]
    eval: list[Example]
    reward: Any = "exact_match"
    checker: Callable[[str, str], bool] = field(default=exact_checker, repr=False)
    config: dict[str, Any] = field(default_factory=dict)

    def check(self, completion: str, answer: str) -> bool:
        """Whether ``completion`` is a correct answer (never raises on odd completions)."""
        try:
            return bool(self.checker(completion, answer))
        except Exception:
            return False

    def __repr__(self) -> str:
        return (f"Task(name={self.name!r}, train={len(self.train)} examples, "
                f"eval={len(self.eval)} examples, reward={self.reward!r})")


TASKS = Registry("task")


def register_task(name: str):
    """Decorator: register ``fn(rng, *, option=default, ...) -> dict(train=..., eval=..., reward=...,
    checker=...)``.

    ``rng`` is a :class:`random.Random` seeded from the task name and the seed.
    """
    return TASKS.register(name)


def available_tasks() -> list[str]:
    return TASKS.names()


def get_task(name: str, seed: int = 0, **kw) -> Task:
    """Build the registered task ``name`` deterministically from ``seed``.

    Unknown names raise ``ValueError`` listing the valid ones; unknown options raise
    ``TypeError`` listing the options the task takes and the closest one.
    """
    fn = TASKS.lookup(name)
    check_options("task", name, fn, kw, skip=1)  # skip rng
    rng = random.Random(f"ratiorl.tasks/{name}/{int(seed)}")
    out = fn(rng, **kw)
    config = {"seed": int(seed), **kw}
    return Task(name=name, train=out["train"], eval=out["eval"],
                reward=out.get("reward", "exact_match"),
                checker=out.get("checker", exact_checker), config=config)


def unique_splits(rng: random.Random, draw: Callable[[random.Random], Example],
                  n_train: int, n_eval: int, space_size: int | None = None) -> tuple[list, list]:
    """Draw ``n_eval + n_train`` examples with distinct prompts and split them.

    The eval split is drawn first, so changing ``n_train`` leaves the eval split unchanged.

    ``draw(rng)`` returns one example; duplicates (same prompt) are redrawn, so the two splits
    never share a prompt. ``space_size`` (number of distinct prompts, if known) lets this fail
    fast when the request cannot be met.
    """
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train and n_eval must be >= 0, got {n_train}, {n_eval}")
    want = n_train + n_eval
    if space_size is not None and want > space_size:
        raise ValueError(f"asked for {want} distinct examples (n_train={n_train}, "
                         f"n_eval={n_eval}) but this task configuration only has {space_size}")
    seen: set[str] = set()
    examples: list[Example] = []
    attempts, max_attempts = 0, 100 * want + 1000
    while len(examples) < want:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(f"could only draw {len(examples)} distinct examples of {want} asked; "
                             "lower n_train/n_eval or make the task larger")
        ex = draw(rng)
        if ex["prompt"] in seen:
            continue
        seen.add(ex["prompt"])
        examples.append(ex)
    return examples[n_eval:], examples[:n_eval]
