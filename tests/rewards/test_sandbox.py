"""The code sandbox: each attack is contained, scored as a failure, and leaves nothing behind.

Every test here is cheap: tight process limits and timeouts of one or two seconds.
"""

import os
import socket
import textwrap

import pytest

from ratiorl.rewards import RewardScorer, SandboxLimits, get_reward, run_python
from ratiorl.rewards.sandbox import PRELOAD_MODULES, namespace_prefix

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the sandbox needs a POSIX system")

FAST = SandboxLimits(timeout_s=2.0, memory_mb=256, max_processes=8)
AS_ROOT = os.geteuid() == 0


def _processes_of(uid):
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            if int(line.split()[1]) == uid:
                                pids.append(int(entry))
                            break
            except OSError:
                pass
    return pids


def _score(code, tests, **kw):
    scorer = RewardScorer([("code_tests", 1.0, {"timeout_s": kw.pop("timeout_s", 2.0), **kw})])
    rewards, metrics = scorer([code], prompts=["p"], answers=[None], tests=[tests])
    return rewards.item(), metrics


def test_correct_code_scores_fraction_and_all_or_nothing():
    code = "```python\ndef double(x):\n    return 2 * x\n```"
    tests = ["assert double(2) == 4", "assert double(3) == 6", "assert double(0) == 1"]
    fn = get_reward("code_tests", timeout_s=5)
    assert fn([code], prompts=["p"], answers=[None], tests=[tests]) == [pytest.approx(2 / 3)]
    fn_all = get_reward("code_tests", mode="all", timeout_s=5)
    assert fn_all([code, code], prompts=["p", "p"], answers=[None, None], tests=[tests, tests[:2]]) == [0.0, 1.0]
    # tests may come from answers, as a JSON list; code that does not run scores 0
    assert fn(["def f(:", "x = 1"], prompts=["p"] * 2, answers=['["assert x == 1"]'] * 2) == [0.0, 1.0]


def test_runs_in_own_temp_dir_that_is_removed():
    code = "import os\nopen('scratch.txt', 'w').write('ok')\nprint(os.getcwd())"
    result = run_python(code, ["assert open('scratch.txt').read() == 'ok'"], FAST)
    assert result.report == {"loaded": True, "passed": 1, "total": 1, "errors": []}
    child_cwd = result.stdout.strip()
    assert os.path.basename(child_cwd).startswith("ratiorl-sandbox-")
    assert child_cwd != os.getcwd() and not os.path.exists(child_cwd)


def test_environment_is_stripped(monkeypatch):
    monkeypatch.setenv("RATIORL_SECRET_TOKEN", "hunter2")
    result = run_python("import os\nprint(sorted(os.environ))", [], FAST)
    assert "RATIORL_SECRET_TOKEN" not in result.stdout
    assert "PATH" in result.stdout


def test_infinite_loop_is_killed_and_counted_as_timeout():
    reward, metrics = _score("while True:\n    pass", ["pass"], timeout_s=1.0)
    assert reward == 0.0
    assert metrics["reward_timeouts"] == 1 and metrics["reward_errors"] == 0


def test_cpu_limit_kills_busy_code_before_wall_clock():
    result = run_python("while True:\n    pass", ["pass"], SandboxLimits(timeout_s=20.0, cpu_s=1))
    assert result.report is None and not result.timed_out  # killed by RLIMIT_CPU, not the timeout
    assert result.seconds < 20.0


def test_memory_hog_fails():
    hog = textwrap.dedent("""
        blocks = []
        while True:
            blocks.append(bytearray(50 * 1024 * 1024))
    """)
    reward, metrics = _score(hog, ["pass"], memory_mb=256)
    assert reward == 0.0
    result = run_python(hog, ["pass"], FAST)
    assert result.report is not None and "MemoryError" in result.report["errors"][0]


@pytest.mark.parametrize("audit_hook", [True, False])
def test_write_outside_sandbox_fails(tmp_path, audit_hook):
    if not audit_hook and not AS_ROOT:
        pytest.skip("without the audit hook, only the drop to 'nobody' (root only) stops this write")
    target = tmp_path / "pwned.txt"
    code = f"open({str(target)!r}, 'w').write('x')"
    result = run_python(code, ["pass"], FAST, audit_hook=audit_hook)
    assert not target.exists()
    assert result.report is not None and not result.report["loaded"]
    assert "PermissionError" in result.report["errors"][0]
    # deleting files outside fails too
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    result = run_python(f"import os\nos.remove({str(keep)!r})", [], FAST, audit_hook=audit_hook)
    assert keep.read_text() == "precious" and not result.report["loaded"]
    reward, _ = _score(code, ["pass"])
    assert reward == 0.0 and not target.exists()


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


