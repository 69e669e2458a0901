"""Evaluation by the reward: avg@k, pass@k (k samples per prompt) and greedy accuracy.

    judge = reward_judge(scorer, cfg.eval)        # the run's first reward >= eval.threshold
    metrics = evaluate_engine(engine, task.eval[:64], judge, k=4, temperature=1.0,
                              max_new_tokens=16, seed=0)

A sample is correct when its correctness reward reaches a threshold: by default the run's own
(first) reward and threshold 1.0 (``eval.reward``, ``eval.threshold``), so a run is judged by
what it was trained on, not by exact string match. avg@k is the mean correctness over all k
samples of every prompt (an estimate of the sampled accuracy); pass@k is the fraction of prompts
with at least one correct sample among k; greedy is the correctness of the temperature-0 answer.
The sampling stream comes from its own generator seeded with ``seed``, so the same weights always
get the same numbers, and evaluating never moves a training RNG.

``evaluate_run`` is ``ratiorl eval``: any model (a run folder, a saved model, a LoRA adapter
folder, a GGUF file) on any task of a config, writing ``samples.jsonl`` (every completion with
its rewards) and ``summary.json`` to an output folder.
"""

from __future__ import annotations

import json
import os
import time

import torch


class RewardJudge:
    """Scores completions with one reward function; ``correct = score >= threshold``.

    ``judge(completions, examples) -> list[float]`` (the reward, per completion); examples are the
    dataset rows (``prompt``, ``answer`` and any other column, passed to the reward by name)."""

    def __init__(self, fn, name: str, threshold: float = 1.0):
        self.fn, self.name, self.threshold = fn, name, float(threshold)

    def __call__(self, completions: list, examples: list) -> list:
        from ratiorl.rewards import call_reward_safely

        keys = [k for k in examples[0] if k not in ("prompt", "answer", "completion")] if examples else []
        fields = {k: [ex.get(k) for ex in examples] for k in keys}
        scores, _ = call_reward_safely(self.fn, list(completions), [ex["prompt"] for ex in examples],
                                       [ex["answer"] for ex in examples], fields)
        return scores

    def correct(self, scores: list) -> list:
        return [float(s >= self.threshold) for s in scores]


class CheckJudge(RewardJudge):
    """A task's ``check(completion, answer) -> bool`` as a judge (score 1.0 or 0.0)."""

    def __init__(self, check):
        super().__init__(None, "check", 1.0)
        self.check = check

    def __call__(self, completions: list, examples: list) -> list:
        return [float(bool(self.check(c, ex["answer"]))) for c, ex in zip(completions, examples)]


def reward_judge(scorer, eval_cfg) -> RewardJudge:
    """The judge of a run: ``eval.reward`` (a name among the scorer's rewards; None = the first)
    with ``eval.threshold``."""
    name = getattr(eval_cfg, "reward", None)
    entries = {n: fn for n, fn, _ in scorer.entries}
    if name is None:
        name = scorer.entries[0][0]
    elif name not in entries:
        from ratiorl.rewards import get_reward

        try:  # a registered reward that the run does not train on
            entries[name] = get_reward(name)
        except (ValueError, TypeError) as e:
            raise ValueError(f"eval.reward={name!r}: not one of the run's rewards ({', '.join(entries)}) "
                             f"and not a registered reward: {e}") from None
    return RewardJudge(entries[name], name, getattr(eval_cfg, "threshold", 1.0))


def as_judge(check) -> RewardJudge:
    return check if isinstance(check, RewardJudge) else CheckJudge(check)


