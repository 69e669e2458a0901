import math

import pytest
import torch

from ratiorl.rewards import RewardScorer, Score, get_reward


def _const(value):
    def const(completions, **kw):
        return [value] * len(completions)
    return const


def _kw(n, answer="46"):
    return dict(prompts=["12+34="] * n, answers=[answer] * n)


def test_scorer_weighted_sum_and_metrics():
    scorer = RewardScorer([("exact_match", 2.0), (get_reward("format", pattern=r"\d+"), 0.5)])
    rewards, metrics = scorer(["46", "47", "x", " 46"], **_kw(4))
    assert rewards.dtype == torch.float32 and rewards.shape == (4,)
    # exact: 1,0,0,1 ; format (fullmatch \d+): 1,1,0,0
    assert rewards.tolist() == pytest.approx([2.5, 0.5, 0.0, 2.0])
    assert metrics["reward/exact_match"] == pytest.approx(0.5)
    assert metrics["reward/format"] == pytest.approx(0.5)
    assert metrics["reward_mean"] == pytest.approx(1.25)
    assert metrics["reward_errors"] == 0 and metrics["reward_timeouts"] == 0


def test_scorer_accepts_name_and_duplicate_names():
    rewards, _ = RewardScorer("exact_match")(["46", "4"], **_kw(2))
    assert rewards.tolist() == [1.0, 0.0]
    scorer = RewardScorer([("exact_match", 1.0), ("exact_match", 1.0)])
    assert scorer.names == ["exact_match", "exact_match_1"]
    with pytest.raises(ValueError, match="empty"):
        RewardScorer([])
    with pytest.raises(ValueError, match="unknown reward"):
        RewardScorer([("nope", 1.0)])
    with pytest.raises(ValueError, match="noise_sigma"):
        RewardScorer("exact_match", noise_sigma=-1)


def test_raising_reward_scores_zero_only_for_affected_samples():
    calls = []

    def picky(completions, *, prompts=None, answers=None, **fields):
        calls.append(len(completions))
        if any(c == "boom" for c in completions):
            raise RuntimeError("cannot score this")
        return [1.0] * len(completions)

    scorer = RewardScorer([(picky, 1.0), ("exact_match", 1.0)])
    rewards, metrics = scorer(["46", "boom", "46"], **_kw(3))
    assert rewards.tolist() == [2.0, 0.0, 2.0]
    assert metrics["reward_errors"] == 1
    assert metrics["reward/picky"] == pytest.approx(2 / 3)
    assert calls == [3, 1, 1, 1]  # batch call failed, then one call per sample


def test_per_sample_fallback_slices_fields():
    def uses_field(completions, *, prompts=None, answers=None, weight=None, **fields):
        if len(completions) > 1:
            raise RuntimeError("batch path broken")
        return [float(weight[0])]

    rewards, metrics = RewardScorer([(uses_field, 1.0)])(["a", "b"], **_kw(2), weight=[3, 5])
    assert rewards.tolist() == [3.0, 5.0] and metrics["reward_errors"] == 0


def test_bad_return_values_are_errors_not_crashes():
    def nan_and_junk(completions, **kw):
        return [float("nan"), "junk", None, 1.0][: len(completions)]

    def wrong_length(completions, **kw):
        return [1.0]

    rewards, metrics = RewardScorer([(nan_and_junk, 1.0)])(["a", "b", "c", "d"], **_kw(4))
    assert rewards.tolist() == [0.0, 0.0, 0.0, 1.0]
    assert metrics["reward_errors"] == 2  # None means "not applicable": scored 0, no error
    rewards, metrics = RewardScorer([(wrong_length, 1.0)])(["a", "b", "c"], **_kw(3))
    assert rewards.tolist() == [1.0, 1.0, 1.0]  # per-sample fallback returns one value each


