"""word_problems: seeded, leveled, every answer computed independently from the prompt text."""

import re
import warnings

import pytest

from ratiorl.tasks import get_task, load_jsonl


def solve(prompt: str) -> int:
    """An independent reading of the prompt: replay each sentence's operation."""
    value = None
    for s in re.split(r"(?<=\.)\s+", prompt):
        nums = [int(x) for x in re.findall(r"\d+", s)]
        if value is None:
            value = nums[0]
        elif "more" in s:
            value += nums[0]
        elif "gives" in s:
            value -= nums[0]
        elif "bags" in s:
            value += nums[0] * nums[1]
        elif "shares" in s:
            assert value % nums[0] == 0
            value //= nums[0]
    return value


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_answers_are_right_and_splits_disjoint(level):
    t = get_task("word_problems", seed=3, level=level, n_train=200, n_eval=50)
    assert len(t.train) == 200 and len(t.eval) == 50
    assert not {e["prompt"] for e in t.train} & {e["prompt"] for e in t.eval}
    for ex in t.train + t.eval:
        assert int(ex["answer"]) == solve(ex["prompt"]) >= 0
        assert t.check(ex["completion"], ex["answer"])
        steps = ex["completion"].count(". ")  # one sentence of working per step
        assert steps == level
    assert t.reward == "answer_match"


def test_seeded_and_checker_tolerant():
    a = get_task("word_problems", seed=1, level=2, n_train=20, n_eval=5)
    b = get_task("word_problems", seed=1, level=2, n_train=20, n_eval=5)
    c = get_task("word_problems", seed=2, level=2, n_train=20, n_eval=5)
    assert a.train == b.train and a.train != c.train
    assert a.check("so \\boxed{12}", "12") and a.check("#### 12", "12") and not a.check("13", "12")
    with pytest.raises(ValueError, match="level"):
        get_task("word_problems", level=9)


def test_addition_one_digit_clamps_with_a_warning():
    with pytest.warns(UserWarning, match="only 100"):
        t = get_task("addition", n_digits=1)
    assert len(t.train) + len(t.eval) == 100 and len(t.eval) == 20
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_task("addition", n_digits=2)  # fits: no warning


def test_jsonl_chat_prompts_are_kept_as_messages(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": [{"role": "user", "content": "1+1?"}], "answer": 2}\n{"prompt": "2+2=", "answer": "4"}\n')
    rows = load_jsonl(p)
    assert rows[0]["prompt"] == [{"role": "user", "content": "1+1?"}] and rows[0]["answer"] == "2"
    assert rows[1]["prompt"] == "2+2="
