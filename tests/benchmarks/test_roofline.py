"""benchmarks/roofline.py: the matmul FLOP count against hand counts (no timing)."""

import importlib.util
import math
import os
import sys

import pytest
import torch

ROOFLINE = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "roofline.py")


@pytest.fixture(scope="module")
def roofline():
    spec = importlib.util.spec_from_file_location("benchmarks_roofline", ROOFLINE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def tiny_gpt2():
    from ratiorl.policy import make_tiny_model

    model, _tok = make_tiny_model(n_layer=2, n_embd=32, n_head=4, n_positions=64, seed=0)
    return model


# GPT-2, 2 layers x 32, vocabulary 100 (the char tokenizer): per layer c_attn 32x96, attn c_proj
# 32x32, c_fc 32x128, mlp c_proj 128x32 = 12 x 32^2 = 12288 weights; the tied head 100 x 32 = 3200
GPT2_BODY = 2 * 12 * 32 * 32
GPT2_HEAD = 100 * 32


def test_gpt2_hand_count(roofline):
    model = tiny_gpt2()
    assert roofline.matmul_flops_per_token(model) == 2 * (GPT2_BODY + GPT2_HEAD) == 55552
    fc = roofline.FlopCounts.of(model)
    assert (fc.body, fc.head) == (2 * GPT2_BODY, 2 * GPT2_HEAD)
    assert fc.training_factor == 3.0  # every weight trains: forward + 2 x backward
    # the head is tied to the input embedding and still counted once
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("tied", [True, False])
def test_llama_hand_count(roofline, tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg)
    # per layer: q 32x32, k and v 32x16 (2 kv heads x head_dim 8), o 32x32, gate and up 32x64,
    # down 64x32; head 50 x 32 whether tied or not
    per_layer = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64
    assert per_layer == 9216
    assert roofline.matmul_flops_per_token(model) == 2 * (2 * per_layer + 50 * 32) == 40064


def test_lora_adds_adapters_and_only_their_weight_gradients(roofline):
    peft = pytest.importorskip("peft")
    model = tiny_gpt2()
    targets = ["c_attn", "c_proj", "c_fc"]  # c_proj: attention's and the MLP's
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                       fan_in_fan_out=True, task_type="CAUSAL_LM"))
    # r x (in + out) per adapted matmul: c_attn 4x(32+96), attn c_proj 4x(32+32), c_fc 4x(32+128),
    # mlp c_proj 4x(128+32); two layers
    lora = 2 * (4 * 128 + 4 * 64 + 4 * 160 + 4 * 160)
    assert lora == 4096
    assert roofline.matmul_flops_per_token(model) == 2 * (GPT2_BODY + GPT2_HEAD + lora)
    fc = roofline.FlopCounts.of(model)
    assert fc.body_trainable == 2 * lora and fc.head_trainable == 0
    body, head = 2 * (GPT2_BODY + lora), 2 * GPT2_HEAD
    # forward + input gradients for every matmul, weight gradients for the adapters only; head on
    # the completion tokens
    assert fc.training_flops(10, 4) == (2 * body + 2 * lora) * 10 + 2 * head * 4
    assert fc.sampling_flops(7, 3) == body * (7 + 3) + head * 7


def test_measured_rate_runs_every_matmul(roofline):
    model = tiny_gpt2()
    calls = []
    real_mm, real_linear = torch.mm, torch.nn.functional.linear
    try:
        torch.mm = lambda x, w: calls.append(("mm", tuple(x.shape), tuple(w.shape))) or real_mm(x, w)
        torch.nn.functional.linear = lambda x, w: calls.append(("linear", tuple(x.shape), tuple(w.shape))) or real_linear(x, w)
        rate = roofline.measured_matmul_rate(model, rows=5, dtype=torch.float32, repeats=1, warmup=0)
    finally:
        torch.mm, torch.nn.functional.linear = real_mm, real_linear
    assert math.isfinite(rate) and rate > 0
    # 4 Conv1D per layer (x @ W, W in x out) + the head (x @ W.T); every activation has 5 rows
    assert sorted(c[0] for c in calls) == ["linear"] + ["mm"] * 8
    assert all(c[1][0] == 5 and c[1][1] == (c[2][0] if c[0] == "mm" else c[2][1]) for c in calls)
    assert sum(math.prod(c[2]) for c in calls) == GPT2_BODY + GPT2_HEAD