def test_timeouts_are_counted():
    def slow(completions, **kw):
        out = []
        for c in completions:
            if c == "hang":
                out.append(Score(0.0, timed_out=True))
            else:
                out.append(1.0)
        return out

    def raises_timeout(completions, **kw):
        raise TimeoutError

    rewards, metrics = RewardScorer([(slow, 1.0), (raises_timeout, 1.0)])(["ok", "hang"], **_kw(2))
    assert rewards.tolist() == [1.0, 0.0]
    assert metrics["reward_timeouts"] == 1 + 2 and metrics["reward_errors"] == 0


def test_noise_statistics_and_reproducibility():
    n, sigma = 20000, 0.3
    scorer = RewardScorer([(_const(1.0), 1.0)], noise_sigma=sigma, seed=7)
    rewards, metrics = scorer(["x"] * n, **_kw(n))
    noise = rewards.double() - 1.0
    # mean ~ N(0, sigma^2 / n): 5 standard errors; std within 3%
    assert abs(noise.mean().item()) < 5 * sigma / math.sqrt(n)
    assert noise.std().item() == pytest.approx(sigma, rel=0.03)
    assert metrics["reward_clean_mean"] == pytest.approx(1.0)
    again, _ = RewardScorer([(_const(1.0), 1.0)], noise_sigma=sigma, seed=7)(["x"] * n, **_kw(n))
    assert torch.equal(rewards, again)
    other, _ = RewardScorer([(_const(1.0), 1.0)], noise_sigma=sigma, seed=8)(["x"] * n, **_kw(n))
    assert not torch.equal(rewards, other)
    second, _ = scorer(["x"] * n, **_kw(n))  # successive calls draw fresh noise
    assert not torch.equal(rewards, second)


def test_no_noise_by_default_and_empty_batch():
    rewards, metrics = RewardScorer("exact_match")(["46"] * 3, **_kw(3))
    assert rewards.tolist() == [1.0, 1.0, 1.0]
    rewards, metrics = RewardScorer("exact_match", noise_sigma=1.0)([], prompts=[], answers=[])
    assert rewards.shape == (0,) and metrics["reward_errors"] == 0


def test_length_mismatch_is_a_caller_error():
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        RewardScorer("exact_match")(["1", "2"], prompts=["a", "b"], answers=["1"])


def test_score_per_function_is_each_function_called_directly():
    fmt = get_reward("format", pattern=r"\d+")

    def length(completions, **kw):
        return [float(len(c)) for c in completions]

    completions = ["46", "47", "x", " 46"]
    scorer = RewardScorer([("exact_match", 2.0), (fmt, 0.5), (length, -0.25)])
    scores = scorer.score(completions, **_kw(4))
    assert list(scores.per_function) == ["exact_match", "format", "length"]
    direct = {
        "exact_match": get_reward("exact_match")(completions, **_kw(4)),
        "format": fmt(completions, **_kw(4)),
        "length": length(completions),
    }
    for name, values in direct.items():
        got = scores.per_function[name]
        assert got.dtype == torch.float32 and got.shape == (4,)
        assert got.tolist() == pytest.approx(values)  # raw: the weights are not applied
    expected_total = [2.0 * a + 0.5 * b - 0.25 * c for a, b, c in zip(*direct.values())]
    assert scores.total.dtype == torch.float32 and scores.total.tolist() == pytest.approx(expected_total)
    rewards, metrics = scorer(completions, **_kw(4))  # __call__ is (total, metrics) of score()
    assert torch.equal(rewards, scores.total) and metrics == scores.metrics
    assert metrics["reward/length"] == pytest.approx(sum(direct["length"]) / 4)


def test_score_per_function_failures_are_zero_and_empty_batch():
    def picky(completions, **kw):
        if "boom" in completions:
            raise RuntimeError("no")
        return [3.0] * len(completions)

    scores = RewardScorer([(picky, 2.0)]).score(["a", "boom"], **_kw(2))
    assert scores.per_function["picky"].tolist() == [3.0, 0.0]
    assert scores.total.tolist() == [6.0, 0.0] and scores.metrics["reward_errors"] == 1
    empty = RewardScorer("exact_match").score([], prompts=[], answers=[])
    assert empty.per_function["exact_match"].shape == (0,) and empty.total.shape == (0,)


