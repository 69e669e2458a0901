"""Stage 2, ``score``: rewards of the completions.

Reads: ``completion_texts``, ``fields`` (``prompt``, ``answer`` and any other dataset column, passed
to the reward functions by name), ``completion_mask`` (lengths, for the overlong penalty).
Adds: ``reward_components`` (each reward function's raw score), ``rewards`` (their weighted sum,
plus seeded noise when configured, minus DAPO's soft overlong penalty), ``correct`` (the accuracy
metric: the run's judge, i.e. ``eval.reward >= eval.threshold`` as in evaluation; the task's own
answer check when no judge is given) and the counters ``reward_errors``,
``reward_timeouts`` and ``time/reward``.
"""

from __future__ import annotations

import time

import torch

from ratiorl.rollout import Rollout


class Score:
    """``Score(scorer, check, reward_cfg, max_new_tokens, judge=None)(rollout) -> rollout``."""

    def __init__(self, scorer, check, reward_cfg, max_new_tokens: int, judge=None):
        self.scorer, self.check, self.cfg, self.max_new_tokens = scorer, check, reward_cfg, max_new_tokens
        self.judge = judge  # a RewardJudge (ratiorl.train.evaluate): training accuracy = evaluation's

    def overlong_penalty(self, lengths: torch.Tensor) -> torch.Tensor:
        """DAPO soft overlong punishment: 0 up to max_new_tokens - buffer, then a linear ramp to
        ``overlong_penalty`` at the limit (tutorial sec. 7.2)."""
        buf = max(1, self.cfg.overlong_buffer)
        over = (lengths.float() - (self.max_new_tokens - buf)).clamp(min=0) / buf
        return self.cfg.overlong_penalty * over.clamp(max=1.0)

    def __call__(self, batch: Rollout) -> Rollout:
        t0 = time.perf_counter()
        fields = dict(batch.fields)
        prompts, answers = fields.pop("prompt"), fields.pop("answer")
        scores = self.scorer.score(batch.completion_texts, prompts=prompts, answers=answers, **fields)
        rewards = scores.total.float()
        if self.cfg.overlong_penalty > 0:
            rewards = rewards - self.overlong_penalty(batch.lengths)
        batch.rewards = rewards
        batch.reward_components = dict(scores.per_function)
        batch.correct = self.correct(batch, prompts, answers, fields)
        batch.counters = {**batch.counters,
                          "reward_errors": float(scores.metrics.get("reward_errors", 0)),
                          "reward_timeouts": float(scores.metrics.get("reward_timeouts", 0)),
                          "time/reward": time.perf_counter() - t0}
        return batch

    def correct(self, batch: Rollout, prompts: list, answers: list, fields: dict) -> torch.Tensor:
        """1.0 where a completion counts as right, judged as evaluation judges it."""
        judge = self.judge
        if judge is None:
            return torch.tensor([float(self.check(t, a)) for t, a in zip(batch.completion_texts, answers)])
        if judge.name in batch.reward_components:  # one of the run's rewards: already computed
            return (batch.reward_components[judge.name] >= judge.threshold).float()
        examples = [{"prompt": p, "answer": a, **{k: v[i] for k, v in fields.items()}}
                    for i, (p, a) in enumerate(zip(prompts, answers))]
        return torch.tensor(judge.correct(judge(batch.completion_texts, examples)))


__all__ = ["Score"]
