"""Supervised warm start: teacher-forced cross-entropy on a task's reference completions.

    model, tok = ratiorl.policy.make_tiny_model()
    sft_train(model, tok, task.train, steps=300, batch_size=32, lr=3e-3, seed=0)

Loss is the mean token NLL of ``completion + EOS`` given the prompt (prompt tokens are not
trained). Built-in tasks carry a ``"completion"`` field; otherwise ``"answer"`` is the target.
Prompts go through ``ratiorl.train.prompts.render_task`` first (the chat template when the
tokenizer has one, ``sft.chat_template`` / ``sft.system_prompt``), as in RL and evaluation.
This is what ``ratiorl sft`` runs to make the default model of the examples.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch


@dataclass
class SFTConfig:
    task: str = "addition"
    # 5000 distinct training sums (of 10^4): the model has to learn addition, not memorise
    task_options: dict = field(default_factory=lambda: {"n_train": 5000})
    # at most; training stops once greedy accuracy reaches `target_accuracy`, so the model is partly
    # right (RL has work to do) at a fixed quality whatever the seed or the CPU's float rounding
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    seed: int = 0
    # Stop as soon as greedy accuracy on `check_prompts` training prompts reaches this
    # (checked every `check_every` steps; null = always run `steps`).
    target_accuracy: Optional[float] = 0.40
    check_every: int = 10
    check_prompts: int = 100
    # torch threads during SFT (restored afterwards). The float rounding of a multi-threaded matmul
    # depends on the thread count, and that is enough to move where the model "gets" addition, so
    # the warm start is pinned to one thread: the same seed gives the same model on any core count.
    threads: Optional[int] = 1
    # keyword arguments of make_tiny_model
    model_sizes: dict = field(default_factory=lambda: {"n_layer": 2, "n_head": 4, "n_embd": 64})
    # prompts through the tokenizer's chat template as in training (auto: when it has one)
    chat_template: str = "auto"
    system_prompt: Optional[str] = None


def _encode(tok, text: str) -> list:
    return tok(text, add_special_tokens=False)["input_ids"]


def make_sft_batch(tok, examples: list):
    """Right-padded input_ids, attention_mask and labels (-100 on prompt and padding)."""
    rows, labels = [], []
    for ex in examples:
        p = _encode(tok, ex["prompt"])
        c = _encode(tok, ex.get("completion", ex["answer"])) + [tok.eos_token_id]
        rows.append(p + c)
        labels.append([-100] * len(p) + c)
    T = max(len(r) for r in rows)
    pad = tok.pad_token_id
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    lab = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        lab[i, : len(l)] = torch.tensor(l)
    return ids, mask, lab


def sft_train(model, tok, examples: list, *, steps: int, batch_size: int, lr: float,
              warmup_steps: int = 20, weight_decay: float = 0.0, seed: int = 0,
              dropout: bool = False, progress=None, stop=None, check_every: int = 25) -> list:
    """Train in place; returns the loss per step. Deterministic from `seed`.

    ``dropout=False`` keeps the model in eval mode (no dropout): faster and steadier for the tiny
    models this is meant for, and the same mode the RL trainer uses. ``stop(step) -> bool`` is
    called every ``check_every`` steps; training ends when it returns True.
    """
    rng = random.Random(seed)
    order: list = []
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def lr_at(s):  # linear warmup, cosine decay to 10%
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        frac = (s - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train(dropout)
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout, if the model has any
        for step in range(steps):
            if len(order) < batch_size:
                more = list(range(len(examples)))
                rng.shuffle(more)
                order.extend(more)
            batch = [examples[i] for i in order[:batch_size]]
            del order[:batch_size]
            ids, mask, lab = make_sft_batch(tok, batch)
            out = model(input_ids=ids, attention_mask=mask, labels=lab)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(out.loss.detach()))
            if progress is not None:
                progress(step + 1, steps, losses[-1])
            if stop is not None and (step + 1) % check_every == 0:
                model.eval()
                done = stop(step + 1)
                model.train(dropout)
                if done:
                    break
    model.eval()
    return losses


def run_sft(out_dir: str, cfg: Optional[SFTConfig] = None, progress=None) -> dict:
    """Create the tiny default model, warm-start it on `cfg.task`, save it to `out_dir`."""
    from ratiorl.policy import make_tiny_model  # noqa: PLC0415
    from ratiorl.tasks import get_task  # noqa: PLC0415

    cfg = cfg or SFTConfig()
    task = get_task(cfg.task, seed=cfg.seed, **cfg.task_options)
    model, tok = make_tiny_model(seed=cfg.seed, **cfg.model_sizes)
    from .prompts import render_task  # noqa: PLC0415

    task = render_task(task, tok, cfg)  # the prompt text the RL run will show the model
    checks: list = []
    stop = None
    if cfg.target_accuracy is not None:
        from ratiorl.rollout import HFRolloutEngine  # noqa: PLC0415

        engine = HFRolloutEngine(model, tok)
        held = task.train[: cfg.check_prompts]
        width = max(len(_encode(tok, ex.get("completion", ex["answer"]))) for ex in held) + 1

        def stop(step):
            b = engine.generate([ex["prompt"] for ex in held], 1, max_new_tokens=width, temperature=0.0)
            acc = sum(task.check(t, ex["answer"]) for t, ex in zip(b.completion_texts, held)) / len(held)
            checks.append((step, acc))
            return acc >= cfg.target_accuracy

    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        losses = sft_train(model, tok, task.train, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                           warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, seed=cfg.seed,
                           progress=progress, stop=stop, check_every=cfg.check_every)
    finally:
        torch.set_num_threads(threads_before)
    tmp = out_dir.rstrip("/") + f".tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    import json  # noqa: PLC0415

    with open(os.path.join(tmp, "sft.json"), "w") as f:
        json.dump({"config": asdict(cfg), "final_loss": losses[-1] if losses else None, "steps_run": len(losses),
                   "greedy_accuracy_checks": checks}, f, indent=2)
    if os.path.exists(out_dir):
        import shutil  # noqa: PLC0415

        shutil.rmtree(out_dir)
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    os.replace(tmp, out_dir)
    return {"out_dir": out_dir, "final_loss": losses[-1] if losses else None, "steps": len(losses),
            "greedy_accuracy": checks[-1][1] if checks else None}
