"""Built-in verifiable tasks, generated offline from a seed.

All text is short ASCII so that the default character-level model (printable ASCII plus
newline) can read and write it.

- ``addition``: ``"12+34="`` -> ``"46"``.
- ``chain``: a sum worked left to right, one step at a time:
  ``"12+34+5="`` -> completion ``"46+5=51"``, answer ``"51"``. Only the final number is
  checked, so a model that skips the working still gets credit.
- ``reverse``: ``"rev:1234="`` -> ``"4321"``.
"""

from __future__ import annotations

import re
import warnings

from .base import register_task, unique_splits

_FINAL_NUMBER = re.compile(r"[-+]?\d+")


def final_integer(text: str) -> int | None:
    """The integer after the last ``=`` (or the last integer if there is no ``=``)."""
    text = str(text).strip()
    tail = text.rsplit("=", 1)[-1].strip()
    if re.fullmatch(r"[-+]?\d+", tail):
        return int(tail)
    found = _FINAL_NUMBER.findall(text) if "=" not in text else []
    return int(found[-1]) if found else None


def final_answer_checker(completion: str, answer: str) -> bool:
    """True when the final integer of ``completion`` equals ``answer``."""
    got = final_integer(completion)
    return got is not None and got == int(str(answer).strip())


def clamp_sizes(task: str, n_train: int, n_eval: int, space: int) -> tuple[int, int]:
    """``(n_train, n_eval)`` that fit in ``space`` distinct prompts: when the default sizes do not
    fit, the eval split keeps at most a fifth of the space, training gets the rest, and a warning
    says so (``addition`` with ``n_digits: 1`` has only 100 distinct sums)."""
    if n_train + n_eval <= space:
        return n_train, n_eval
    eval_ = max(1, min(n_eval, space // 5))
    train = min(n_train, space - eval_)
    warnings.warn(f"{task}: default n_train={n_train} + n_eval={n_eval} distinct prompts but there are only "
                  f"{space}; using n_train={train}, n_eval={eval_}", UserWarning, stacklevel=3)
    return train, eval_


def _check_positive(**kw):
    for key, value in kw.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


@register_task("addition")
def addition(rng, *, n_digits: int = 2, n_train: int | None = None, n_eval: int = 200):
    """``a+b=`` with ``a, b`` uniform in ``[0, 10**n_digits)``; answer is the sum.

    ``n_train`` defaults to 1000, fewer (with a warning) when the sums run out (``n_digits: 1``
    has 100); sizes given explicitly that do not fit are an error."""
    _check_positive(n_digits=n_digits)
    hi = 10 ** n_digits
    if n_train is None:
        n_train, n_eval = clamp_sizes("addition", 1000, n_eval, hi * hi)

    def draw(r):
        a, b = r.randrange(hi), r.randrange(hi)
        return {"prompt": f"{a}+{b}=", "answer": str(a + b), "completion": str(a + b)}

    train, eval_ = unique_splits(rng, draw, n_train, n_eval, space_size=hi * hi)
    return dict(train=train, eval=eval_, reward="exact_match")


@register_task("chain")
def chain(rng, *, n_terms: int = 3, n_digits: int = 1, ops: str = "+",
          n_train: int = 1000, n_eval: int = 200):
    """``t1 op t2 op t3 ... =`` evaluated left to right (no precedence).

    The reference completion shows each step, e.g. prompt ``"3+4-2="`` and completion
    ``"7-2=5"``; ``answer`` is the final value (``"5"``). ``ops`` is a subset of ``"+-*"``.
    Reward: ``numeric_match`` on the final number.
    """
    _check_positive(n_terms=n_terms, n_digits=n_digits)
    if n_terms < 2:
        raise ValueError(f"n_terms must be >= 2, got {n_terms}")
    if not ops or set(ops) - set("+-*"):
        raise ValueError(f"ops must be a non-empty subset of '+-*', got {ops!r}")
    hi = 10 ** n_digits
    op_list = sorted(set(ops))

    def apply(x, op, y):
        return x + y if op == "+" else x - y if op == "-" else x * y

    def draw(r):
        terms = [r.randrange(hi) for _ in range(n_terms)]
        chosen = [r.choice(op_list) for _ in range(n_terms - 1)]
        prompt = str(terms[0]) + "".join(f"{o}{t}" for o, t in zip(chosen, terms[1:])) + "="
        value, steps = terms[0], []
        for i, (o, t) in enumerate(zip(chosen, terms[1:])):
            value = apply(value, o, t)
            rest = "".join(f"{o2}{t2}" for o2, t2 in zip(chosen[i + 1:], terms[i + 2:]))
            steps.append(f"{value}{rest}")
        return {"prompt": prompt, "answer": str(value), "completion": "=".join(steps)}

    space = hi ** n_terms * len(op_list) ** (n_terms - 1)
    train, eval_ = unique_splits(rng, draw, n_train, n_eval, space_size=space)
    return dict(train=train, eval=eval_, reward="numeric_match", checker=final_answer_checker)


@register_task("reverse")
def reverse(rng, *, min_len: int = 3, max_len: int = 6, n_train: int = 1000, n_eval: int = 200):
    """``rev:<digits>=`` -> the digits reversed; lengths uniform in ``[min_len, max_len]``."""
    _check_positive(min_len=min_len, max_len=max_len)
    if min_len > max_len:
        raise ValueError(f"min_len ({min_len}) must be <= max_len ({max_len})")

    def draw(r):
        s = "".join(r.choice("0123456789") for _ in range(r.randint(min_len, max_len)))
        return {"prompt": f"rev:{s}=", "answer": s[::-1], "completion": s[::-1]}

    space = sum(10 ** k for k in range(min_len, max_len + 1))
    train, eval_ = unique_splits(rng, draw, n_train, n_eval, space_size=space)
    return dict(train=train, eval=eval_, reward="exact_match")
