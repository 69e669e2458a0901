"""Finished rows leave the batch (and the KV cache): the samples, log-probs and evaluation numbers
are those of the sampler that keeps every row, and the forwards do shrink."""

import pytest
import torch

from ratiorl.policy import Policy
from ratiorl.rollout import HFRolloutEngine
from ratiorl.rollout.decoder import LeanDecoder

PROMPTS = ["12+34=", "7+5=", "a much longer prompt: 99+1=", "x", "3+3=", "10+9="]


def engines(path, decoder="auto", full_decoder=None):
    policy = Policy.from_pretrained(path, reference="none")
    compact = HFRolloutEngine(policy.model, policy.tokenizer, decoder=decoder)
    full = HFRolloutEngine(policy.model, policy.tokenizer, decoder=full_decoder or decoder)
    full.compact_finished = False
    return compact, full


def batch_sizes(model, monkeypatch=None):
    """Rows of every forward: transformers' (prefill, and decode steps with decoder="hf"), and with
    ``monkeypatch`` the lean decoder's decode steps."""
    sizes = []
    handle = model.register_forward_pre_hook(lambda m, args, kw: sizes.append(kw["input_ids"].shape), with_kwargs=True)
    if monkeypatch is not None:
        step = LeanDecoder.step

        def counting_step(self, tokens, t):
            sizes.append(tokens[:, None].shape)
            return step(self, tokens, t)

        monkeypatch.setattr(LeanDecoder, "step", counting_step)
    return sizes, handle


@pytest.mark.parametrize("decoder", ["auto", "hf"])
@pytest.mark.parametrize("model_dir", ["eos_model_dir", "llama_dir"])
@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.8, top_p=0.9, min_p=0.05),
                                dict(temperature=0.0), dict(temperature=1.0, stop=["1", "+"])])
def test_same_samples_with_and_without_dropping_finished_rows(request, monkeypatch, model_dir, kw, decoder):
    compact, full = engines(request.getfixturevalue(model_dir), decoder)
    assert (compact.lean_decoder() is not None) == (decoder == "auto")
    G = 1 if kw["temperature"] == 0 else 5
    sizes, handle = batch_sizes(compact.model, monkeypatch if decoder == "auto" else None)
    try:
        a = compact.generate(PROMPTS, G, max_new_tokens=14, generator=torch.Generator().manual_seed(9), **kw)
    finally:
        handle.remove()
        monkeypatch.undo()
    b = full.generate(PROMPTS, G, max_new_tokens=14, generator=torch.Generator().manual_seed(9), **kw)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.completion_mask, b.completion_mask)
    assert a.completion_texts == b.completion_texts and torch.equal(a.truncated, b.truncated)
    torch.testing.assert_close(a.behaviour_logp, b.behaviour_logp, rtol=0, atol=1e-5)
    R = len(PROMPTS) * G
    steps = [s[0] for s in sizes[1:]]  # after the prefill (one row per distinct prompt)
    assert sizes[0][0] == len(PROMPTS) and steps[0] == R
    lengths = a.completion_mask.sum(1)
    if (lengths < lengths.max()).sum() * HFRolloutEngine.COMPACT_FRACTION >= R:  # enough rows finish early
        assert min(steps) < R and sum(steps) < R * len(steps)
    elif model_dir == "eos_model_dir":
        raise AssertionError("the EOS model's rows should end at varied lengths")
        # every forward ran at least the rows still generating, never a finished-only batch
        alive = [(lengths > t + 1).sum().item() for t in range(len(steps))]
        assert all(s >= n for s, n in zip(steps, alive))


def test_evaluation_numbers_are_unchanged(eos_model_dir):
    from ratiorl.train.evaluate import evaluate_engine

    compact, full = engines(eos_model_dir)
    examples = [{"prompt": p, "answer": a} for p, a in zip(PROMPTS * 4, ["46", "12", "100", "x", "6", "19"] * 4)]
    check = lambda completion, answer: completion.strip()[:1] == answer[:1]  # noqa: E731
    kw = dict(k=4, temperature=0.9, max_new_tokens=12, seed=3)
    recs_a, recs_b = [], []
    a = evaluate_engine(compact, examples, check, records=recs_a, **kw)
    b = evaluate_engine(full, examples, check, records=recs_b, **kw)
    for m in (a, b):
        m.pop("time/eval")
    assert a == b and recs_a == recs_b
    assert 0 < a["eval/avg@k"] < 1 and 0 < a["eval/pass@k"]  # not a degenerate judge


