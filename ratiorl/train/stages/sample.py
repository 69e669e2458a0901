"""Stage 1, ``sample``: prompts in, a new ``Rollout`` out.

Reads: nothing (it draws the next prompts of the training split from a ``PromptStream``).
Produces: ``prompt_ids/mask``, ``completion_ids/mask``, ``behaviour_logp`` (log mu: the log-prob of
the truncated, renormalised distribution the sampler drew each token from, in the sampler's
precision), ``behaviour_version`` (the policy version of the sampler's weights), ``old_logp`` (log
pi_old: ``behaviour_logp``, or a no-grad forward of the policy at the start of the step when
``ratiorl.train.sampler.old_logp_source`` says "forward"), ``group_ids``, ``truncated``,
``completion_texts``, ``fields`` (every dataset column of each row's example: ``prompt``,
``answer``, ...) and the counters ``time/rollout`` (sampling) and ``time/old_logp`` (the forward, if any).
"""

from __future__ import annotations

import random
import time

import torch

from ratiorl.rollout import Rollout, sampling_options

from ..distributed import shard_prompts


class PromptStream:
    """The training examples in a seeded shuffle, epoch after epoch; its position is checkpointed."""

    def __init__(self, examples: list, seed: int):
        self.examples, self.seed = examples, seed
        self.epoch, self.pos = 0, 0
        self._order = (None, None)

    def order(self, epoch: int) -> list:
        if self._order[0] != epoch:
            order = list(range(len(self.examples)))
            random.Random(f"ratiorl.train/{self.seed}/{epoch}").shuffle(order)
            self._order = (epoch, order)
        return self._order[1]

    def take(self, n: int) -> list:
        out = []
        while len(out) < n:
            order = self.order(self.epoch)
            if self.pos >= len(order):
                self.epoch, self.pos = self.epoch + 1, 0
                continue
            out.append(self.examples[order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


class Sample:
    """``Sample(engine, stream, rollout_cfg, generator, old_logp_scorer, version)(n_prompts) -> Rollout``.

    ``old_logp_scorer``: a Policy whose ``completion_stats`` gives log pi_old (the trainer's policy:
    the sample stage runs before the step's first update), or None for ``old_logp = behaviour_logp``.
    ``version``: a callable returning the policy version of the sampler's weights, or None.
    ``shard``: ``(rank, world_size)`` under data parallel: a call for ``n`` prompts takes the
    ``n * world_size`` prompts a single process would take and keeps slice ``rank`` of them.
    The engine samples with the config's temperature, ``top_k``, ``top_p``, ``min_p`` and ``stop``
    (``ratiorl.rollout.sampling_options``; checked here, so a bad value fails before any sampling).
    """

    def __init__(self, engine, stream: PromptStream, rollout_cfg, generator: torch.Generator, old_logp_scorer=None,
                 version=None, shard: tuple = (0, 1)):
        self.engine, self.stream, self.cfg, self.generator = engine, stream, rollout_cfg, generator
        self.old_logp_scorer = old_logp_scorer
        self.version = version
        self.shard = shard
        sampling_options(rollout_cfg)  # fail now on a bad value

    def __call__(self, n_prompts: int) -> Rollout:
        r = self.cfg
        rank, world = self.shard
        examples = shard_prompts(self.stream.take(n_prompts * world), rank, world) if world > 1 else \
            self.stream.take(n_prompts)
        t0 = time.perf_counter()
        batch = self.engine.generate([e["prompt"] for e in examples], r.num_generations,
                                     max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                     generator=self.generator, **sampling_options(r))
        rows = batch.group_ids.tolist()  # group g answers examples[g]
        batch.fields = {k: [examples[i][k] for i in rows] for k in examples[0] if k != "completion"}
        if self.version is not None:
            batch.behaviour_version = torch.full((len(batch),), int(self.version()), dtype=torch.long,
                                                 device=batch.device)
        t1 = time.perf_counter()
        batch.counters = {"time/rollout": t1 - t0}
        if self.old_logp_scorer is not None:
            with torch.no_grad():
                batch.old_logp = self.old_logp_scorer.completion_stats(
                    batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask).logp
            batch.counters["time/old_logp"] = time.perf_counter() - t1
        return batch


__all__ = ["PromptStream", "Sample"]
