"""min-p and the composition of the truncations: the recorded log-prob of every sampled token is
log q(token) of the truncated, renormalised distribution it was drawn from (checked against
transformers' own warpers, against a float64 enumeration, and against sampled frequencies);
option validation; the config keys and the sample stage."""

import math
from types import SimpleNamespace

import pytest
import torch

from ratiorl.policy import Policy
from ratiorl.rollout import HFRolloutEngine
from ratiorl.rollout.truncation import check_sampling_options, truncated_logp

PROMPTS = ["12+34=", "7+5=", "a much longer prompt: 99+1=", "x"]


def engine_for(path, **kw):
    policy = Policy.from_pretrained(path, reference="none", **kw)
    return policy, HFRolloutEngine(policy.model, policy.tokenizer)


@pytest.mark.parametrize("T,top_k,top_p,min_p", [(1.0, 0, 1.0, 0.1), (0.7, 0, 1.0, 0.3), (1.0, 20, 0.9, 0.05),
                                                 (1.3, 0, 0.8, 0.2), (1.0, 5, 1.0, 0.5), (0.8, 30, 0.95, 0.0)])
def test_matches_transformers_warpers_in_their_default_order(T, top_k, top_p, min_p):
    """The same support and renormalised log-probs as transformers' processors, applied in the
    order GenerationMixin._get_logits_processor builds them: temperature, top-k, top-p, min-p."""
    from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(int(T * 10) + top_k)) * 3
    chain = [TemperatureLogitsWarper(T)]
    if top_k:
        chain.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        chain.append(TopPLogitsWarper(top_p))
    if min_p > 0:
        chain.append(MinPLogitsWarper(min_p))
    want = torch.log_softmax(LogitsProcessorList(chain)(None, logits.clone()), -1)
    got = truncated_logp(torch.log_softmax(logits / T, -1), top_k, top_p, min_p)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    kept = torch.isfinite(want)
    torch.testing.assert_close(got[kept], want[kept], rtol=1e-5, atol=1e-5)
    assert (~kept).any()  # something was cut: not vacuous


def test_min_p_rule_by_hand():
    p = torch.tensor([[0.5, 0.25, 0.15, 0.1]])
    q = truncated_logp(p.log(), 0, 1.0, 0.3)  # threshold 0.3 * 0.5 = 0.15: 0.15 is kept (>=), 0.1 is not
    torch.testing.assert_close(q.exp(), torch.tensor([[0.5, 0.25, 0.15, 0.0]]) / 0.9)
    # after top-p = 0.7 (keeps 0.5, 0.25), min-p 0.6 tests 0.25 against 0.6 * 0.5 = 0.3: dropped
    q = truncated_logp(p.log(), 0, 0.7, 0.6)
    torch.testing.assert_close(q.exp(), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    # min-p after top-k = 3 uses the renormalised probabilities: same ratios, same cut
    q = truncated_logp(p.log(), 3, 1.0, 0.4)
    torch.testing.assert_close(q.exp(), torch.tensor([[0.5, 0.25, 0.0, 0.0]]) / 0.75)
    lp = p.log()
    assert truncated_logp(lp, 0, 1.0, 0.0) is lp  # min_p = 0: nothing truncated


def enumerated_logq(policy, b, T, top_k, top_p, min_p):
    """log q(y_t) position by position in float64 with plain Python: softmax(logits / T), the top_k
    most likely tokens, the smallest prefix of their renormalised distribution reaching top_p,
    the tokens with p >= min_p * max p among those, renormalised."""
    from tests.policy.helpers import full_logits

    with torch.no_grad():
        logits = full_logits(policy.model, b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)
    probs = torch.softmax(logits.double() / T, -1)
    out = torch.zeros(b.completion_ids.shape, dtype=torch.float64)
    cut = 0
    for i in range(probs.shape[0]):
        for t in range(int(b.completion_mask[i].sum())):
            p = probs[i, t].tolist()
            order = sorted(range(len(p)), key=lambda v: -p[v])
            keep = order[:top_k] if top_k > 0 else order
            z = sum(p[v] for v in keep)
            nucleus, mass = [], 0.0
            for v in keep:
                if mass >= top_p:
                    break
                nucleus.append(v)
                mass += p[v] / z
            support = [v for v in nucleus if p[v] >= min_p * p[nucleus[0]]]
            cut += len(support) < len(keep)
            y = int(b.completion_ids[i, t])
            assert y in support, "a token outside the truncated support was sampled"
            out[i, t] = math.log(p[y] / sum(p[v] for v in support))
    assert cut > 0
    return out


@pytest.mark.parametrize("T,top_k,top_p,min_p", [(1.0, 0, 1.0, 0.1), (0.8, 0, 1.0, 0.3), (1.2, 8, 0.9, 0.05),
                                                 (1.0, 0, 0.85, 0.2)])
def test_behaviour_logp_is_the_min_p_distribution(eos_model_dir, T, top_k, top_p, min_p):
    policy, eng = engine_for(eos_model_dir, temperature=T)
    b = eng.generate(PROMPTS, 6, max_new_tokens=10, temperature=T, top_k=top_k, top_p=top_p, min_p=min_p,
                     generator=torch.Generator().manual_seed(7))
    ref = enumerated_logq(policy, b, T, top_k, top_p, min_p)
    torch.testing.assert_close(b.behaviour_logp.double(), ref, rtol=1e-4, atol=1e-4)
    s = policy.completion_stats(b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)
    gap = (b.behaviour_logp - s.logp.detach())[b.completion_mask.bool()]
    assert (gap >= -1e-4).all() and gap.max() > 1e-2  # renormalised above the full softmax


@pytest.mark.parametrize("opts", [dict(min_p=0.1), dict(top_k=6, top_p=0.9, min_p=0.05), dict(top_p=0.95)])
def test_sampled_frequencies_match_the_recorded_probabilities(eos_model_dir, opts):
    """Many first tokens for one context: each token's frequency is within 4 standard errors of
    exp(recorded log-prob), tokens outside the support never appear, and the support found by
    sampling carries all the probability."""
    _, eng = engine_for(eos_model_dir)
    N = 6000
    b = eng.generate(["12+34="], N, max_new_tokens=1, temperature=0.9, generator=torch.Generator().manual_seed(11),
                     **opts)
    tok, lp = b.completion_ids[:, 0], b.behaviour_logp[:, 0]
    probs = {}
    for y, v in zip(tok.tolist(), lp.tolist()):
        assert probs.setdefault(y, v) == pytest.approx(v, abs=1e-6)  # one context: one log-prob per token
    counts = torch.bincount(tok, minlength=len(eng.tokenizer))
    for y, v in probs.items():
        p = math.exp(v)
        sigma = math.sqrt(p * (1 - p) / N)
        assert abs(counts[y].item() / N - p) < 4 * sigma + 1e-9, (y, counts[y].item() / N, p)
    assert sum(math.exp(v) for v in probs.values()) == pytest.approx(1.0, abs=1e-4)
    assert len(probs) >= 3  # several tokens: not a degenerate distribution


def test_min_p_zero_keeps_the_samples_of_existing_configs(eos_model_dir):
    _, eng = engine_for(eos_model_dir)
    run = lambda **kw: eng.generate(PROMPTS, 4, max_new_tokens=8, top_p=0.9,
                                    generator=torch.Generator().manual_seed(2), **kw)
    a, b = run(), run(min_p=0.0, stop=[])
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.behaviour_logp, b.behaviour_logp)
    c = run(min_p=0.3)
    assert not torch.equal(a.behaviour_logp[:, :1], c.behaviour_logp[:, :1])  # min-p does cut here