@torch.no_grad()
def evaluate_engine(engine, examples: list, check, *, k: int, temperature: float, max_new_tokens: int,
                    top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, stop: list | None = None,
                    seed: int = 0, greedy: bool = True, records: list | None = None) -> dict:
    """avg@k / pass@k at ``temperature`` and greedy accuracy of ``engine`` on ``examples``.

    ``check`` is a :class:`RewardJudge` or a task's ``check(completion, answer)``. ``top_k``, ``min_p``
    and ``stop`` are the rollout's (``stop`` ends greedy completions too). An engine with
    ``generate_with_greedy`` (``HFRolloutEngine``) samples and decodes greedily in one pass that
    prefills each prompt once; the numbers are those of two separate calls. With a list in
    ``records``, one dict per completion is appended (mode, prompt index, completion, reward,
    correct, length)."""
    judge = as_judge(check)
    prompts = [x["prompt"] for x in examples]
    gen = torch.Generator(device=engine.device).manual_seed(seed + 7919)
    t0 = time.perf_counter()
    out = {"eval/k": float(k), "eval/temperature": float(temperature)}
    stops = {"stop": list(stop)} if stop else {}  # only when set: engines without the options still work
    opts = {**stops, **({"min_p": min_p} if min_p > 0 else {}), **({"top_k": top_k} if top_k > 0 else {})}
    g = None
    if k > 0:
        if greedy and hasattr(engine, "generate_with_greedy"):
            b, g = engine.generate_with_greedy(prompts, k, max_new_tokens=max_new_tokens, temperature=temperature,
                                               top_p=top_p, generator=gen, **opts)
        else:
            b = engine.generate(prompts, k, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                generator=gen, **opts)
        rows = b.group_ids.tolist()
        scores = judge(b.completion_texts, [examples[i] for i in rows])
        ok = torch.tensor(judge.correct(scores)).view(len(prompts), k)
        lengths = b.completion_mask.sum(1)
        out.update({"eval/avg@k": float(ok.mean()), "eval/pass@k": float(ok.max(1).values.mean()),
                    "eval/length": float(lengths.float().mean()), "eval/reward": sum(scores) / len(scores)})
        if records is not None:
            for j, (text, i) in enumerate(zip(b.completion_texts, rows)):
                records.append({"mode": "sample", "index": i, "completion": text, "reward": scores[j],
                                "correct": bool(ok.view(-1)[j]), "length": int(lengths[j])})
    if greedy:
        if g is None:
            g = engine.generate(prompts, 1, max_new_tokens=max_new_tokens, temperature=0.0, **stops)
        scores = judge(g.completion_texts, examples)
        hits = judge.correct(scores)
        out["eval/greedy_acc"] = sum(hits) / len(hits)
        out["eval/greedy_reward"] = sum(scores) / len(scores)
        if records is not None:
            lengths = g.completion_mask.sum(1).tolist()
            for i, text in enumerate(g.completion_texts):
                records.append({"mode": "greedy", "index": i, "completion": text, "reward": scores[i],
                                "correct": bool(hits[i]), "length": int(lengths[i])})
    out["time/eval"] = time.perf_counter() - t0
    return out


def run_model_path(model: str) -> tuple[str, str | None]:
    """``(model_path, run_config)``: a training run's folder gives its ``model/`` (the final
    weights, or a LoRA adapter) and its ``config.yaml``; anything else is a model path as it is."""
    cfg_path = os.path.join(model, "config.yaml")
    if os.path.isdir(model) and os.path.isfile(cfg_path) and os.path.isdir(os.path.join(model, "model")):
        return os.path.join(model, "model"), cfg_path
    return model, None


def evaluate_run(model: str, config_path: str | None = None, overrides: list | None = None,
                 out_dir: str | None = None, console=None) -> dict:
    """``ratiorl eval``: evaluate ``model`` (a run folder, a model folder, an adapter folder or a
    hub name) on the task of ``config_path`` (default: the run's own config) with ``overrides``
    (``--task.name jsonl --task.path f.jsonl --eval.k 8 ...``). Writes ``samples.jsonl`` and
    ``summary.json`` to ``out_dir`` (default ``<run>/eval`` for a run, else ``runs/eval``)."""
    from ratiorl.policy.loading import resolve_model_path
    from ratiorl.rollout import HFRolloutEngine

    from .build import build_policy, build_scorer, build_task
    from .config import load_config
    from .prompts import render_task

    model_path, run_cfg = run_model_path(resolve_model_path(model))
    if not os.path.exists(model_path) and (model_path.startswith((".", "/", "~")) or model_path.count("/") != 1):
        raise ValueError(f"--model {model}: no such run, model folder or hub name")
    cfg = load_config(config_path or run_cfg, list(overrides or []))
    if run_cfg is not None and not os.path.isfile(os.path.join(model_path, "adapter_config.json")):
        cfg.model.gguf_file = None  # the run saved full weights: no GGUF any more
    cfg.model.path = model_path
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)  # evaluation has the machine to itself
    try:
        task = build_task(cfg)
        policy = build_policy(cfg, model_path, needs_reference=False)
        task = render_task(task, policy.tokenizer, cfg.task)
        scorer = build_scorer(cfg, task)
        engine = HFRolloutEngine(policy.model, policy.tokenizer, decoder=cfg.rollout.decoder, draw=cfg.rollout.draw,
                                attention=cfg.rollout.attention)
        e = cfg.eval
        temp = cfg.rollout.temperature if e.temperature is None else e.temperature
        examples = task.eval[: e.num_prompts]
        records: list = []
        metrics = evaluate_engine(engine, examples, reward_judge(scorer, e), k=e.k, temperature=temp,
                                  top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, min_p=cfg.rollout.min_p,
                                  stop=list(cfg.rollout.stop), max_new_tokens=cfg.rollout.max_new_tokens,
                                  seed=cfg.seed, greedy=e.greedy, records=records)
    finally:
        torch.set_num_threads(threads_before)
    metrics["eval/num_prompts"] = float(len(examples))
    out_dir = out_dir or (os.path.join(model, "eval") if run_cfg else os.path.join("runs", "eval"))
    write_eval(out_dir, metrics, records, examples, scorer, cfg, model)
    if console is not None:
        console.print(f"wrote {out_dir}/summary.json and samples.jsonl")
    return metrics


