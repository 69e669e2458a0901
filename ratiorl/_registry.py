"""A tiny name -> function registry, filled by decorators (in the spirit of verl's core_algos).

Every axis of an objective (weights, shapings, weighted rules, aggregations, KL estimators,
KL placements, advantage methods, presets), the reward functions and the tasks are each one
``Registry``. Adding a new loss is one decorated function::

    from ratiorl.objectives import WEIGHTS

    @WEIGHTS.register("my_weight", level="token")
    def my_weight(delta, info, *, alpha: float = 1.0):
        ...

An entry's hyperparameters are its keyword-only parameters with defaults (``keyword_options``),
and its capabilities are the keywords given to ``register`` (read back as attributes).
"""

from __future__ import annotations

import difflib
import functools
import inspect


class Registry(dict):
    """A ``dict`` of name -> callable with a decorator and errors that list the valid names."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str, **attrs):
        """Decorator: ``@REG.register("name", level="token")`` stores the function under ``name``
        and sets each keyword as an attribute on it (e.g. ``fn.level``)."""

        def deco(fn):
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            for k, v in attrs.items():
                setattr(fn, k, v)
            fn.registry_name = name
            self[name] = fn
            return fn

        return deco

    def get(self, name, default=None):  # noqa: D401 - dict API kept for `in`-style use
        return super().get(name, default)

    def lookup(self, name: str):
        """Return the entry for ``name`` or raise ``ValueError`` listing the valid names."""
        try:
            return self[name]
        except (KeyError, TypeError):
            raise ValueError(
                f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(sorted(self))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self)


def check_options(kind: str, name: str, fn, options: dict, skip: int = 0) -> None:
    """Raise ``TypeError`` listing the valid options when ``options`` has a keyword that ``fn``
    (after its first ``skip`` parameters) does not take; a ``**kwargs`` function takes anything."""
    params = list(inspect.signature(fn).parameters.values())[skip:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    valid = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"{kind} {name!r} got unknown option(s) {', '.join(map(repr, unknown))}"
                        f"{did_you_mean(unknown, valid)}; valid options: {', '.join(valid) or 'none'}")


def did_you_mean(unknown, valid) -> str:
    """``" (did you mean 'x'?)"`` for the closest valid name to the first unknown one, else ``""``."""
    for u in unknown:
        close = difflib.get_close_matches(str(u), [str(v) for v in valid], n=1)
        if close:
            return f" (did you mean {close[0]!r}?)"
    return ""


@functools.lru_cache(maxsize=None)
def keyword_options(fn, exclude=()) -> tuple[dict, bool]:
    """The options an entry declares: ``({name: default}, takes_any)`` for the keyword-only
    parameters of ``fn`` that have a default (minus ``exclude``); ``takes_any`` is True when ``fn``
    also takes ``**kwargs``."""
    params = inspect.signature(fn).parameters.values()
    opts = {p.name: p.default for p in params
            if p.kind is p.KEYWORD_ONLY and p.default is not p.empty and p.name not in exclude}
    return opts, any(p.kind is p.VAR_KEYWORD for p in params)


def check_keyword_options(kind: str, name: str, fn, options: dict, exclude=()) -> dict:
    """Validate ``options`` against the keyword-only options of ``fn``; return the resolved options
    (signature defaults updated with ``options``); the cached defaults are never mutated. Unknown keys raise ``ValueError`` naming the
    valid ones and the closest match."""
    defaults, takes_any = keyword_options(fn, exclude)
    unknown = sorted(set(options) - set(defaults))
    if unknown and not takes_any:
        raise ValueError(f"{kind} {name!r} got unknown option(s) {', '.join(map(repr, unknown))}"
                         f"{did_you_mean(unknown, defaults)}; valid options: {', '.join(defaults) or 'none'}")
    return {**defaults, **options}
