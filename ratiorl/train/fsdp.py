"""``train.parallel: fsdp``: the policy sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

For a model whose training state (weights, gradients, AdamW moments: 16 bytes per parameter in
float32) does not fit one device but whose weights do. Every transformer block is one FSDP group
and the root module (embeddings, final norm, output layer) another; parameters, gradients and
the optimizer state are sharded over the ranks (dim 0), so each rank keeps 1/N of them.

When the full weights exist (the design; docs/scale.md has the memory arithmetic):

* **rollout** (sampling, old / reference log-probs, a greedy baseline, evaluation): inside
  :meth:`FSDPPolicy.gathered` every group is all-gathered ONCE, in the same order on every rank,
  and stays gathered until the context ends: generation with early stopping runs a different
  number of forwards on each rank, so no collective may happen inside it (gathering per forward
  would also move the whole model once per generated token);
* **update**: the blocks are gathered one at a time by FSDP's hooks (all-gather before a block's
  forward and again in backward, reduce-scatter of its gradient after), the root group once per
  micro-batch (:meth:`FSDPPolicy.prepare_micro_batch`: the scorer calls the transformer body and
  reads the output layer's weight directly, never the root's ``forward``). Every rank must run the
  same sequence of block forwards per micro-batch; the prompt-sharing forward
  (ratiorl/policy/forward.py) runs the body twice unless the completions are one column wide, so
  micro-batches are padded to at least two completion columns (masked, values unchanged) and a
  group of one completion scores without sharing.

Gradients: ratiorl's losses use global token / sequence counts, so gradients are SUMMED over
ranks (ratiorl/train/distributed.py); FSDP's reduce-scatter is set to a plain sum
(``set_gradient_divide_factor(1.0)``, ``set_force_sum_reduction_for_comms``). Gradient clipping
on the sharded (DTensor) gradients computes the global norm (:func:`full_tensor` of
``clip_grad_norm_``'s result).

Checkpoints hold full tensors (rank 0 gathers them, :func:`gather_full`), in the same layout as a
single process writes; :func:`shard_like` and :func:`shard_optimizer_state` cut them back to this
rank's shards on resume. The code does not depend on the device: gloo on CPU is tested, NCCL on GPUs
is not (no GPU here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch
from torch import nn

from ratiorl.rollout import HFRolloutEngine

MIN_COMPLETION_COLUMNS = 2  # the prompt-sharing forward runs the body once when Tc == 1, twice otherwise


def _dtensor_cls():
    from torch.distributed.tensor import DTensor  # noqa: PLC0415

    return DTensor


def is_sharded(t) -> bool:
    """True for a DTensor (an FSDP-sharded parameter, gradient or optimizer state)."""
    try:
        return isinstance(t, _dtensor_cls())
    except ImportError:  # torch without torch.distributed.tensor
        return False


def full_tensor(t):
    """The whole tensor of a DTensor (a collective: every rank calls it); anything else unchanged."""
    return t.full_tensor() if is_sharded(t) else t


def gather_full(tree, keep: bool = True):
    """``tree`` (dicts, lists, tuples of tensors and plain values) with every DTensor replaced by its
    full tensor on the CPU; ``keep=False`` (ranks other than 0) takes part in the collectives but
    keeps None in their place, so only one rank holds the full copy."""
    if is_sharded(tree):
        full = tree.full_tensor()
        return full.detach().cpu() if keep else None
    if isinstance(tree, dict):
        return {k: gather_full(v, keep) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(gather_full(v, keep) for v in tree)
    return tree


def shard_like(value: torch.Tensor, param) -> torch.Tensor:
    """This rank's shard of the full tensor ``value`` laid out as the DTensor ``param`` (no
    communication: every rank holds ``value``); ``value`` itself when ``param`` is not sharded."""
    if not is_sharded(param):
        return value
    from torch.distributed.tensor import distribute_tensor  # noqa: PLC0415

    value = value.to(device=param.device, dtype=value.dtype)
    return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """An ``optimizer.state_dict()`` holding full tensors (a checkpoint) with every per-parameter
    tensor of a sharded parameter cut to this rank's shard. Unchanged without sharded parameters."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not any(is_sharded(p) for p in params):
        return state
    out = dict(state)
    out["state"] = {}
    for idx, entry in state["state"].items():
        p = params[int(idx)]
        out["state"][idx] = {k: shard_like(v, p) if isinstance(v, torch.Tensor) and v.shape == p.shape else v
                             for k, v in entry.items()}
    return out


