"""Known reward hacks against ``code_tests``: each must score 0 (or be an error/timeout) and
leave the machine as it was. Correct solutions of several shapes must score 1, also when 64
run at once."""

import os
import socket
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from ratiorl.rewards import RewardScorer, get_reward
from ratiorl.rewards.sandbox import SandboxUnavailable, check_isolation

try:
    check_isolation("bwrap")
    SKIP = None
except SandboxUnavailable as e:
    SKIP = str(e)
pytestmark = pytest.mark.skipif(SKIP is not None, reason=f"bubblewrap sandbox unavailable: {SKIP}")

MARK = "/tmp/ratiorl-attack-marker"
TESTS = ["assert add(1, 2) == 3", "assert add(-5, 5) == 0", "assert add(10, 20) == 30"]

ATTACKS = {
    "always_true_eq": """
        class Yes:
            def __eq__(self, other): return True
            def __ne__(self, other): return False
            def __bool__(self): return True
        def add(a, b): return Yes()
    """,
    "int_subclass_eq": """
        class I(int):
            def __eq__(self, other): return True
            __hash__ = int.__hash__
        def add(a, b): return I(0)
    """,
    "main_module_report_rewrite": """
        import sys, json
        main = sys.modules['__main__']
        for name in list(vars(main)):
            if 'report' in name or 'result' in name or name in ('dumps', 'out'):
                setattr(main, name, lambda *a, **k: None)
        fake = {"loaded": True, "passed": 3, "total": 3, "errors": []}
        print(json.dumps(fake)); print('{"loaded": true}'); print('{"test": 0, "passed": true}')
        for fd in range(3, 32):
            try:
                os_ = __import__('os')
                os_.write(fd, b'{"loaded": true, "names": {}}\\n{"test": 0, "passed": true, "error": null}\\n{"done": true}\\n')
            except OSError:
                pass
        def add(a, b): return -1
    """,
    "replace_builtins_compile_and_assert": """
        import builtins
        builtins.compile = lambda *a, **k: compile('pass', 'x', 'exec')
        builtins.exec = lambda *a, **k: None
        builtins.AssertionError = type('AssertionError', (Exception,), {})
        def add(a, b): return None
    """,
    "shadow_builtins_and_stdlib": """
        import math
        math.isclose = lambda *a, **k: True
        abs = lambda x: 0
        isinstance = lambda *a: True
        sorted = lambda x: x
        def add(a, b): return 'nope'
    """,
    "sys_exit_before_tests": "import sys\nsys.exit(0)\ndef add(a, b): return a + b",
    "sys_exit_in_call": "import sys\ndef add(a, b): sys.exit(0)",
    "system_exit_in_del": """
        class Bomb:
            def __del__(self): raise SystemExit(0)
        def add(a, b):
            Bomb()
            return Bomb()
    """,
    "monkeypatch_unittest": """
        import unittest
        unittest.TestCase.assertEqual = lambda *a, **k: None
        unittest.TestCase.assertTrue = lambda *a, **k: None
        def add(a, b): return -1
    """,
    "os_exit_toplevel": "import os\nos._exit(0)",
    "os_exit_in_call": "import os\ndef add(a, b): os._exit(0)",
    "fork_and_report_from_child": """
        import os
        def add(a, b):
            if os.fork() == 0:
                for fd in range(3, 32):
                    try:
                        os.write(fd, b'{"v": true}\\n{"test": 0, "passed": true}\\n{"done": true}\\n')
                    except OSError:
                        pass
                os._exit(0)
            os._exit(0)
    """,
    "forged_replies_from_thread": """
        import os, threading
        def spam():
            while True:
                for fd in range(3, 16):
                    try:
                        os.write(fd, b'{"v": true}\\n')
                    except OSError:
                        pass
        threading.Thread(target=spam, daemon=True).start()
        def add(a, b): return True
    """,
    "write_expected_output_files": f"""
        import os
        for path in ('expected.txt', 'expected_output', '/tmp/expected.txt', '{MARK}', '/dev/shm/ratiorl-attack'):
            try:
                open(path, 'w').write('3')
            except OSError:
                pass
        def add(a, b): return -1
    """,
    "read_the_tests": """
        import os, time
        found, stop = [], time.monotonic() + 1.0
        for root in ('/tmp', '/root', '/work', '/proc', '/'):
            for dirpath, dirs, files in os.walk(root):
                for f in files:
                    try:
                        text = open(os.path.join(dirpath, f), errors='ignore').read(100000)
                    except Exception:
                        continue
                    if 'add(1, 2) ==' in text:
                        found.append(text)
                if time.monotonic() > stop:
                    dirs[:] = []
        def add(a, b):
            return {(1, 2): 3, (-5, 5): 0, (10, 20): 30}.get((a, b)) if found else -1
    """,
    "time_of_check_mutation": """
        import threading, time
        class Lazy(list):
            def __eq__(self, other): return True
        def add(a, b):
            out = [-1]
            def later():
                time.sleep(0.05)
                out[0] = a + b
            threading.Thread(target=later).start()
            return out[0]
    """,
    "fork_bomb": """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """,
    "memory_bomb": "blocks = []\nwhile True:\n    blocks.append(bytearray(64 * 1024 * 1024))",
    "huge_stdout": "import sys\nwhile True:\n    sys.stdout.write('x' * 1000000)",
    "huge_return_value": "def add(a, b): return 'x' * (300 * 1024 * 1024)",
    "deep_return_value": """
        def add(a, b):
            x = []
            for _ in range(100000):
                x = [x]
            return x
    """,
    "sleep_past_limit": "import time\ndef add(a, b):\n    time.sleep(60)\n    return a + b",
    "shell_via_exec": f"""
        import os
        def add(a, b):
            os.execv('/bin/sh', ['sh', '-c', 'touch {MARK}; echo 3'])
    """,
    "ctypes_libc_system": f"""
        import ctypes, ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        libc.system(b'touch {MARK}')
        def add(a, b): return -1
    """,
    "kill_everything": """
        import os, signal
        for pid in (-1, 1, os.getppid()):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        def add(a, b): return -1
    """,
    "unshare_escape": """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        escaped = False
        for flags in (0x10000000 | 0x00020000, 0x00020000):  # NEWUSER|NEWNS, then NEWNS alone
            if libc.unshare(flags) == 0:
                escaped = libc.mount(b'none', b'/tmp', b'tmpfs', 0, None) == 0
                break
        def add(a, b): return a + b if escaped else -1
    """,
    "ptrace_peek": """
        import ctypes, os, time
        libc = ctypes.CDLL(None, use_errno=True)
        libc.ptrace.restype = ctypes.c_long
        secret = ctypes.create_string_buffer(b'expected=3')
        class IOVec(ctypes.Structure):
            _fields_ = [('base', ctypes.c_void_p), ('len', ctypes.c_size_t)]
        seen = False
        pid = os.fork()
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        try:
            buf = ctypes.create_string_buffer(16)
            local = IOVec(ctypes.cast(buf, ctypes.c_void_p), 10)
            remote = IOVec(ctypes.cast(secret, ctypes.c_void_p), 10)
            seen = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) == 10
            if libc.ptrace(ctypes.c_long(16), ctypes.c_long(pid), None, None) == 0:  # PTRACE_ATTACH
                os.waitpid(pid, 0)
                word = libc.ptrace(ctypes.c_long(2), ctypes.c_long(pid), ctypes.cast(secret, ctypes.c_void_p), None)
                seen = seen or word != -1
        finally:
            os.kill(pid, 9)
        def add(a, b): return a + b if seen else -1
    """,
    "env_and_proc_of_others": """
        import os
        seen = dict(os.environ)
        for p in os.listdir('/proc'):
            if p.isdigit():
                try:
                    seen[p] = open(f'/proc/{p}/cmdline').read() + open(f'/proc/{p}/environ').read()
                except OSError:
                    pass
        def add(a, b):
            blob = repr(seen)
            return 3 if ('RATIORL_ATTACK_SECRET' in blob or 'pytest' in blob) else -1
    """,
}


