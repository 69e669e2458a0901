"""The code sandbox's mechanics: scoring, the plain-data boundary, limits, failing closed."""

import os

import pytest

from ratiorl.rewards import SandboxLimits, get_reward
from ratiorl.rewards.sandbox import SandboxUnavailable, check_isolation, launch, run_tests
from ratiorl.rewards.sandbox._codec import decode, encode

try:
    check_isolation("bwrap")
    SKIP = None
except SandboxUnavailable as e:
    SKIP = str(e)
needs_bwrap = pytest.mark.skipif(SKIP is not None, reason=f"bubblewrap sandbox unavailable: {SKIP}")
FAST = SandboxLimits(timeout_s=3.0, memory_mb=256)


def test_codec_round_trip_and_rejects_subclasses():
    value = {"a": [1, 2.5, None, True], (1, "x"): {3, 4}, "b": b"\x00", "c": frozenset({1})}
    refs = []
    enc = encode(value, lambda x: refs.append(x) or ["r", 0])
    assert decode(enc, lambda i: None, lambda m: None) == value and not refs

    class Sly(int):
        def __eq__(self, other):
            return True
    handles = []
    assert encode(Sly(1), lambda x: handles.append(x) or ["r", 7]) == ["r", 7] and handles
    for bad in (["x", 1], ["l", 3], [1, 2], ["d", [[1]]]):
        with pytest.raises(ValueError):
            decode(bad, lambda i: None, lambda m: None)


@needs_bwrap
def test_fraction_all_and_answers_field():
    code = "```python\ndef double(x):\n    return 2 * x\n```"
    tests = ["assert double(2) == 4", "assert double(3) == 6", "assert double(0) == 1"]
    fn = get_reward("code_tests", timeout_s=5)
    assert fn([code], prompts=["p"], answers=[None], tests=[tests]) == [pytest.approx(2 / 3)]
    fn_all = get_reward("code_tests", mode="all", timeout_s=5)
    assert fn_all([code, code], answers=[None, None], tests=[tests, tests[:2]]) == [0.0, 1.0]
    assert fn(["def f(:", "x = 1"], prompts=["p"] * 2, answers=['["assert x == 1"]'] * 2) == [0.0, 1.0]


@needs_bwrap
def test_sandbox_view_env_and_output(monkeypatch):
    monkeypatch.setenv("RATIORL_SECRET_TOKEN", "hunter2")
    code = ("import os\nprint('cwd', os.getcwd(), sorted(os.environ), os.getuid(), os.getpid())\n"
            "open('scratch.txt', 'w').write('ok')\n"
            "def listing(): return sorted(os.listdir('/'))\n"
            "def scratch(): return open('scratch.txt').read()")
    tests = ["assert scratch() == 'ok'", "assert 'home' not in listing() and 'work' not in listing()",
             "assert 'etc' not in listing()"]
    result = run_tests(code, tests, FAST)
    assert result.report["passed"] == 3, result.report
    assert "cwd /tmp" in result.stdout and "RATIORL_SECRET_TOKEN" not in result.stdout
    assert "['HOME', 'LANG', 'PATH', 'PWD', 'TMPDIR'] 1000 1" in result.stdout
    assert not os.path.exists("/tmp/scratch.txt")


@needs_bwrap
def test_cpu_limit_and_timeout():
    busy = run_tests("while True:\n    pass", ["pass"], SandboxLimits(timeout_s=20.0, cpu_s=1))
    assert busy.report["loaded"] is False and busy.seconds < 10  # RLIMIT_CPU, not the timeout
    stuck = run_tests("import time\ntime.sleep(30)", ["pass"], SandboxLimits(timeout_s=1.0))
    assert stuck.report is None and stuck.timed_out and stuck.seconds < 5


@needs_bwrap
def test_setup_runs_on_the_trusted_side():
    code = "def f(x): return x + 1\nimport math\nmath.pi = 3"
    result = run_tests(code, ["assert f(1) == two", "assert math.pi > 3.1"], FAST,
                       setup="two = 2\nimport math")
    assert result.report["passed"] == 2, result.report


def test_missing_bwrap_fails_closed_naming_the_fix(monkeypatch):
    monkeypatch.setattr(launch, "_state", {})
    monkeypatch.setattr(launch.shutil, "which", lambda name: None)
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap.*isolation='process'"):
        get_reward("code_tests")
    with pytest.raises(SandboxUnavailable):
        run_tests("x = 1", ["assert x == 1"], FAST)


def test_process_isolation_is_an_explicit_opt_in():
    fn = get_reward("code_tests", isolation="process", timeout_s=5)
    code = "class Yes:\n    def __eq__(self, o): return True\ndef f(x): return Yes()\ndef g(x): return x * 2"
    assert fn([code, code], tests=[["assert f(1) == 2"], ["assert g(1) == 2"]]) == [0.0, 1.0]
    with pytest.raises(ValueError, match="isolation"):
        get_reward("code_tests", isolation="none")