def transformer_blocks(model: nn.Module) -> list:
    """The repeated blocks of a causal LM (one FSDP group each): the modules whose class the model
    declares in ``_no_split_modules`` (Hugging Face's own list of blocks), else the children of the
    largest ``nn.ModuleList``. Outermost only (a block inside another block is not one)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(hf, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
        if not lists:
            raise ValueError(f"cannot find the transformer blocks of {type(hf).__name__} for FSDP "
                             "(no _no_split_modules and no nn.ModuleList)")
        biggest = max(lists, key=lambda ml: sum(p.numel() for p in ml.parameters()))
        blocks = list(biggest)
    inner = {id(c) for b in blocks for c in b.modules() if c is not b}
    return [b for b in blocks if id(b) not in inner]


def pad_completions(batch, width: int):
    """``batch`` with its completion columns padded (mask 0, zeros) to at least ``width``."""
    extra = width - batch.completion_ids.shape[1]
    if extra <= 0:
        return batch
    out = {}
    for f in dataclasses.fields(batch):
        v, per = getattr(batch, f.name), f.metadata["per"]
        if isinstance(v, torch.Tensor) and (per == "token" or (per == "row_or_token" and v.dim() == 2)):
            fill = batch.pad_token_id if f.name == "completion_ids" else 0
            v = torch.nn.functional.pad(v, (0, extra), value=fill)
        out[f.name] = v
    return type(batch)(**out)


class FSDPPolicy:
    """``FSDPPolicy(policy, dist, num_generations)`` shards ``policy.model`` in place (every block,
    then the root) over the ranks of ``dist``; rank 0's trainable weights are broadcast first."""

    def __init__(self, policy, dist, num_generations: int):
        from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
        from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: PLC0415

        self.policy, self.dist = policy, dist
        self.root = root = policy.model
        dist.broadcast_parameters(policy.trainable_parameters())  # the same start on every rank
        mesh = init_device_mesh(dist.device().type, (dist.world_size,))
        self.blocks = transformer_blocks(root)
        for block in self.blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=True)
        fully_shard(root, mesh=mesh)
        self.groups = [m for m in root.modules() if isinstance(m, FSDPModule)]  # root first, then blocks in order
        for m in self.groups:
            m.set_gradient_divide_factor(1.0)  # summed, not averaged (the losses use global counts)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no AVG / PREMUL_SUM)
            m.set_reduce_scatter_unused_params(True)  # a gradient missing on one rank is zeros, as in ddp
        if num_generations < 2:  # no group to share a prompt forward with: one body pass per micro-batch
            policy.share_prompts = False
        # FSDP decides which module is its root at the first forward: run one through the root
        # (outside inference mode, so no buffer it allocates is an inference tensor), then reshard
        with torch.no_grad():
            ids = torch.zeros((1, 1), dtype=torch.long, device=dist.device())
            root(input_ids=ids, attention_mask=torch.ones_like(ids))
        root.reset_iter_state()

    # ------------------------------------------------------------------ when the weights are whole
    @contextlib.contextmanager
    def gathered(self):
        """Full weights on every rank for the duration (one all-gather per group, the same on every
        rank); inside, forwards run no collective, so ranks may run different numbers of them."""
        for block in self.blocks:
            block.set_reshard_after_forward(False, recurse=False)
        for m in self.groups:
            m.unshard()
        try:
            yield
        finally:
            for block in self.blocks:
                block.set_reshard_after_forward(True, recurse=False)
            self.root.reset_iter_state()  # reshard every group, forget the forwards seen inside

    def prepare_micro_batch(self, mb):
        """Before a training forward: gather the root group (its gradient is reduce-scattered and it
        is resharded at the end of the backward) and pad completions to the width that gives every
        rank the same forwards."""
        self.root.unshard()
        return pad_completions(mb, MIN_COMPLETION_COLUMNS)

    # ------------------------------------------------------------------ saving
    def model_state_dict(self) -> dict:
        """The full model state dict on rank 0 (CPU), ``{}`` on the others (every rank calls it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: PLC0415

        sd = get_model_state_dict(self.root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if self.dist.is_main else {}

    def save_pretrained(self, save_dir: str, state_dict=None) -> None:
        """``Policy.save_pretrained`` of the sharded policy: every rank gathers, rank 0 writes
        (``state_dict``: an already gathered :meth:`model_state_dict`, then rank 0 alone may call it)."""
        sd = self.model_state_dict() if state_dict is None else state_dict
        if not self.dist.is_main:
            return
        os.makedirs(save_dir, exist_ok=True)
        self.policy.model.save_pretrained(save_dir, state_dict=sd)
        if self.policy.tokenizer is not None:
            self.policy.tokenizer.save_pretrained(save_dir)


class GatheringEngine(HFRolloutEngine):
    """The separate sampler (``rollout.dtype``, ``policy_lag``, ``sync_every``) of a sharded policy:
    a full copy taken before sharding, refreshed from the policy's gathered state dict (every rank
    calls ``load_weights`` / ``snapshot`` after the same update)."""

    def snapshot(self, model: nn.Module) -> dict:
        src = model.model if hasattr(model, "completion_stats") else model
        own = self.model.state_dict()
        with torch.no_grad():
            return {k: full_tensor(v).detach().to(own[k].dtype if k in own else v.dtype, copy=True)
                    for k, v in src.state_dict().items()}

    def load_weights(self, model: nn.Module) -> None:
        self.load_snapshot(self.snapshot(model))


__all__ = ["FSDPPolicy", "GatheringEngine", "full_tensor", "gather_full", "is_sharded", "pad_completions",
           "shard_like", "shard_optimizer_state", "transformer_blocks"]
