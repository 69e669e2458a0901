"""Evaluation: avg@k, pass@k (k samples per prompt) and greedy exact-match accuracy.

    metrics = evaluate_engine(engine, task.eval[:64], task.check, k=4, temperature=1.0,
                              max_new_tokens=16, seed=0)

avg@k is the mean correctness over all k samples of every prompt (an estimate of the sampled
accuracy); pass@k is the fraction of prompts with at least one correct sample among k.
The sampling stream comes from its own generator seeded with ``seed``, so the same weights
always get the same numbers, and evaluating never moves a training RNG.
"""

from __future__ import annotations

import time

import torch


@torch.no_grad()
def evaluate_engine(engine, examples: list, check, *, k: int, temperature: float, max_new_tokens: int,
                    top_p: float = 1.0, seed: int = 0, greedy: bool = True) -> dict:
    prompts, answers = [x["prompt"] for x in examples], [x["answer"] for x in examples]
    gen = torch.Generator(device=engine.device).manual_seed(seed + 7919)
    t0 = time.perf_counter()
    b = engine.generate(prompts, k, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        generator=gen)
    ok = torch.tensor([float(check(t, answers[i])) for t, i in zip(b.completion_texts, b.group_ids.tolist())])
    ok = ok.view(len(prompts), k)
    out = {"eval/avg@k": float(ok.mean()), "eval/pass@k": float(ok.max(1).values.mean()),
           "eval/k": float(k), "eval/temperature": float(temperature),
           "eval/length": float(b.completion_mask.sum(1).float().mean())}
    if greedy:
        g = engine.generate(prompts, 1, max_new_tokens=max_new_tokens, temperature=0.0)
        hits = [float(check(t, a)) for t, a in zip(g.completion_texts, answers)]
        out["eval/greedy_acc"] = sum(hits) / len(hits)
    out["time/eval"] = time.perf_counter() - t0
    return out


def evaluate_model(model_path: str, task_name: str = "addition", *, k: int = 4, num_prompts: int = 200,
                   temperature: float = 1.0, max_new_tokens: int = 16, seed: int = 0, device: str = "cpu",
                   task_options: dict | None = None, greedy: bool = True) -> dict:
    """Load a saved model (``save_pretrained`` folder) and evaluate it on a built-in task's eval split."""
    import os  # noqa: PLC0415

    from ratiorl.policy import Policy  # noqa: PLC0415
    from ratiorl.rollout import HFRolloutEngine  # noqa: PLC0415
    from ratiorl.tasks import get_task  # noqa: PLC0415

    if not os.path.exists(model_path):
        raise ValueError(f"--model {model_path}: no such directory (create one with `ratiorl sft --out DIR`)")
    try:
        task = get_task(task_name, seed=seed, **(task_options or {}))
    except TypeError as e:
        raise ValueError(str(e)) from None
    policy = Policy.from_pretrained(model_path, reference="none", temperature=max(temperature, 1e-6) if temperature > 0 else 1.0,
                                    device=device)
    engine = HFRolloutEngine(policy.model, policy.tokenizer)
    out = evaluate_engine(engine, task.eval[:num_prompts], task.check, k=k, temperature=temperature,
                          max_new_tokens=max_new_tokens, seed=seed, greedy=greedy)
    out["eval/num_prompts"] = float(min(num_prompts, len(task.eval)))
    return out
