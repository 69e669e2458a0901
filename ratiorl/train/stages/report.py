"""Stage 5, ``report``: the step's metrics, a flat dict of floats.

Reads: everything the earlier stages added (rewards and their components, correctness, lengths,
counters, ``update_metrics``) and, for the importance-weight diagnostics, the rows of the step's
last update (``update_index``) with their ``policy_logp``, ``old_logp``, ``advantages`` and
``group_ids``; the diagnostics call the objective itself (``ratiorl.report.diagnostics``).
Adds nothing to the batch.
"""

from __future__ import annotations


from ratiorl.rollout import Rollout


def diagnostic_rows(batch: Rollout) -> Rollout:
    """The rows of the step's last update (the most off-policy ones), trimmed, with their log-probs."""
    last = batch.update_index == batch.update_index.max()
    return batch.select(last.nonzero().flatten()).trim()


class Report:
    """``Report(diagnostics=module or None, console)(batch, objective, extra) -> dict``."""

    def __init__(self, diagnostics=None, console=None):
        self.diagnostics, self.console = diagnostics, console

    def __call__(self, batch: Rollout, objective, extra: dict) -> dict:
        lengths = batch.lengths.float()
        rewards = batch.rewards
        _, std_g = batch.group_reward_std()
        c = batch.counters
        m = {
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std(unbiased=False)),
            "reward/zero_std_groups": float((std_g <= 1e-6).float().mean()),
            "accuracy": float(batch.correct.mean()),
            "length/mean": float(lengths.mean()),
            "length/max": float(lengths.max()),
            "length/truncated_frac": float(batch.truncated.float().mean()),
            "time/rollout": c.get("time/rollout", 0.0),
            "time/reward": c.get("time/reward", 0.0),
        }
        for name, scores in batch.reward_components.items():
            m[f"reward/fn/{name}"] = float(scores.float().mean())
        m["reward/errors"] = c.get("reward_errors", 0.0)
        m.update({k: v for k, v in c.items() if k not in m and k not in ("reward_errors", "reward_timeouts")})
        m.update(batch.update_metrics)
        m.update(extra)
        if "time/step" in m:
            m["throughput/tokens_per_s"] = float(lengths.sum()) / max(m["time/step"], 1e-9)
        if self.diagnostics is not None and batch.policy_logp is not None:
            m.update({f"diag/{k}": v for k, v in self.scalars(batch, objective).items()})
        return m

    def scalars(self, batch: Rollout, objective) -> dict:
        rows = diagnostic_rows(batch)
        try:
            return self.diagnostics.step_scalars(objective, rows.policy_logp, rows.old_logp, rows.advantages,
                                                 rows.completion_mask, rows.group_ids)
        except Exception as e:  # diagnostics must never break training
            if self.console is not None:
                self.console.print(f"[yellow]diagnostics disabled: {type(e).__name__}: {e}[/]")
            self.diagnostics = None
            return {}


__all__ = ["Report", "diagnostic_rows"]
