"""Data parallel training through ``torch.distributed`` (launched by ``torchrun``).

``torchrun --nproc-per-node N -m ratiorl train --config X`` starts N processes; torchrun sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and the rendezvous address), :func:`init_distributed`
reads them and calls ``dist.init_process_group`` (gloo on CPU, NCCL on CUDA, rank r on
``cuda:LOCAL_RANK``). Without those variables (a plain ``python -m ratiorl train``) nothing is
initialised and :data:`LOCAL` (one rank, every collective a no-op) is used, so a single-process
run computes exactly what it computed before.

The contract of a data-parallel step (``train.parallel: ddp``):

* every rank holds the full model (the same initial weights: rank 0's are broadcast) and samples
  whole groups of its share of the step's prompts: rank r takes slice r of the
  ``prompts_per_step`` prompts that a single process would take from the same seeded stream
  (:func:`shard_prompts`), so the union over ranks is the single-process step's prompts;
* group statistics and advantages are per group, hence local;
* the token and sequence counts that the objective divides by (``num_tokens``, ``num_sequences``)
  are summed over ranks before the loss, so each rank's loss is its share of the global loss;
* gradients are therefore SUMMED over ranks (``all_reduce(SUM)``, in flat buckets, once per
  optimizer update, before clipping), not averaged: the update equals the single-process update
  on the union batch. (This is what ``DistributedDataParallel`` does, without its averaging
  and without wrapping the model, which the sampler, the log-prob head and ``save_pretrained``
  use directly);
* metrics are reduced over ranks (:meth:`Dist.reduce_metrics`); rank 0 writes logs, plots,
  checkpoints and ``summary.json``, the other ranks print nothing;
* each rank samples with its own generator (``seed + rank``), so a 2-rank run is NOT
  sample-identical to a 1-rank run; one update on a fixed batch is identical (up to float
  summation order). A checkpoint holds every rank's RNG streams; resume with the same N.

``train.parallel: fsdp`` (FSDP2, ratiorl/train/fsdp.py) keeps this contract (prompts, counts,
summed gradients, metrics, rank 0 writing) and shards the policy's weights, gradients and
optimizer state over the ranks: the weights are gathered once per step for the rollout and one
block at a time in the update. :meth:`Dist.sync_gradients` and :meth:`Dist.broadcast_parameters`
skip sharded (DTensor) parameters: FSDP reduces their gradients itself. Under one process it is
the single-process run.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

PARALLEL_MODES = ("ddp", "fsdp")
BUCKET_NUMEL = 1 << 24  # gradient elements per all_reduce
MAX_KEYS = ("length/max",)  # metrics reduced by max; "time/*" too (the slowest rank sets the pace)
SUM_KEYS = ("sampling/tries", "sampling/kept_groups", "sampling/seen_groups", "reward/errors",
            "throughput/tokens_per_s")


@dataclass
class Dist:
    """This process's place in the data-parallel group; every method is a no-op with one rank."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    owns_group: bool = False  # init_distributed started the process group (close() ends it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        """Where collective buffers live (NCCL: this rank's GPU, gloo: CPU)."""
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------------ numbers
    def sum_floats(self, values: list) -> list:
        """Element-wise sum over ranks of a list of floats (float64)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def sync_gradients(self, params) -> None:
        """Sum every parameter's gradient over ranks (a missing gradient counts as zeros); FSDP-sharded
        (DTensor) parameters are left to FSDP's own reduce-scatter."""
        if not self.enabled:
            return
        grads = []
        for p in _replicated(params):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        for bucket in _buckets(grads, BUCKET_NUMEL):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()

    def broadcast_parameters(self, params) -> None:
        """Rank 0's values into every rank's parameters (the same start on every rank); sharded
        parameters are skipped (they were broadcast before sharding)."""
        if not self.enabled:
            return
        with torch.no_grad():
            for p in _replicated(params):
                dist.broadcast(p.data, src=0)

    def keys(self, keys) -> list:
        """The sorted union of every rank's keys."""
        return sorted({k for ks in self.gather(sorted(keys)) for k in ks})

    def weighted_means(self, rows: list, weights: list) -> dict:
        """Per key, the mean of the finite values over every rank's rows weighted by ``weights``."""
        keys = self.keys({k for r in rows for k in r})
        sums = torch.zeros(2 * len(keys), dtype=torch.float64)
        for i, key in enumerate(keys):
            for r, w in zip(rows, weights):
                v = r.get(key)
                if v is not None and _finite(v):
                    sums[2 * i] += float(v) * w
                    sums[2 * i + 1] += w
        sums = torch.tensor(self.sum_floats(sums.tolist()), dtype=torch.float64)
        return {k: float(sums[2 * i] / sums[2 * i + 1]) for i, k in enumerate(keys) if sums[2 * i + 1] > 0}

    def reduce_metrics(self, metrics: dict) -> dict:
        """A step's metrics over ranks: means (rows are split evenly), sums for counts
        (:data:`SUM_KEYS`), max for :data:`MAX_KEYS` and times; ``reward/std`` from the pooled
        second moment. Unchanged with one rank."""
        if not self.enabled:
            return metrics
        keys = self.keys(metrics)
        present = [k in metrics and _finite(metrics[k]) for k in keys]
        vals = [float(metrics[k]) if p else 0.0 for k, p in zip(keys, present)]
        if "reward/std" in metrics and "reward/mean" in metrics:  # E[x^2] of this rank's rows
            vals[keys.index("reward/std")] = metrics["reward/std"] ** 2 + metrics["reward/mean"] ** 2
        summed = self.sum_floats(vals + [float(p) for p in present])
        n = len(keys)
        big = torch.tensor([float(metrics[k]) if p else float("-inf") for k, p in zip(keys, present)],
                           dtype=torch.float64, device=self.device())
        dist.all_reduce(big, op=dist.ReduceOp.MAX)
        out = {}
        for i, k in enumerate(keys):
            count = summed[n + i]
            if count == 0:
                continue
            if k in MAX_KEYS or k.startswith("time/"):
                out[k] = float(big[i])
            elif k in SUM_KEYS:
                out[k] = summed[i]
            else:
                out[k] = summed[i] / count
        if "reward/std" in out and "reward/mean" in out:
            out["reward/std"] = max(out["reward/std"] - out["reward/mean"] ** 2, 0.0) ** 0.5
        return out

    # ------------------------------------------------------------------ objects
    def gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)`` on rank 0 only; every rank returns its result (or raises its error)."""
        if not self.enabled:
            return fn(*args, **kwargs)
        box = [None]
        if self.is_main:
            try:
                box[0] = (True, fn(*args, **kwargs))
            except Exception as e:  # noqa: BLE001 (re-raised below; the other ranks must not wait forever)
                box[0] = (False, e)
        dist.broadcast_object_list(box, src=0)
        ok, value = box[0]
        if not ok:
            if self.is_main:
                raise value
            raise RuntimeError(f"rank 0 failed: {type(value).__name__}: {value}")
        return value

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """End the process group if :func:`init_distributed` started it."""
        if self.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False


LOCAL = Dist()  # one process: every collective is a no-op


class NullLogger:
    """The metrics logger of ranks other than 0: writes nothing."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _replicated(params) -> list:
    """The parameters that every rank holds whole (not FSDP-sharded DTensors)."""
    from .fsdp import is_sharded  # noqa: PLC0415

    return [p for p in params if not is_sharded(p)]