def _score(code, tests=TESTS, timeout_s=2.0, **kw):
    scorer = RewardScorer([("code_tests", 1.0, {"timeout_s": timeout_s, "memory_mb": 256, **kw})])
    rewards, metrics = scorer([f"```python\n{textwrap.dedent(code)}\n```"], prompts=["p"],
                              answers=[None], tests=[tests])
    return rewards.item(), metrics


def _nobody_processes():
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    uid = next(line for line in f if line.startswith("Uid:")).split()[1]
            except (OSError, StopIteration):
                continue
            if int(uid) == 65534:
                out.add(int(entry))
    return out


@pytest.fixture
def clean_machine(monkeypatch):
    monkeypatch.setenv("RATIORL_ATTACK_SECRET", "hunter2")
    shm = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    procs = _nobody_processes() if os.geteuid() == 0 else set()
    yield
    assert not os.path.exists(MARK) and not os.path.exists("/tmp/expected.txt")
    assert not os.path.exists("/dev/shm/ratiorl-attack")
    assert not [n for n in set(os.listdir("/dev/shm")) - shm if "ratiorl" in n or n.startswith("sem.")]
    assert not [n for n in os.listdir("/tmp") if n.startswith("ratiorl-sandbox-")]
    if os.geteuid() == 0:  # everything the sandbox ran as nobody is gone
        assert _nobody_processes() <= procs


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_scores_zero(name, clean_machine):
    timeout = 1.5 if name in ("sleep_past_limit", "fork_bomb", "forged_replies_from_thread") else 3.0
    reward, _ = _score(ATTACKS[name], timeout_s=timeout)
    assert reward == 0.0, name


