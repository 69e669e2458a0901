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
    reward, metrics = _score(ATTACKS[name], timeout_s=timeout)
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
