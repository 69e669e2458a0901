"""Run untrusted Python (model completions) in a constrained child process.

This is a best-effort sandbox for reward computation on a machine you control, not a
security boundary against a determined attacker. What is enforced, layer by layer:

Always (Linux):
  * a fresh temporary directory as the working directory, deleted afterwards;
  * an environment stripped to ``PATH``, ``HOME``/``TMPDIR`` (the sandbox dir) and ``LANG``;
    the child runs ``python -I`` (ignores ``PYTHON*`` variables and user site-packages);
  * ``start_new_session=True``; on wall-clock timeout the whole process group is SIGKILLed;
  * resource limits (``setrlimit``): ``RLIMIT_AS`` (memory), ``RLIMIT_CPU`` (CPU seconds),
    ``RLIMIT_NPROC`` (processes), ``RLIMIT_FSIZE`` (largest file written, stdout included),
    ``RLIMIT_NOFILE``, ``RLIMIT_CORE = 0``;
  * a Python audit hook installed before the untrusted code runs, which raises
    ``PermissionError`` on: opening a file for writing (or creating, deleting, renaming,
    chmod-ing one) outside the sandbox dir; ``os.system``, ``subprocess``, ``os.exec*``,
    ``os.spawn*``, ``os.posix_spawn``, ``os.fork``/``forkpty``; ``os.kill``; creating a socket;
    loading a shared library through ``ctypes``.

When the parent runs as root:
  * the child drops to user ``nobody`` (uid/gid 65534, no supplementary groups) before the
    untrusted code runs, so file permissions protect everything not world-writable and
    ``RLIMIT_NPROC`` is actually enforced (the kernel ignores it for root). The modules in
    ``SandboxLimits.preload`` (common stdlib) are imported before the drop, because the
    interpreter may live where ``nobody`` cannot read (e.g. pyenv under ``/root``); other
    imports then work only if ``nobody`` can read them.

When ``unshare`` works (probed once; root, or unprivileged user namespaces):
  * a new network namespace (only a downed loopback: no network at all), and
  * a new PID namespace whose init is the sandbox runner: when it exits or is killed, every
    process the code left behind is killed by the kernel.

Not enforced: reading files the child's user can read; writing into world-writable
directories (``/tmp``, ``/dev/shm``) by means that bypass the audit hook (``os.open`` with
``dir_fd``, or code that defeats the hook in-process); the number of files created in the
sandbox dir; the hook is in-process Python, so C extensions can sidestep it (``ctypes`` is
blocked, but an importable compiled module could still call libc). Without root and without
user namespaces there is no network isolation beyond the socket hook, and leftover
processes that called ``setsid`` may outlive the timeout. The test code runs in the same
interpreter as the completion, so a completion can tamper with the checks (e.g. replace
builtins); treat scores from adversarial code accordingly.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

NOBODY = 65534

# Standard-library modules imported before the child drops privileges (see run_python).
PRELOAD_MODULES = (
    "abc", "array", "bisect", "calendar", "cmath", "collections", "collections.abc", "contextlib",
    "copy", "dataclasses", "datetime", "decimal", "enum", "fractions", "functools", "hashlib",
    "heapq", "io", "itertools", "json", "math", "numbers", "operator", "pprint", "queue", "random",
    "re", "statistics", "string", "struct", "textwrap", "time", "types", "typing", "unicodedata",
)


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one sandboxed run. ``cpu_s=None`` means ``ceil(timeout_s) + 1``."""

    timeout_s: float = 5.0
    cpu_s: int | None = None
    memory_mb: int = 512
    max_processes: int = 16
    max_file_mb: int = 16
    max_open_files: int = 64
    drop_privileges: bool = True   # as root: run the child as nobody
    preload: tuple[str, ...] = PRELOAD_MODULES
    namespaces: bool = True        # use unshare (network + PID namespaces) when it works

    def cpu_seconds(self) -> int:
        return int(self.cpu_s) if self.cpu_s is not None else int(-(-self.timeout_s // 1)) + 1


@dataclass
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    report: dict | None = None          # what the runner reported (None if it never did)
    isolation: list[str] = field(default_factory=list)
    seconds: float = 0.0


# The runner is passed with ``-c``; the job (nonce, code, tests) comes on stdin, so nothing the
# untrusted code could read or change sits on disk. It prints one line ``<nonce><json>``.
_RUNNER = r'''
import json, os, resource, signal, sys
job = json.loads(sys.stdin.read())
cfg = job.pop("cfg")
nonce = job.pop("nonce")

def setlim(res, soft, hard=None):
    hard = soft if hard is None else hard
    try:
        resource.setrlimit(res, (soft, hard))
    except (ValueError, OSError):
        pass

if os.getpid() == 1:
    # PID-namespace init: run the job in a child so ordinary signal rules apply to it; when we
    # exit, the kernel kills everything left in the namespace.
    pid = os.fork()
    if pid:
        while True:
            try:
                wpid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                os._exit(1)
            if wpid == pid:
                sys.stdout.flush()
                os._exit(os.waitstatus_to_exitcode(status) & 0xFF)

import importlib, traceback
for _name in cfg["preload"]:
    # Import before dropping privileges: the interpreter's stdlib may not be readable by nobody.
    try:
        importlib.import_module(_name)
    except Exception:
        pass
mb = 1024 * 1024
setlim(resource.RLIMIT_CORE, 0)
setlim(resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1)
setlim(resource.RLIMIT_FSIZE, cfg["max_file_mb"] * mb)
setlim(resource.RLIMIT_NOFILE, cfg["max_open_files"])
setlim(resource.RLIMIT_NPROC, cfg["max_processes"])
if cfg["drop_to"] is not None:
    os.setgroups([])
    os.setgid(cfg["drop_to"])
    os.setuid(cfg["drop_to"])
setlim(resource.RLIMIT_AS, cfg["memory_mb"] * mb)
signal.signal(signal.SIGXCPU, lambda *a: os._exit(124))

root = os.path.realpath(os.getcwd())
real_stdout = os.dup(1)
import _thread
_busy = set()  # threads currently inside the hook (its own os calls raise nested events)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
BLOCKED = ("os.system", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn",
           "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill",
           "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo",
           "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "sys.addaudithook")
PATH_EVENTS = {"os.remove": (0,), "os.rename": (0, 1), "os.mkdir": (0,), "os.rmdir": (0,),
               "os.chmod": (0,), "os.chown": (0,), "os.link": (0, 1), "os.symlink": (1,),
               "os.truncate": (0,), "os.utime": (0,), "shutil.rmtree": (0,), "os.chflags": (0,),
               "os.mkfifo": (0,), "os.mknod": (0,)}

def inside(path):
    if isinstance(path, int):
        return True
    try:
        p = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False
    return p == root or p.startswith(root + os.sep) or p == "/dev/null"

def hook(event, args):
    me = _thread.get_ident()
    if me in _busy:
        return
    _busy.add(me)
    try:
        if event == "open":
            path, mode, flags = (list(args) + [None, None, None])[:3]
            writing = (isinstance(mode, str) and any(ch in mode for ch in "wax+")) or (
                isinstance(flags, int) and flags & WRITE_FLAGS)
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory is not allowed")
        elif event.startswith(BLOCKED):
            raise PermissionError(f"sandbox: {event} is not allowed")
        elif event in PATH_EVENTS:
            for i in PATH_EVENTS[event]:
                if i < len(args) and not inside(args[i]):
                    raise PermissionError(f"sandbox: {event} on {args[i]!r} outside the sandbox directory is not allowed")
    finally:
        _busy.discard(me)

def report(obj):
    os.write(real_stdout, (nonce + json.dumps(obj) + "\n").encode())

if cfg["audit_hook"]:
    sys.addaudithook(hook)
ns = {"__name__": "__main__", "__builtins__": __builtins__}
tests = job["tests"]
result = {"loaded": False, "passed": 0, "total": len(tests), "errors": []}
try:
    exec(compile(job["code"], "solution.py", "exec"), ns)
    result["loaded"] = True
except BaseException as e:
    result["errors"].append("solution: " + "".join(traceback.format_exception_only(type(e), e)).strip()[-300:])
if result["loaded"]:
    for i, test in enumerate(tests):
        try:
            exec(compile(test, f"test_{i}", "exec"), ns)
            result["passed"] += 1
        except BaseException as e:
            result["errors"].append(f"test {i}: " + "".join(traceback.format_exception_only(type(e), e)).strip()[-300:])
try:
    sys.stdout.flush()
    sys.stderr.flush()
except BaseException:
    pass
report(result)
os._exit(0)
'''

_probe_lock = threading.Lock()
_probe_cache: dict[bool, list[str]] = {}


def namespace_prefix() -> list[str]:
    """The ``unshare`` command prefix that works here (probed once), or ``[]``."""
    is_root = os.geteuid() == 0
    with _probe_lock:
        if is_root in _probe_cache:
            return _probe_cache[is_root]
        found: list[str] = []
        exe = shutil.which("unshare")
        if exe and sys.platform.startswith("linux"):
            base = [exe, "--net", "--pid", "--fork", "--kill-child"]
            candidates = [base] if is_root else [[exe, "--user", "--map-root-user", *base[1:]]]
            candidates.append([exe, "--net"] if is_root else [exe, "--user", "--map-root-user", "--net"])
            for cand in candidates:
                try:
                    ok = subprocess.run([*cand, sys.executable, "-I", "-c", "pass"],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, timeout=10).returncode == 0
                except (OSError, subprocess.SubprocessError):
                    ok = False
                if ok:
                    found = cand
                    break
        _probe_cache[is_root] = found
        return found


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


def _kill_all(proc: subprocess.Popen, pid_namespace: bool) -> None:
    """Kill the child and everything it started; return once they are gone where we can tell.

    With a PID namespace, SIGKILL goes to the namespace's init first (the child of
    ``unshare``): the kernel kills every process in the namespace and ``unshare`` only reaps
    init once they are all gone, so waiting for ``unshare`` waits for the whole tree.
    Then the process group is killed, which covers the no-namespace case.
    """
    if pid_namespace and proc.poll() is None:
        for child in _children(proc.pid):
            try:
                os.kill(child, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        try:
            proc.kill()
        except ProcessLookupError:
            pass
    proc.wait()


def _read_tail(f, limit: int = 65536) -> str:
    f.flush()
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - limit))
    return f.read().decode("utf-8", errors="replace")


def run_python(code: str, tests: list[str] | None = None, limits: SandboxLimits | None = None,
               audit_hook: bool = True) -> SandboxResult:
    """Run ``code`` then each test snippet in one sandboxed interpreter; see the module doc.

    ``result.report`` is ``{"loaded": bool, "passed": int, "total": int, "errors": [...]}`` when
    the runner got to the end, else ``None`` (killed, timed out, crashed).
    ``audit_hook=False`` turns the in-process hook off (used to test the outer layers).
    """
    limits = limits or SandboxLimits()
    tests = list(tests or [])
    is_root = os.geteuid() == 0
    prefix = namespace_prefix() if limits.namespaces else []
    drop_to = NOBODY if (is_root and limits.drop_privileges and "--user" not in prefix) else None
    isolation = ["rlimits", "tempdir", "process-group"] + (["audit-hook"] if audit_hook else [])
    if drop_to is not None:
        isolation.append("uid-nobody")
    if "--net" in prefix:
        isolation.append("netns")
    if "--pid" in prefix:
        isolation.append("pidns")
    nonce = secrets.token_hex(16)
    job = {"nonce": nonce, "code": code, "tests": tests, "cfg": {
        "cpu_s": limits.cpu_seconds(), "memory_mb": int(limits.memory_mb),
        "max_processes": int(limits.max_processes), "max_file_mb": int(limits.max_file_mb),
        "max_open_files": int(limits.max_open_files), "drop_to": drop_to, "audit_hook": audit_hook,
        "preload": list(limits.preload)}}
    workdir = tempfile.mkdtemp(prefix="ratiorl-sandbox-")
    try:
        if drop_to is not None:
            os.chown(workdir, drop_to, drop_to)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
               "LANG": "C.UTF-8"}
        cmd = [*prefix, sys.executable, "-I", "-c", _RUNNER]
        start = time.monotonic()
        # stdout/stderr go to files the parent owns: RLIMIT_FSIZE bounds them, not our memory.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=out,
                                    stderr=err, start_new_session=True, close_fds=True)
            timed_out = False
            try:
                proc.communicate(json.dumps(job).encode(), timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # also kills stragglers left in the group after a normal exit
                _kill_all(proc, pid_namespace="--pid" in prefix)
            seconds = time.monotonic() - start
            stdout, stderr = _read_tail(out), _read_tail(err)
        report = None
        for line in stdout.splitlines():
            if line.startswith(nonce):
                try:
                    report = json.loads(line[len(nonce):])
                except json.JSONDecodeError:
                    report = None
        stdout = "\n".join(l for l in stdout.splitlines() if not l.startswith(nonce))
        return SandboxResult(returncode=proc.returncode, stdout=stdout, stderr=stderr,
                             timed_out=timed_out and report is None, report=report,
                             isolation=isolation, seconds=seconds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
