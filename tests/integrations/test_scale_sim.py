"""benchmarks/scale_sim.py: its numbers follow its formulas (docs/scale.md)."""

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "scale_sim.py"
spec = importlib.util.spec_from_file_location("scale_sim", _PATH)
sim = importlib.util.module_from_spec(spec)
sys.modules.setdefault("scale_sim", sim)  # dataclasses look their module up
spec.loader.exec_module(sim)


def rows(c):
    return {r.item: r.bytes for r in sim.estimate(c)}


def test_numbers_follow_the_formulas():
    c = sim.Cluster(params=7e9, gpus=64, prompts=512, group=8, length=1024, logp_dtype="fp32", dtype="bf16",
                    mini_batches=4)
    r = rows(c)
    toks = 512 * 8 * 1024
    assert r["old log-probs (pi_old, every objective)"] == 2 * toks * 4
    assert r["mismatch correction: behaviour log-probs mu"] == 2 * toks * 4
    assert r["advantages (verl stores them per token)"] == toks * 4
    assert r["GRPO/DAPO/GSPO/CTPO extra"] == 0
    assert r["SNIB group normaliser"] == 0  # whole groups on a rank: nothing crosses the network
    assert rows(replace(c, split_groups=True))["SNIB group normaliser"] == 512 * 2 * 4  # two scalars per group
    assert r["weight sync actor -> rollout"] == 7e9 * 2
    assert r["FSDP all-gather x2 + reduce-scatter, per GPU"] == pytest.approx(4 * 3 * 7e9 * 2 * 63 / 64)


def test_scaling_and_cli(capsys):
    c = sim.Cluster()
    base, double = rows(c), rows(replace(c, prompts=2 * c.prompts))
    for k in ("old log-probs (pi_old, every objective)", "mismatch correction: behaviour log-probs mu",
              "response token ids"):
        assert double[k] == 2 * base[k]
    assert double["weight sync actor -> rollout"] == base["weight sync actor -> rollout"]
    assert rows(replace(c, logp_dtype="bf16"))["old log-probs (pi_old, every objective)"] == \
        base["old log-probs (pi_old, every objective)"] / 2
    sim.main(["--params", "7e9", "--gpus", "64", "--prompts", "512", "--group", "8", "--length", "1024"])
    out = capsys.readouterr().out
    assert "SNIB group normaliser" in out and "33.55 MB" in out and "14.00 GB" in out