@pytest.fixture
def listeners(tmp_path):
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    tcp.setblocking(False)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(tmp_path / "s.sock")
    unix.bind(path)
    unix.listen(8)
    unix.setblocking(False)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind("\0ratiorl-attack")
    abstract.listen(8)
    abstract.setblocking(False)
    yield tcp.getsockname()[1], path, (tcp, unix, abstract)
    for s in (tcp, unix, abstract):
        s.close()


def test_sockets_reach_nothing(listeners, clean_machine):
    port, path, socks = listeners
    code = f"""
        import socket
        reached = 0
        for fam, addr in ((socket.AF_INET, ('127.0.0.1', {port})), (socket.AF_UNIX, {path!r}),
                          (socket.AF_UNIX, '\\0ratiorl-attack')):
            try:
                s = socket.socket(fam, socket.SOCK_STREAM)
                s.settimeout(0.5)
                s.connect(addr)
                reached += 1
            except OSError:
                pass
        def add(a, b): return a + b if reached else -1
    """
    assert _score(code)[0] == 0.0
    for s in socks:
        with pytest.raises(BlockingIOError):
            s.accept()


def test_missing_or_empty_tests_never_score_one():
    fn = get_reward("code_tests")
    for tests in (None, [], "", "[]"):
        with pytest.raises(ValueError, match="no tests"):
            fn(["def add(a, b): return a + b"], tests=[tests])
    scorer = RewardScorer([("code_tests", 1.0, {})])
    rewards, metrics = scorer(["x = 1"], prompts=["p"], answers=[None], tests=[[]])
    assert rewards.item() == 0.0 and metrics["reward_errors"] == 1
    zero = get_reward("code_tests", missing_tests="zero")
    assert zero(["x = 1"], tests=[[]]) == [0.0]


