"""ratiorl.rewards: verifiable reward functions and the RewardScorer.

>>> fn = get_reward("exact_match")
>>> fn(["46", "45"], prompts=["12+34="] * 2, answers=["46", "46"])
[1.0, 0.0]
>>> scorer = RewardScorer([("exact_match", 1.0), ("format", 0.1)], noise_sigma=0.0, seed=0)
>>> rewards, metrics = scorer(["46"], prompts=["12+34="], answers=["46"])
>>> scores = scorer.score(["46"], prompts=["12+34="], answers=["46"])
>>> scores.per_function["format"]  # raw, unweighted
tensor([1.])
"""

from .base import Score, available_rewards, get_reward, register_reward
from . import basic as _basic  # noqa: F401  (registers the built-in rewards)
from . import code as _code  # noqa: F401
from . import answers as _answers  # noqa: F401  (answer_match)
from . import format as _format  # noqa: F401  (think_answer_format, boxed_format)
from . import length as _length  # noqa: F401  (cosine_length)
from . import reward_model as _reward_model  # noqa: F401  (reward_model)
from .answers import extract_answer, parse_number
from .code import extract_code
from .sandbox import SandboxLimits, SandboxResult, run_python
from .basic import parse_final_number
from .scorer import RewardScorer, RewardScores, call_reward_safely, parse_reward_spec, weighted_sum

__all__ = [
    "Score", "get_reward", "extract_answer", "parse_number", "register_reward", "available_rewards", "parse_final_number",
    "extract_code", "SandboxLimits", "SandboxResult", "run_python",
    "RewardScorer", "RewardScores", "call_reward_safely", "parse_reward_spec", "weighted_sum",
]
