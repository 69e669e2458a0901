"""ratiorl objectives as verl policy losses: ``actor_rollout_ref.actor.policy_loss.loss_mode=ratiorl.<preset>``.

How verl (0.9.1) finds this module: ``import verl`` loads every setuptools entry point of the group
``verl.plugins`` (``VERL_USE_EXTERNAL_PLUGINS``: ``auto`` by default, ``none``, or a list of
entry-point names); ratiorl declares ``ratiorl = "ratiorl.integrations.verl"`` there, so every
process that imports verl (the driver and each Ray worker) registers the losses below with verl's
own ``register_policy_loss``. The actor's loss (``verl.workers.utils.losses.ppo_loss``) then gets
the function with ``get_policy_loss_fn(config.policy_loss.loss_mode)``. Without the entry point
(``VERL_USE_EXTERNAL_PLUGINS=none``), ``VERL_USE_EXTERNAL_MODULES=ratiorl.integrations.verl`` does
the same through verl's module list.

verl calls a policy loss as ``fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
config, rollout_is_weights)`` with ``config`` the actor config (``ActorConfig``, a closed schema: no
free keys). Options therefore come from the actor config fields, routed only to objectives whose
entries declare them (docs/verl.md has the table):

- ``clip_ratio_low`` / ``clip_ratio_high`` (falling back to ``clip_ratio``) -> ``clip_low`` / ``clip_high``;
  ``clip_ratio_c`` -> ``dual_clip``; ``tau_pos`` / ``tau_neg`` -> SAPO's gate;
- ``loss_agg_mode`` -> the aggregation (token-mean -> token_mean, seq-mean-token-mean ->
  seq_mean_token_mean, seq-mean-token-sum(-norm) -> seq_mean_token_sum(_norm) with
  ``max_tokens = loss_scale_factor`` or the padded length as verl; token-sum -> a token sum);
- ``config.global_batch_info`` (dp_size, batch_num_tokens, global_batch_size) -> ``num_tokens`` and
  ``num_sequences`` = global count / dp_size, as verl's ``agg_loss`` normalises;
- ``beta`` is 0: the KL term is verl's (``use_kl_loss``, ``kl_loss_coef``, ``kl_loss_type``).

Other options (``pos_power``, DGPO's ``n``/``m``, ``normalize_scope``, ...): register a configured
objective under its own name from a module that verl imports (``VERL_USE_EXTERNAL_MODULES``)::

    from ratiorl.integrations.verl import register
    register("ratiorl.ctpo_p07", ratiorl.objective("ctpo", pos_power=0.7))

Group ids: verl's loss signature carries no ``uid``. Objectives whose loss needs groups
(``obj.loss_needs_groups``: SNIB's self-normalised weights) take ``group_ids = row // rollout.n``:
the precondition is that every micro-batch holds whole groups of ``rollout.n`` consecutive rows in
generation order. verl keeps that order when ``trainer.balance_batch=False``,
``actor.shuffle=False`` and ``actor.use_dynamic_bsz=False`` and micro-batch sizes are multiples of
``rollout.n``; the loss asserts the last three (the actor config shows them) and the row count,
and docs/verl.md states the first (the driver's setting is not visible to the loss).

Sampler mismatch: verl hands the loss its own rollout-correction weights (``rollout_is_weights``,
from ``algorithm.rollout_correction``), never the rollout log-probs. So verl's correction is the
one that applies: the weights multiply the per-element loss exactly as verl's own losses do
(folded into the advantages, which every ratiorl shaping scales linearly for a non-negative
factor; for a sequence-level weight the verl weights must be constant within each sequence,
i.e. ``rollout_is=sequence``). An objective with a ratiorl mismatch level cannot be registered
(it needs the behaviour log-probs), so the correction never applies twice.
"""

from __future__ import annotations

import math

import torch

try:
    from verl.trainer.ppo.core_algos import register_policy_loss
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(f"the verl plugin needs verl ({err}); install it with: pip install 'ratiorl[verl]'") from err

import ratiorl
from ratiorl.objectives import Objective

