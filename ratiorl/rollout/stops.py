"""Stop strings: a completion ends at the first occurrence of any of them in its decoded text.

``StopStrings(stop, tokenizer)`` is asked after every sampled token which rows it completed a stop
string for: the row's last tokens are decoded (``skip_special_tokens=True``, as the completion text
is) with and without the new token, and the token completes a stop string when that string occurs
in the first text but not in the second. The window holds ``4 * len(longest stop) + 2`` tokens,
enough for the stop string (a character is at most 4 byte-level tokens) plus one token in front of
it (a window's first token may decode differently than inside the full text: a SentencePiece
leading space, a cut multi-byte character); so a row stops at the first token whose full decoded
text contains a stop string, without decoding the whole completion at every step.

The sampler keeps the completing token and drops what follows it (masked as after EOS);
``cut(text)`` ends the completion text right after the first stop string, so the text keeps the
stop string but not characters the completing token carries beyond it (as vLLM does).
"""

from __future__ import annotations

import torch


class StopStrings:
    def __init__(self, stop: list, tokenizer):
        self.stop = list(stop)
        self.tokenizer = tokenizer
        self.window = 4 * max(len(s) for s in self.stop) + 2 if self.stop else 0

    def __bool__(self) -> bool:
        return bool(self.stop)

    def completed(self, tokens: torch.Tensor, rows: torch.Tensor, t: int) -> torch.Tensor:
        """Of ``rows`` (indices into ``tokens``, (R, T) with this step's tokens at column ``t``), a
        bool tensor: the token at ``t`` completes a stop string."""
        hit = torch.zeros(len(rows), dtype=torch.bool)
        if len(rows) == 0:
            return hit
        start = max(0, t + 1 - self.window)
        ids = tokens[rows.to(tokens.device), start: t + 1].tolist()
        dec = self.tokenizer.batch_decode
        new = dec(ids, skip_special_tokens=True)
        old = dec([r[:-1] for r in ids], skip_special_tokens=True)
        for i, (a, b) in enumerate(zip(new, old)):
            hit[i] = any(s in a and s not in b for s in self.stop)
        return hit

    def cut(self, text: str) -> str:
        """``text`` up to and including its first stop string (``text`` itself if it has none)."""
        ends = [i + len(s) for s in self.stop if (i := text.find(s)) >= 0]
        return text[: min(ends)] if ends else text


__all__ = ["StopStrings"]