def test_rng_state_round_trip_reproduces_noise():
    scorer = RewardScorer([(_const(1.0), 1.0)], noise_sigma=0.5, seed=3)
    scorer(["x"] * 5, **_kw(5))  # advance the stream
    state = scorer.rng_state()
    saved = state.clone()
    first = scorer.score(["x"] * 5, **_kw(5)).total
    second = scorer.score(["x"] * 5, **_kw(5)).total
    assert not torch.equal(first, second)
    scorer.set_rng_state(state)
    assert torch.equal(scorer.score(["x"] * 5, **_kw(5)).total, first)
    assert torch.equal(scorer.score(["x"] * 5, **_kw(5)).total, second)
    # a fresh scorer with another seed restored to the saved state draws the same noise too
    other = RewardScorer([(_const(1.0), 1.0)], noise_sigma=0.5, seed=99)
    other.set_rng_state(state)
    assert torch.equal(other.score(["x"] * 5, **_kw(5)).total, first)
    assert torch.equal(state, saved)  # a snapshot: later draws do not change it
    expected = 1.0 + 0.5 * torch.randn(5, generator=torch.Generator().set_state(state), dtype=torch.float64)
    assert torch.equal(first, expected.to(torch.float32))


# ----------------------------------------------------------------------------- time budget

import logging  # noqa: E402
import os  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from ratiorl.rewards import scorer as scorer_module  # noqa: E402
from ratiorl.rewards.isolation import worker_pool  # noqa: E402

HOSTILE_MATH = "$10^{10^{10^{10}}}$"  # math-verify works on this for minutes (seconds with its own timeout)


def _in_thread(fn):
    box = []
    t = threading.Thread(target=lambda: box.append(fn()))
    t.start()
    t.join()
    return box[0]


def busy_reward(completions, *, prompts=None, answers=None, **fields):
    """Pure-Python CPU loop on "slow" (a thread cannot interrupt it); 1.0 otherwise."""
    out = []
    for c in completions:
        if c == "slow":
            while True:
                sum(range(1000))
        out.append(1.0)
    return out


busy_reward.isolate = True  # a declared capability: run in a killable worker process


@pytest.mark.parametrize("where", ["main thread", "worker thread"])
def test_hostile_math_string_times_out_within_budget(where):
    pytest.importorskip("math_verify")
    scorer = RewardScorer([("math_verify", 1.0)], timeout=1.0)
    run = (lambda f: f()) if where == "main thread" else _in_thread
    kw = dict(prompts=["q"] * 3, answers=["3"] * 3)
    run(lambda: scorer.score(["$3$"] * 3, **kw))  # workers started and math-verify imported (not budgeted)
    t0 = time.monotonic()
    out = run(lambda: scorer.score([HOSTILE_MATH, "$3$", "the answer is $4$"], **kw))
    elapsed = time.monotonic() - t0
    assert out.per_function["math_verify"].tolist() == [0.0, 1.0, 0.0]
    assert out.metrics["reward_timeouts"] == 1 and out.metrics["reward_errors"] == 0
    assert elapsed < 1.0 + 3.0, elapsed  # the budget plus a worker's kill and replacement
    # the pool recovered: the next batch scores normally
    assert run(lambda: scorer.score(["$3$"], prompts=["q"], answers=["3"])).total.tolist() == [1.0]