CORRECT = {
    "threads": ("""
        from concurrent.futures import ThreadPoolExecutor
        import threading
        def add(a, b):
            with ThreadPoolExecutor(max_workers=8) as pool:
                parts = list(pool.map(lambda x: x, [a, b]))
            t = threading.Thread(target=lambda: None)
            t.start(); t.join()
            return sum(parts)
    """, TESTS),
    "recursion": ("""
        import sys
        from functools import lru_cache
        sys.setrecursionlimit(10000)
        @lru_cache(None)
        def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)
        def depth(n): return 0 if n == 0 else 1 + depth(n - 1)
    """, ["assert fib(30) == 832040", "assert depth(3000) == 3000"]),
    "classes": ("""
        class Stack:
            def __init__(self): self.items = []
            def push(self, x): self.items.append(x)
            def pop(self): return self.items.pop()
            def __len__(self): return len(self.items)
        def sort_in_place(xs): xs.sort()
    """, ["s = Stack(); s.push(1); s.push(2)\nassert s.pop() == 2 and len(s) == 1",
          "xs = [3, 1, 2]; sort_in_place(xs)\nassert xs == [1, 2, 3]",
          "try:\n    Stack().pop()\n    assert False\nexcept IndexError:\n    pass"]),
    "generators": ("""
        def count(n):
            for i in range(n):
                yield i * i
    """, ["assert list(count(4)) == [0, 1, 4, 9]", "assert sum(count(3)) == 5"]),
    "stdlib": ("""
        import collections, heapq, itertools, math, re
        def freq(s): return collections.Counter(s)
        def top(xs, k): return heapq.nlargest(k, xs)
        def words(s): return re.findall(r'\\w+', s)
        def pairs(xs): return list(itertools.combinations(xs, 2))
        def hyp(a, b): return math.hypot(a, b)
    """, ["assert freq('aab') == {'a': 2, 'b': 1}", "assert top([5, 1, 9], 2) == [9, 5]",
          "assert words('a b') == ['a', 'b']", "assert pairs([1, 2, 3])[0] == (1, 2)",
          "import math\nassert math.isclose(hyp(3, 4), 5.0)"]),
}


@pytest.mark.parametrize("name", sorted(CORRECT))
def test_correct_solutions_score_one(name, clean_machine):
    code, tests = CORRECT[name]
    assert _score(code, tests, timeout_s=10.0)[0] == 1.0


def test_64_concurrent_threaded_solutions_all_pass(clean_machine):
    fn = get_reward("code_tests", timeout_s=60.0, max_workers=1)
    code, tests = CORRECT["threads"]
    code = textwrap.dedent(code)
    start = time.monotonic()
    with ThreadPoolExecutor(64) as pool:
        scores = list(pool.map(lambda _: fn([code], tests=[tests])[0], range(64)))
    assert scores == [1.0] * 64, scores
    print(f"64 concurrent runs: {time.monotonic() - start:.1f} s")


# --- the same attacks, run by an unprivileged user -------------------------------------------
# As root the sandbox starts bubblewrap as nobody through setpriv (and, where the interpreter is
# under a 0700 /root, from a private mount namespace); as any other user it starts bubblewrap
# directly. This re-runs a representative subset with the whole pytest process as uid 65534, so
# the second path is covered on a CI machine that runs as root.
UNPRIVILEGED = 65534
UNPRIVILEGED_SUBSET = [f"test_attack_scores_zero[{n}]" for n in (
    "always_true_eq", "main_module_report_rewrite", "fork_and_report_from_child", "fork_bomb",
    "kill_everything", "env_and_proc_of_others", "write_expected_output_files", "shell_via_exec",
    "ptrace_peek", "unshare_escape")] + ["test_sockets_reach_nothing",
                                         "test_correct_solutions_score_one[threads]"]
REPO = os.path.realpath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _closed_dir(path):
    """The topmost directory at or above ``path`` that other users cannot enter, or None."""
    parts = os.path.realpath(path).strip("/").split("/")
    for i in range(1, len(parts) + 1):
        d = "/" + "/".join(parts[:i])
        if not os.stat(d).st_mode & 0o001:
            return d
    return None


