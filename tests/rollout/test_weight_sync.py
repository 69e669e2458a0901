"""Weight sync into a separate sampler: LoRA merges (``merged_state_dict``) against a float64
computation and against PEFT's own ``merge_and_unload``; ``load_weights`` copies frozen tensors
only when they changed, and the sampler ends equal to the policy after every kind of change."""

import copy

import pytest
import torch
from torch import nn

from ratiorl.rollout import HFRolloutEngine, merged_state_dict
from ratiorl.rollout.engine import lora_merged_weight
from tests.rollout.test_lean_decoder import tiny_gpt2, tiny_llama, with_lora

TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"], "llama": ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]}


def lora_model(kind, dtype=torch.float32, adapter_dtype=None, seed=0):
    model, tok = tiny_gpt2() if kind == "gpt2" else tiny_llama("llama")
    model = with_lora(model, TARGETS[kind])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:  # adapters as large as a trained run's: the delta moves the weight
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.to(dtype)
    if adapter_dtype is not None:
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.data = p.data.to(adapter_dtype)
    return model, tok


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)]


def exact_merged(layer) -> torch.Tensor:
    """W + scaling B A in float64 ((B A)^T for fan_in_fan_out)."""
    a = layer.lora_A["default"].weight.double()
    b = layer.lora_B["default"].weight.double()
    delta = (b @ a) * layer.scaling["default"]
    if layer.fan_in_fan_out:
        delta = delta.t()
    return layer.get_base_layer().weight.double() + delta


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_merge_is_the_exact_sum_rounded(kind, dtype):
    model, _ = lora_model(kind, dtype)
    sd = merged_state_dict(model)
    layers = lora_layers(model)
    assert layers
    ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -23)  # spacing relative to a value's exponent
    for name, layer in layers:
        exact = exact_merged(layer)
        got = sd[f"{name}.weight"]
        assert got.dtype == dtype and got.shape == exact.shape
        # within half a unit in the last place (one rounding), plus float32 accumulation in bf16
        bound = exact.abs() * ulp / 2 * (1 + 1e-3) + (1e-30 if dtype == torch.bfloat16 else 1e-6)
        assert ((got.double() - exact).abs() <= bound).all(), name
        assert not torch.equal(got, layer.get_base_layer().weight)  # the delta is not lost


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                  (torch.bfloat16, torch.float32)])
def test_lora_merge_matches_peft_merge_and_unload(kind, dtype, adapter_dtype):
    """PEFT's own merge as the peer reference; float32 adapters on a bf16 base take PEFT's
    ``get_delta_weight`` path (the fused one needs one dtype) and agree exactly."""
    model, _ = lora_model(kind, dtype, adapter_dtype)
    if adapter_dtype is not None:
        assert all(lora_merged_weight(m, "default", m.get_base_layer().weight) is None for _, m in lora_layers(model))
    sd = merged_state_dict(model)
    exact = {f"{n}.weight": exact_merged(m) for n, m in lora_layers(model)}
    deltas = {k: e - dict(model.get_base_model().named_parameters())[k.replace(".weight", ".base_layer.weight")].double()
              for k, e in exact.items()}
    ref = copy.deepcopy(model).merge_and_unload().state_dict()
    assert set(sd) == set(ref)
    for k, v in ref.items():
        if adapter_dtype is not None or dtype == torch.float32:
            torch.testing.assert_close(sd[k], v, rtol=1e-6 if dtype == torch.float32 else 0, atol=0 if
                                       dtype == torch.bfloat16 else 1e-6, msg=k)
        else:  # PEFT rounds the delta to bf16, then the sum; ours rounds the sum once: each rounding
            # moves a value by at most half a unit in its last place, |x| 2^-8 in bf16
            zero = torch.zeros(())
            bound = (v.double().abs() + deltas.get(k, zero).abs() + exact.get(k, zero).abs()) * 2.0 ** -8 * (1 + 1e-3)
            assert ((sd[k].double() - v.double()).abs() <= bound + 1e-30).all(), k


def test_lora_variants_take_peft_delta():
    model, _ = lora_model("llama")
    _, layer = lora_layers(model)[0]
    w = layer.get_base_layer().weight
    assert lora_merged_weight(layer, "default", w) is not None
    layer.lora_bias["default"] = True  # a LoRA bias: not a plain B A
    assert lora_merged_weight(layer, "default", w) is None
    layer.lora_bias["default"] = False
    layer.use_dora["default"] = True
    assert lora_merged_weight(layer, "default", w) is None


# ----------------------------------------------------------------------------- load_weights


def sampler_for(policy_model, tok, dtype=torch.bfloat16):
    sampler = copy.deepcopy(policy_model).requires_grad_(False).to(dtype)
    return HFRolloutEngine(sampler, tok, attention="torch")


def assert_synced(eng, policy_model):
    own = eng.model.state_dict()
    src = policy_model.state_dict()
    assert set(own) == set(src)
    for k, v in src.items():
        assert torch.equal(own[k], v.to(own[k].dtype)), k


def versions(eng):
    return {k: v._version for k, v in eng.model.state_dict(keep_vars=True).items()}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_load_weights_copies_what_changed(kind):
    policy, tok = lora_model(kind)  # float32 LoRA policy, bf16 PEFT sampler (as rollout.dtype=bfloat16)
    eng = sampler_for(policy, tok)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if p.requires_grad:
                p.add_(1.0)
    eng.load_weights(policy)
    assert_synced(eng, policy)

    # nothing changed: the frozen tensors are not copied again, the trainable ones are
    before = versions(eng)
    eng.load_weights(policy)
    after = versions(eng)
    frozen = [k for k in before if k not in trainable]
    assert frozen and all(after[k] == before[k] for k in frozen)
    assert all(after[k] > before[k] for k in trainable)

    # a trainable parameter changed without a version bump (as fused optimizers do): copied
    name = min(trainable)
    dict(policy.named_parameters())[name].data.mul_(-2.0)
    eng.load_weights(policy)
    assert_synced(eng, policy)

    # a frozen weight written in place: copied
    frozen_param = next(p for n, p in policy.named_parameters() if not p.requires_grad and p.dim() == 2)
    with torch.no_grad():
        frozen_param.mul_(0.5)
    eng.load_weights(policy)
    assert_synced(eng, policy)

    # a frozen weight replaced by another tensor: copied
    module = next(m for m in policy.modules() if m._parameters.get("weight") is not None
                  and not m.weight.requires_grad and m.weight.dim() == 2 and m.weight is not frozen_param)
    module.weight = nn.Parameter(torch.randn_like(module.weight), requires_grad=False)
    eng.load_weights(policy)
    assert_synced(eng, policy)

    # the sampler's own copy written since the last sync (a snapshot, a checkpoint): copied back
    other, _ = lora_model(kind, seed=1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.25)
    eng.load_snapshot(eng.snapshot(other))
    eng.load_weights(policy)
    assert_synced(eng, policy)


def test_load_weights_full_model_and_errors():
    """A full fine-tune (every weight trainable) copies everything; a mismatched model is named."""
    policy, tok = tiny_gpt2()
    eng = sampler_for(policy, tok)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.5)
    eng.load_weights(policy)
    assert_synced(eng, policy)
    wider, _ = tiny_gpt2(n_embd=64, n_head=4)
    with pytest.raises(ValueError, match="weight sync failed: .* in the policy"):
        eng.load_weights(wider)
    llama, _ = tiny_llama("llama")
    with pytest.raises(ValueError, match="weight sync failed: missing"):
        eng.load_weights(llama)
