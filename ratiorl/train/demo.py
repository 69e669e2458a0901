"""The demo: SFT warm start of the tiny model on addition, then RL with `snib`; accuracy before/after.

    ratiorl demo --out runs/demo

Settings come from ``examples/demo.yaml`` (both the SFT warm start, section ``sft``, and the RL
run). The headline number is avg@k exact-match accuracy on held-out prompts, sampled at the
training temperature (stated in summary.json), before RL (= after SFT) and after RL; greedy
accuracy is reported next to it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

from .config import TrainConfig, load_config
from .config_load import parse_overrides
from .run_dir import holds_run, move_aside

EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")
DEMO_CONFIG = os.path.join(EXAMPLES_DIR, "demo.yaml")


def demo_config(out_dir: str, config_path: Optional[str] = None, overrides: Optional[list] = None) -> TrainConfig:
    path = config_path or DEMO_CONFIG
    if not os.path.exists(path):
        raise ValueError(f"demo config not found: {path} (pass --config examples/demo.yaml from the repository)")
    overrides = list(overrides or [])
    cfg = load_config(path, overrides)
    if "sft.seed" not in {key for key, _ in parse_overrides(overrides)}:
        cfg.sft.seed = cfg.seed  # `--seed N` seeds the warm start too: a seed is the whole demo
    cfg.out_dir = out_dir
    cfg.model.path = os.path.join(out_dir, "sft-model")
    return cfg


def run_demo(out_dir: str = "runs/demo", config_path: Optional[str] = None, overrides: Optional[list] = None,
             console=None) -> dict:
    import torch  # noqa: PLC0415
    from rich.console import Console  # noqa: PLC0415

    from .sft import run_sft  # noqa: PLC0415
    from .trainer import train  # noqa: PLC0415

    console = console or Console(stderr=True)
    cfg = demo_config(out_dir, config_path, overrides)
    t0 = time.perf_counter()
    if holds_run(out_dir, os.path.join(out_dir, "checkpoints")):  # a rerun: the earlier demo is kept aside
        console.print(f"[yellow]moved the earlier demo run in {out_dir} to {move_aside(out_dir)}[/]")
    os.makedirs(out_dir, exist_ok=True)
    until = (f"until {cfg.sft.target_accuracy:.0%} greedy accuracy, at most {cfg.sft.steps} steps"
             if cfg.sft.target_accuracy is not None else f"{cfg.sft.steps} steps")
    console.print(f"[bold]1/2 supervised warm start[/] on {cfg.sft.task} ({until}) -> {cfg.model.path}")
    sft = run_sft(cfg.model.path, cfg.sft, progress=_sft_progress(console, cfg.sft.steps))
    t_sft = time.perf_counter() - t0
    if sft.get("greedy_accuracy") is not None:
        console.print(f"  stopped after {sft['steps']} steps: greedy accuracy {sft['greedy_accuracy']:.2f} "
                      f"on {cfg.sft.check_prompts} training prompts (target {cfg.sft.target_accuracy})")
    console.print(f"[bold]2/2 RL with {cfg.objective.name}[/] ({cfg.train.steps} steps) -> {out_dir}")
    rl = train(cfg, console=console)
    wall = time.perf_counter() - t0
    before, after = rl["eval_accuracy_before"], rl["eval_accuracy_after"]
    summary = {
        "objective": cfg.objective.name,
        "task": cfg.task.name,
        "steps": rl["steps"],
        "wall_seconds": round(wall, 2),
        "sft_seconds": round(t_sft, 2),
        "sft_steps": sft["steps"],
        "rl_seconds": round(wall - t_sft, 2),
        "eval_metric": rl["eval_metric"],
        "eval_accuracy_before": before,
        "eval_accuracy_after": after,
        "eval_accuracy_gain_points": None if before is None or after is None else round(100 * (after - before), 2),
    }
    summary.update({k: v for k, v in rl.items() if k.startswith(("eval_avg", "eval_pass", "greedy_", "eval_temp"))})
    summary.update({"seed": cfg.seed, "torch_threads": torch.get_num_threads(),
                    "config": os.path.join(out_dir, "config.yaml")})
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _sft_progress(console, total: int):
    every = 100

    def cb(step, n, loss):
        if step % every == 0 or step == n:
            console.print(f"  sft step {step}/{n}  loss {loss:.3f}")

    return cb
