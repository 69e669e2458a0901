"""The lean decoder (static KV cache, ``ratiorl.rollout.decoder``) samples what transformers'
forward samples: the same tokens and log-probs for the same seed in float32, for every supported
layout (GPT-2; Llama with grouped-query attention; Qwen2 with q/k/v biases and an untied head;
LoRA over each), with left-padded prompts, truncation, stop strings, greedy rows and finished rows
leaving the batch, with its attention on torch's matmuls and on the native kernel
(``ratiorl.rollout.native``; skipped with the reason where it cannot be built). The log-probs it
records are checked independently against a cache-free forward of the whole sequence
(``Policy.completion_stats``)."""

import pytest
import torch

from ratiorl.policy import Policy, make_char_tokenizer, make_tiny_model
from ratiorl.rollout import HFRolloutEngine, decoder, native
from ratiorl.rollout.decoder import ARCHITECTURES, LeanDecoder
from tests.policy.helpers import perturb_

PROMPTS = ["12+34=", "7+5=", "a much longer prompt: 99+1=", "x", "3+3="]


def tiny_gpt2(n_embd=32, n_head=4):
    model, tok = make_tiny_model(n_embd=n_embd, n_head=n_head, n_layer=2, n_positions=128, seed=3)
    perturb_(model, seed=3)
    return model, tok


def tiny_llama(kind):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = make_char_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(5)
    if kind == "llama":  # grouped-query attention (2 query heads per key/value head), tied head
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **common))
    else:  # Qwen2: biases on q, k, v; one key/value head; untied head
        model = Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=1, tie_word_embeddings=False, **common))
    perturb_(model, std=0.3, seed=5)
    return model, tok


def with_lora(model, targets):
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                      fan_in_fan_out=targets == ["c_attn", "c_proj", "c_fc"],
                                                      init_lora_weights=False))


MODELS = {
    "gpt2": tiny_gpt2,
    "gpt2-head64": lambda: tiny_gpt2(n_embd=128, n_head=2),  # a realistic head size (whole vector registers)
    "llama": lambda: tiny_llama("llama"),
    "qwen2": lambda: tiny_llama("qwen2"),
    "gpt2+lora": lambda: (lambda m, t: (with_lora(m, ["c_attn", "c_proj", "c_fc"]), t))(*tiny_gpt2()),
    "llama+lora": lambda: (lambda m, t: (with_lora(m, ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]), t))(
        *tiny_llama("llama")),
}
OPTIONS = [dict(temperature=1.0), dict(temperature=0.7, top_k=6, top_p=0.9, min_p=0.02),
           dict(temperature=1.0, stop=["1", "+"]), dict(temperature=0.0)]


ATTENTIONS = ["torch", "native"]


def needs(attention):
    """Skip a native-kernel case, with the reason, where the kernel cannot be built."""
    if attention == "native":
        try:
            native.decode_attention()
        except native.NativeUnavailable as e:
            pytest.skip(f"native decode attention unavailable: {e}")


def engines(model, tok, attention="torch"):
    needs(attention)
    lean = HFRolloutEngine(model, tok, decoder="auto", attention=attention)
    hf = HFRolloutEngine(model, tok, decoder="hf")
    dec = lean.lean_decoder()
    assert dec is not None and hf.lean_decoder() is None
    assert (dec.attention is not None) == (attention == "native")
    return lean, hf


