"""A tiny name -> function registry, filled by decorators (in the spirit of verl's core_algos).

Every axis of an objective (weights, shapings, weighted rules, aggregations, KL estimators,
KL placements, advantage methods, presets), the reward functions and the tasks are each one
``Registry``. Adding a new loss is one decorated function::

    from ratiorl.objectives import WEIGHTS

    @WEIGHTS.register("my_weight", level="token")
    def my_weight(delta, info, obj):
        ...
"""

from __future__ import annotations

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
        raise TypeError(f"{kind} {name!r} got unknown option(s) {', '.join(map(repr, unknown))}; "
                        f"valid options: {', '.join(valid) or 'none'}")