def _unprivileged_command(argv):
    """(command, description of what was exposed) running ``argv`` as uid 65534; raises
    ``pytest.skip.Exception`` naming what stands in the way."""
    import shlex
    import shutil
    import sys

    setpriv, unshare = shutil.which("setpriv"), shutil.which("unshare")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed: cannot switch to uid 65534")
    drop = [setpriv, f"--reuid={UNPRIVILEGED}", f"--regid={UNPRIVILEGED}", "--clear-groups", "--"]
    needed = {"the Python installation": os.path.realpath(sys.base_prefix),
              "the virtual environment": os.path.realpath(sys.prefix), "the repository": REPO}
    for what, path in needed.items():
        probe = os.path.join(path, "bin") if what != "the repository" else os.path.join(path, "ratiorl")
        if os.path.exists(probe) and not os.stat(probe).st_mode & 0o005:
            pytest.skip(f"{what} ({probe}) is not readable by uid {UNPRIVILEGED} (mode "
                        f"{oct(os.stat(probe).st_mode & 0o777)})")
    hidden = {}
    for what, path in needed.items():
        closed = _closed_dir(path)
        if closed == path:
            pytest.skip(f"{what} ({path}) is itself a directory uid {UNPRIVILEGED} cannot enter")
        if closed is not None:
            hidden.setdefault(closed, set()).add(path)
    if not hidden:
        return drop + argv, "nothing (every path is reachable)"
    stage = next((d for d in ("/mnt", "/media", "/srv", "/opt") if os.path.isdir(d)
                  and not os.path.islink(d) and not any(d == c or c.startswith(d + "/") or
                                                         d.startswith(c + "/") for c in hidden)), None)
    if unshare is None or stage is None:
        pytest.skip(f"{', '.join(sorted(hidden))} cannot be entered by uid {UNPRIVILEGED} and "
                    f"{'unshare is not installed' if unshare is None else 'no staging directory exists'}")
    # In a private mount namespace (the host's mounts untouched): a tmpfs holding binds of only
    # the needed paths replaces each closed directory, so /root shows nothing but, e.g., the
    # interpreter; then drop to uid 65534.
    lines = ["set -e", "umask 022", f"mount -t tmpfs -o size=64k,mode=0755 ratiorl-unpriv {stage}"]
    for i, (closed, paths) in enumerate(sorted(hidden.items())):
        for path in sorted(paths):
            dest = f"{stage}/{i}/{os.path.relpath(path, closed)}"
            lines += [f"mkdir -p {shlex.quote(dest)}",
                      f"mount --bind {shlex.quote(path)} {shlex.quote(dest)}"]
        lines.append(f"mount --rbind {stage}/{i} {shlex.quote(closed)}")
    lines.append('exec "$@"')
    shown = "; ".join(f"{c} (mode {oct(os.stat(c).st_mode & 0o777)}) replaced by a view of "
                      f"{', '.join(sorted(p))}" for c, p in sorted(hidden.items()))
    return ([unshare, "--mount", "--propagation", "private", "--", "/bin/sh", "-c", "\n".join(lines),
             "sh"] + drop + argv), shown


@pytest.mark.skipif(os.geteuid() != 0, reason=f"running as uid {os.geteuid()}, not root: this run "
                    "is itself the unprivileged one (run the suite as root to cover both)")
def test_attack_subset_as_unprivileged_user():
    import shutil
    import subprocess
    import sys
    import tempfile

    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    check, shown = _unprivileged_command([sys.executable, "-c", "import pytest, ratiorl.rewards"])
    probe = subprocess.run(check, cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
                           check=False)
    if probe.returncode != 0:
        pytest.skip(f"uid {UNPRIVILEGED} cannot start the test interpreter (exposed: {shown}): "
                    f"{(probe.stderr or probe.stdout).strip()[-400:]}")
    before = _nobody_processes()
    base = tempfile.mkdtemp(prefix="ratiorl-unpriv-pytest-")
    try:
        os.chown(base, UNPRIVILEGED, UNPRIVILEGED)
        ids = [f"tests/rewards/test_attacks.py::{t}" for t in UNPRIVILEGED_SUBSET]
        cmd, _ = _unprivileged_command([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                        "-rs", f"--basetemp={base}/t", *ids])
        run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
                             check=False)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    out = run.stdout + run.stderr
    if run.returncode == 0 and " skipped" in out and " passed" not in out:
        reasons = [line for line in out.splitlines() if line.startswith("SKIPPED")]
        pytest.skip(f"as uid {UNPRIVILEGED} the suite skips: {reasons[:1]}")
    assert run.returncode == 0 and f"{len(ids)} passed" in out, out[-3000:]
    # everything uid 65534 ran is gone (waiting out short-lived sandboxes another process
    # on this machine may be running as nobody at the same time)
    deadline = time.monotonic() + 10.0
    while not _nobody_processes() <= before and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _nobody_processes() - before
    assert not left, {pid: _cmdline(pid) for pid in left}


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ")[:200].decode(errors="replace")
    except OSError:
        return "?"
