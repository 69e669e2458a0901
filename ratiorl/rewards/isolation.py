"""Rewards under a per-sample time budget.

Two paths, chosen by what a reward declares (``@register_reward("math_verify", isolate=True)``, or
an ``isolate = True`` attribute on a plain function):

* **isolated** (CPU-bound verifiers that can hang: math-verify on hostile strings): each sample
  runs in a worker process; a sample over budget gets its worker killed (SIGKILL) and replaced,
  so the budget holds from any thread and whatever the verifier does. Workers come from the
  ``forkserver`` start method (forked from a clean server that imported ``ratiorl.rewards``), so a
  replacement costs milliseconds. As with any ``multiprocessing`` use, a script that trains with
  an isolated reward needs the ``if __name__ == "__main__":`` guard.
* **in-thread** (cheap rewards: exact match, regexes, length): the batch runs in a helper thread
  with a deadline of ``budget x batch size``; on an error or overrun each sample runs alone with
  its own budget. A thread cannot be killed: an overrunning sample is abandoned (scored 0) and
  finishes in the background, and C code that holds the GIL (a catastrophic regex) delays the
  deadline; declare such rewards ``isolate=True``.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import threading
import time
from multiprocessing.connection import wait
from typing import Callable, Optional

START_LIMIT = 120.0  # seconds for a new worker to be ready (not counted in any sample's budget)


def _plain(v):
    """A reward value reduced to picklable plain data: None, or (float, timed_out, error)."""
    if v is None:
        return None
    return (float(v), bool(getattr(v, "timed_out", False)), getattr(v, "error", None) or None)


def _worker(conn) -> None:  # runs in the worker process
    cache: dict = {}
    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        if msg[0] == "build":  # import and build the reward before any sample's clock starts
            _, key, target, options = msg
            try:
                cache[key] = target(**options) if options is not None else target
                conn.send(("built", None))
            except BaseException as e:  # noqa: BLE001
                conn.send(("error", f"{type(e).__name__}: {e}"[:500]))
            continue
        key, (completions, prompts, answers, fields) = msg
        try:
            fn = cache[key]
            out = list(fn(completions, prompts=prompts, answers=answers, **fields))
            if len(out) != len(completions):
                raise ValueError(f"reward returned {len(out)} values for {len(completions)} completions")
            reply = ("ok", [_plain(v) for v in out])
        except BaseException as e:  # noqa: BLE001 - reported to the parent with the sample
            reply = ("error", f"{type(e).__name__}: {e}"[:500])
        try:
            conn.send(reply)
        except Exception as e:  # an unpicklable value
            conn.send(("error", f"{type(e).__name__}: {e}"[:500]))


class _Worker:
    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child,), daemon=True, name="ratiorl-reward")
        self.proc.start()
        self.built: set = set()
        child.close()
        if not self.conn.poll(START_LIMIT) or self.conn.recv() != "ready":
            self.kill()
            raise RuntimeError("a reward worker process did not start")

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.join(5)
        finally:
            self.conn.close()

    def close(self) -> None:
        try:
            self.conn.send(None)
            self.proc.join(1)
        except Exception:
            pass
        if self.proc.is_alive():
            self.kill()
        else:
            self.conn.close()


class WorkerPool:
    """Worker processes shared by every isolated reward of this process; ``size`` at most busy
    per call. ``run(...)`` gives, per sample, ``(value, problem, detail)``."""

    def __init__(self, size: Optional[int] = None):
        self.size = max(1, size or min(8, os.cpu_count() or 1))
        self._idle: list = []
        self._lock = threading.Lock()
        self._ctx = None

    def _context(self):
        if self._ctx is None:
            if "forkserver" in mp.get_all_start_methods():
                self._ctx = mp.get_context("forkserver")
                self._ctx.set_forkserver_preload(["ratiorl.rewards"])
            else:
                self._ctx = mp.get_context("spawn")
        return self._ctx

    def _take(self):
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return _Worker(self._context())

    def _give(self, w) -> None:
        with self._lock:
            if len(self._idle) < self.size:
                self._idle.append(w)
                return
        w.close()

    def run(self, key, target: Callable, options: Optional[dict], samples: list, timeout: Optional[float]) -> list:
        """``samples``: ``[(completions, prompts, answers, fields)]`` of one completion each."""
        results: list = [None] * len(samples)
        todo = list(range(len(samples)))[::-1]
        busy: dict = {}  # conn -> (worker, index, deadline)
        try:
            while todo or busy:
                while todo and len(busy) < self.size:
                    i = todo.pop()
                    w = self._take()
                    problem = self._build(w, key, target, options)
                    if problem:
                        results[i] = (0.0, "error", problem)
                        continue
                    try:
                        w.conn.send((key, samples[i]))
                    except Exception as e:  # e.g. an unpicklable field
                        self._give(w)
                        results[i] = (0.0, "error", f"cannot send the sample to a worker: {e}")
                        continue
                    busy[w.conn] = (w, i, None if timeout is None else time.monotonic() + timeout)
                if not busy:
                    continue
                deadlines = [d for _, _, d in busy.values() if d is not None]
                left = None if not deadlines else max(0.0, min(deadlines) - time.monotonic())
                ready = wait(list(busy) + [w.proc.sentinel for w, _, _ in busy.values()], left)
                for conn in list(busy):
                    w, i, deadline = busy[conn]
                    if conn in ready or w.proc.sentinel in ready:
                        del busy[conn]
                        try:
                            status, payload = conn.recv()
                        except (EOFError, OSError):
                            w.kill()
                            results[i] = (0.0, "error", f"the reward worker died (exit code {w.proc.exitcode})")
                            continue
                        self._give(w)
                        results[i] = (payload, None, None) if status == "ok" else (0.0, "error", payload)
                    elif deadline is not None and time.monotonic() >= deadline:
                        del busy[conn]
                        w.kill()  # hard stop; a fresh worker takes its place on the next sample
                        results[i] = (0.0, "timeout", f"over the {timeout:g} s budget")
        finally:
            for w, _, _ in busy.values():
                w.kill()
        return results

    def _build(self, w, key, target, options) -> Optional[str]:
        """Build the reward in worker ``w`` once (not counted in any budget); a problem or None."""
        if key in w.built:
            return None
        try:
            w.conn.send(("build", key, target, options))
            status, payload = w.conn.recv() if w.conn.poll(START_LIMIT) else ("error", "build timed out")
        except Exception as e:  # unpicklable target, dead worker
            status, payload = "error", f"cannot build the reward in a worker process: {type(e).__name__}: {e}"
        if status != "built":
            w.kill()
            return payload
        w.built.add(key)
        return None

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for w in idle:
            w.close()


_POOL: Optional[WorkerPool] = None
_POOL_LOCK = threading.Lock()


def worker_pool() -> WorkerPool:
    """The process-wide pool of reward workers (created on first use, closed at exit)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = WorkerPool()
            atexit.register(_POOL.close)
        return _POOL


def run_in_thread(call: Callable, timeout: Optional[float]):
    """``("ok", value)``, ``("error", exception)`` or ``("timeout", None)`` of ``call()`` run in a
    daemon thread with a deadline (an overrunning thread is abandoned)."""
    box: list = []

    def target():
        try:
            box.append(("ok", call()))
        except BaseException as e:  # noqa: BLE001
            box.append(("error", e))

    t = threading.Thread(target=target, daemon=True, name="ratiorl-reward")
    t.start()
    t.join(timeout)
    return box[0] if box else ("timeout", None)