def assert_same(a, b):
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.completion_mask, b.completion_mask)
    assert a.completion_texts == b.completion_texts and torch.equal(a.truncated, b.truncated)
    # float32 rounding: the two forwards sum in different orders (width 128: differences of ~3e-5)
    torch.testing.assert_close(a.behaviour_logp, b.behaviour_logp, rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kw", OPTIONS)
@pytest.mark.parametrize("name", list(MODELS))
def test_same_samples_as_transformers_forward(name, kw, packed, attention, monkeypatch):
    """``packed``: every weight prepacked by oneDNN (which the decoder does for long enough calls)."""
    monkeypatch.setattr(decoder, "PACK_MIN_WORK", 0 if packed else 10**9)
    layouts, current_layout = [], LeanDecoder.current_layout
    monkeypatch.setattr(LeanDecoder, "current_layout", lambda self, rows=0: layouts.append(current_layout(self, rows))
                        or layouts[-1])
    model, tok = MODELS[name]()
    lean, hf = engines(model, tok, attention)
    G = 1 if kw["temperature"] == 0 else 4
    for seed in (0, 1):
        a = lean.generate(PROMPTS, G, max_new_tokens=16, generator=torch.Generator().manual_seed(seed), **kw)
        b = hf.generate(PROMPTS, G, max_new_tokens=16, generator=torch.Generator().manual_seed(seed), **kw)
        assert_same(a, b)
    assert len(layouts) == 2  # one per call
    assert (layouts[-1].head.packed is not None) == (packed and torch.backends.mkldnn.is_available())
    lengths = a.completion_mask.sum(1)
    if kw == OPTIONS[0]:
        assert lengths.min() < lengths.max()  # rows did finish at different steps


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("name", ["gpt2", "llama+lora"])
def test_generate_with_greedy_matches(name, attention):
    model, tok = MODELS[name]()
    lean, hf = engines(model, tok, attention)
    kw = dict(max_new_tokens=12, temperature=0.9, top_p=0.95)
    s, g = lean.generate_with_greedy(PROMPTS, 3, generator=torch.Generator().manual_seed(2), **kw)
    s2, g2 = hf.generate_with_greedy(PROMPTS, 3, generator=torch.Generator().manual_seed(2), **kw)
    assert_same(s, s2)
    assert_same(g, g2)


@pytest.mark.parametrize("attention, open_columns", [("torch", 2), ("torch", 16), ("native", 2), ("native", 16)])
@pytest.mark.parametrize("name", ["gpt2", "gpt2-head64", "llama", "qwen2", "llama+lora"])
def test_recorded_logp_is_the_cache_free_forward(name, attention, open_columns, monkeypatch):
    """Untruncated sampling at T = 1: behaviour_logp is log softmax of the model's logits at each
    sampled token, here computed without any KV cache over cat(prompt, completion). With 2 open
    columns the cache's open block is sealed six times in a call."""
    needs(attention)
    monkeypatch.setattr(LeanDecoder, "OPEN_COLUMNS", open_columns)
    model, tok = MODELS[name]()
    policy = Policy(model, tok, reference="none")
    r = HFRolloutEngine(policy, tok, attention=attention).generate(PROMPTS, 3, max_new_tokens=14, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        stats = policy.completion_stats(r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    torch.testing.assert_close(r.behaviour_logp, stats.logp, rtol=1e-5, atol=2e-5)  # float32 rounding


@pytest.mark.parametrize("attention, open_columns, open_fraction",
                         [("torch", 1, 16), ("torch", 3, 2), ("torch", 16, 16), ("native", 3, 2), ("native", 16, 16)])
def test_finished_rows_leave_the_static_cache(attention, open_columns, open_fraction, monkeypatch):
    """Rows leave the cache's sealed part and its open block (full, part-written or just sealed;
    with ``open_fraction`` 2 each open block is half the sealed columns)."""
    model, tok = MODELS["gpt2"]()
    lean, hf = engines(model, tok, attention)
    seen = []
    keep = LeanDecoder.keep

    def recording_keep(self, rows):
        keep(self, rows)
        seen.append((len(rows), self.K.shape[1], self.V_open.shape[1], self.mask.shape[0], self.positions.shape[0]))

    monkeypatch.setattr(LeanDecoder, "keep", recording_keep)
    monkeypatch.setattr(LeanDecoder, "OPEN_COLUMNS", open_columns)
    monkeypatch.setattr(LeanDecoder, "OPEN_FRACTION", open_fraction)
    a = lean.generate(PROMPTS * 2, 4, max_new_tokens=20, generator=torch.Generator().manual_seed(0))
    monkeypatch.undo()
    b = hf.generate(PROMPTS * 2, 4, max_new_tokens=20, generator=torch.Generator().manual_seed(0))
    assert_same(a, b)
    assert seen, "no row left the batch"
    assert all(n == k == o == m == p for n, k, o, m, p in seen)  # cache, mask and positions shrink together
    assert seen[-1][0] < len(PROMPTS) * 8


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("packed", [False, True])
def test_bfloat16_sampler_records_what_it_sampled_from(packed, attention, monkeypatch):
    """A bf16 copy samples with the lean decoder; its recorded log-probs are its own (close to the
    float32 policy's, not equal), and equal to transformers' bf16 forward up to bf16 rounding."""
    needs(attention)
    monkeypatch.setattr(decoder, "PACK_MIN_WORK", 0 if packed else 10**9)
    model, tok = MODELS["llama"]()
    policy = Policy(model, tok, reference="none")
    bf16 = HFRolloutEngine(MODELS["llama"]()[0].to(torch.bfloat16), tok, attention=attention)
    r = bf16.generate(PROMPTS, 3, max_new_tokens=12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fp32 = policy.completion_stats(r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask).logp
    m = r.completion_mask.bool()
    gap = (r.behaviour_logp - fp32)[m].abs()
    assert 0 < gap.mean() < 0.03 and gap.max() < 0.3  # a real, small sampler/trainer mismatch
    assert r.behaviour_logp.dtype == torch.float32


@pytest.mark.parametrize("name", ["gpt2-head64", "llama"])
def test_native_kernel_reads_a_bf16_models_cache_in_bf16(name, monkeypatch):
    """With a bf16 model the native kernel's cache is bf16. GPT-2's keys and values are bf16 matmul
    outputs, so the bf16 cache holds exactly what a float32 one would: the same samples and the same
    log-probs to the bit. Llama's keys are rotated in float32 and rounded: log-probs that move less,
    on average, than the bf16 sampler's own distance from the float32 policy."""
    needs("native")
    model = MODELS[name]()[0].to(torch.bfloat16)
    tok = MODELS[name]()[1]
    engine = HFRolloutEngine(model, tok, attention="native")
    dtypes, start = [], LeanDecoder.start
    monkeypatch.setattr(LeanDecoder, "start", lambda self, *a: (start(self, *a), dtypes.append(self.K_open.dtype)))
    kw = dict(max_new_tokens=20, temperature=1.0)
    a = engine.generate(PROMPTS, 4, generator=torch.Generator().manual_seed(3), **kw)
    monkeypatch.setattr(LeanDecoder, "BF16_CACHE", False)
    b = engine.generate(PROMPTS, 4, generator=torch.Generator().manual_seed(3), **kw)
    assert dtypes == [torch.bfloat16, torch.float32]
    if name == "gpt2-head64":
        assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.behaviour_logp, b.behaviour_logp)
    else:
        same = (a.completion_ids == b.completion_ids).all(1)
        assert same.float().mean() > 0.5  # most completions are the same tokens
        m = a.completion_mask[same].bool()
        cache_gap = (a.behaviour_logp[same] - b.behaviour_logp[same])[m].abs()
        policy = Policy(MODELS[name]()[0], tok, reference="none")
        with torch.no_grad():
            fp32 = policy.completion_stats(b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask).logp
        bf16_gap = (b.behaviour_logp - fp32)[b.completion_mask.bool()].abs()
        assert 0 < cache_gap.mean() < bf16_gap.mean()


def test_unsupported_models_keep_transformers_forward():
    from transformers import GPT2Config, GPT2LMHeadModel

    model, tok = MODELS["gpt2"]()
    assert LeanDecoder.unsupported_reason(model) is None
    odd = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_head=4, n_layer=1,
                                     scale_attn_by_inverse_layer_idx=True))
    assert "scale_attn_by_inverse_layer_idx" in LeanDecoder.unsupported_reason(odd)
    assert HFRolloutEngine(odd, tok).lean_decoder() is None
    odd.config.model_type = "not_a_layout"
    assert "no lean layout" in LeanDecoder.unsupported_reason(odd)
    assert {"gpt2", "llama", "qwen2", "mistral"} <= set(ARCHITECTURES)
    with pytest.raises(ValueError, match="decoder must be"):
        HFRolloutEngine(model, tok, decoder="fast")


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("name", ["llama+lora", "gpt2"])
def test_weights_changed_in_place_are_seen_by_the_next_call(name, attention):
    """Each call reads the weights as they are: after a fused AdamW step (which updates parameters
    in place without bumping their version counters) the samples are the new policy's."""
    model, tok = MODELS[name]()
    lean, hf = engines(model, tok, attention)
    lean.generate(PROMPTS, 2, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.3, fused=True)
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, params))
    a = lean.generate(PROMPTS, 3, max_new_tokens=10, generator=torch.Generator().manual_seed(1))
    b = hf.generate(PROMPTS, 3, max_new_tokens=10, generator=torch.Generator().manual_seed(1))
    assert_same(a, b)