PREFIX = "ratiorl."
AGGREGATIONS = {  # verl loss_agg_mode -> ratiorl aggregation
    "token-mean": "token_mean",
    "token-sum": "token_mean",  # with num_tokens = 1 / dp_size: a plain token sum, scaled as verl
    "seq-mean-token-mean": "seq_mean_token_mean",
    "seq-mean-token-sum": "seq_mean_token_sum",
    "seq-mean-token-sum-norm": "seq_mean_token_sum_norm",
}
_MISSING = object()


def _cfg(config, key, default=None):
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None else value


def objective_for(base: Objective, config, loss_agg_mode: str) -> Objective:
    """``base`` with the options verl's actor ``config`` sets (module docstring), ``beta=0``."""
    if loss_agg_mode not in AGGREGATIONS:
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r} is not supported by ratiorl's verl losses; "
                         f"valid: {', '.join(AGGREGATIONS)}")
    clip = _cfg(config, "clip_ratio", 0.2)
    verl_opts = {
        "clip_low": _cfg(config, "clip_ratio_low", clip),
        "clip_high": _cfg(config, "clip_ratio_high", clip),
        "dual_clip": _cfg(config, "clip_ratio_c", None),
        "tau_pos": _cfg(config, "tau_pos", None),
        "tau_neg": _cfg(config, "tau_neg", None),
    }
    changes = {"beta": 0.0, "aggregation": AGGREGATIONS[loss_agg_mode]}
    obj = base.replace(**changes)
    opts = {k: v for k, v in verl_opts.items() if v is not None and obj.option(k, _MISSING) is not _MISSING}
    if loss_agg_mode == "seq-mean-token-sum-norm":
        opts["max_tokens"] = _cfg(config, "loss_scale_factor", None)  # None: the padded length, as verl
    return obj.replace(**opts) if opts else obj


def _check_groups(obj: Objective, config, B: int) -> torch.Tensor:
    n = int(_cfg(config, "rollout_n", 0) or 0)
    problems = []
    if n < 1:
        problems.append("the actor config has no rollout_n (set actor_rollout_ref.rollout.n)")
    if _cfg(config, "use_dynamic_bsz", False):
        problems.append("actor.use_dynamic_bsz=True regroups rows by token count")
    if _cfg(config, "shuffle", False):
        problems.append("actor.shuffle=True shuffles rows across mini-batches")
    if n >= 1 and B % n:
        problems.append(f"this micro-batch has {B} rows, not a multiple of rollout.n={n}")
    if problems:
        raise ValueError(
            f"objective {obj.name!r} normalises weights within each group of rollout.n responses, and verl's "
            "policy-loss call carries no uid: the plugin needs every micro-batch to hold whole groups in "
            "generation order (trainer.balance_batch=False, actor.shuffle=False, actor.use_dynamic_bsz=False, "
            "ppo_micro_batch_size_per_gpu and the per-rank mini-batch a multiple of rollout.n); "
            + "; ".join(problems))
    return torch.div(torch.arange(B), n, rounding_mode="floor")


def _fold_rollout_weights(obj: Objective, advantages, mask, rollout_is_weights):
    """verl's ``pg_losses * rollout_is_weights`` as advantages scaled by the (non-negative) weights."""
    w = rollout_is_weights.detach().to(advantages.dtype)
    m = mask.to(torch.bool)
    if bool((w[m] < 0).any()) or not bool(torch.isfinite(w[m]).all()):
        raise ValueError("rollout_is_weights must be finite and >= 0 on response tokens")
    if obj.level == "sequence":
        first = torch.where(m, w, torch.zeros_like(w)).amax(1, keepdim=True)
        if not bool(torch.allclose(torch.where(m, w, first), first.expand_as(w), rtol=1e-6, atol=1e-8)):
            raise ValueError(
                f"objective {obj.name!r} has a sequence-level weight, but verl's rollout_is_weights vary within "
                "a sequence; use algorithm.rollout_correction.rollout_is=sequence (or a token-level objective)")
    A = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(w)
    return A * w