@pytest.mark.parametrize("where", ["main thread", "worker thread"])
def test_isolated_custom_reward_is_killed_at_the_budget(where):
    scorer = RewardScorer([(busy_reward, 1.0)], timeout=0.5)
    run = (lambda f: f()) if where == "main thread" else _in_thread
    run(lambda: scorer.score(["ok"] * 4))
    t0 = time.monotonic()
    out = run(lambda: scorer.score(["slow", "ok", "slow", "ok"]))
    assert time.monotonic() - t0 < 0.5 * 2 + 3.0  # two rounds of the budget at most, plus replacements
    assert out.total.tolist() == [0.0, 1.0, 0.0, 1.0] and out.metrics["reward_timeouts"] == 2


def test_in_thread_reward_overrunning_its_budget_is_abandoned():
    def sleepy(completions, **kw):
        out = []
        for c in completions:
            if c == "slow":
                time.sleep(3.0)
            out.append(1.0)
        return out

    scorer = RewardScorer([(sleepy, 1.0)], timeout=0.2)
    for run in ((lambda f: f()), _in_thread):
        t0 = time.monotonic()
        out = run(lambda: scorer.score(["a", "slow", "b"]))
        assert time.monotonic() - t0 < 0.2 * 3 + 0.2 * 3 + 1.0  # the batch, then each sample alone
        assert out.total.tolist() == [1.0, 0.0, 1.0] and out.metrics["reward_timeouts"] == 1


def test_cheap_rewards_never_start_a_process(monkeypatch):
    monkeypatch.setattr(scorer_module, "worker_pool", lambda: pytest.fail("exact_match used a process"))
    assert not getattr(get_reward("exact_match"), "isolate", True)
    out = RewardScorer(["exact_match", "format"]).score(["46", "x y"], **_kw(2))
    assert out.per_function["exact_match"].tolist() == [1.0, 0.0]
    assert get_reward("math_verify").isolate if _has("math_verify") else True


def _has(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def test_raising_reward_is_reported_with_the_sample_rate_limited(caplog, monkeypatch):
    monkeypatch.setattr(scorer_module, "_reported", {})

    def picky(completions, **kw):
        if any(c.startswith("boom") for c in completions):
            raise RuntimeError("cannot score this")
        return [1.0] * len(completions)

    scorer = RewardScorer([(picky, 1.0)])
    long_sample = "boom" + "x" * 1000
    with caplog.at_level(logging.WARNING, logger="ratiorl.rewards"):
        out = scorer.score(["fine", long_sample])
        out2 = scorer.score([long_sample])  # within the rate limit: counted, not reported again
    assert out.total.tolist() == [1.0, 0.0] and out.metrics["reward_errors"] == 1
    assert out2.metrics["reward_errors"] == 1
    records = [r.getMessage() for r in caplog.records if r.name == "ratiorl.rewards"]
    assert len(records) == 1
    assert "'picky'" in records[0] and "RuntimeError: cannot score this" in records[0]
    assert repr(long_sample[:200]) in records[0] and long_sample[:201] not in records[0]


def raising_reward(completions, *, prompts=None, answers=None, **fields):
    if completions == ["boom"]:
        raise ValueError("no verdict")
    if completions == ["die"]:
        os._exit(3)
    return [1.0] * len(completions)


raising_reward.isolate = True


def test_isolated_reward_that_raises_or_dies_is_an_error_not_a_crash(caplog):
    scorer = RewardScorer([(raising_reward, 1.0)], timeout=5.0)
    with caplog.at_level(logging.WARNING, logger="ratiorl.rewards"):
        out = scorer.score(["ok", "boom", "die", "ok"])
    assert out.total.tolist() == [1.0, 0.0, 0.0, 1.0] and out.metrics["reward_errors"] == 2
    assert any("ValueError: no verdict" in r.getMessage() and "'boom'" in r.getMessage() for r in caplog.records)
    out = scorer.score(["ok"], answers=[lambda: 0])  # a field that cannot be sent to a process
    assert out.total.tolist() == [0.0] and out.metrics["reward_errors"] == 1
    assert worker_pool().run((1, "x"), raising_reward, None, [(["ok"], None, None, {})], 5.0)[0][1] is None