def _buckets(grads: list, numel: int) -> list:
    """Consecutive gradients of one dtype and device, about ``numel`` elements per bucket."""
    out, cur, size = [], [], 0
    for g in grads:
        if cur and (size + g.numel() > numel or g.dtype != cur[0].dtype or g.device != cur[0].device):
            out.append(cur)
            cur, size = [], 0
        cur.append(g)
        size += g.numel()
    if cur:
        out.append(cur)
    return out


def env_world() -> tuple:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(cfg=None, backend: Optional[str] = None) -> Dist:
    """The data-parallel group of this process: :data:`LOCAL` without torchrun, else the process
    group (initialised here unless the caller already did). Checks ``cfg`` against the world size."""
    if cfg is not None:
        parallel = cfg.train.parallel
        if parallel not in PARALLEL_MODES:
            raise ValueError(f"train.parallel must be one of {', '.join(PARALLEL_MODES)}, got {parallel!r}")
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
        d = Dist(rank, world, local, dist.get_backend(), owns_group=False)
    else:
        rank, world, local = env_world()
        if world <= 1:
            d = LOCAL
        else:
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            if backend == "nccl":
                torch.cuda.set_device(local)
            dist.init_process_group(backend)
            d = Dist(rank, world, local, backend, owns_group=True)
    if cfg is not None and d.enabled:
        n = cfg.rollout.prompts_per_step
        if n % d.world_size:
            d.close()
            raise ValueError(f"rollout.prompts_per_step={n} must be divisible by the number of ranks ({d.world_size})")
        if cfg.train.mini_batches * cfg.train.grad_accum > n // d.world_size:
            d.close()
            raise ValueError(f"train.mini_batches * train.grad_accum must be <= rollout.prompts_per_step / ranks "
                             f"= {n // d.world_size} (each rank splits its own groups)")
    return d


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over ranks, in place (unchanged without a process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def is_main() -> bool:
    """True on rank 0 (and without a process group)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def shard_prompts(items: list, rank: int, world_size: int) -> list:
    """Rank ``rank``'s contiguous slice of ``items`` (``len(items)`` divisible by ``world_size``)."""
    if len(items) % world_size:
        raise ValueError(f"{len(items)} prompts cannot be split evenly over {world_size} ranks")
    n = len(items) // world_size
    return items[rank * n: (rank + 1) * n]


__all__ = ["LOCAL", "PARALLEL_MODES", "Dist", "NullLogger", "all_reduce_sum", "env_world", "init_distributed",
           "is_main", "shard_prompts"]
