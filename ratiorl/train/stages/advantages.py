"""Stage 3, ``advantages``: how much better each completion (or token) was than expected.

Reads: ``rewards``, ``group_ids``; the prompt/completion ids and masks when reference log-probs
or critic values are needed; ``old_logp`` for PPO's in-reward KL.
Adds: ``ref_logp`` (log pi_ref of the sampled tokens, when the KL estimator declares
``needs_ref_logp`` or the critic's in-reward KL is on), ``advantages`` ((B,) from the group
methods, or (B, Tc) from a critic method), and with a critic ``values`` and ``returns`` plus the
counters ``value/mean`` and ``kl_in_reward``.

Which class runs is decided once, from the advantage method's declared ``needs_critic``:
``GroupAdvantages`` or ``CriticAdvantages``.
"""

from __future__ import annotations

import torch

import ratiorl
from ratiorl.rollout import Rollout


def reference_logp(policy, batch: Rollout) -> torch.Tensor:
    """log pi_ref of the sampled tokens, (B, Tc), no gradient."""
    with torch.no_grad():
        return policy.completion_stats(batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                       batch.completion_mask, with_ref_logp=True).ref_logp


class GroupAdvantages:
    """Outcome advantages from each group's rewards: ``ratiorl.advantages(rewards, group_ids, method)``."""

    def __init__(self, policy, method: str, options: dict, need_ref_logp: bool):
        self.policy, self.method, self.options, self.need_ref_logp = policy, method, dict(options), need_ref_logp

    @torch.no_grad()
    def __call__(self, batch: Rollout) -> Rollout:
        batch.ref_logp = reference_logp(self.policy, batch) if self.need_ref_logp else None
        batch.advantages = ratiorl.advantages(batch.rewards, batch.group_ids, method=self.method, **self.options)
        return batch


class CriticAdvantages:
    """Token advantages from a critic (GAE family): the outcome reward sits on each sequence's last
    token, minus ``critic.kl_coef`` times the k1 KL to the reference on every token (PPO's
    in-reward KL); returns = advantages + values; advantages whitened over the batch's tokens
    when ``critic.whiten_advantages``."""

    def __init__(self, policy, critic, method: str, options: dict, critic_cfg, need_ref_logp: bool):
        self.policy, self.critic, self.method, self.options = policy, critic, method, dict(options)
        self.cfg, self.need_ref_logp = critic_cfg, need_ref_logp

    @torch.no_grad()
    def __call__(self, batch: Rollout) -> Rollout:
        batch.ref_logp = reference_logp(self.policy, batch) if self.need_ref_logp else None
        mask = batch.completion_mask
        values = self.critic.model(batch.prompt_ids, batch.prompt_mask, batch.completion_ids, mask)
        m = mask.float()
        lengths = m.sum(1).long()
        token_rewards = torch.zeros_like(m)
        counters = {}
        if batch.ref_logp is not None and self.cfg.kl_coef > 0:  # in-reward KL (k1 at sample time)
            kl_tok = (batch.old_logp - batch.ref_logp) * m
            token_rewards -= self.cfg.kl_coef * kl_tok
            counters["kl_in_reward"] = float(kl_tok.sum() / m.sum().clamp(min=1))
        rows = torch.arange(len(lengths))
        token_rewards[rows, (lengths - 1).clamp(min=0)] += batch.rewards * (lengths > 0)
        adv = ratiorl.advantages(token_rewards, None, method=self.method, values=values, mask=mask, **self.options)
        batch.returns = (adv + values) * m
        batch.values = values
        if self.cfg.whiten_advantages:
            n = m.sum().clamp(min=1)
            mu = (adv * m).sum() / n
            sd = (((adv - mu) * m) ** 2).sum().div(n).sqrt()
            adv = (adv - mu) / (sd + 1e-8) * m
        batch.advantages = adv
        counters["value/mean"] = float((values * m).sum() / m.sum().clamp(min=1))
        batch.counters = {**batch.counters, **counters}
        return batch


__all__ = ["GroupAdvantages", "CriticAdvantages", "reference_logp"]
