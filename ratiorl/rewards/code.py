"""``code_tests``: run a completion's Python code against test snippets in a sandbox."""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

from .base import Score, register_reward
from .sandbox import ISOLATIONS, SandboxLimits, check_isolation, run_tests

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
    return [text] if text.strip() else []


@register_reward("code_tests")
def code_tests(*, tests_field: str = "tests", mode: str = "fraction", setup: str = "",
               timeout_s: float = 5.0, memory_mb: int = 512, max_processes: int = 64,
               max_workers: int | None = None, extract: bool = True, isolation: str = "bwrap",
               missing_tests: str = "error"):
    """Score code completions by running tests against them in a sandbox.

    Tests for sample ``i`` come from ``fields[tests_field][i]`` (list of snippets such as
    ``"assert f(2) == 4"``, a JSON list, or one script), else from ``answers[i]``. The tests run
    in a separate interpreter from the completion's code; the completion's functions and
    objects are reached through handles that pass plain data only (see
    :mod:`ratiorl.rewards.sandbox`). ``setup`` runs on the test side before the tests (imports,
    helpers). The completion's last fenced code block is used when ``extract``.

    Score: ``mode="fraction"`` -> fraction of tests passed; ``mode="all"`` -> 1 if all pass.
    Code that fails to load scores 0. A run killed by the wall-clock timeout returns
    ``Score(0.0, timed_out=True)`` (counted as ``reward_timeouts`` by ``RewardScorer``).
    A sample without tests raises ``ValueError`` (``missing_tests="zero"``: scores 0 with an
    error flag); it never scores 1.

    ``isolation="bwrap"`` (default) needs bubblewrap and user namespaces and raises
    :class:`~ratiorl.rewards.sandbox.SandboxUnavailable` here, naming the fix, if they do not
    work; ``isolation="process"`` explicitly opts into a weaker sandbox.
    """
    if mode not in ("fraction", "all"):
        raise ValueError(f"code_tests: mode must be 'fraction' or 'all', got {mode!r}")
    if missing_tests not in ("error", "zero"):
        raise ValueError(f"code_tests: missing_tests must be 'error' or 'zero', got {missing_tests!r}")
    if isolation not in ISOLATIONS:
        raise ValueError(f"code_tests: isolation must be one of {ISOLATIONS}, got {isolation!r}")
    check_isolation(isolation)  # fail closed now, not at the first batch
    limits = SandboxLimits(timeout_s=float(timeout_s), memory_mb=int(memory_mb),
                           max_processes=int(max_processes), isolation=isolation)
    workers = max_workers or min(8, os.cpu_count() or 1)

    def score_one(index: int, completion: str, tests: list[str]) -> float:
        if not tests:
            if missing_tests == "zero":
                return Score(0.0, error="no tests")
            raise ValueError(f"code_tests: sample {index} has no tests (missing or empty "
                             f"{tests_field!r}); pass missing_tests='zero' to score such samples 0")
        code = extract_code(completion) if extract else str(completion)
        result = run_tests(code, tests, limits, setup=setup)
        if result.report is None:
            # Timed out, or the evaluator never finished: a failure of the completion.
            return Score(0.0, timed_out=True) if result.timed_out else 0.0
        rep = result.report
        if not rep["loaded"]:
            return 0.0
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
        jobs = [(i, str(c), _as_tests(t)) for i, (c, t) in enumerate(zip(completions, raw))]
        if len(jobs) <= 1 or workers <= 1:
            return [score_one(*job) for job in jobs]
        with ThreadPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            return list(pool.map(lambda job: score_one(*job), jobs))

    return code_tests
