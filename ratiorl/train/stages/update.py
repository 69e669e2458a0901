"""Stage 4, ``update``: ``epochs`` x ``mini_batches`` optimizer updates on the batch.

Reads: ids and masks, ``old_logp``, ``ref_logp``, ``advantages``, ``group_ids`` (and ``values`` /
``returns`` through the critic's auxiliary loss); ``behaviour_logp`` when the objective declares
``needs_behaviour_logp`` (a sampler/trainer mismatch correction), and ``behaviour_version`` with the
step's policy version when it declares ``needs_policy_versions`` (``proximal="loglinear"``: then
``old_logp`` is passed as None and the objective interpolates pi_old).
Adds: ``policy_logp`` (log pi_theta of every row at its last forward, detached) and
``update_index`` (which update of the step that forward belonged to: the rows of the last
update are the most off-policy, the diagnostics read them), and ``update_metrics`` (loss,
gradient norm, the objective's metrics, entropy, KL, and with ``measure_mismatch`` the measured
gap between the sampler and pi_old: ``sampler/kl_k1``, ``sampler/kl_k3`` (token means of the k1 and
k3 estimates of KL(mu || pi_old)) and ``sampler/abs_logp_diff``; micro-batch values averaged with
row weights).

The batch is always split ON GROUP BOUNDARIES (a self-normalised weight needs its whole group),
each mini-batch again into ``grad_accum`` micro-batches, and every micro-batch loss uses the
global token and sequence counts (of the whole rollout by default, ``train.count_scope``), so
the accumulated gradient is exactly the gradient of the un-split loss. Under data parallel
(``dist``, ratiorl/train/distributed.py) the counts are summed over ranks before the loss and the
gradients summed over ranks before clipping, so the update is the single-process update on the
union of the ranks' batches; ``loss`` and the micro-batch metrics are reduced over ranks too.
With ``train.parallel: fsdp`` (``sharding``, ratiorl/train/fsdp.py) FSDP sums the sharded
gradients, each micro-batch is prepared by ``sharding.prepare_micro_batch`` (the same forwards on
every rank) and the clipping norm is the global norm of the sharded gradients.
"""

from __future__ import annotations

import math

import torch

from ratiorl.rollout import Rollout

from ..distributed import LOCAL
from ..fsdp import full_tensor, shard_optimizer_state