def test_validation():
    assert check_sampling_options(stop=("a", "bc")) == ["a", "bc"]
    from omegaconf import OmegaConf

    assert check_sampling_options(stop=OmegaConf.create(["\n\n"])) == ["\n\n"]
    for kw, match in [(dict(min_p=1.0), r"min_p must be in \[0, 1\)"), (dict(min_p=-0.1), "min_p"),
                      (dict(min_p=float("nan")), "min_p"), (dict(stop="###"), "stop must be a list of strings"),
                      (dict(stop=[""]), "non-empty"), (dict(stop=["a", 3]), "non-empty strings"),
                      (dict(top_p=0.0), "top_p"), (dict(top_k=-1), "top_k"), (dict(temperature=-1.0), "temperature")]:
        with pytest.raises(ValueError, match=match):
            check_sampling_options(**kw)
    with pytest.raises(ValueError, match="rollout.min_p"):
        check_sampling_options(min_p=2.0, prefix="rollout.")


def test_engine_rejects_bad_options(eos_model_dir):
    _, eng = engine_for(eos_model_dir)
    with pytest.raises(ValueError, match="min_p"):
        eng.generate(PROMPTS, 1, min_p=1.0)
    with pytest.raises(ValueError, match="stop must be a list"):
        eng.generate(PROMPTS, 1, stop="\n")


class RecordingEngine:
    def __init__(self):
        self.calls = []

    def generate(self, prompts, G, **kw):
        self.calls.append(kw)
        from ratiorl.rollout import Rollout

        n = len(prompts) * G
        ids = torch.ones(n, 2, dtype=torch.long)
        return Rollout(prompt_ids=ids, prompt_mask=ids, completion_ids=ids, completion_mask=ids,
                       behaviour_logp=torch.zeros(n, 2), old_logp=torch.zeros(n, 2),
                       group_ids=torch.arange(len(prompts)).repeat_interleave(G),
                       truncated=torch.zeros(n, dtype=torch.bool), completion_texts=["x"] * n)


def test_config_keys_and_the_sample_stage():
    from ratiorl.train.config import config_from_dict
    from ratiorl.train.stages.sample import PromptStream, Sample

    cfg = config_from_dict({})
    assert cfg.rollout.min_p == 0.0 and list(cfg.rollout.stop) == []
    examples = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(6)]
    eng = RecordingEngine()
    Sample(eng, PromptStream(examples, 0), cfg.rollout, torch.Generator())(2)
    assert "min_p" not in eng.calls[0] and "stop" not in eng.calls[0]  # defaults: the call of before
    cfg = config_from_dict({"rollout": {"min_p": 0.1, "stop": ["\n\n", "###"]}})
    Sample(eng, PromptStream(examples, 0), cfg.rollout, torch.Generator())(2)
    assert eng.calls[1]["min_p"] == 0.1 and eng.calls[1]["stop"] == ["\n\n", "###"]
    for bad, match in [({"min_p": 1.5}, "rollout.min_p"), ({"stop": [""]}, "rollout.stop")]:
        with pytest.raises(ValueError, match=match):
            Sample(eng, PromptStream(examples, 0), config_from_dict({"rollout": bad}).rollout, torch.Generator())


def test_sampling_options_helper():
    from ratiorl.rollout import sampling_options

    r = SimpleNamespace(top_p=0.9, top_k=4, min_p=0.0, stop=[])
    assert sampling_options(r) == {"top_p": 0.9, "top_k": 4}
    r = SimpleNamespace(top_p=1.0, top_k=0, min_p=0.05, stop=["</answer>"])
    assert sampling_options(r) == {"top_p": 1.0, "top_k": 0, "min_p": 0.05, "stop": ["</answer>"]}
