"""Stage 3, ``advantages``: how much better each completion (or token) was than expected.

Reads: ``rewards``, ``group_ids``, ``completion_mask``; the prompt/completion ids and masks when
reference log-probs or critic values are needed; ``old_logp`` for PPO's in-reward KL; and what the
advantage method declares (``ratiorl.objectives.advantages_extra``): ``reward_components``
(``needs_reward_components``, GDPO), a greedy completion per prompt scored by the run's rewards
(``needs_greedy_baseline``, ReMax), log pi_old and sum_v pi_old(v)^2 (``needs_token_stats``, the
optimal token baseline).
Adds: ``ref_logp`` (log pi_ref of the sampled tokens, when the KL estimator declares
``needs_ref_logp`` or the critic's in-reward KL is on), ``advantages`` ((B,) from the group
methods, or (B, Tc) from a token-level or critic method), and with a critic ``values`` and
``returns`` plus the counters ``value/mean`` and ``kl_in_reward``. With ``train.pf_ppo`` the
batch is then resampled by reward (PF-PPO, ``advantage_inputs.pf_ppo_resample``).

Which class runs is decided once, from the advantage method's declared ``needs_critic``:
``GroupAdvantages`` or ``CriticAdvantages`` (``build_advantages``).
"""

from __future__ import annotations

import torch

import ratiorl
from ratiorl.objectives import ADVANTAGES
from ratiorl.objectives.advantages import last_token_rewards
from ratiorl.rollout import Rollout

from .advantage_inputs import GreedyBaseline, PFPPO, method_inputs


def reference_logp(policy, batch: Rollout) -> torch.Tensor:
    """log pi_ref of the sampled tokens, (B, Tc), no gradient."""
    with torch.no_grad():  # the reference's forward only (not the policy's too)
        return policy.reference_logp(batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)


class GroupAdvantages:
    """Outcome advantages from each group's rewards: ``ratiorl.advantages(rewards, group_ids, method)``,
    with the inputs the method declares (``greedy``: a ``GreedyBaseline`` for ReMax)."""

    def __init__(self, policy, method: str, options: dict, need_ref_logp: bool, greedy=None, pf_ppo=None):
        self.policy, self.method, self.options, self.need_ref_logp = policy, method, dict(options), need_ref_logp
        self.greedy, self.pf_ppo = greedy, pf_ppo

    @torch.no_grad()
    def __call__(self, batch: Rollout) -> Rollout:
        batch.ref_logp = reference_logp(self.policy, batch) if self.need_ref_logp else None
        inputs = method_inputs(ADVANTAGES.lookup(self.method), batch, self.policy, self.greedy)
        batch.advantages = ratiorl.advantages(batch.rewards, batch.group_ids, method=self.method,
                                              mask=batch.completion_mask, **inputs, **self.options)
        return self.pf_ppo(batch) if self.pf_ppo is not None else batch


