"""Length-aware rewards.

``cosine_length`` (Yeo et al. 2025, "Demystifying Long Chain-of-Thought Reasoning in LLMs",
the cosine reward): with progress ``p = min(len, max_length) / max_length`` and
``c = cos(pi p)``, a correct completion scores ``lo + (hi - lo)(1 + c)/2`` from
``correct_short`` (empty) down to ``correct_long`` (at ``max_length``), and a wrong one goes from
``wrong_short`` up to ``wrong_long``: short right answers are preferred, and a wrong answer
is punished less when the model kept thinking. Beyond ``max_length`` it scores ``exceed``
(None = the value at ``max_length``). Correctness is another registered reward
(``correctness``, default ``answer_match``) reaching ``threshold``. Length is counted in
characters (``unit: chars``) or whitespace-separated words (``unit: words``); the token-level
DAPO overlong penalty is ``reward.overlong_penalty`` (applied by the trainer, which sees token
counts).
"""

from __future__ import annotations

import math

from .base import get_reward, register_reward


def cosine_value(length: float, max_length: float, short: float, long: float) -> float:
    p = min(max(length, 0.0), max_length) / max_length
    return long + 0.5 * (short - long) * (1.0 + math.cos(math.pi * p))


@register_reward("cosine_length")
def cosine_length(*, max_length: int = 1000, unit: str = "chars", correct_short: float = 1.0,
                  correct_long: float = 0.5, wrong_short: float = -1.0, wrong_long: float = -0.5,
                  exceed: float | None = None, correctness: str = "answer_match", threshold: float = 1.0,
                  correctness_options: dict | None = None):
    """See the module docstring."""
    if max_length <= 0:
        raise ValueError(f"cosine_length: max_length must be > 0, got {max_length}")
    if unit not in ("chars", "words"):
        raise ValueError(f"cosine_length: unit must be chars or words, got {unit!r}")
    judge = get_reward(correctness, **dict(correctness_options or {}))

    def size(text: str) -> int:
        return len(text) if unit == "chars" else len(text.split())

    def cosine_length(completions, *, prompts=None, answers=None, **fields):
        ok = judge(completions, prompts=prompts, answers=answers, **fields)
        out = []
        for c, r in zip(completions, ok):
            n = size(str(c))
            right = r is not None and float(r) >= threshold
            if exceed is not None and n > max_length:
                out.append(float(exceed))
                continue
            short, long = (correct_short, correct_long) if right else (wrong_short, wrong_long)
            out.append(cosine_value(n, max_length, short, long))
        return out

    return cosine_length


__all__ = ["cosine_length", "cosine_value"]
