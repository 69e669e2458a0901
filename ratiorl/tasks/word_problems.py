"""``word_problems``: multi-step arithmetic word problems with a numeric answer, generated from a seed.

    task = get_task("word_problems", seed=0, level=2)
    task.train[0]   # {'prompt': 'Ben has 9 coins. He buys 8 more coins. Then he gives 8 coins to a
                    #   friend. How many coins does Ben have now?', 'answer': '9',
                    #   'completion': '9 + 8 = 17. 17 - 8 = 9. The answer is 9.'}

``level`` sets the number of steps and the size of the numbers:

=====  =====  ====================================================  ===============
level  steps  step kinds                                            numbers up to
=====  =====  ====================================================  ===============
1      1      gain, loss                                            10
2      2      gain, loss                                            20
3      3      gain, loss, k groups of m                             20
4      4      gain, loss, k groups of m, share equally              50
=====  =====  ====================================================  ===============

The running total never goes negative and sharing always divides evenly, so every answer is a
whole number. ``completion`` is a worked solution ending in "The answer is N." (for a supervised
warm start); ``answer`` is N. Reward: ``answer_match`` (the final number, formatting tolerated:
``\\boxed{N}``, "#### N", "N marbles").
"""

from __future__ import annotations

from .base import register_task, unique_splits

NAMES = ["Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Ben", "Eva", "Max", "Lily", "Noah", "Emma", "Liam"]
PRONOUN = {n: ("She" if n in {"Mia", "Ava", "Zoe", "Ivy", "Eva", "Lily", "Emma"} else "He") for n in NAMES}
ITEMS = ["apples", "marbles", "stickers", "coins", "pencils", "cards", "shells", "books", "stamps", "cookies"]
LEVELS = {1: (1, ("gain", "loss"), 10), 2: (2, ("gain", "loss"), 20), 3: (3, ("gain", "loss", "groups"), 20),
          4: (4, ("gain", "loss", "groups", "share"), 50)}
FIRST = ["", "Then ", "After that, ", "Later, "]


def count(x: int, item: str) -> str:
    return f"{x} {item[:-1] if x == 1 else item}"


def word_answer_checker(completion: str, answer: str) -> bool:
    """True when the completion's final answer (``answer_match``'s reading) equals ``answer``."""
    from ratiorl.rewards.answers import extract_answer, numbers_match, parse_number

    return numbers_match(parse_number(extract_answer(completion)), parse_number(answer))


def draw_problem(r, level: int, max_number: int) -> dict:
    n_steps, kinds, _ = LEVELS[level]
    name, item = r.choice(NAMES), r.choice(ITEMS)
    he = PRONOUN[name]
    value = r.randint(2, max_number)
    text = [f"{name} has {count(value, item)}."]
    work = []
    for i in range(n_steps):
        lead = FIRST[min(i, len(FIRST) - 1)]
        choices = [k for k in kinds if not (k == "loss" and value < 2)]
        divisors = [d for d in range(2, 6) if value % d == 0]
        if not divisors:
            choices = [k for k in choices if k != "share"]
        kind = r.choice(choices)
        if kind == "gain":
            x = r.randint(1, max_number)
            text.append(f"{lead}{he.lower() if lead else he} {r.choice(['finds', 'buys', 'gets'])} {x} more {item}.")
            work.append(f"{value} + {x} = {value + x}")
            value += x
        elif kind == "loss":
            x = r.randint(1, value - 1)
            text.append(f"{lead}{he.lower() if lead else he} gives {count(x, item)} to a friend.")
            work.append(f"{value} - {x} = {value - x}")
            value -= x
        elif kind == "groups":
            k, m = r.randint(2, 5), r.randint(2, max(2, max_number // 4))
            text.append(f"{lead}{he.lower() if lead else he} gets {k} bags with {m} {item} in each bag.")
            work.append(f"{k} x {m} = {k * m}, {value} + {k * m} = {value + k * m}")
            value += k * m
        else:  # share: split evenly, keep one share
            d = r.choice(divisors)
            text.append(f"{lead}{he.lower() if lead else he} shares the {item} equally among {d} friends "
                        f"and keeps one share.")
            work.append(f"{value} / {d} = {value // d}")
            value //= d
        text[-1] = text[-1][0].upper() + text[-1][1:]
    text.append(f"How many {item} does {name} have now?")
    return {"prompt": " ".join(text), "answer": str(value),
            "completion": ". ".join(work) + f". The answer is {value}."}


@register_task("word_problems")
def word_problems(rng, *, level: int = 1, n_train: int = 1000, n_eval: int = 200, max_number: int | None = None):
    """Multi-step arithmetic word problems (see the module docstring); ``max_number`` overrides the
    level's number size."""
    if level not in LEVELS:
        raise ValueError(f"word_problems: level must be one of {sorted(LEVELS)}, got {level!r}")
    top = LEVELS[level][2] if max_number is None else max_number
    if not isinstance(top, int) or top < 2:
        raise ValueError(f"word_problems: max_number must be an integer >= 2, got {max_number!r}")
    train, eval_ = unique_splits(rng, lambda r: draw_problem(r, level, top), n_train, n_eval)
    return dict(train=train, eval=eval_, reward="answer_match", checker=word_answer_checker)
