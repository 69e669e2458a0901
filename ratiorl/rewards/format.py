"""Structure rewards: is the completion laid out as asked (``<think>`` reasoning, then an answer)?

- ``think_answer_format``: 1.0 for ``<think>...</think>`` followed by ``<answer>...</answer>``
  (nothing else around them but whitespace); with ``partial=true``, 0.25 for each of the four tags
  that appears exactly once instead (a denser signal early in training). ``think=false`` asks
  for the answer block alone.
- ``boxed_format``: 1.0 when the completion contains a non-empty ``\\boxed{...}``.
"""

from __future__ import annotations

import re

from .answers import last_boxed
from .base import register_reward


@register_reward("think_answer_format")
def think_answer_format(*, think: bool = True, partial: bool = False, think_tag: str = "think",
                        answer_tag: str = "answer"):
    """See the module docstring."""
    t, a = re.escape(think_tag), re.escape(answer_tag)
    body = rf"<{a}>.*?</{a}>"
    if think:
        body = rf"<{t}>.*?</{t}>\s*" + body
    full = re.compile(rf"\s*{body}\s*", re.DOTALL)
    tags = [f"<{answer_tag}>", f"</{answer_tag}>"]
    if think:
        tags = [f"<{think_tag}>", f"</{think_tag}>"] + tags

    def think_answer_format(completions, *, prompts=None, answers=None, **fields):
        out = []
        for c in completions:
            c = str(c)
            if partial:
                out.append(sum(c.count(tag) == 1 for tag in tags) / len(tags))
            else:
                out.append(1.0 if full.fullmatch(c) else 0.0)
        return out

    return think_answer_format


@register_reward("boxed_format")
def boxed_format():
    """1.0 when the completion has a non-empty ``\\boxed{...}``, else 0.0."""

    def boxed_format(completions, *, prompts=None, answers=None, **fields):
        return [1.0 if (last_boxed(str(c)) or "").strip() else 0.0 for c in completions]

    return boxed_format


__all__ = ["boxed_format", "think_answer_format"]
