"""``code_tests``: run a completion's Python code against test snippets in a sandbox."""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

from .base import Score, register_reward
from .sandbox import SandboxLimits, run_python

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(completion: str) -> str:
    """The last fenced code block (```python ... ```) if there is one, else the whole text."""
    blocks = _FENCE.findall(str(completion))
    return blocks[-1] if blocks else str(completion)


def _as_tests(raw) -> list[str]:
    """Tests may be a list of snippets, a JSON-encoded list, or one script (one test)."""
    if raw is None:
        return []
    if isinstance(raw, (list, tuple)):
        return [str(t) for t in raw]
    text = str(raw)
    if text.lstrip().startswith("["):
        try:
            parsed = json.loads(text)
            if isinstance(parsed, list):
                return [str(t) for t in parsed]
        except json.JSONDecodeError:
            pass
    return [text]


@register_reward("code_tests")
def code_tests(*, tests_field: str = "tests", mode: str = "fraction", setup: str = "",
               timeout_s: float = 5.0, memory_mb: int = 512, max_processes: int = 16,
               max_workers: int | None = None, extract: bool = True):
    """Score code completions by running tests in a sandboxed subprocess.

    Tests for sample ``i`` come from ``fields[tests_field][i]`` (list of snippets such as
    ``"assert f(2) == 4"``, a JSON list, or one script), else from ``answers[i]``. ``setup`` is
    run after the completion and before the tests (e.g. imports). The completion's last
    fenced code block is used when ``extract`` (else the raw text).

    Score: ``mode="fraction"`` -> fraction of tests passed; ``mode="all"`` -> 1 if all pass.
    Code that fails to run scores 0. A run killed by the wall-clock timeout returns
    ``Score(0.0, timed_out=True)``, counted as ``reward_timeouts`` by ``RewardScorer``.
    Sandbox guarantees and limits: see :mod:`ratiorl.rewards.sandbox`.
    """
    if mode not in ("fraction", "all"):
        raise ValueError(f"code_tests: mode must be 'fraction' or 'all', got {mode!r}")
    limits = SandboxLimits(timeout_s=float(timeout_s), memory_mb=int(memory_mb),
                           max_processes=int(max_processes))
    workers = max_workers or min(8, os.cpu_count() or 1)

    def score_one(completion: str, tests: list[str]) -> float:
        code = extract_code(completion) if extract else str(completion)
        if setup:
            code = code + "\n" + setup
        result = run_python(code, tests, limits)
        if result.report is None:
            # Timed out, or killed/exited before reporting (a memory or CPU limit, os._exit):
            # a failure of the completion, not of the reward function.
            return Score(0.0, timed_out=True) if result.timed_out else 0.0
        rep = result.report
        if not rep["loaded"]:
            return 0.0
        if rep["total"] == 0:
            return 1.0
        if mode == "all":
            return 1.0 if rep["passed"] == rep["total"] else 0.0
        return rep["passed"] / rep["total"]

    def code_tests(completions, *, prompts=None, answers=None, **fields):
        raw = fields.get(tests_field)
        if raw is None:
            raw = answers
        if raw is None or len(raw) != len(completions):
            raise ValueError(f"code_tests needs tests: a field {tests_field!r} (or answers) "
                             "with one entry per completion")
        jobs = [(str(c), _as_tests(t)) for c, t in zip(completions, raw)]
        if len(jobs) <= 1 or workers <= 1:
            return [score_one(c, t) for c, t in jobs]
        with ThreadPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            return list(pool.map(lambda job: score_one(*job), jobs))

    return code_tests