def _nobody_connected(server):
    try:
        conn, _ = server.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


@pytest.mark.parametrize("audit_hook", [True, False])
def test_network_is_blocked(listener, audit_hook):
    if not audit_hook and "--net" not in namespace_prefix():
        pytest.skip("no network namespace here; only the audit hook blocks sockets")
    port = listener.getsockname()[1]
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'hi')"
    limits = SandboxLimits(timeout_s=3.0, preload=PRELOAD_MODULES + ("socket",))
    result = run_python(code, ["pass"], limits, audit_hook=audit_hook)
    assert result.report is not None and not result.report["loaded"]
    assert _nobody_connected(listener)
    reward, _ = _score(code, ["pass"])
    assert reward == 0.0 and _nobody_connected(listener)


def test_subprocess_and_os_system_blocked(tmp_path):
    marker = tmp_path / "ran"
    for code in (f"import os\nos.system('touch {marker}')",
                 f"import subprocess\nsubprocess.run(['touch', '{marker}'])"):
        result = run_python(code, ["pass"], FAST)
        assert result.report is not None and not result.report["loaded"]
    assert not marker.exists()


FORK_BOMB = textwrap.dedent("""
    import os
    while True:
        try:
            os.fork()
        except OSError:
            pass
""")


def test_fork_bomb_blocked_by_hook():
    result = run_python("import os\nwhile True:\n    os.fork()", ["pass"], FAST)
    assert result.report is not None and "os.fork is not allowed" in result.report["errors"][0]
    reward, metrics = _score(FORK_BOMB, ["pass"], timeout_s=1.0)  # swallows the errors: spins
    assert reward == 0.0


def test_fork_bomb_contained_by_process_limit():
    """With the audit hook off, RLIMIT_NPROC (and the PID namespace) must contain a real fork bomb."""
    isolation = run_python("", [], FAST).isolation
    if AS_ROOT and "uid-nobody" not in isolation:
        pytest.skip("as root without the drop to nobody, RLIMIT_NPROC is not enforced")
    before = set(_processes_of(65534)) if AS_ROOT else set()
    limits = SandboxLimits(timeout_s=1.5, cpu_s=2, memory_mb=128, max_processes=6)
    result = run_python(FORK_BOMB + "\nprint('unreachable')", ["pass"], limits, audit_hook=False)
    assert result.report is None and "unreachable" not in result.stdout
    if AS_ROOT:
        # every process the bomb made is gone once run_python returns
        # (only checked as root: a normal user's uid has unrelated processes)
        assert set(_processes_of(65534)) <= before


def test_process_limit_caps_forks_and_leftovers_are_killed():
    isolation = run_python("", [], FAST).isolation
    if AS_ROOT and "uid-nobody" not in isolation:
        pytest.skip("as root without the drop to nobody, RLIMIT_NPROC is not enforced")
    code = textwrap.dedent("""
        import os, time
        made = 0
        try:
            for _ in range(50):
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                made += 1
        except OSError:
            pass
        print("made", made)
    """)
    before = set(_processes_of(65534)) if AS_ROOT else set()
    result = run_python(code, [], SandboxLimits(timeout_s=5.0, max_processes=6), audit_hook=False)
    assert result.report is not None and result.report["loaded"]
    made = int(result.stdout.split()[-1])
    assert made < 6
    if AS_ROOT:  # the sleeping children did not outlive the run
        assert set(_processes_of(65534)) <= before


def test_output_flood_and_early_exit_score_zero_without_errors():
    flood = "import sys\nwhile True:\n    sys.stdout.write('x' * 1000000)"
    result = run_python(flood, ["pass"], SandboxLimits(timeout_s=5.0, max_file_mb=4))
    assert result.report is None and not result.timed_out  # RLIMIT_FSIZE stopped it
    assert len(result.stdout) <= 65536  # the parent only reads the tail
    reward, metrics = _score("import os\nos._exit(0)", ["pass"])
    assert reward == 0.0 and metrics["reward_errors"] == 0 and metrics["reward_timeouts"] == 0
