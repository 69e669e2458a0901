"""The behaviour policy mu: which weights sample, in which dtype, and whether pi_old needs a forward.

Three policies meet in a step: mu (the sampler's weights, precision and truncation: it drew the
tokens and logged ``behaviour_logp``), pi_old (the policy at the start of the step: the trust region
and the mismatch correction are measured against it) and pi_theta (the policy being updated).
The rollout options that make mu differ from pi_old, as a production stack does:

- ``rollout.dtype: bfloat16``: the sampler is a bf16 copy of the fp32 policy (each weight sync casts);
- ``rollout.policy_lag: k``: the sampler holds the weights of k optimizer updates ago, as an
  asynchronous trainer does; ``rollout.sync_every: s``: it is refreshed every s updates only.
  Both are one rule: after u updates the sampler holds version
  ``sampler_version(u, k, s) = floor(max(0, u - k) / s) * s`` (version v = the weights after v
  updates; 0 = the initial weights);
- ``rollout.top_k`` / ``rollout.top_p`` < 1 / ``rollout.min_p`` > 0: tokens are drawn from a truncated, renormalised
  distribution (the engine logs that distribution's log-prob), while the policy's log-prob is of
  the full tempered distribution.

``old_logp_source`` decides, in one place, where ``old_logp`` comes from.
"""

from __future__ import annotations

import copy

import torch

from ratiorl.policy.models import use_cpu_attention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sampler_version(updates: int, policy_lag: int, sync_every: int) -> int:
    """The policy version the sampler holds after ``updates`` optimizer updates."""
    return (max(0, updates - policy_lag) // sync_every) * sync_every


def mismatch_sources(rollout_cfg, policy_dtype: torch.dtype, autocast: str | None = None) -> list:
    """What makes the sampler's mu differ from the trainer's pi_old under this configuration
    (``autocast``: the trainer's ``train.autocast``)."""
    r = rollout_cfg
    out = []
    if r.dtype is not None and DTYPES[r.dtype] != policy_dtype:
        out.append(f"dtype={r.dtype}")
    if autocast is not None:
        out.append(f"train.autocast={autocast}")  # the trainer's pi is bf16-rounded, the sampler's is not
    if r.policy_lag > 0:
        out.append(f"policy_lag={r.policy_lag}")
    if r.sync_every > 1:
        out.append(f"sync_every={r.sync_every}")
    if r.top_k > 0:
        out.append(f"top_k={r.top_k}")
    if r.top_p < 1.0:
        out.append(f"top_p={r.top_p}")
    if r.min_p > 0.0:
        out.append(f"min_p={r.min_p}")
    return out


def old_logp_source(cfg, objective, sources: list) -> str:
    """Where the step's ``old_logp`` (log pi_old) comes from:

    - ``"loglinear"``: the objective interpolates pi_old between mu and pi_theta from the policy
      versions (``proximal="loglinear"``, AReaL): no forward pass; ``old_logp`` is passed as None;
    - ``"forward"``: a no-grad forward of the policy at the start of the step (before its first
      update) over the sampled tokens. Taken when ``rollout.recompute_old_logp`` asks for it, or
      when mu differs from pi_old (``sources`` not empty) AND the objective needs pi_old distinct
      from mu: it corrects the mismatch (``objective.mismatch_level`` is not ``none``), or the
      batch gets several updates (``train.epochs * train.mini_batches > 1``) whose clip must be
      measured against pi_old rather than against mu;
    - ``"behaviour"``: ``old_logp = behaviour_logp`` (the sampler's numbers; no forward). With a
      single update and no correction, the objective's ratio pi_theta / mu then already is the
      two-policy importance ratio.
    """
    if getattr(objective, "needs_policy_versions", False):
        return "loglinear"
    if cfg.rollout.recompute_old_logp:
        return "forward"
    several_updates = cfg.train.epochs * cfg.train.mini_batches > 1
    if sources and (getattr(objective, "uses_mismatch", False) or several_updates):
        return "forward"
    return "behaviour"


class LaggingSampler:
    """The sampler engine and the bookkeeping of which policy version it holds.

    With no lag, no sync interval and the policy's own dtype the sampler *is* the policy's model
    (``engine`` is ``shared_engine``, no copy). Otherwise it is a frozen copy in ``rollout.dtype``;
    after each update the weights that a later step will sample with are kept as snapshots (in the
    sampler's dtype, at most ``ceil(policy_lag / sync_every) + 1`` of them) until they are loaded.
    ``state_dict`` holds the version and the pending snapshots (the copy's own weights are
    checkpointed by the trainer), so a resumed run samples with exactly the same weights.
    """

    def __init__(self, model, tokenizer, rollout_cfg, shared_engine, engine_cls=None):
        if engine_cls is None:
            from ratiorl.rollout import HFRolloutEngine as engine_cls  # noqa: PLC0415
        r = rollout_cfg
        self.policy_model, self.lag, self.every = model, int(r.policy_lag), int(r.sync_every)
        policy_dtype = next(model.parameters()).dtype
        dtype = DTYPES[r.dtype] if r.dtype is not None else policy_dtype
        self.separate = self.lag > 0 or self.every > 1 or dtype != policy_dtype
        if self.separate:
            sampler = copy.deepcopy(model).requires_grad_(False).to(dtype)
            use_cpu_attention(getattr(sampler, "get_base_model", lambda: sampler)())  # its prefill
            self.engine = engine_cls(sampler, tokenizer, decoder=r.decoder, draw=r.draw,
                                     attention=r.attention)
        else:
            self.engine = shared_engine
        self.version = 0  # the policy version whose weights the sampler holds
        self.snapshots: dict = {}  # version -> state dict, kept until the sampler loads it

    def target(self, updates: int) -> int:
        return sampler_version(updates, self.lag, self.every)

    def after_update(self, updates: int) -> None:
        """Called after optimizer update number ``updates`` (the policy is now version ``updates``)."""
        if not self.separate:
            self.version = updates
            return
        target = self.target(updates)
        if target == updates:  # the newest weights: load them directly
            self.engine.load_weights(self.policy_model)
            self.version = updates
        else:
            if updates % self.every == 0:  # a later step samples with these weights
                self.snapshots[updates] = self.engine.snapshot(self.policy_model)
            if target > self.version:
                self.engine.load_snapshot(self.snapshots[target])
                self.version = target
        self.snapshots = {v: s for v, s in self.snapshots.items() if v > self.version}

    def state_dict(self) -> dict:
        return {"version": self.version, "snapshots": dict(self.snapshots)}

    def load_state_dict(self, state: dict) -> None:
        self.version = int(state["version"])
        self.snapshots = {int(v): s for v, s in state["snapshots"].items()}


__all__ = ["DTYPES", "LaggingSampler", "mismatch_sources", "old_logp_source", "sampler_version"]
