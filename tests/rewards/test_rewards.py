import math
import sys

import pytest

from ratiorl.rewards import available_rewards, get_reward, parse_final_number, register_reward, weighted_sum


def test_registry_lists_builtins_and_rejects_unknown():
    assert {"exact_match", "numeric_match", "math_verify", "code_tests", "format", "weighted"} <= set(available_rewards())
    with pytest.raises(ValueError, match="valid rewards: .*exact_match"):
        get_reward("exact")
    with pytest.raises(TypeError, match="'tolerance'.*valid options: atol, rtol"):
        get_reward("numeric_match", tolerance=0.1)


def test_exact_match_strips_whitespace():
    fn = get_reward("exact_match")
    out = fn(["46", " 46\n", "47", "4 6", ""], prompts=["12+34="] * 5, answers=["46"] * 5)
    assert out == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert get_reward("exact_match", strip=False)([" 46"], prompts=["p"], answers=["46"]) == [0.0]
    assert get_reward("exact_match", case_sensitive=False)(["ABC"], prompts=["p"], answers=["abc"]) == [1.0]
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        fn(["1", "2"], prompts=["a", "b"], answers=["1"])


@pytest.mark.parametrize("text,value", [
    ("46", 46.0), ("the answer is -3.5.", -3.5), ("1,234 apples", 1234.0), ("x = 3/4", 0.75),
    ("1e-3", 0.001), ("12+34=46", 46.0), ("no number", None), ("5 then 7", 7.0),
])
def test_parse_final_number(text, value):
    got = parse_final_number(text)
    assert (got is None and value is None) or math.isclose(got, value)


def test_numeric_match_tolerance():
    fn = get_reward("numeric_match", atol=0.01)
    out = fn(["so 3.005", "3.02", "three", "46+5=51"], prompts=["p"] * 4, answers=["3", "3", "3", "51"])
    assert out == [1.0, 0.0, 0.0, 1.0]
    rel = get_reward("numeric_match", atol=0.0, rtol=0.01)
    assert rel(["1005", "1011"], prompts=["p", "p"], answers=["1000", "1000"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="contains no number"):
        fn(["1"], prompts=["p"], answers=["n/a"])


def test_format_reward():
    fn = get_reward("format", pattern=r"\d+=\d+")
    assert fn(["12=12", "12=12 extra", "x"], prompts=["p"] * 3, answers=["a"] * 3) == [1.0, 0.0, 0.0]
    search = get_reward("format", pattern=r"<answer>.*</answer>", mode="search", value=0.5)
    assert search(["think <answer>4</answer>", "4"], prompts=["p"] * 2, answers=["4"] * 2) == [0.5, 0.0]
    with pytest.raises(ValueError, match="mode"):
        get_reward("format", mode="partial")


def test_math_verify():
    pytest.importorskip("math_verify")
    fn = get_reward("math_verify")
    out = fn([r"so the answer is $\frac{1}{2}$", r"\boxed{0.5}", "0.3", "no idea", r"\boxed{x^2+2x}"],
             prompts=["p"] * 5, answers=["1/2", r"\frac12", "1/3", "7", r"x(x+2)"])
    assert out == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_math_verify_missing_dependency(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)
    with pytest.raises(ImportError, match=r"pip install 'ratiorl\[math\]'"):
        get_reward("math_verify")


def test_weighted_composition_equals_manual_sum():
    completions = ["46", " 46 ", "46!", "x"]
    answers = ["46"] * 4
    kw = dict(prompts=["12+34="] * 4, answers=answers)
    em = get_reward("exact_match")(completions, **kw)
    fmt = get_reward("format", pattern=r"\d+")(completions, **kw)
    num = get_reward("numeric_match")(completions, **kw)
    spec = [("exact_match", 1.0), ("format", 0.25, {"pattern": r"\d+"}), ("numeric_match", -0.5)]
    manual = [1.0 * a + 0.25 * b - 0.5 * c for a, b, c in zip(em, fmt, num)]
    assert weighted_sum(spec)(completions, **kw) == pytest.approx(manual)
    assert get_reward("weighted", components=spec)(completions, **kw) == pytest.approx(manual)
    assert manual != [0.0] * 4 and len(set(manual)) > 1


def test_register_custom_reward():
    @register_reward("test_length_penalty")
    def length_penalty(per_char: float = 0.1):
        def fn(completions, *, prompts=None, answers=None, **fields):
            return [-per_char * len(c) for c in completions]
        return fn

    assert get_reward("test_length_penalty", per_char=1.0)(["ab", ""], prompts=["p", "p"], answers=["a", "a"]) == [-2.0, -0.0]


def test_builtin_rewards_declare_keyword_only_options_with_defaults():
    import inspect

    from ratiorl.rewards.base import REWARDS

    builtins = ["exact_match", "numeric_match", "format", "math_verify", "code_tests", "weighted"]
    for name in builtins:
        params = inspect.signature(REWARDS[name]).parameters.values()
        for p in params:
            assert p.kind is p.KEYWORD_ONLY, (name, p.name)
            assert p.default is not p.empty, (name, p.name)
    # options are validated against the signature: a typo is caught before the factory runs
    with pytest.raises(TypeError, match="'strp'.*did you mean 'strip'.*valid options: strip, case_sensitive"):
        get_reward("exact_match", strp=False)
    with pytest.raises(TypeError, match="valid options: components"):
        get_reward("weighted", component=[])
