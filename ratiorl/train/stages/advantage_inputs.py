"""Inputs some advantage methods declare, and PF-PPO's resampling (used by stages/advantages.py).

- ``GreedyBaseline``: ReMax's baseline, the reward of one greedy (temperature 0) completion per
  prompt, sampled with the current policy and scored by the run's score stage.
- ``sum_pi_squared``: sum_v pi(v | s_t)^2 at every completion position (the optimal token
  baseline's score-norm proxy), one forward of the policy.
- ``method_inputs``: the keyword inputs an advantage entry declares, read from the batch.
- ``PFPPO``: policy filtration (PF-PPO, Shen et al. 2024, arXiv 2409.06957; verl
  ``compute_pf_ppo_reweight_data``): resample B rows with replacement, with weights from the rewards.
"""

from __future__ import annotations

import torch

from ratiorl.policy import position_ids_from_mask
from ratiorl.rollout import Rollout


class GreedyBaseline:
    """``GreedyBaseline(engine, score, max_new_tokens)(batch) -> (B,)``: each row gets the reward of
    the greedy completion of its prompt (one greedy sample per group)."""

    def __init__(self, engine, score, max_new_tokens: int):
        self.engine, self.score, self.max_new_tokens = engine, score, max_new_tokens

    @torch.no_grad()
    def __call__(self, batch: Rollout) -> torch.Tensor:
        groups = batch.groups()
        first = [batch.rows_of_groups([g])[0] for g in groups]
        prompts = [batch.fields["prompt"][i] for i in first]
        greedy = self.engine.generate(prompts, 1, max_new_tokens=self.max_new_tokens, temperature=0.0)
        rows = greedy.group_ids.tolist()
        greedy.fields = {k: [col[first[g]] for g in rows] for k, col in batch.fields.items()}
        greedy = self.score(greedy)
        by_group = {groups[g]: float(r) for g, r in zip(rows, greedy.rewards.tolist())}
        return torch.tensor([by_group[g] for g in batch.group_ids.tolist()], dtype=batch.rewards.dtype,
                            device=batch.rewards.device)


@torch.no_grad()
def sum_pi_squared(policy, batch: Rollout) -> torch.Tensor:
    """(B, Tc) sum over the vocabulary of pi(v | s_t)^2 (logits / the policy's temperature), 0 on padding."""
    model = policy.model
    Tp = batch.prompt_ids.shape[1]
    ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)[:, :-1]
    attn = torch.cat([batch.prompt_mask.long(), batch.completion_mask.long()], 1)[:, :-1]
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn)).logits[:, Tp - 1:]
    p = torch.softmax(logits.float() / float(getattr(policy, "temperature", 1.0) or 1.0), -1)
    return (p * p).sum(-1) * batch.completion_mask.float()


def method_inputs(method, batch: Rollout, policy=None, greedy=None) -> dict:
    """The declared inputs of advantage entry ``method`` from the batch (see ratiorl.advantages)."""
    out = {}
    if getattr(method, "needs_reward_components", False):
        out["components"] = dict(batch.reward_components or {})
    if getattr(method, "needs_greedy_baseline", False):
        if greedy is None:
            raise ValueError(f"advantage method {method.registry_name!r} needs a greedy baseline (GreedyBaseline)")
        out["baseline"] = greedy(batch)
    if getattr(method, "needs_token_stats", False):
        out["logp"] = batch.old_logp if batch.old_logp is not None else batch.behaviour_logp
        out["sum_pi_squared"] = sum_pi_squared(policy, batch)
    return out


PF_PPO_METHODS = ("pow", "max_min", "max_random")


def pf_ppo_weights(scores: torch.Tensor, method: str, weight_pow: float = 2.0) -> torch.Tensor:
    """verl's PF-PPO weights: |R|^pow ("pow"), 1 on the batch's best and worst rewards ("max_min"),
    0.4 on the best and 0.1 elsewhere ("max_random"); + 1e-8."""
    if method == "pow":
        w = scores.abs().pow(weight_pow)
    elif method == "max_min":
        w = ((scores == scores.max()) | (scores == scores.min())).to(scores.dtype)
    elif method == "max_random":
        w = torch.where(scores == scores.max(), 0.4, 0.1).to(scores.dtype)
    else:
        raise ValueError(f"train.pf_ppo must be one of {PF_PPO_METHODS}, got {method!r}")
    return (w + 1e-8).clamp_min(1e-8)


class PFPPO:
    """``PFPPO(method, weight_pow, seed)(batch)``: B rows drawn with replacement with probability
    proportional to ``pf_ppo_weights(rewards)`` (after the advantages, as verl does); its own
    generator, so the sampling stream is untouched. Counter ``pf_ppo/unique_frac``."""

    def __init__(self, method: str, weight_pow: float = 2.0, seed: int = 0):
        pf_ppo_weights(torch.zeros(1), method, weight_pow)  # validates the method
        self.method, self.weight_pow = method, weight_pow
        self.generator = torch.Generator().manual_seed(seed + 7919)

    def __call__(self, batch: Rollout) -> Rollout:
        w = pf_ppo_weights(batch.rewards.detach().float().cpu(), self.method, self.weight_pow)
        idx = torch.multinomial(w, len(batch), replacement=True, generator=self.generator).sort().values
        out = batch.select(idx)
        out.counters = {**batch.counters, "pf_ppo/unique_frac": float(idx.unique().numel() / len(batch))}
        return out

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


__all__ = ["GreedyBaseline", "PFPPO", "method_inputs", "pf_ppo_weights", "sum_pi_squared"]
