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

CPU_ATTENTION = "ratiorl_cpu_attention"  # the attention implementation's registered name

# Longest key length (per compute dtype) up to which cpu_attention computes attention as two plain
# matmuls and a softmax instead of PyTorch's CPU flash kernel. Measured here (2 threads, 6 heads of
# 64, causal, forward + backward, one batch of ~2300 query rows): at 16 / 72 / 144 / 288 keys, flash
# attention (float32) took 5.8 / 15.2 / 18.7 / 27.9 ms, the plain float32 form 2.0 / 12.6 / 19.3 /
# 37.5 ms and the plain bf16 form 1.6 / 7.4 / 12.2 / 26.7 ms; flash bf16 is slower than flash float32
# (26.8 against 14.0 ms at 72 keys). The plain form keeps the probabilities for the backward
# (batch x heads x queries x keys): at 256 keys and a head dim of 64 that is no more than the MLP's
# 4 x hidden activations of the same tokens.
MATH_ATTENTION_MAX_KEYS = {torch.float32: 128, torch.float64: 128, torch.bfloat16: 256}


def _stack_groups(mask, kv_heads, groups, T, S):
    """A 4-D mask (b, 1 or heads, T, S) laid out like the stacked queries below: (b, 1 or kv_heads,
    groups x T, S)."""
    b, h = mask.shape[0], mask.shape[1]
    mask = mask.expand(b, h, T, S)
    if groups == 1:
        return mask
    if h == 1:
        return mask.unsqueeze(2).expand(b, 1, groups, T, S).reshape(b, 1, groups * T, S)
    return mask.reshape(b, kv_heads, groups * T, S)


def _plain_attention(query, key, value, attention_mask, scaling, is_causal, dtype):
    """softmax(q k^T * scaling + mask) v with the matmuls in ``dtype`` and the softmax in float32 (or
    float64).
    query (B, H, T, D); key, value (B, KV, S, D) with H a multiple of KV; attention_mask None, or a
    4-D bool (True: attend) or additive float mask broadcastable to (B, H, T, S). Returns (B, T, H, D).

    Query head h reads key/value head h // (H / KV) (grouped-query attention): the queries of the
    heads that share a key/value head are stacked into one (H / KV) x T matrix, so the keys and
    values are read as they are instead of repeated per head (a copy, and a sum in the backward)."""
    B, H, T, D = query.shape
    kv_heads, S = key.shape[1], key.shape[2]
    groups = H // kv_heads
    q = query.reshape(B, kv_heads, groups * T, D)
    scores = torch.matmul(q.to(dtype), key.to(dtype).transpose(-1, -2))  # (B, KV, groups x T, S)
    scores = scores.to(torch.promote_types(dtype, torch.float32))
    scores = scores.mul_(scaling if scaling is not None else D ** -0.5)
    if attention_mask is not None:
        mask = _stack_groups(attention_mask, kv_heads, groups, T, S)
        if mask.dtype == torch.bool:  # a finite fill: a fully masked (padding) row stays finite
            scores = scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores.add_(mask.to(scores.dtype))
    elif is_causal and T > 1:  # sdpa's is_causal: query i attends to keys 0..i
        causal = torch.ones(T, S, dtype=torch.bool, device=query.device).tril().repeat(groups, 1)
        scores = scores.masked_fill_(~causal, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs.to(dtype), value.to(dtype))  # (B, KV, groups x T, D)
    return out.view(B, H, T, D).transpose(1, 2).contiguous()


def cpu_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' ``sdpa`` attention, computed the faster way on CPU.

    On CPU, for at most ``MATH_ATTENTION_MAX_KEYS`` keys, attention is two plain matmuls and a
    float32 softmax (above); the matmuls run in bf16 under bf16 autocast or with bf16 inputs, in
    float64 with float64 inputs, in float32 otherwise (float16 too: CPU float16 matmuls are slow).
    Longer: PyTorch's flash kernel in float32 (float64 inputs stay float64), whose bf16 kernel is the
    slower one (also measured on SmolLM2-135M + LoRA, 32 rows x 68 tokens, forward + backward under
    bf16 autocast: 5.2 s with bf16 flash attention, 4.6 s with float32). Under autocast the output
    is left in the compute dtype for the next linear layer; without it, it has the inputs' dtype.
    Anywhere else (GPU, dropout, an attention bias or softcap, attention weights asked for) this is
    plain ``sdpa``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: PLC0415

    if query.device.type != "cpu" or kwargs.get("dropout") or (
            attention_mask is not None and attention_mask.dim() != 4) or any(
            kwargs.get(k) is not None for k in ("position_bias", "softcap")) or kwargs.get(
            "output_attentions"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    autocast_on = torch.is_autocast_enabled("cpu")
    if (torch.get_autocast_dtype("cpu") if autocast_on else query.dtype) == torch.bfloat16:
        compute = torch.bfloat16
    else:
        compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    dtype = query.dtype
    with torch.autocast("cpu", enabled=False):
        if key.shape[2] <= MATH_ATTENTION_MAX_KEYS[compute]:
            is_causal = kwargs.get("is_causal")
            is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
            out = _plain_attention(query, key, value, attention_mask, kwargs.get("scaling"), is_causal, compute)
        else:  # flash attention, never below float32
            flash = torch.promote_types(compute, torch.float32)
            out, _ = sdpa_attention_forward(module, query.to(flash), key.to(flash), value.to(flash), attention_mask,
                                            **kwargs)
    return (out if autocast_on else out.to(dtype)), None


def use_cpu_attention(model: nn.Module) -> bool:
    """Switch a model that uses ``sdpa`` attention to :func:`cpu_attention` (registered once with
    transformers' attention and mask interfaces; the masks are sdpa's). The name is not saved with
    the config. Returns whether the model uses it now."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "_attn_implementation", None) not in ("sdpa", CPU_ATTENTION):
        return False
    try:
        from transformers import AttentionInterface, AttentionMaskInterface  # noqa: PLC0415
        from transformers.masking_utils import sdpa_mask  # noqa: PLC0415
    except ImportError:  # pragma: no cover - transformers without the attention interfaces
        return False
    AttentionInterface.register(CPU_ATTENTION, cpu_attention)
    AttentionMaskInterface.register(CPU_ATTENTION, sdpa_mask)
    cfg._attn_implementation = CPU_ATTENTION
    for m in model.modules():  # some bodies keep their own copy of the name (GPT-2's, for its masks)
        if m is not model and getattr(m, "_attn_implementation", None) == "sdpa":
            m._attn_implementation = CPU_ATTENTION
    return True
