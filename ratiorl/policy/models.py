"""Preparing a Hugging Face causal LM for RL: LoRA detection, dtypes, dropout, fused kernels."""

from __future__ import annotations

import torch
from torch import nn


def require_peft():
    """The ``peft`` module, or an ``ImportError`` saying how to install it."""
    try:
        import peft  # noqa: F401
    except ImportError as e:  # pragma: no cover - peft is installed in the test env
        raise ImportError(
            "LoRA needs the 'peft' package: pip install 'ratiorl[lora]'"
        ) from e
    return peft


def is_peft_model(model) -> bool:
    """True when ``model`` is a ``peft.PeftModel`` (a model with LoRA adapters); False without peft."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def resolve_dtype(dtype):
    """``None`` / ``"auto"`` / a torch dtype / a name (``"bf16"``, ``"float32"``, ...) -> what
    ``from_pretrained(dtype=...)`` takes; unknown names raise ``ValueError``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        if dtype == "auto":
            return "auto"
        name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(dtype, dtype)
        if not isinstance(getattr(torch, name, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16' or a torch.dtype")
        return getattr(torch, name)
    raise ValueError(f"dtype must be None, a string or a torch.dtype, got {dtype!r}")


def disable_dropout(model: nn.Module) -> None:
    """RL needs log pi_theta to be deterministic: on-policy ratios must be exactly 1."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def fuse_activations(model: nn.Module) -> int:
    """Swap the Python tanh-GELU (``gelu_new``: GPT-2, GPT-J, CodeGen, ...) for PyTorch's kernel.

    ``NewGELUActivation`` computes 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) with five
    element-wise kernels forward and more backward; ``gelu(x, approximate="tanh")`` is the same
    function in one kernel each way (equal up to float rounding, ~1e-7). Returns the count.
    """
    try:
        from transformers.activations import GELUTanh, NewGELUActivation
    except ImportError:  # pragma: no cover - transformers without these classes
        return 0
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, GELUTanh())
                n += 1
    return n


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no dropout, no gradients: a fixed reference policy. Returns ``model``."""
    model.eval()
    disable_dropout(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
