"""Preparing a Hugging Face causal LM for RL: LoRA detection, dtypes, dropout, fused kernels."""

from __future__ import annotations

import sys

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


def is_fsdp_managed(model: nn.Module) -> bool:
    """True when FSDP2 (``fully_shard``) manages ``model`` or one of its modules: its parameters are
    sharded, or gathered and resharded by FSDP, and its forwards are collectives. Sharding imported
    ``torch.distributed.fsdp``; while it is not imported (a 2 s import) no model is managed."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    cls = getattr(fsdp, "FSDPModule", None)
    return cls is not None and any(isinstance(m, cls) for m in model.modules())


# ----------------------------------------------------------------------------- attention on CPU

CPU_FP32_ATTENTION = "ratiorl_sdpa_cpu_fp32"  # the attention implementation's registered name


def sdpa_fp32_on_cpu(module, query, key, value, attention_mask, **kwargs):
    """transformers' ``sdpa`` attention, computed in float32 on CPU when it would run in bf16/fp16.

    PyTorch's CPU kernels of ``scaled_dot_product_attention`` are slower in bfloat16 than in
    float32 (autocast casts their inputs to bf16; a bf16 model gives bf16 inputs): measured on
    SmolLM2-135M + LoRA, 32 rows x 68 tokens, forward + backward under bf16 autocast, 5.2 s with
    bf16 attention and 4.6 s with this one. Under autocast the float32 output is left for the next
    linear layer to cast; without autocast it is cast back to the inputs' dtype. Anywhere else
    (GPU, float32 inputs) this is plain ``sdpa``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: PLC0415

    autocast_on = torch.is_autocast_enabled("cpu")
    if query.device.type != "cpu" or not (autocast_on or query.dtype in (torch.bfloat16, torch.float16)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    dtype = query.dtype
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return (out if autocast_on else out.to(dtype)), weights


def use_fp32_attention_on_cpu(model: nn.Module) -> bool:
    """Switch a model that uses ``sdpa`` attention to :func:`sdpa_fp32_on_cpu` (registered once
    with transformers' attention and mask interfaces; the masks are sdpa's). The name is not
    saved with the config. Returns whether the model uses it now."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "_attn_implementation", None) not in ("sdpa", CPU_FP32_ATTENTION):
        return False
    try:
        from transformers import AttentionInterface, AttentionMaskInterface  # noqa: PLC0415
        from transformers.masking_utils import sdpa_mask  # noqa: PLC0415
    except ImportError:  # pragma: no cover - transformers without the attention interfaces
        return False
    AttentionInterface.register(CPU_FP32_ATTENTION, sdpa_fp32_on_cpu)
    AttentionMaskInterface.register(CPU_FP32_ATTENTION, sdpa_mask)
    cfg._attn_implementation = CPU_FP32_ATTENTION
    for m in model.modules():  # some bodies keep their own copy of the name (GPT-2's, for its masks)
        if m is not model and getattr(m, "_attn_implementation", None) == "sdpa":
            m._attn_implementation = CPU_FP32_ATTENTION
    return True
