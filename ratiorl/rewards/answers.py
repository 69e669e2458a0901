"""Numeric answers written the way models and datasets write them.

``extract_answer`` finds the final answer of a completion (or of a dataset answer) in this order:
the last ``\\boxed{...}``, the text after the last ``####`` (GSM8K), the last ``<answer>...</answer>``,
the text after the last "answer is" / "answer:", and, when ``fallback`` is on, the whole text.
``parse_number`` then reads the last number of that text, ignoring what is not part of it:
thousands separators (``1,234``), currency and units (``$42``, ``42 km``, ``42%``), LaTeX
(``\\frac{3}{4}``, ``\\$``, ``\\text{ cm}``) and a trailing full stop.

The ``answer_match`` reward is 1.0 when the two numbers agree within tolerance, else 0.0.
"""

from __future__ import annotations

import math
import re

from .base import check_answers, register_reward

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_SLASH = re.compile(r"([-+]?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)\s*$")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*:?\s*(.+)", re.IGNORECASE)


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces balanced), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def extract_answer(text: str, *, fallback: bool = True) -> str | None:
    """The final-answer part of ``text`` (see the module docstring), or None when there is none."""
    text = str(text)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0] if tail else ""
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1]
    said = _ANSWER_IS.findall(text)
    if said:
        return said[-1]
    return text if fallback else None


def parse_number(text: str | None) -> float | None:
    """The last number in ``text`` with formatting removed (see the module docstring), or None."""
    if text is None:
        return None
    s = str(text)
    s = _FRAC.sub(lambda m: f"{m.group(1)}/{m.group(2)}", s)
    s = s.replace("\\$", " ").replace("\\%", " ").replace("\\!", "").replace("{,}", ",")
    s = re.sub(r"\\(?:text|mathrm|textbf|mbox)\{[^{}]*\}", " ", s)
    frac = _SLASH.search(s.strip().rstrip("."))
    if frac is not None and float(frac.group(2)) != 0:
        return float(frac.group(1)) / float(frac.group(2))
    found = _NUMBER.findall(s)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:  # pragma: no cover - the pattern only matches numbers
        return None


def numbers_match(got: float | None, want: float | None, atol: float = 1e-6, rtol: float = 1e-9) -> bool:
    return (got is not None and want is not None and math.isfinite(got)
            and abs(got - want) <= max(atol, rtol * abs(want)))


@register_reward("answer_match")
def answer_match(*, atol: float = 1e-6, rtol: float = 1e-9, fallback: bool = True):
    """1.0 when the completion's final answer equals the dataset answer as a number, else 0.0.

    Both sides go through ``extract_answer`` then ``parse_number`` (``\\boxed{1,234}``,
    ``#### 1234``, ``The answer is $1,234.``, ``1234 apples`` all read as 1234). ``fallback=False``
    gives credit only to a marked answer (boxed, ``####``, ``<answer>`` or "answer is"); with the
    default, the last number of the completion counts. An answer without a number raises
    ``ValueError`` (a data bug).
    """

    def answer_match(completions, *, prompts=None, answers=None, **fields):
        check_answers(completions, answers, "answer_match")
        out = []
        for c, a in zip(completions, answers):
            want = parse_number(extract_answer(a))
            if want is None:
                raise ValueError(f"answer_match: answer {a!r} contains no number")
            got = parse_number(extract_answer(c, fallback=fallback))
            out.append(1.0 if numbers_match(got, want, atol, rtol) else 0.0)
        return out

    return answer_match


__all__ = ["answer_match", "extract_answer", "last_boxed", "numbers_match", "parse_number"]
