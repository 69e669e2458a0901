"""``summary.json``: the run's headline numbers, before and after training."""

from __future__ import annotations

import json
import os


def write_summary(cfg, run_dir: str, before: dict, after: dict, *, steps: int, finished: bool,
                  wall_seconds: float, advantage: str, num_eval_prompts: int) -> dict:
    temp = after.get("eval/temperature", cfg.rollout.temperature)
    k = cfg.eval.k
    judge = f"{cfg.eval.reward or 'the run reward'} >= {cfg.eval.threshold:g}"
    metric_text = {
        "avg@k": f"avg@{k}: accuracy ({judge}) averaged over {k} samples per prompt at temperature {temp}",
        "pass@k": f"pass@{k}: fraction of prompts with a correct answer among {k} samples at temperature {temp}",
        "greedy": f"greedy: accuracy ({judge}) of the greedy (temperature 0) answer",
    }[cfg.eval.headline] + f", on {num_eval_prompts} held-out prompts"
    key = {"avg@k": "eval/avg@k", "pass@k": "eval/pass@k", "greedy": "eval/greedy_acc"}[cfg.eval.headline]
    summary = {
        "objective": cfg.objective.name,
        "advantage": advantage,
        "task": cfg.task.name,
        "model": cfg.model.path,
        "steps": steps,
        "finished": finished,
        "wall_seconds": round(wall_seconds, 2),
        "seed": cfg.seed,
        "eval_metric": metric_text,
        "eval_accuracy_before": before.get(key),
        "eval_accuracy_after": after.get(key),
        f"eval_avg_at_{k}_before": before.get("eval/avg@k"),
        f"eval_avg_at_{k}_after": after.get("eval/avg@k"),
        f"eval_pass_at_{k}_before": before.get("eval/pass@k"),
        f"eval_pass_at_{k}_after": after.get("eval/pass@k"),
        "greedy_accuracy_before": before.get("eval/greedy_acc"),
        "greedy_accuracy_after": after.get("eval/greedy_acc"),
        "eval_temperature": temp,
        "run_dir": run_dir,
    }
    tmp = os.path.join(run_dir, "summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, os.path.join(run_dir, "summary.json"))
    return summary


__all__ = ["write_summary"]
