"""Loading any causal LM: automatic LoRA targets, dtype, GGUF lookup, device errors, and no
deprecated call of ours during a training step."""

import os
import sys
import traceback
import warnings

import pytest
import torch

from ratiorl.policy import Policy
from ratiorl.policy.loading import (
    base_load_kwargs,
    check_device,
    gguf_in_dir,
    resolve_model_path,
)
from ratiorl.policy.lora import lora_target_modules


def test_lora_targets_gpt2_and_llama(tiny_dir, llama_dir):
    from transformers import AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert lora_target_modules(gpt2) == ["c_attn", "c_fc", "c_proj"]
    llama = AutoModelForCausalLM.from_pretrained(llama_dir)
    assert lora_target_modules(llama) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert "lm_head" not in lora_target_modules(llama)


def test_policy_lora_auto_and_override(llama_dir, tiny_dir):
    pytest.importorskip("peft")
    p = Policy.from_pretrained(llama_dir, lora={"r": 2, "target_modules": "auto"})
    wrapped = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in p.model.named_parameters() if "lora_A" in n}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(("lora_" in n) == prm.requires_grad for n, prm in p.model.named_parameters())
    q = Policy.from_pretrained(llama_dir, lora={"r": 2, "target_modules": ["q_proj"]})
    assert {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in q.model.named_parameters() if "lora_A" in n} == {
        "q_proj"}
    g = Policy.from_pretrained(tiny_dir, lora={"r": 2, "target_modules": "auto"})  # GPT-2 Conv1D layers
    ids = torch.tensor([[5, 6, 7]])
    assert torch.isfinite(g.model(input_ids=ids).logits).all()


def test_dtype_bfloat16(tiny_dir):
    p = Policy.from_pretrained(tiny_dir, dtype="bfloat16", reference="none")
    assert next(p.model.parameters()).dtype == torch.bfloat16


def test_gguf_lookup_and_package_paths(tmp_path):
    assert gguf_in_dir(str(tmp_path)) is None
    (tmp_path / "m.gguf").write_bytes(b"")
    assert gguf_in_dir(str(tmp_path)) == "m.gguf"
    (tmp_path / "config.json").write_text("{}")
    assert gguf_in_dir(str(tmp_path)) is None  # a normal HF folder
    with pytest.raises(ValueError, match="no such file"):
        base_load_kwargs(str(tmp_path), "other.gguf") if _has_gguf() else pytest.skip("gguf not installed")
    assert resolve_model_path("runs/x") == "runs/x"
    assert resolve_model_path("pkg:ratiorl") == os.path.dirname(sys.modules["ratiorl"].__file__)
    with pytest.raises(ValueError, match="no installed package"):
        resolve_model_path("pkg:surely_not_installed_pkg")


def _has_gguf():
    try:
        import gguf  # noqa: F401
    except ImportError:
        return False
    return True


def test_device_errors():
    assert check_device("cpu") == "cpu"
    assert check_device("auto") in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            check_device("cuda:0")


RATIORL = os.path.dirname(sys.modules["ratiorl"].__file__)


def ours(stack) -> bool:
    """A warning raised in ratiorl, or by a deprecated function that ratiorl called directly."""
    frames = [f for f in stack if not f.filename.endswith(("warnings.py", "deprecation.py"))]
    emitter = frames[-1] if frames else None
    caller = frames[-2] if len(frames) > 1 else None
    return any(f is not None and f.filename.startswith(RATIORL) for f in (emitter, caller))


@pytest.mark.parametrize("lora", [False, True])
def test_no_deprecated_calls_of_ours(lora, llama_dir, tmp_path):
    """DeprecationWarning / FutureWarning from our code (or from an API we call) fail the test."""
    if lora:
        pytest.importorskip("peft")
    from ratiorl.train import Trainer, load_config
    from tests.train.conftest import tiny_overrides

    seen = []

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (DeprecationWarning, FutureWarning)):
            seen.append((category.__name__, str(message), traceback.extract_stack()[:-1]))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        cfg = load_config(None, tiny_overrides(llama_dir, str(tmp_path / "run"), **{
            "lora.enabled": lora, "eval.greedy": True, "objective.beta": 0.01, "threads": 1}))
        t = Trainer(cfg)
        try:
            t.step()
            t.evaluate()
            t.policy.save_pretrained(os.path.join(cfg.out_dir, "model"))
        finally:
            t.close()
    bad = [f"{c}: {m} (at {s[-1].filename}:{s[-1].lineno})" for c, m, s in seen if ours(s)]
    assert not bad, "\n".join(bad)
