import re

import pytest

from ratiorl.tasks import Task, available_tasks, final_integer, get_task, register_task, unique_splits


def _eval_left_to_right(expr: str) -> int:
    first = re.match(r"-?\d+", expr)
    value = int(first.group())
    tokens = re.findall(r"\d+|[-+*]", expr[first.end():])
    for op, num in zip(tokens[0::2], tokens[1::2]):
        n = int(num)
        value = value + n if op == "+" else value - n if op == "-" else value * n
    return value


def test_builtin_tasks_registered():
    assert {"addition", "chain", "reverse"} <= set(available_tasks())


@pytest.mark.parametrize("name", ["addition", "chain", "reverse"])
def test_deterministic_from_seed(name):
    a = get_task(name, seed=3, n_train=50, n_eval=20)
    b = get_task(name, seed=3, n_train=50, n_eval=20)
    c = get_task(name, seed=4, n_train=50, n_eval=20)
    assert a.train == b.train and a.eval == b.eval
    assert a.train != c.train


@pytest.mark.parametrize("name", ["addition", "chain", "reverse"])
def test_splits_disjoint_sized_and_ascii(name):
    task = get_task(name, seed=0, n_train=300, n_eval=100)
    assert isinstance(task, Task) and task.name == name
    assert len(task.train) == 300 and len(task.eval) == 100
    train_prompts = {ex["prompt"] for ex in task.train}
    eval_prompts = {ex["prompt"] for ex in task.eval}
    assert len(train_prompts) == 300 and len(eval_prompts) == 100
    assert not train_prompts & eval_prompts
    printable = re.compile(r"^[\x20-\x7e\n]*$")
    for ex in task.train + task.eval:
        assert printable.match(ex["prompt"]) and printable.match(ex["answer"])
        assert printable.match(ex["completion"])


def test_eval_split_does_not_depend_on_n_train():
    assert get_task("addition", n_train=10, n_eval=30).eval == get_task("addition", n_train=500, n_eval=30).eval


def test_addition_format_and_checker():
    task = get_task("addition", seed=1, n_digits=3, n_train=200, n_eval=10)
    assert task.reward == "exact_match"
    for ex in task.train:
        m = re.fullmatch(r"(\d{1,3})\+(\d{1,3})=", ex["prompt"])
        assert m, ex
        assert ex["answer"] == str(int(m.group(1)) + int(m.group(2)))
        assert task.check(ex["answer"], ex["answer"])
        assert task.check(" " + ex["answer"] + "\n", ex["answer"])
        assert not task.check(str(int(ex["answer"]) + 1), ex["answer"])
        assert not task.check(ex["answer"] + "0", ex["answer"])
    assert not task.check("", "46")


def test_addition_default_is_two_digits():
    task = get_task("addition", n_train=500, n_eval=0)
    operands = [int(x) for ex in task.train for x in ex["prompt"][:-1].split("+")]
    assert max(operands) <= 99 and max(operands) >= 90


def test_chain_worked_answer_and_checker():
    task = get_task("chain", seed=2, n_terms=4, n_digits=2, ops="+-*", n_train=200, n_eval=10)
    assert task.reward == "numeric_match"
    for ex in task.train:
        expected = _eval_left_to_right(ex["prompt"][:-1])
        assert ex["answer"] == str(expected)
        # the worked completion has one step per remaining operator and ends with the value
        steps = ex["completion"].split("=")
        assert len(steps) == 3 and steps[-1] == ex["answer"]
        assert all(_eval_left_to_right(s) == expected for s in steps)
        assert task.check(ex["completion"], ex["answer"])
        assert task.check(ex["answer"], ex["answer"])
        assert not task.check(ex["completion"] + "1", ex["answer"])
        assert not task.check(str(expected + 1), ex["answer"])
    assert not task.check("12+3=", "15")      # no final value
    assert not task.check("garbage", "15")


def test_chain_default_prompt_shape():
    ex = get_task("chain", n_train=1, n_eval=0).train[0]
    assert re.fullmatch(r"\d\+\d\+\d=", ex["prompt"])
    a, b, c = (int(x) for x in ex["prompt"][:-1].split("+"))
    assert ex["completion"] == f"{a + b}+{c}={a + b + c}"


def test_reverse_checker():
    task = get_task("reverse", n_train=50, n_eval=5)
    for ex in task.train:
        digits = ex["prompt"][len("rev:"):-1]
        assert ex["answer"] == digits[::-1]
        assert task.check(ex["answer"], ex["answer"])
    assert not task.check("123", "321")


def test_final_integer():
    assert final_integer("46+5=51") == 51
    assert final_integer(" -7 ") == -7
    assert final_integer("the answer is 12") == 12
    assert final_integer("12+3=") is None
    assert final_integer("") is None


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match="addition.*chain"):
        get_task("multiplication")


def test_unknown_option_is_clear():
    with pytest.raises(TypeError, match="n_digit'.*did you mean 'n_digits'.*valid options: n_digits"):
        get_task("addition", n_digit=3)


def test_impossible_sizes_and_bad_options():
    with pytest.raises(ValueError, match="only has 100"):
        get_task("addition", n_digits=1, n_train=95, n_eval=10)
    with pytest.raises(ValueError, match="ops"):
        get_task("chain", ops="/")
    # exactly the whole space works
    task = get_task("addition", n_digits=1, n_train=90, n_eval=10)
    assert len({ex["prompt"] for ex in task.train + task.eval}) == 100


def test_registering_a_new_task_is_one_function():
    @register_task("test_echo_task")
    def echo(rng, *, n_train=5, n_eval=2):
        def draw(r):
            s = str(r.randrange(10**6))
            return {"prompt": f"echo:{s}=", "answer": s}
        train, eval_ = unique_splits(rng, draw, n_train, n_eval)
        return dict(train=train, eval=eval_)

    task = get_task("test_echo_task", seed=1, n_train=7)
    assert len(task.train) == 7 and len(task.eval) == 2
    assert task.reward == "exact_match"
    assert task.check(" 12 ", "12") and not task.check("13", "12")
    with pytest.raises(ValueError, match="already registered"):
        register_task("test_echo_task")(echo)


def test_check_never_raises():
    task = get_task("chain", n_train=1, n_eval=0)
    assert task.check("7", "not a number") is False


def test_builtin_tasks_declare_keyword_only_options_with_defaults():
    import inspect

    from ratiorl.tasks.base import TASKS

    for name in ("addition", "chain", "reverse"):
        rng, *options = inspect.signature(TASKS[name]).parameters.values()
        assert rng.name == "rng" and rng.kind is rng.POSITIONAL_OR_KEYWORD
        assert {"n_train", "n_eval"} <= {p.name for p in options}
        for p in options:
            assert p.kind is p.KEYWORD_ONLY and p.default is not p.empty, (name, p.name)
    # the defaults in the signature are the defaults used
    assert len(get_task("reverse").train) == TASKS["reverse"].__kwdefaults__["n_train"] == 1000
    with pytest.raises(TypeError, match="'max_length'.*valid options: min_len, max_len, n_train, n_eval"):
        get_task("reverse", max_length=4)