class VerlPolicyLoss:
    """A ratiorl objective behind verl's policy-loss signature (see the module docstring)."""

    def __init__(self, name: str, objective: Objective):
        if objective.needs_behaviour_logp:
            raise ValueError(
                f"objective {name!r} uses a ratiorl mismatch correction (mismatch_level={objective.mismatch_level!r}, "
                f"proximal={objective.proximal!r}), which needs the rollout log-probs; verl passes its policy losses "
                "only its own rollout-correction weights. Use verl's algorithm.rollout_correction (rollout_is, "
                "rollout_is_threshold, rollout_rs), which these losses apply, and an objective without mismatch_level")
        self.name, self.objective, self._cache = name, objective, {}

    def resolve(self, config, loss_agg_mode: str) -> Objective:
        key = (loss_agg_mode,) + tuple(_cfg(config, k, None) for k in (
            "clip_ratio", "clip_ratio_low", "clip_ratio_high", "clip_ratio_c", "tau_pos", "tau_neg",
            "loss_scale_factor"))
        if key not in self._cache:
            self._cache[key] = objective_for(self.objective, config, loss_agg_mode)
        return self._cache[key]

    def __call__(self, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode: str = "token-mean",
                 config=None, rollout_is_weights=None, **unused):
        if config is None:
            raise ValueError(f"{self.name}: verl passes the actor config; got config=None")
        obj = self.resolve(config, loss_agg_mode)
        B = log_prob.shape[0]
        group_ids = _check_groups(obj, config, B).to(log_prob.device) if obj.loss_needs_groups else None
        if rollout_is_weights is not None:
            advantages = _fold_rollout_weights(obj, advantages, response_mask, rollout_is_weights)
        info = dict(_cfg(config, "global_batch_info", {}) or {})
        dp = int(info.get("dp_size") or 1)
        num_tokens = num_sequences = None
        mask = response_mask.to(log_prob.dtype)
        if loss_agg_mode == "token-sum":
            num_tokens = 1.0 / dp
        elif info.get("batch_num_tokens") is not None:
            num_tokens = float(info["batch_num_tokens"]) / dp
        elif dp > 1:
            raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
        if loss_agg_mode.startswith("seq-mean"):
            if info.get("global_batch_size") is not None:
                num_sequences = float(info["global_batch_size"]) / dp
            elif dp > 1:
                raise ValueError("global_batch_size is required when dp_size > 1")
            else:  # verl counts the non-empty responses
                num_sequences = max(float((mask.sum(1) > 0).sum()), 1.0)
        out = obj(log_prob, old_log_prob.detach(), advantages.detach(), mask, group_ids=group_ids,
                  num_tokens=num_tokens, num_sequences=num_sequences)
        with torch.no_grad():
            n = mask.sum().clamp_min(1.0)
            ppo_kl = float(((old_log_prob - log_prob) * mask).sum() / n)
        metrics = {
            "actor/pg_clipfrac": out.metrics.get("clip_frac", 0.0),
            "actor/ppo_kl": ppo_kl,
            "actor/pg_clipfrac_lower": out.metrics.get("dual_clip_frac", 0.0),
        }
        for k, v in out.metrics.items():
            if isinstance(v, float) and math.isfinite(v):
                metrics[f"actor/ratiorl/{k}"] = v
        return out.loss, metrics


def register(name: str, objective: Objective | str, *, overwrite: bool = False) -> VerlPolicyLoss:
    """Register ``objective`` (an ``Objective`` or a preset name) as verl's policy loss ``name``."""
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

    if name in POLICY_LOSS_REGISTRY and not overwrite:
        existing = POLICY_LOSS_REGISTRY[name]
        if isinstance(existing, VerlPolicyLoss) and existing.objective == objective:
            return existing
        raise ValueError(f"verl already has a policy loss named {name!r}; pass overwrite=True to replace it")
    obj = ratiorl.objective(objective) if isinstance(objective, str) else objective
    fn = VerlPolicyLoss(name, obj)
    register_policy_loss(name)(fn)
    return fn


def register_presets() -> list[str]:
    """Register ``ratiorl.<preset>`` for every ratiorl preset; returns the names."""
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

    names = []
    for preset in ratiorl.available_objectives():
        name = PREFIX + preset
        if name not in POLICY_LOSS_REGISTRY:
            obj = ratiorl.objective(preset)
            if obj.needs_behaviour_logp:
                continue
            register(name, obj)
        names.append(name)
    return names


register_presets()

__all__ = ["AGGREGATIONS", "PREFIX", "VerlPolicyLoss", "objective_for", "register", "register_presets"]