def write_eval(out_dir: str, metrics: dict, records: list, examples: list, scorer, cfg, model: str) -> None:
    """``samples.jsonl``: each completion with its prompt, answer, every reward of the run
    (``rewards``) and the judge's reward and verdict; ``summary.json``: the metrics."""
    os.makedirs(out_dir, exist_ok=True)
    if records:
        texts = [r["completion"] for r in records]
        rows = [examples[r["index"]] for r in records]
        fields = {k: [ex.get(k) for ex in rows] for k in rows[0] if k not in ("prompt", "answer", "completion")}
        per_fn = scorer.score(texts, prompts=[ex["prompt"] for ex in rows],
                              answers=[ex["answer"] for ex in rows], **fields).per_function
        for j, r in enumerate(records):
            r["rewards"] = {name: float(v[j]) for name, v in per_fn.items()}
    with open(os.path.join(out_dir, "samples.jsonl"), "w") as f:
        for r in records:
            ex = examples[r["index"]]
            f.write(json.dumps({"prompt": ex["prompt"], "answer": ex["answer"], **r}) + "\n")
    summary = {"model": model, "task": cfg.task.name, "task_options": dict(cfg.task.options),
               "judge": getattr(cfg.eval, "reward", None) or scorer.entries[0][0],
               "threshold": cfg.eval.threshold, **metrics}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)


def evaluate_model(model_path: str, task_name: str = "addition", *, k: int = 4, num_prompts: int = 200,
                   temperature: float = 1.0, max_new_tokens: int = 16, seed: int = 0, device: str = "cpu",
                   task_options: dict | None = None, greedy: bool = True) -> dict:
    """A saved model on a built-in task's eval split (``evaluate_run`` without the output files)."""
    from ratiorl.rollout import HFRolloutEngine

    from .build import build_policy, build_scorer, build_task
    from .config import config_from_dict
    from .prompts import render_task

    if not os.path.exists(model_path):
        raise ValueError(f"--model {model_path}: no such directory (create one with `ratiorl sft --out DIR`)")
    cfg = config_from_dict({"seed": seed, "model": {"path": model_path, "device": device},
                            "task": {"name": task_name, "options": dict(task_options or {})},
                            "rollout": {"temperature": temperature if temperature > 0 else 1.0,
                                        "max_new_tokens": max_new_tokens}})
    task = build_task(cfg)
    policy = build_policy(cfg, model_path, needs_reference=False)
    task = render_task(task, policy.tokenizer, cfg.task)
    engine = HFRolloutEngine(policy.model, policy.tokenizer)
    out = evaluate_engine(engine, task.eval[:num_prompts], reward_judge(build_scorer(cfg, task), cfg.eval), k=k,
                          temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, greedy=greedy)
    out["eval/num_prompts"] = float(min(num_prompts, len(task.eval)))
    return out


__all__ = [
    "CheckJudge",
    "RewardJudge",
    "evaluate_engine",
    "evaluate_model",
    "evaluate_run",
    "reward_judge",
    "run_model_path",
    "write_eval",
]
