"""benchmarks/vs_trl.py runs TRL's GRPOTrainer in a child process of its own, block by block (no
timing is asserted: only that the blocks run, report their steps and phases, and end cleanly)."""

import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")


@pytest.fixture(scope="module")
def vs_trl():
    pytest.importorskip("trl")
    sys.path.insert(0, os.path.abspath(BENCHMARKS))  # the spawned child imports vs_trl the same way
    import vs_trl

    return vs_trl


def test_trl_trains_in_a_child_process_block_by_block(vs_trl, tmp_path):
    # 2 prompts x G=2, 4 new tokens, a 1-layer GPT-2; TRL's max_steps is warm-up + rounds x block + 1 = 3
    args = vs_trl.parse_args(["--num-prompts", "2", "-G", "2", "--max-new-tokens", "4", "--n-layer", "1",
                              "--n-embd", "32", "--n-head", "2", "--threads", "1", "--rounds", "1", "--block", "2",
                              "--warmup", "0"])
    setup = vs_trl.build_setup(args, str(tmp_path))
    side = vs_trl.TRLSide(setup, args, str(tmp_path / "trl"))
    try:
        assert side.proc.pid != os.getpid() and side.proc.is_alive()
        assert side.run_block(0) == []
        times = side.run_block(2)
        assert len(times) == 2 and all(t > 0 for t in times)
        phases = side.phase_steps(2)
        assert [p["#sequences"] for p in phases] == [4, 4]  # each step sampled 2 prompts x 2
        assert all(p["sampling"] > 0 and p["backward"] > 0 and p["total"] >= p["sampling"] for p in phases)
        assert side.peak_rss_mib > side.ready_rss_mib * 0.5 > 0
        with pytest.raises(RuntimeError, match="ended before the block was done"):
            side.run_block(2)  # only one step is left before TRL's max_steps
    finally:
        side.close()
    assert not side.proc.is_alive()
