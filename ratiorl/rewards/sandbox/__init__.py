"""Run a completion's Python code against tests, with the verdict out of the completion's reach.

Two interpreters per run, each in its own sandbox (see :mod:`.launch`):

* the **worker** loads the completion's code and answers calls on it;
* the **evaluator** runs the test snippets. It never loads the completion's code: the names
  the completion defined are handles, and calling one sends plain-data arguments to the worker
  and turns the plain-data reply (exact builtin types only) into fresh values. So
  ``assert add(1, 2) == 3`` compares an ``int`` the evaluator built with ``3``; an object with an
  always-true ``__eq__`` cannot cross, and whatever the worker writes on its channel is only a
  return value, which a correct solution also chooses freely.

The parent (this process) reads the verdict from the evaluator's report pipe, which the worker
has no handle on and cannot reach (other PID, mount, user and network namespaces). Threat model:
docs/rewards_and_tasks.md, "The code sandbox".
"""

from __future__ import annotations

import json
import os
import select
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .launch import SandboxUnavailable, Sandboxed, check_bwrap

__all__ = ["SandboxLimits", "SandboxResult", "SandboxUnavailable", "run_tests", "run_python",
           "check_isolation", "ISOLATIONS"]

ISOLATIONS = ("bwrap", "process")
_HERE = Path(__file__).parent
_CODEC = (_HERE / "_codec.py").read_text()
WORKER_SOURCE = _CODEC + "\n" + (_HERE / "_worker.py").read_text()
EVALUATOR_SOURCE = _CODEC + "\n" + (_HERE / "_evaluator.py").read_text()


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one run (worker and evaluator). ``cpu_s=None`` means ``ceil(timeout_s) + 1``.

    ``max_processes`` counts processes and threads of the worker; with ``isolation="bwrap"``
    it applies to this run alone. ``tmp_mb`` is the size of the worker's tmpfs (host memory).
    """

    timeout_s: float = 5.0
    cpu_s: int | None = None
    memory_mb: int = 512
    max_processes: int = 64
    max_file_mb: int = 16
    max_open_files: int = 64
    tmp_mb: int = 16
    max_message_mb: int = 8
    evaluator_memory_mb: int = 1024
    isolation: str = "bwrap"

    def __post_init__(self):
        if self.isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {ISOLATIONS}, got {self.isolation!r}")

    def cpu_seconds(self) -> int:
        return int(self.cpu_s) if self.cpu_s is not None else int(-(-self.timeout_s // 1)) + 1


@dataclass
class SandboxResult:
    """``report``: ``{"loaded", "passed", "total", "errors", "results"}`` once the evaluator
    finished, else ``None`` (timed out or killed). ``stdout``/``stderr``: the worker's tails."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    report: dict | None = None
    isolation: str = "bwrap"
    seconds: float = 0.0
    results: list = field(default_factory=list)


def check_isolation(isolation: str = "bwrap") -> None:
    """Raise :class:`SandboxUnavailable` (naming the fix) if ``isolation`` cannot work here."""
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    if isolation == "bwrap":
        check_bwrap()


def _tail(f, limit: int = 65536) -> str:
    f.flush()
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - limit))
    return f.read().decode("utf-8", errors="replace")


def _read_report(proc, deadline: float) -> tuple[list[dict], bool]:
    """Lines from the evaluator's report pipe until it closes or the deadline passes."""
    fd, buf, lines = proc.stdout.fileno(), b"", []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return lines, True
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return lines, False
        buf += chunk
        *done, buf = buf.split(b"\n")
        for line in done:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if type(msg) is dict:
                lines.append(msg)
                if msg.get("done") is True or msg.get("loaded") is False:
                    return lines, False


def _summarise(lines: list[dict], n_tests: int) -> dict | None:
    head = next((m for m in lines if "loaded" in m), None)
    if head is None:
        return None
    results = [m for m in lines if type(m.get("test")) is int]
    done = any(m.get("done") is True for m in lines)
    if head["loaded"] is not True:
        return {"loaded": False, "passed": 0, "total": n_tests, "results": [],
                "errors": [str(head.get("error"))]}
    if not done or len(results) != n_tests:
        return None
    passed = sum(1 for m in results if m.get("passed") is True)
    errors = [f"test {m['test']}: {m.get('error')}" for m in results if m.get("passed") is not True]
    return {"loaded": True, "passed": passed, "total": n_tests, "errors": errors,
            "results": [m.get("passed") is True for m in results]}


def run_tests(code: str, tests: list[str], limits: SandboxLimits | None = None,
              setup: str = "") -> SandboxResult:
    """Load ``code`` in a sandboxed worker and run each test snippet in the sandboxed evaluator.

    ``setup`` runs in the evaluator (trusted side) before the tests, e.g. imports or helpers.
    Raises :class:`SandboxUnavailable` if ``limits.isolation`` cannot be set up here.
    """
    limits = limits or SandboxLimits()
    tests = [str(t) for t in tests]
    check_isolation(limits.isolation)
    cfg = {"cpu_s": limits.cpu_seconds(), "memory_mb": int(limits.memory_mb),
           "max_processes": int(limits.max_processes), "max_file_mb": int(limits.max_file_mb),
           "max_open_files": int(limits.max_open_files),
           "max_message_bytes": int(limits.max_message_mb) << 20,
           "evaluator_memory_mb": int(limits.evaluator_memory_mb)}
    to_worker_r, to_worker_w = os.pipe()
    to_eval_r, to_eval_w = os.pipe()
    start = time.monotonic()
    worker = evaluator = None
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            worker = Sandboxed(WORKER_SOURCE, [str(to_worker_r), str(to_eval_w)],
                               [to_worker_r, to_eval_w], limits.isolation, limits.tmp_mb,
                               stdout=out, stderr=err, drop=True)
            evaluator = Sandboxed(EVALUATOR_SOURCE, [str(to_eval_r), str(to_worker_w)],
                                  [to_eval_r, to_worker_w], limits.isolation, 1,
                                  stdout=-1, stderr=err, drop=False)
            for fd in (to_worker_r, to_worker_w, to_eval_r, to_eval_w):
                os.close(fd)
            to_worker_r = None
            for proc, job in ((worker.proc, {"code": str(code), "cfg": cfg}),
                              (evaluator.proc, {"tests": tests, "setup": str(setup), "cfg": cfg})):
                try:
                    proc.stdin.write(json.dumps(job).encode())
                    proc.stdin.close()
                except OSError:
                    pass
            lines, timed_out = _read_report(evaluator.proc, start + limits.timeout_s)
        finally:
            for box in (evaluator, worker):
                if box is not None:
                    box.kill()
            if to_worker_r is not None:
                for fd in (to_worker_r, to_worker_w, to_eval_r, to_eval_w):
                    try:
                        os.close(fd)
                    except OSError:
                        pass
        seconds = time.monotonic() - start
        stdout, stderr = _tail(out), _tail(err)
    report = _summarise(lines, len(tests))
    return SandboxResult(returncode=worker.proc.returncode, stdout=stdout, stderr=stderr,
                         timed_out=timed_out and report is None, report=report,
                         isolation=limits.isolation, seconds=seconds,
                         results=(report or {}).get("results", []))


def run_python(code: str, tests: list[str] | None = None, limits: SandboxLimits | None = None,
               setup: str = "") -> SandboxResult:
    """Alias of :func:`run_tests` (the previous name)."""
    return run_tests(code, list(tests or []), limits, setup)
