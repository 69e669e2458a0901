"""Evaluation by the reward, and `ratiorl eval` on any model and task."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

from ratiorl.cli import main
from ratiorl.rewards import RewardScorer
from ratiorl.train.evaluate import evaluate_engine, reward_judge


class ScriptedEngine:
    """Returns fixed completions: sampled ones in group order, then greedy ones."""

    device = torch.device("cpu")

    def __init__(self, sampled, greedy):
        self.sampled, self.greedy = sampled, greedy

    def generate(self, prompts, G, *, max_new_tokens, temperature, top_p=1.0, generator=None):
        texts = self.greedy if temperature == 0 else self.sampled
        assert len(texts) == len(prompts) * G
        return SimpleNamespace(completion_texts=list(texts), group_ids=torch.arange(len(prompts)).repeat_interleave(G),
                               completion_mask=torch.ones(len(texts), 3))


def test_accuracy_is_the_reward_reaching_the_threshold():
    examples = [{"prompt": "a", "answer": "46"}, {"prompt": "b", "answer": "7"}]
    sampled = ["#### 46", "45", "\\boxed{7}", "7 apples"]  # k = 2
    greedy = ["The answer is 46.", "8"]
    engine = ScriptedEngine(sampled, greedy)
    scorer = RewardScorer([("answer_match", 1.0, {}), ("format", 0.1, {})])
    records = []
    m = evaluate_engine(engine, examples, reward_judge(scorer, SimpleNamespace(reward=None, threshold=1.0)), k=2,
                        temperature=1.0, max_new_tokens=3, records=records)
    assert m["eval/avg@k"] == 0.75 and m["eval/pass@k"] == 1.0 and m["eval/greedy_acc"] == 0.5
    # exact match (the task's old check) would have called all of these wrong but "45"/"8"
    exact = evaluate_engine(engine, examples, lambda c, a: c.strip() == a, k=2, temperature=1.0, max_new_tokens=3)
    assert exact["eval/avg@k"] == 0.0
    # another judge and threshold
    fmt = reward_judge(scorer, SimpleNamespace(reward="format", threshold=0.5))
    m2 = evaluate_engine(engine, examples, fmt, k=2, temperature=1.0, max_new_tokens=3)
    want = sum(float(len(t.split()) == 1) for t in sampled) / 4  # format: one token-like word
    assert m2["eval/avg@k"] == want
    assert [r["mode"] for r in records] == ["sample"] * 4 + ["greedy"] * 2
    assert [r["correct"] for r in records] == [True, False, True, True, True, False]
    with pytest.raises(ValueError, match="not one of the run's rewards"):
        reward_judge(scorer, SimpleNamespace(reward="nope", threshold=1.0))


def test_trainer_evaluation_uses_the_run_reward(make_config):
    from ratiorl.train import Trainer

    cfg = make_config(**{"rewards": "[{name: answer_match}, {name: format, weight: 0.5}]", "reward.noise_sigma": 0.0,
                         "eval.greedy": True})
    t = Trainer(cfg)
    try:
        m = t.step()
        assert "reward/fn/answer_match" in m and "reward/fn/format" in m  # each reward logged on its own
        assert m["reward/mean"] == pytest.approx(m["reward/fn/answer_match"] + 0.5 * m["reward/fn/format"], abs=1e-6)
        ev = t.evaluate()
        # independent: greedy completions judged by answer_match
        ex = t.task.eval[: cfg.eval.num_prompts]
        g = t.eval_engine.generate([e["prompt"] for e in ex], 1, max_new_tokens=cfg.rollout.max_new_tokens,
                                   temperature=0.0)
        from ratiorl.rewards import get_reward

        ok = get_reward("answer_match")(g.completion_texts, answers=[e["answer"] for e in ex])
        assert ev["eval/greedy_acc"] == sum(ok) / len(ok)
    finally:
        t.close()
    with pytest.raises(ValueError, match="not both"):
        Trainer(make_config(**{"rewards": "[{name: answer_match}]", "reward.name": "exact_match"}))


def run_cli(*args):
    return main(["eval", *args])


def test_ratiorl_eval_on_a_lora_run_folder(tmp_path, make_config, capsys):
    pytest.importorskip("peft")
    from ratiorl.train import Trainer

    run = str(tmp_path / "run")
    cfg = make_config(**{"out_dir": run, "lora.enabled": True, "lora.r": 2, "checkpoint.save_final_model": True,
                         "reward.noise_sigma": 0.0})
    t = Trainer(cfg)
    try:
        t.run()
        ex = t.task.eval[:4]
        g = t.eval_engine.generate([e["prompt"] for e in ex], 1, max_new_tokens=cfg.rollout.max_new_tokens,
                                   temperature=0.0)
    finally:
        t.close()
    assert os.path.isfile(os.path.join(run, "model", "adapter_config.json"))  # the folder holds only the adapter
    assert run_cli("--model", run, "--num-prompts", "4", "--k", "2", "--eval.greedy", "true") == 0
    out = os.path.join(run, "eval")
    summary = json.load(open(os.path.join(out, "summary.json")))
    rows = [json.loads(line) for line in open(os.path.join(out, "samples.jsonl"))]
    assert summary["eval/num_prompts"] == 4 and summary["judge"] == "exact_match"
    assert len(rows) == 4 * 2 + 4 and set(rows[0]["rewards"]) == {"exact_match"}
    greedy = [r["completion"] for r in rows if r["mode"] == "greedy"]
    assert greedy == g.completion_texts  # base + adapter loaded: the trained policy's own answers
    assert summary["eval/greedy_acc"] == sum(r["correct"] for r in rows if r["mode"] == "greedy") / 4


def test_ratiorl_eval_any_task_with_options(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"q": f"{i}+1=", "a": str(i + 1)}) + "\n" for i in range(12)))
    out = str(tmp_path / "e1")
    assert run_cli("--model", tiny_model_dir, "--task", "jsonl", "--task.path", str(data), "--task.prompt_field", "q",
                   "--task.answer_field", "a", "--k", "1", "--max-new-tokens", "2", "--out", out) == 0
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["task"] == "jsonl" and s["eval/num_prompts"] == 1.0  # 12 rows: 1 held out
    out2 = str(tmp_path / "e2")
    assert run_cli("--model", tiny_model_dir, "--task", "addition", "--task.options.n_digits", "1",
                   "--task.options.n_train", "10", "--task.options.n_eval", "5", "--k", "1",
                   "--max-new-tokens", "2", "--out", out2) == 0
    s2 = json.load(open(os.path.join(out2, "summary.json")))
    assert s2["task_options"] == {"n_digits": 1, "n_train": 10, "n_eval": 5} and s2["eval/num_prompts"] == 5


def test_ratiorl_eval_clear_errors(tiny_model_dir, tmp_path, capsys):
    assert run_cli("--model", str(tmp_path / "nothing")) == 2
    assert "no such run" in capsys.readouterr().err
    assert run_cli("--model", tiny_model_dir, "--task.options.bogus", "1", "--out", str(tmp_path / "e")) == 2
    assert "bogus" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert run_cli("--model", tiny_model_dir, "--model.device", "cuda", "--out", str(tmp_path / "e")) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_evaluation_samples_with_the_rollouts_truncation_and_stops():
    """Evaluation at the training temperature draws from the same truncated distribution as the
    rollout (top_k, top_p, min_p) and ends completions at the same stop strings; greedy decoding
    gets the stops but no truncation (it has none to apply)."""
    calls = []

    class Recording(ScriptedEngine):
        def generate(self, prompts, G, *, max_new_tokens, temperature, top_p=1.0, generator=None, **options):
            calls.append((temperature, top_p, options))
            return super().generate(prompts, G, max_new_tokens=max_new_tokens, temperature=temperature)

    examples = [{"prompt": "a", "answer": "1"}]
    evaluate_engine(Recording(["1", "2"], ["1"]), examples, lambda c, a: c == a, k=2, temperature=0.7,
                    max_new_tokens=3, top_p=0.9, top_k=5, min_p=0.05, stop=["\n"])
    assert calls == [(0.7, 0.9, {"top_k": 5, "min_p": 0.05, "stop": ["\n"]}), (0.0, 1.0, {"stop": ["\n"]})]
    calls.clear()  # defaults pass no options, so engines without them keep working
    evaluate_engine(Recording(["1", "2"], ["1"]), examples, lambda c, a: c == a, k=2, temperature=0.7,
                    max_new_tokens=3)
    assert calls == [(0.7, 1.0, {}), (0.0, 1.0, {})]


def test_training_accuracy_is_judged_as_evaluation_judges():
    """The `accuracy` logged every step uses the run's judge (eval.reward >= eval.threshold), so a
    run whose answers are right but not exact strings does not log accuracy 0."""
    from ratiorl.train.stages.score import Score

    def batch():
        return SimpleNamespace(fields={"prompt": ["a", "b", "c"], "answer": ["13", "7", "5"]}, counters={},
                               completion_texts=["8 + 5 = 13.", "7", "The answer is 4"])

    scorer = RewardScorer([("answer_match", 1.0, {}), ("format", 0.5, {})])
    cfg = SimpleNamespace(overlong_penalty=0.0)
    exact = lambda c, a: c.strip() == a  # noqa: E731  (a task's own string check)
    judged = Score(scorer, exact, cfg, 8, judge=reward_judge(scorer, SimpleNamespace(reward=None, threshold=1.0)))
    assert judged(batch()).correct.tolist() == [1.0, 1.0, 0.0]
    assert Score(scorer, exact, cfg, 8)(batch()).correct.tolist() == [0.0, 1.0, 0.0]  # no judge: the check
    # a judge on a reward the run does not train on is computed for the accuracy only
    other = reward_judge(RewardScorer([("format", 1.0, {})]), SimpleNamespace(reward="answer_match", threshold=1.0))
    assert Score(RewardScorer([("format", 1.0, {})]), exact, cfg, 8, judge=other)(batch()).correct.tolist() == [
        1.0, 1.0, 0.0]