class CriticAdvantages:
    """Token advantages from a critic (GAE family): the outcome reward sits on each sequence's last
    token, minus ``critic.kl_coef`` times the k1 KL to the reference on every token (PPO's
    in-reward KL); returns = GAE advantages with the critic's lambda (option ``critic_lam``, VAPO's
    decoupled lambda; None = the policy's) + values; advantages whitened over the batch's tokens
    when ``critic.whiten_advantages``. ``pretraining``: a ``CriticPretraining`` run before the first
    batch (VAPO value pretraining)."""

    def __init__(self, policy, critic, method: str, options: dict, critic_cfg, need_ref_logp: bool,
                 pretraining=None, pf_ppo=None):
        self.policy, self.critic, self.method, self.options = policy, critic, method, dict(options)
        self.cfg, self.need_ref_logp = critic_cfg, need_ref_logp
        self.pretraining, self.pf_ppo = pretraining, pf_ppo

    def token_rewards(self, batch: Rollout, counters: dict) -> torch.Tensor:
        """(B, Tc) rewards: the outcome reward on the last valid token, minus the in-reward KL."""
        m = batch.completion_mask.float()
        token_rewards = last_token_rewards(batch.rewards.float(), m)
        if batch.ref_logp is not None and self.cfg.kl_coef > 0:  # in-reward KL (k1 at sample time)
            kl_tok = (batch.old_logp - batch.ref_logp) * m
            token_rewards = token_rewards - self.cfg.kl_coef * kl_tok
            counters["kl_in_reward"] = float(kl_tok.sum() / m.sum().clamp(min=1))
        return token_rewards

    @torch.no_grad()
    def values_and_returns(self, batch: Rollout, critic_lam=None) -> tuple:
        """(values, GAE advantages of the policy, returns) of a batch; ``critic_lam`` overrides the
        lambda of the returns (1.0: Monte Carlo returns, value pretraining)."""
        mask = batch.completion_mask
        values = self.critic.model(batch.prompt_ids, batch.prompt_mask, batch.completion_ids, mask)
        counters = {}
        r = self.token_rewards(batch, counters)
        opts = {k: v for k, v in self.options.items() if k != "critic_lam"}
        adv = ratiorl.advantages(r, None, method=self.method, values=values, mask=mask, **opts)
        lam_c = self.options.get("critic_lam") if critic_lam is None else critic_lam
        if lam_c is None:
            ret_adv = adv
        else:  # decoupled lambda: the critic learns from returns of its own lambda
            ret_adv = ratiorl.advantages(r, None, method="gae", values=values, mask=mask,
                                         gamma=self.options.get("gamma", 1.0), lam=float(lam_c),
                                         skip_masked=self.options.get("skip_masked", False))
        m = mask.float()
        return values, adv, (ret_adv + values) * m, counters

    @torch.no_grad()
    def __call__(self, batch: Rollout) -> Rollout:
        pre = self.pretraining(self) if self.pretraining is not None else {}
        batch.ref_logp = reference_logp(self.policy, batch) if self.need_ref_logp else None
        values, adv, batch.returns, counters = self.values_and_returns(batch)
        m = batch.completion_mask.float()
        batch.values = values
        if self.cfg.whiten_advantages:
            n = m.sum().clamp(min=1)
            mu = (adv * m).sum() / n
            sd = (((adv - mu) * m) ** 2).sum().div(n).sqrt()
            adv = (adv - mu) / (sd + 1e-8) * m
        batch.advantages = adv
        counters["value/mean"] = float((values * m).sum() / m.sum().clamp(min=1))
        batch.counters = {**batch.counters, **counters, **pre}
        return self.pf_ppo(batch) if self.pf_ppo is not None else batch


def build_advantages(trainer, obj, need_ref_logp: bool, model_path: str) -> tuple:
    """The advantages stage of ``trainer`` for objective ``obj`` and the update's auxiliary terms:
    ``(stage, critic or None, auxiliaries)``. Reads the method's declared capabilities; builds the
    critic (``needs_critic``) with VAPO's value pretraining (``critic.pretrain_steps``), the
    greedy baseline (``needs_greedy_baseline``), PF-PPO (``train.pf_ppo``) and the NLL term on
    correct samples (``train.nll_coef``)."""
    from ..critic import Critic, CriticPretraining, NLLLoss  # noqa: PLC0415

    cfg = trainer.cfg
    method = ADVANTAGES.lookup(obj.advantage)
    options = obj.options("advantage")
    pf_ppo = PFPPO(cfg.train.pf_ppo, cfg.train.pf_ppo_pow, cfg.seed) if cfg.train.pf_ppo else None
    critic, aux = None, []
    if getattr(method, "needs_critic", False):
        critic = Critic(trainer.policy.name_or_path or model_path, trainer.policy.device, cfg.critic)
        pre = None
        if cfg.critic.pretrain_steps > 0:
            pre = CriticPretraining(critic, lambda n: trainer.collector.collect(trainer.draw, n),
                                    cfg.rollout.prompts_per_step, cfg.critic.pretrain_steps, cfg.train.grad_accum,
                                    cfg.optim.max_grad_norm)
        stage = CriticAdvantages(trainer.policy, critic, obj.advantage, options, cfg.critic, need_ref_logp, pre,
                                 pf_ppo)
        aux.append(critic)
    else:
        greedy = None
        if getattr(method, "needs_greedy_baseline", False):
            greedy = GreedyBaseline(trainer.eval_engine, trainer.score, cfg.rollout.max_new_tokens)
        stage = GroupAdvantages(trainer.policy, obj.advantage, options, need_ref_logp, greedy, pf_ppo)
    if cfg.train.nll_coef > 0:
        aux.append(NLLLoss(cfg.train.nll_coef, cfg.train.nll_threshold))
    return stage, critic, aux


__all__ = ["GroupAdvantages", "CriticAdvantages", "build_advantages", "reference_logp"]
