"""Policy.completion_stats against a float64 full-forward reference; reference modes; I/O."""

import copy
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ratiorl.policy import Policy, TokenStats, make_tiny_model

from .helpers import full_logits, naive_stats, random_batch

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "fan_in_fan_out": True, "target_modules": ["c_attn", "c_fc"]}
FIELDS = ("logp", "entropy", "token_kl", "ref_logp")


def perturb_lora_(policy, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def perturb_all_(model, seed, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def check_against_reference(policy, ref_model64, batch, temperature, seed, adapter_ref=False):
    """Values and parameter gradients of completion_stats vs a float64 copy of the model."""
    pids, pmask, cids, cmask = batch
    stats = policy.completion_stats(pids, pmask, cids, cmask, with_entropy=True, with_kl=True, with_ref_logp=True)
    assert isinstance(stats, TokenStats)
    B, Tc = cids.shape
    for f in FIELDS:
        v = getattr(stats, f)
        assert v.shape == (B, Tc) and v.dtype == torch.float32
        assert (v[cmask == 0] == 0).all()
    assert not stats.ref_logp.requires_grad

    model64 = copy.deepcopy(policy.model).double()
    logits = full_logits(model64, pids, pmask, cids, cmask)
    if adapter_ref:
        with torch.no_grad(), model64.disable_adapter():
            ref_logits = full_logits(model64, pids, pmask, cids, cmask)
    else:
        with torch.no_grad():
            ref_logits = full_logits(ref_model64, pids, pmask, cids, cmask)
    ref = naive_stats(logits, cids, cmask, temperature, ref_logits)
    for f in FIELDS:
        torch.testing.assert_close(getattr(stats, f).double(), ref[f].detach(), rtol=1e-4, atol=2e-5, msg=f)
    assert (stats.token_kl.detach().abs().sum() > 1e-3), "test is vacuous: policy == reference"

    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(B, Tc, generator=g, dtype=torch.float64) for _ in range(3)]
    names = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    params = dict(policy.model.named_parameters())
    params64 = dict(model64.named_parameters())
    loss = sum((getattr(stats, f).double() * wi).sum() for f, wi in zip(FIELDS[:3], w))
    loss64 = sum((ref[f] * wi).sum() for f, wi in zip(FIELDS[:3], w))
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    grads64 = torch.autograd.grad(loss64, [params64[n] for n in names])
    for n, a, r in zip(names, grads, grads64):
        scale = r.abs().max().item() + 1e-12
        torch.testing.assert_close(a.double(), r, rtol=1e-3, atol=1e-4 * scale, msg=n)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_stats_full_finetune(tiny_dir, temperature):
    policy = Policy.from_pretrained(tiny_dir, temperature=temperature)
    policy.vocab_chunk, policy.token_chunk = 33, 7  # chunks that do not divide V=100 or N
    assert policy.reference == "separate" and policy._ref_model is None  # lazy
    perturb_all_(policy.model, seed=1)
    ref64 = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64)
    batch = random_batch(5, 6, 9, 100, seed=int(temperature * 100))
    check_against_reference(policy, ref64, batch, temperature, seed=3)
    assert policy._ref_model is not None


@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_completion_stats_lora(tiny_dir, temperature):
    policy = Policy.from_pretrained(tiny_dir, lora=LORA, temperature=temperature)
    policy.vocab_chunk, policy.token_chunk = 25, 8  # divides V=100
    assert policy.reference == "adapter" and policy.ref_model is None
    perturb_lora_(policy, seed=2)
    batch = random_batch(4, 5, 7, 100, seed=int(temperature * 100) + 1)
    check_against_reference(policy, None, batch, temperature, seed=4, adapter_ref=True)
    # only adapters train
    assert all("lora_" in n for n, p in policy.model.named_parameters() if p.requires_grad)


def test_llama_style_model(llama_dir):
    policy = Policy.from_pretrained(llama_dir, temperature=0.9)
    policy.vocab_chunk, policy.token_chunk = 30, 4
    perturb_all_(policy.model, seed=5)
    ref64 = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64)
    check_against_reference(policy, ref64, random_batch(4, 6, 5, 100, seed=9), 0.9, seed=6)


def test_adapter_reference_equals_separate_base(tiny_dir):
    lora_pol = Policy.from_pretrained(tiny_dir, lora=LORA)
    perturb_lora_(lora_pol, seed=7)
    base_pol = Policy.from_pretrained(tiny_dir, reference="none")
    batch = random_batch(4, 5, 6, 100, seed=11)
    s_lora = lora_pol.completion_stats(*batch, with_ref_logp=True)
    s_base = base_pol.completion_stats(*batch)
    torch.testing.assert_close(s_lora.ref_logp, s_base.logp.detach(), rtol=1e-5, atol=1e-5)
    assert (s_lora.logp - s_base.logp).abs().max() > 1e-3  # the adapters do change the policy
    # separate-reference mode with LoRA loads a second copy and agrees too
    sep = Policy.from_pretrained(tiny_dir, lora=LORA, reference="separate")
    perturb_lora_(sep, seed=7)
    s_sep = sep.completion_stats(*batch, with_ref_logp=True, with_kl=True)
    torch.testing.assert_close(s_sep.ref_logp, s_lora.ref_logp, rtol=1e-5, atol=1e-5)