def assert_same_rollout(x, y):
    assert torch.equal(x.completion_ids, y.completion_ids) and torch.equal(x.completion_mask, y.completion_mask)
    assert torch.equal(x.prompt_ids, y.prompt_ids) and torch.equal(x.prompt_mask, y.prompt_mask)
    assert torch.equal(x.group_ids, y.group_ids) and torch.equal(x.truncated, y.truncated)
    assert x.completion_texts == y.completion_texts
    torch.testing.assert_close(x.behaviour_logp, y.behaviour_logp, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(temperature=0.9), dict(temperature=1.0, top_k=5, min_p=0.05, stop=["1"]),
                                dict(temperature=0.0)])
def test_generate_with_greedy_is_the_two_calls_with_one_prefill(eos_model_dir, kw):
    compact, full = engines(eos_model_dir, full_decoder="hf")  # (transformers' forward: every step seen by a hook)
    s, g = compact.generate_with_greedy(PROMPTS, 4, max_new_tokens=12, generator=torch.Generator().manual_seed(4), **kw)
    sizes, handle = batch_sizes(full.model)
    try:
        s2, g2 = full.generate_with_greedy(PROMPTS, 4, max_new_tokens=12, generator=torch.Generator().manual_seed(4),
                                           **kw)
    finally:
        handle.remove()
    assert_same_rollout(s, s2)
    assert_same_rollout(g, g2)
    a = full.generate(PROMPTS, 4, max_new_tokens=12, generator=torch.Generator().manual_seed(4), **kw)
    b = full.generate(PROMPTS, 1, max_new_tokens=12, temperature=0.0, stop=kw.get("stop"))
    assert_same_rollout(s, a)
    assert_same_rollout(g, b)
    assert [n[1] > 1 for n in sizes] == [True] + [False] * (len(sizes) - 1)  # one prompt forward
    assert sizes[0][0] == len(PROMPTS) and sizes[1][0] == len(PROMPTS) * 5  # then 4 sampled + 1 greedy rows each
    assert len(set(a.completion_texts)) > len(PROMPTS) or kw["temperature"] == 0


def test_evaluation_numbers_from_one_pass(eos_model_dir):
    """avg@k, pass@k and greedy accuracy from ``generate_with_greedy`` are evaluate_engine's."""
    from ratiorl.train.evaluate import evaluate_engine

    compact, _ = engines(eos_model_dir)
    examples = [{"prompt": p, "answer": a} for p, a in zip(PROMPTS * 4, ["46", "12", "100", "x", "6", "19"] * 4)]
    check = lambda completion, answer: completion.strip()[:1] == answer[:1]  # noqa: E731
    want = evaluate_engine(compact, examples, check, k=4, temperature=0.9, max_new_tokens=12, seed=3)
    gen = torch.Generator().manual_seed(3 + 7919)  # evaluate_engine's generator for seed 3
    s, g = compact.generate_with_greedy([e["prompt"] for e in examples], 4, max_new_tokens=12, temperature=0.9,
                                        generator=gen)
    ok = torch.tensor([float(check(t, examples[i]["answer"])) for t, i in zip(s.completion_texts, s.group_ids.tolist())])
    ok = ok.view(len(examples), 4)
    greedy = [float(check(t, e["answer"])) for t, e in zip(g.completion_texts, examples)]
    assert want["eval/avg@k"] == float(ok.mean()) and want["eval/pass@k"] == float(ok.max(1).values.mean())
    assert want["eval/greedy_acc"] == sum(greedy) / len(greedy)
    assert want["eval/length"] == float(s.completion_mask.sum(1).float().mean())
