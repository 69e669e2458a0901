"""answer_match, think/answer and boxed format, cosine length and the reward-model reward."""

import math

import pytest
import torch

from ratiorl.rewards import RewardScorer, extract_answer, get_reward, parse_number


@pytest.mark.parametrize("text,want", [
    ("\\boxed{1,234}", 1234.0), ("so #### 1234", 1234.0), ("The answer is $1,234.", 1234.0),
    ("1234 apples", 1234.0), ("<answer> 42 km </answer>", 42.0), ("\\frac{3}{4}", 0.75), ("3/4", 0.75),
    ("it is 12%.", 12.0), ("\\boxed{\\text{5 cm}}", None), ("-7.5", -7.5), ("no number", None),
])
def test_parse_number_tolerates_formatting(text, want):
    got = parse_number(extract_answer(text))
    assert got == want if want is not None else got is None


def test_extract_answer_prefers_marked_answers():
    assert extract_answer("first 3, \\boxed{7} then 9") == "7"
    assert extract_answer("work 3 + 4 = 7\n#### 7\nbye") == "7"
    assert extract_answer("12 then 13", fallback=False) is None


def test_answer_match_scores():
    fn = get_reward("answer_match")
    comps = ["\\boxed{1,234}", "#### 1234", "The answer is 1234 apples.", "1233", "", "1,234.0"]
    assert fn(comps, answers=["1234"] * 6) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    # GSM8K-style gold answers are read the same way
    assert fn(["I get 72"], answers=["48 + 24 = 72\n#### 72"]) == [1.0]
    strict = get_reward("answer_match", fallback=False)
    assert strict(["I get 72", "answer: 72"], answers=["72", "72"]) == [0.0, 1.0]
    with pytest.raises(ValueError, match="no number"):
        fn(["1"], answers=["n/a"])


def test_think_answer_format():
    full = get_reward("think_answer_format")
    part = get_reward("think_answer_format", partial=True)
    comps = ["<think>3+4</think>\n<answer>7</answer>", "<answer>7</answer>", "x <think>a</think><answer>7</answer>",
             "<think>a</think><think>b</think>"]
    assert full(comps) == [1.0, 0.0, 0.0, 0.0]
    assert part(comps) == [1.0, 0.5, 1.0, 0.0]
    assert get_reward("think_answer_format", think=False)(["<answer>7</answer>"]) == [1.0]
    assert get_reward("boxed_format")(["\\boxed{3}", "\\boxed{}", "3"]) == [1.0, 0.0, 0.0]


def test_cosine_length_against_formula():
    fn = get_reward("cosine_length", max_length=20, exceed=-2.0)
    comps = ["7", "x" * 9 + "7", "8", "x" * 19 + "8", "x" * 30 + "7"]
    got = fn(comps, answers=["7"] * 5)

    def cos(n, short, long):
        return long + 0.5 * (short - long) * (1 + math.cos(math.pi * min(n, 20) / 20))

    want = [cos(1, 1.0, 0.5), cos(10, 1.0, 0.5), cos(1, -1.0, -0.5), cos(20, -1.0, -0.5), -2.0]
    assert got == pytest.approx(want)
    assert got[0] > got[1] and got[2] < got[3]  # short right answers best, short wrong ones worst


def test_rewards_list_weighted_sum_and_components():
    scorer = RewardScorer([("answer_match", 1.0, {}), ("think_answer_format", 0.5, {"partial": True})])
    s = scorer.score(["<answer>7</answer>", "<think>x</think><answer>8</answer>"], prompts=["p", "p"],
                     answers=["7", "7"])
    assert s.per_function["answer_match"].tolist() == [1.0, 0.0]
    assert s.per_function["think_answer_format"].tolist() == [0.5, 1.0]
    assert s.total.tolist() == pytest.approx([1.25, 0.5])


def make_classifier(path, seed=0):
    """A tiny GPT-2 sequence classifier (one output) with the char tokenizer."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from ratiorl.policy import make_char_tokenizer

    tok = make_char_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=16, n_layer=1, n_head=2, num_labels=1,
                     pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = GPT2ForSequenceClassification(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def test_reward_model_matches_direct_forward_and_is_batched(tmp_path):
    model, tok = make_classifier(tmp_path / "rm")
    prompts = ["1+2=", "10+20=", "3+3="]
    comps = ["3", "30000", "6"]
    one = get_reward("reward_model", path=str(tmp_path / "rm"), batch_size=1)(comps, prompts=prompts, answers=None)
    two = get_reward("reward_model", path=str(tmp_path / "rm"), batch_size=2)(comps, prompts=prompts, answers=None)
    with torch.no_grad():
        direct = [float(model(**tok([p + c], return_tensors="pt")).logits[0, 0]) for p, c in zip(prompts, comps)]
    assert one == pytest.approx(direct, abs=1e-5)
    assert two == pytest.approx(direct, abs=1e-5)  # padding in a batch changes nothing
    prob = get_reward("reward_model", path=str(tmp_path / "rm"), output="probability")(comps, prompts=prompts)
    assert prob == pytest.approx([1 / (1 + math.exp(-x)) for x in direct], abs=1e-5)


def test_reward_model_errors(tmp_path):
    with pytest.raises(ValueError, match="options.path"):
        get_reward("reward_model")
    with pytest.raises(ValueError, match="could not load"):
        get_reward("reward_model", path=str(tmp_path / "missing"))
