"""``Rollout``: the one typed batch that every training stage reads and extends.

A step is ``sample -> score -> advantages -> update -> report``; each stage takes a ``Rollout``
and returns it with its own fields filled in. Layout (B rows = completions, rows of one prompt
form a group):

- prompts are left-padded ``(B, Tp)``, completions right-padded ``(B, Tc)``; the model input is
  ``cat(prompt, completion)``; masks are 1 on real tokens (EOS included), 0 on padding;
- per-token float fields (log-probs, values, returns, token-level advantages) are ``(B, Tc)``
  float32 and 0 on padding;
- per-sequence fields are ``(B,)`` tensors, or Python lists for text and dataset columns.

Every field declares its layout in ``metadata["per"]`` ("prompt", "token", "row", "row_or_token",
"list", "dict_list", "dict_row", "batch", "batch_sum"), so ``select``, ``concat``, ``trim`` and ``to`` handle each field by
its declaration -- a field added here needs no other change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch


def _f(per: str, default=None, factory=None):
    if factory is not None:
        return field(default_factory=factory, metadata={"per": per})
    return field(default=default, metadata={"per": per})


@dataclass
class Rollout:
    """Completions of a batch of prompts and everything later stages compute about them."""

    # ---- sample (the sampler, behaviour policy mu)
    prompt_ids: torch.Tensor = _f("prompt")  # (B, Tp) long, left-padded
    prompt_mask: torch.Tensor = _f("prompt")  # (B, Tp) long, 1 on real tokens
    completion_ids: torch.Tensor = _f("token")  # (B, Tc) long, right-padded
    completion_mask: torch.Tensor = _f("token")  # (B, Tc) long, 1 on generated tokens (EOS included)
    behaviour_logp: torch.Tensor = _f("token")  # (B, Tc) float32: log mu(y_t|s_t) as the sampler reported it
    group_ids: torch.Tensor = _f("row")  # (B,) long: which prompt (group) each row answers
    truncated: torch.Tensor = _f("row")  # (B,) bool: no EOS within max_new_tokens
    behaviour_version: Optional[torch.Tensor] = _f("row")  # (B,) long: optimizer updates behind the sampler's weights
    completion_texts: list = _f("list", factory=list)  # decoded completions, without EOS / padding
    pad_token_id: int = _f("batch", 0)
    # ---- old / reference log-probs
    old_logp: Optional[torch.Tensor] = _f("token")  # (B, Tc) log pi_old (= behaviour_logp unless recomputed)
    ref_logp: Optional[torch.Tensor] = _f("token")  # (B, Tc) log pi_ref, when a sampled KL estimator needs it
    # ---- score
    rewards: Optional[torch.Tensor] = _f("row")  # (B,) float32 total reward (after shaping and noise)
    reward_components: dict = _f("dict_row", factory=dict)  # name -> (B,) raw score of each reward function
    correct: Optional[torch.Tensor] = _f("row")  # (B,) float32: the task's own check of the answer
    # ---- advantages (and critic)
    advantages: Optional[torch.Tensor] = _f("row_or_token")  # (B,) or (B, Tc)
    values: Optional[torch.Tensor] = _f("token")  # (B, Tc) critic values at sampling time
    returns: Optional[torch.Tensor] = _f("token")  # (B, Tc) critic targets
    # ---- update
    policy_logp: Optional[torch.Tensor] = _f("token")  # (B, Tc) log pi_theta at the row's last forward (detached)
    update_index: Optional[torch.Tensor] = _f("row")  # (B,) long: the update (within the step) of that forward
    update_metrics: dict = _f("batch", factory=dict)  # loss, grad norm, objective metrics (row-weighted means)
    # ---- free per-sequence fields (dataset columns: prompt text, answer, ...)
    fields: dict = _f("dict_list", factory=dict)  # name -> list of B values
    # ---- per-batch scalars the stages report (seconds, counts, ...). ``concat`` sums them: it only
    # joins freshly sampled and scored batches, whose counters are all extensive.
    counters: dict = _f("batch_sum", factory=dict)

    # ------------------------------------------------------------------ shape
    def __len__(self) -> int:
        return int(self.completion_ids.shape[0])

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) number of completion tokens of each row."""
        return self.completion_mask.sum(1)

    @property
    def device(self) -> torch.device:
        return self.completion_ids.device

    def groups(self) -> list:
        """Group ids in order of first appearance."""
        seen: dict = {}
        for g in self.group_ids.tolist():
            seen.setdefault(g, None)
        return list(seen)

    @property
    def num_groups(self) -> int:
        return len(self.groups())

    def replace(self, **changes) -> "Rollout":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ row selection
    def select(self, rows) -> "Rollout":
        """The rows ``rows`` (a list or a long tensor of row indices), in that order."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        idx_list = idx.tolist()
        out = {}
        for f in dataclasses.fields(self):
            v, per = getattr(self, f.name), f.metadata["per"]
            if v is None or per in ("batch", "batch_sum"):
                out[f.name] = v
            elif per == "list":
                out[f.name] = [v[i] for i in idx_list]
            elif per == "dict_list":
                out[f.name] = {k: [col[i] for i in idx_list] for k, col in v.items()}
            elif per == "dict_row":
                out[f.name] = {k: col.index_select(0, idx.to(col.device)) for k, col in v.items()}
            else:
                out[f.name] = v.index_select(0, idx.to(v.device))
        return Rollout(**out)

    def rows_of_groups(self, groups) -> list:
        """Row indices of the groups ``groups`` (group order, rows in their batch order)."""
        gids = self.group_ids.tolist()
        by_group: dict = {}
        for i, g in enumerate(gids):
            by_group.setdefault(g, []).append(i)
        missing = [g for g in groups if g not in by_group]
        if missing:
            raise ValueError(f"groups {missing[:5]} are not in this batch (it has {list(by_group)[:8]}...)")
        return [i for g in groups for i in by_group[g]]

    def select_groups(self, groups, renumber: bool = True) -> "Rollout":
        """Whole groups, in the given order; group ids renumbered 0..len(groups)-1 by default."""
        out = self.select(self.rows_of_groups(groups))
        if renumber:  # the rows of a group are now contiguous: number the runs 0, 1, ...
            out.group_ids = torch.unique_consecutive(out.group_ids, return_inverse=True)[1]
        return out

    def group_reward_std(self) -> tuple:
        """(group ids ascending, the population std of the rewards within each group): a group
        whose rewards are all equal (std 0) has zero advantage under every group baseline."""
        ids, index = torch.unique(self.group_ids, return_inverse=True)
        r = self.rewards
        count = torch.zeros(len(ids), dtype=r.dtype, device=r.device).index_add(0, index, torch.ones_like(r))
        mean = torch.zeros_like(count).index_add(0, index, r) / count
        var = torch.zeros_like(count).index_add(0, index, (r - mean[index]) ** 2) / count
        return ids, var.sqrt()

    def split_by_groups(self, n: int) -> list:
        """At most ``n`` parts of whole groups, as even as ``torch.tensor_split`` makes them; group ids
        are kept (not renumbered), so each part's rows still name their prompt."""
        groups = self.groups()
        if n < 1:
            raise ValueError(f"split_by_groups needs n >= 1, got {n}")
        parts = torch.tensor_split(torch.arange(len(groups)), min(n, len(groups)))
        return [self.select_groups([groups[i] for i in p.tolist()], renumber=False) for p in parts]

    # ------------------------------------------------------------------ joining
    @classmethod
    def concat(cls, parts: list) -> "Rollout":
        """Rows of all parts, prompts re-padded on the left and completions on the right; the group
        ids of each part are offset so that groups of different parts stay distinct."""
        if not parts:
            raise ValueError("Rollout.concat needs at least one part")
        if len(parts) == 1:
            return parts[0]
        Tp = max(p.prompt_ids.shape[1] for p in parts)
        Tc = max(p.completion_ids.shape[1] for p in parts)
        pad_id = parts[0].pad_token_id
        out = {}
        for f in dataclasses.fields(cls):
            vals = [getattr(p, f.name) for p in parts]
            per = f.metadata["per"]
            if per == "batch":
                out[f.name] = vals[0]
            elif per == "batch_sum":
                keys = {k for v in vals for k in v}
                out[f.name] = {k: sum(v.get(k, 0.0) for v in vals) for k in sorted(keys)}
            elif any(v is None for v in vals):
                if not all(v is None for v in vals):
                    raise ValueError(f"Rollout.concat: field {f.name!r} is set in some parts and not in others")
                out[f.name] = None
            elif per == "list":
                out[f.name] = [x for v in vals for x in v]
            elif per in ("dict_list", "dict_row"):
                keys = list(vals[0])
                if any(list(v) != keys for v in vals):
                    raise ValueError(f"Rollout.concat: parts have different {f.name} keys")
                join = (lambda cols: [x for c in cols for x in c]) if per == "dict_list" else torch.cat
                out[f.name] = {k: join([v[k] for v in vals]) for k in keys}
            elif per == "prompt":
                value = pad_id if f.name == "prompt_ids" else 0
                out[f.name] = torch.cat([_pad(v, Tp, value, left=True) for v in vals])
            elif per == "row_or_token" and len({v.dim() for v in vals}) > 1:
                raise ValueError(f"Rollout.concat: {f.name} is per token in some parts and per row in others")
            elif per == "token" or (per == "row_or_token" and vals[0].dim() == 2):
                value = pad_id if f.name == "completion_ids" else 0
                out[f.name] = torch.cat([_pad(v, Tc, value, left=False) for v in vals])
            elif f.name == "group_ids":
                shifted, offset = [], 0
                for v in vals:
                    shifted.append(v - v.min() + offset if len(v) else v)
                    offset = int(shifted[-1].max()) + 1 if len(v) else offset
                out[f.name] = torch.cat(shifted)
            else:
                out[f.name] = torch.cat(vals)
        return cls(**out)

    # ------------------------------------------------------------------ columns and devices
    def trim(self) -> "Rollout":
        """Drop prompt columns that are padding in every row (left) and completion columns that
        are padding in every row (right): the same batch, less compute."""
        has_p = self.prompt_mask.any(0).nonzero()
        p0 = int(has_p[0]) if len(has_p) else self.prompt_ids.shape[1] - 1
        has_c = self.completion_mask.any(0).nonzero()
        c1 = int(has_c[-1]) + 1 if len(has_c) else 1
        if p0 == 0 and c1 == self.completion_ids.shape[1]:
            return self
        out = {}
        for f in dataclasses.fields(self):
            v, per = getattr(self, f.name), f.metadata["per"]
            if v is not None and per == "prompt":
                v = v[:, p0:]
            elif v is not None and (per == "token" or (per == "row_or_token" and v.dim() == 2)):
                v = v[:, :c1]
            out[f.name] = v
        return Rollout(**out)

    def to(self, device) -> "Rollout":
        """The same batch with every tensor on ``device``."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device)
            elif f.metadata["per"] == "dict_row":
                v = {k: t.to(device) for k, t in v.items()}
            out[f.name] = v
        return Rollout(**out)


def _pad(t: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
    extra = width - t.shape[1]
    if extra <= 0:
        return t
    pad = torch.full((t.shape[0], extra), value, dtype=t.dtype, device=t.device)
    return torch.cat([pad, t] if left else [t, pad], 1)


__all__ = ["Rollout"]
