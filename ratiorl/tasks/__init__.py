"""ratiorl.tasks: built-in verifiable tasks and dataset loaders.

>>> task = get_task("addition", seed=0, n_digits=2)
>>> task.train[0]["prompt"], task.check("46", "46")
"""

from .base import Example, Task, available_tasks, exact_checker, get_task, register_task, unique_splits
from . import builtin as _builtin  # noqa: F401  (registers the built-in tasks)
from . import word_problems as _word_problems  # noqa: F401  (word_problems)
from .builtin import final_answer_checker, final_integer
from .loaders import load_hf_dataset, load_jsonl

__all__ = [
    "Task", "Example", "get_task", "register_task", "available_tasks", "unique_splits",
    "exact_checker", "final_answer_checker", "final_integer", "load_jsonl", "load_hf_dataset",
]
