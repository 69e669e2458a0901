"""Code-reward sandbox throughput: evaluations per second at 1, 8 and 64 workers, the current
sandbox (bubblewrap, worker + evaluator per evaluation) against the previous one (a single
``unshare``d interpreter with an in-process audit hook, loaded from git ``HEAD`` or --old-ref).

    python benchmarks/sandbox_throughput.py [--evals 64] [--old-ref a8cfcc6]

One evaluation = one completion against three asserts. Prints a table and the ratios
(previous / current); the target is a ratio of at most 2 at 8 workers.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CODE = "def add(a, b):\n    return a + b\n"
TESTS = ["assert add(1, 2) == 3", "assert add(-5, 5) == 0", "assert add(10, 20) == 30"]


def load_previous(ref: str):
    """The previous sandbox module, from ``git show <ref>:ratiorl/rewards/sandbox.py``."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:ratiorl/rewards/sandbox.py"],
                         capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="ratiorl-bench-")) / "previous_sandbox.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("previous_sandbox", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["previous_sandbox"] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        path.unlink()
        path.parent.rmdir()
    return module


def rate(evaluate, workers: int, evals: int) -> float:
    evaluate()  # warm-up (probes, page cache)
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        passed = list(pool.map(lambda _: evaluate(), range(evals)))
    seconds = time.perf_counter() - start
    if not all(passed):
        raise RuntimeError(f"{passed.count(False)} of {evals} correct evaluations failed")
    return evals / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--evals", type=int, default=64, help="evaluations per measurement")
    parser.add_argument("--old-ref", default="HEAD", help="git ref holding the previous sandbox.py")
    args = parser.parse_args()

    from ratiorl.rewards.sandbox import SandboxLimits, run_tests
    old = load_previous(args.old_ref)
    new_limits = SandboxLimits(timeout_s=60.0)
    old_limits = old.SandboxLimits(timeout_s=60.0)

    def new_eval():
        rep = run_tests(CODE, TESTS, new_limits).report
        return rep is not None and rep["passed"] == 3

    def old_eval():
        rep = old.run_python(CODE, TESTS, old_limits).report
        return rep is not None and rep["passed"] == 3

    ratios = {}
    print(f"{'workers':>7} {'previous eval/s':>16} {'current eval/s':>15} {'previous/current':>17}")
    for workers in (1, 8, 64):
        evals = max(args.evals if workers > 1 else args.evals // 4, workers)
        r_old, r_new = rate(old_eval, workers, evals), rate(new_eval, workers, evals)
        print(f"{workers:>7} {r_old:>16.1f} {r_new:>15.1f} {r_old / r_new:>17.2f}", flush=True)
        ratios[workers] = r_old / r_new
    print(" ".join(f"slowdown_{w}_workers={r:.2f}" for w, r in ratios.items()))


if __name__ == "__main__":
    main()
