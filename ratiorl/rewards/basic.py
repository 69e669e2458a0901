"""Answer-checking rewards: exact match, numeric match, regex format, math-verify."""

from __future__ import annotations

import math
import re

from .base import check_answers, register_reward

_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?(?:\s*/\s*\d+)?")


def parse_final_number(text: str) -> float | None:
    """The last number in ``text`` (``1,234``, ``-3.5``, ``1e-3`` and ``3/4`` understood), or None."""
    matches = _NUMBER.findall(str(text))
    for raw in reversed(matches):
        s = raw.replace(",", "").replace(" ", "")
        try:
            if "/" in s:
                num, den = s.split("/")
                return float(num) / float(den) if float(den) != 0 else None
            return float(s.rstrip(".")) if s.rstrip(".") not in ("", "+", "-") else None
        except ValueError:
            continue
    return None


@register_reward("exact_match")
def exact_match(*, strip: bool = True, case_sensitive: bool = True):
    """1.0 when the completion equals the answer (after ``str.strip`` by default), else 0.0."""

    def norm(s):
        s = str(s)
        s = s.strip() if strip else s
        return s if case_sensitive else s.casefold()

    def exact_match(completions, *, prompts=None, answers=None, **fields):
        check_answers(completions, answers, "exact_match")
        return [1.0 if norm(c) == norm(a) else 0.0 for c, a in zip(completions, answers)]

    return exact_match


@register_reward("numeric_match")
def numeric_match(*, atol: float = 1e-6, rtol: float = 0.0):
    """1.0 when the last number in the completion is within tolerance of the answer's last number.

    Tolerance: ``|got - want| <= max(atol, rtol * |want|)``. A completion without a number
    scores 0; an answer without a number raises ``ValueError`` (that is a data bug).
    """

    def numeric_match(completions, *, prompts=None, answers=None, **fields):
        check_answers(completions, answers, "numeric_match")
        out = []
        for c, a in zip(completions, answers):
            want = parse_final_number(a)
            if want is None:
                raise ValueError(f"numeric_match: answer {a!r} contains no number")
            got = parse_final_number(c)
            ok = got is not None and math.isfinite(got) and abs(got - want) <= max(atol, rtol * abs(want))
            out.append(1.0 if ok else 0.0)
        return out

    return numeric_match


@register_reward("format")
def format_reward(*, pattern: str = r"^\s*\S+\s*$", mode: str = "fullmatch", flags: int = re.DOTALL,
                  value: float = 1.0):
    """``value`` when the completion matches ``pattern`` (``mode``: fullmatch | match | search), else 0."""
    if mode not in ("fullmatch", "match", "search"):
        raise ValueError(f"format reward: mode must be fullmatch, match or search, got {mode!r}")
    regex = re.compile(pattern, flags)
    matcher = getattr(regex, mode)

    def format(completions, *, prompts=None, answers=None, **fields):
        return [value if matcher(str(c)) else 0.0 for c in completions]

    return format


@register_reward("math_verify", isolate=True)  # hangs on hostile strings: a killable worker
def math_verify_reward(*, float_rounding: int = 6, strict: bool = True, timeout_seconds: int = 5):
    """1.0 when ``math_verify.verify(parse(answer), parse(completion))`` holds.

    A bare LaTeX answer (``\\frac12``, no ``$``) is parsed as ``$\\frac12$``.
    Needs the ``math-verify`` package (``pip install 'ratiorl[math]'``). A completion that
    cannot be parsed scores 0. Declared ``isolate=True``: the scorer runs each sample in a worker
    process killed at the per-sample budget (parsing a hostile string can take seconds or hang);
    ``timeout_seconds`` is math-verify's own signal timeout, active in a main thread only.
    """
    try:
        from math_verify import parse, verify
    except ImportError as e:
        raise ImportError("the math_verify reward needs the 'math-verify' package: "
                          "pip install 'ratiorl[math]'") from e
    import threading

    def math_verify(completions, *, prompts=None, answers=None, **fields):
        check_answers(completions, answers, "math_verify")
        # math-verify's own timeouts use signals, which only work in the main thread.
        timeout = timeout_seconds if threading.current_thread() is threading.main_thread() else None
        out = []
        for c, a in zip(completions, answers):
            a = str(a)
            gold = parse(a, parsing_timeout=timeout)
            if not gold and "$" not in a:  # bare LaTeX gold such as \frac12: add delimiters
                gold = parse(f"${a}$", parsing_timeout=timeout)
            pred = parse(str(c), parsing_timeout=timeout)
            ok = bool(gold) and bool(pred) and verify(gold, pred, float_rounding=float_rounding,
                                                      strict=strict, timeout_seconds=timeout)
            out.append(1.0 if ok else 0.0)
        return out

    return math_verify