def sampler_gap(behaviour_logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> dict:
    """Token means of KL(mu || pi_old) by k1 (log mu - log pi_old) and k3 (r - 1 - log r with
    r = pi_old / mu), and of |log mu - log pi_old|, over the tokens of ``mask``."""
    d = (old_logp - behaviour_logp).double() * mask  # log r, 0 off the mask
    n = mask.sum().clamp(min=1)
    return {"sampler/kl_k1": float(-d.sum() / n),
            "sampler/kl_k3": float(((d.exp() - 1 - d) * mask).sum() / n),
            "sampler/abs_logp_diff": float(d.abs().sum() / n)}


class Update:
    """``Update(policy, objective, optimizer, scheduler, cfg, auxiliary=[critic], after_update=sync)(batch)``."""

    def __init__(self, policy, objective, optimizer, scheduler, cfg, auxiliary=(), after_update=None,
                 measure_token_kl: bool = False, measure_mismatch: bool = False, dist=None, sharding=None):
        self.policy, self.objective, self.optimizer, self.scheduler = policy, objective, optimizer, scheduler
        # data parallel (ratiorl/train/distributed.py): global counts, gradients summed over ranks
        self.dist = dist if dist is not None else LOCAL
        self.sharding = sharding  # train.parallel=fsdp: an FSDPPolicy (ratiorl/train/fsdp.py), else None
        self.cfg = cfg
        self.params = policy.trainable_parameters()
        self.dist.broadcast_parameters(self.params)  # every rank starts from rank 0's weights
        self.auxiliary = list(auxiliary)  # extra loss terms with their own optimizers (the critic)
        self.after_update = after_update  # called with the update count (sampler weight sync)
        self.measure_token_kl = measure_token_kl  # full-vocabulary KL per token (exact estimator, or observed
        self.updates = 0                          # for a KL controller while beta is still 0)
        self.measure_mismatch = measure_mismatch  # old_logp is the trainer's forward: report its gap to mu
        self.step_version = 0  # optimizer updates before this step's first one (the version of pi_old)

    # ------------------------------------------------------------------ one micro-batch
    def micro_batch_loss(self, mb: Rollout, num_tokens: float, num_sequences: float) -> tuple:
        """Objective (+ auxiliary) loss of a micro-batch of whole groups with global counts."""
        mb = mb.trim()
        if self.sharding is not None:
            mb = self.sharding.prepare_micro_batch(mb)
        obj = self.objective
        stats = self.policy.completion_stats(mb.prompt_ids, mb.prompt_mask, mb.completion_ids, mb.completion_mask,
                                             with_entropy=True, with_kl=self.measure_token_kl)
        old_logp, extra = mb.old_logp, {}
        if getattr(obj, "needs_behaviour_logp", False):
            extra["behaviour_logp"] = mb.behaviour_logp
        if getattr(obj, "needs_entropy", False):  # entropy bonus, entropy-based token selection
            extra["entropy"] = stats.entropy
        if getattr(obj, "needs_policy_versions", False):  # pi_old interpolated by the objective
            old_logp = None
            extra.update(behaviour_version=mb.behaviour_version, policy_version=self.step_version)
        out = obj(stats.logp, old_logp, mb.advantages, mb.completion_mask, group_ids=mb.group_ids - mb.group_ids.min(),
                  ref_logp=mb.ref_logp, token_kl=stats.token_kl, num_tokens=num_tokens, num_sequences=num_sequences,
                  **extra)
        loss = out.loss
        m = mb.completion_mask.float()
        ntok = m.sum().clamp(min=1)
        metrics = {f"objective/{k}": float(v) for k, v in out.metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.measure_mismatch:
            metrics.update(sampler_gap(mb.behaviour_logp, mb.old_logp, m))
        metrics["entropy"] = float((stats.entropy.detach() * m).sum() / ntok)
        if stats.token_kl is not None:
            metrics["kl"] = float((stats.token_kl.detach() * m).sum() / ntok)
        elif mb.ref_logp is not None:
            d = (mb.ref_logp - stats.logp.detach()) * m
            metrics["kl"] = float(((d.exp() - d - 1) * m).sum() / ntok)  # k3
        metrics["policy_loss"] = float(loss.detach())
        for aux in self.auxiliary:  # a term declaring uses_policy_logp (VAPO's NLL) gets log pi_theta
            aux_loss, aux_metrics = (aux.loss(mb, num_tokens, stats.logp) if getattr(aux, "uses_policy_logp", False)
                                     else aux.loss(mb, num_tokens))
            loss = loss + aux_loss
            metrics.update(aux_metrics)
        return loss, metrics, stats.logp.detach()

    def backward(self, batch: Rollout, groups: list, n_micro: int, num_tokens: float, num_sequences: float) -> tuple:
        """Accumulate the gradient of the groups ``groups`` in ``n_micro`` micro-batches (group
        boundaries). With the same global counts the gradient does not depend on ``n_micro``, and
        summing it over disjoint group sets gives the gradient of their union.
        Returns (summed loss, micro-batch metrics, their row counts, [(rows, logp)])."""
        starts = batch.rows_of_groups(groups)
        part = batch.select(starts)  # whole groups, ids kept
        loss_total, metrics, weights, logps, offset = 0.0, [], [], [], 0
        for mb in part.split_by_groups(n_micro):
            loss, mm, logp = self.micro_batch_loss(mb, num_tokens, num_sequences)
            loss.backward()
            loss_total += float(loss.detach())
            metrics.append(mm)
            weights.append(len(mb))
            logps.append((starts[offset: offset + len(mb)], logp))
            offset += len(mb)
        return loss_total, metrics, weights, logps

    # ------------------------------------------------------------------ the stage
    def __call__(self, batch: Rollout) -> Rollout:
        cfg = self.cfg
        self.step_version = self.updates
        for aux in self.auxiliary:  # rollout-wide counts of an auxiliary term (VAPO's NLL)
            getattr(aux, "begin", lambda b: None)(batch)
        groups = batch.groups()
        mini = [c.tolist() for c in torch.tensor_split(torch.tensor(groups), min(cfg.train.mini_batches, len(groups)))]
        mask = batch.completion_mask
        micro_metrics, micro_weights, update_metrics = [], [], []
        policy_logp = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        update_index = torch.zeros(len(batch), dtype=torch.long, device=mask.device)
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
        n_update = 0
        for _epoch in range(cfg.train.epochs):
            for mb_groups in mini:
                if cfg.train.count_scope == "rollout":
                    num_tokens, num_sequences = float(mask.sum()), float(len(batch))
                else:
                    rows = batch.rows_of_groups(mb_groups)
                    num_tokens, num_sequences = float(mask[rows].sum()), float(len(rows))
                num_tokens, num_sequences = self.dist.sum_floats([num_tokens, num_sequences])  # over ranks
                self.optimizer.zero_grad(set_to_none=True)
                for aux in self.auxiliary:
                    aux.zero_grad()
                loss_total, mm, mw, logps = self.backward(batch, mb_groups, cfg.train.grad_accum, num_tokens,
                                                          num_sequences)
                micro_metrics += mm
                micro_weights += mw
                for rows, logp in logps:
                    policy_logp[rows] = 0.0
                    w = min(logp.shape[1], policy_logp.shape[1])  # fsdp may pad a micro-batch wider
                    policy_logp[rows, :w] = logp[:, :w].float()
                    update_index[rows] = n_update
                self.dist.sync_gradients(self.params)  # summed: each rank's loss is its share of the global one
                for aux in self.auxiliary:  # an auxiliary term's own model (the critic's ``model``)
                    self.dist.sync_gradients(aux.model.parameters() if self.dist.enabled else ())
                loss_total = self.dist.sum_floats([loss_total])[0]
                grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(self.params, max_norm)))  # global
                finite = math.isfinite(grad_norm)
                if finite:  # a non-finite gradient skips the update (and is counted)
                    self.optimizer.step()
                    for aux in self.auxiliary:
                        aux.step(max_norm)
                self.scheduler.step()
                self.updates += 1
                n_update += 1
                update_metrics.append({"loss": loss_total, "grad_norm": grad_norm, "skipped": float(not finite)})
                if self.after_update is not None:
                    self.after_update(self.updates)
        batch.policy_logp, batch.update_index = policy_logp, update_index
        m = self.dist.weighted_means(micro_metrics, micro_weights)  # over every rank's micro-batches
        m["loss"] = sum(u["loss"] for u in update_metrics) / len(update_metrics)
        m["grad_norm"] = sum(u["grad_norm"] for u in update_metrics) / len(update_metrics)
        m["skipped_updates"] = sum(u["skipped"] for u in update_metrics)
        batch.update_metrics = m
        return batch

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(shard_optimizer_state(state["optimizer"], self.optimizer))  # fsdp: shards
        self.scheduler.load_state_dict(state["scheduler"])
        self.updates = int(state["updates"])


__all__ = ["Update", "sampler_gap"]