def test_on_policy_kl_is_zero_and_ref_logp_equals_logp(tiny_dir):
    policy = Policy.from_pretrained(tiny_dir)
    batch = random_batch(3, 4, 5, 100, seed=12)
    s = policy.completion_stats(*batch, with_kl=True, with_ref_logp=True)
    torch.testing.assert_close(s.token_kl.detach(), torch.zeros_like(s.token_kl), atol=1e-6, rtol=0)
    torch.testing.assert_close(s.ref_logp, s.logp.detach(), atol=1e-6, rtol=0)


def test_left_padding_does_not_change_scores(tiny_dir):
    """The same prompt/completion scores the same with or without extra left/right padding."""
    policy = Policy.from_pretrained(tiny_dir, reference="none")
    g = torch.Generator().manual_seed(13)
    p = torch.randint(4, 100, (1, 4), generator=g)
    c = torch.randint(4, 100, (1, 3), generator=g)
    s1 = policy.completion_stats(p, torch.ones_like(p), c, torch.ones_like(c), with_entropy=True)
    pp = torch.cat([torch.zeros(1, 3, dtype=torch.long), p], 1)
    cc = torch.cat([c, torch.zeros(1, 2, dtype=torch.long)], 1)
    s2 = policy.completion_stats(pp, (pp != 0).long(), cc, (cc != 0).long(), with_entropy=True)
    torch.testing.assert_close(s2.logp[:, :3], s1.logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2.entropy[:, :3], s1.entropy, rtol=1e-5, atol=1e-5)


def test_tiny_model_round_trip(tmp_path):
    model, tok = make_tiny_model(tmp_path, seed=3)
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    text = "12+34=46\nHello, World! ~"
    ids = tok2(text)["input_ids"]
    assert ids == tok(text)["input_ids"] and len(ids) == len(text)
    assert tok2("12+34=")["input_ids"] == [tok2.convert_tokens_to_ids(ch) for ch in "12+34="]
    assert tok2.decode(ids) == text
    assert tok2.eos_token_id is not None and tok2.pad_token_id is not None
    assert tok2.eos_token_id != tok2.pad_token_id
    assert tok2.decode(ids + [tok2.eos_token_id, tok2.pad_token_id], skip_special_tokens=True) == text
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model2(x).logits, model(x).logits, rtol=0, atol=0)
    assert model2.config.vocab_size == len(tok2) == 100
    # different seeds give different models; same seed the same
    m3, _ = make_tiny_model(seed=3)
    m4, _ = make_tiny_model(seed=4)
    assert torch.equal(m3.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(m4.lm_head.weight, model.lm_head.weight)


def test_policy_save_and_reload_lora(tiny_dir, tmp_path):
    policy = Policy.from_pretrained(tiny_dir, lora=LORA, temperature=0.8)
    perturb_lora_(policy, seed=8)
    batch = random_batch(3, 4, 5, 100, seed=14)
    before = policy.completion_stats(*batch).logp.detach()
    policy.save_pretrained(tmp_path / "adapter")
    again = Policy.from_pretrained(tmp_path / "adapter", temperature=0.8)
    assert again.is_lora and again.reference == "adapter"
    torch.testing.assert_close(again.completion_stats(*batch).logp.detach(), before, rtol=1e-6, atol=1e-6)
    policy.save_pretrained(tmp_path / "merged", merged=True)
    merged = Policy.from_pretrained(tmp_path / "merged", temperature=0.8)
    assert not merged.is_lora
    torch.testing.assert_close(merged.completion_stats(*batch).logp.detach(), before, rtol=1e-5, atol=1e-5)


def test_errors(tiny_dir, monkeypatch):
    policy = Policy.from_pretrained(tiny_dir, reference="none")
    pids, pmask, cids, cmask = random_batch(3, 4, 5, 100, seed=15)
    with pytest.raises(ValueError, match="batch size"):
        policy.completion_stats(pids[:2], pmask[:2], cids, cmask)
    with pytest.raises(ValueError, match="completion_mask"):
        policy.completion_stats(pids, pmask, cids, cmask[:, :3])
    with pytest.raises(ValueError, match="Tc = 0"):
        policy.completion_stats(pids, pmask, cids[:, :0], cmask[:, :0])
    with pytest.raises(ValueError, match="all 0"):
        policy.completion_stats(pids, pmask, cids, torch.zeros_like(cmask))
    with pytest.raises(ValueError, match="out of range"):
        policy.completion_stats(pids, pmask, cids.masked_fill(cmask.bool(), 100), cmask)
    with pytest.raises(ValueError, match="reference='none'"):
        policy.completion_stats(pids, pmask, cids, cmask, with_kl=True)
    with pytest.raises(ValueError, match="adapter"):
        Policy.from_pretrained(tiny_dir, reference="adapter")
    with pytest.raises(ValueError, match="valid"):
        Policy.from_pretrained(tiny_dir, reference="bogus")
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"pip install 'ratiorl\[lora\]'"):
        Policy.from_pretrained(tiny_dir, lora={"r": 2})


def test_is_peft_model(tiny_dir, monkeypatch):
    from ratiorl.policy import is_peft_model

    plain = Policy.from_pretrained(tiny_dir)
    lora = Policy.from_pretrained(tiny_dir, lora=LORA)
    assert not is_peft_model(plain.model) and not plain.is_lora
    assert is_peft_model(lora.model) and lora.is_lora
    assert not is_peft_model(lora.hf_model)  # the transformers model inside the PEFT wrapper
    import peft

    assert is_peft_model(lora.model) == isinstance(lora.model, peft.PeftModel)
    monkeypatch.setitem(sys.modules, "peft", None)  # without peft nothing is a PEFT model
    assert not is_peft_model(lora.model)
