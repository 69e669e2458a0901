"""Which layers get LoRA adapters, for any causal LM.

PEFT knows default target modules only for the architectures it lists; ``lora_target_modules``
finds them in the model itself: every linear layer (``nn.Linear``, or GPT-2's ``Conv1D``) inside
the transformer blocks, i.e. the attention and MLP projections, and not the output layer
(``lm_head``) nor anything outside the blocks. A config's ``lora.target_modules`` overrides it.
"""

from __future__ import annotations

from torch import nn


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def lora_target_modules(model: nn.Module) -> list[str]:
    """Sorted leaf names of the linear layers of attention and MLP (``q_proj``, ``c_attn``, ...).

    The output embedding (``model.get_output_embeddings()``) and any layer whose name is also used
    by a linear layer outside the repeated blocks (a classification head) are excluded."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside, outside = set(), set()
    for name, module in model.named_modules():
        if not is_linear(module) or module is out:
            continue
        leaf = name.rsplit(".", 1)[-1]
        # a block is a numbered child of a ModuleList: "...layers.3.self_attn.q_proj"
        in_block = any(part.isdigit() for part in name.split("."))
        (inside if in_block else outside).add(leaf)
    targets = sorted(inside - outside)
    if not targets:
        raise ValueError(f"no linear layers found in the blocks of {type(model).__name__}; "
                         "set lora.target_modules")
    return targets


def uses_conv1d(model: nn.Module, targets: list[str]) -> bool:
    """True when a targeted layer is GPT-2's ``Conv1D`` (LoRA then needs ``fan_in_fan_out=True``)."""
    names = set(targets)
    return any(type(m).__name__ == "Conv1D" and n.rsplit(".", 1)[-1] in names for n, m in model.named_modules())


__all__ = ["is_linear", "lora_target_modules", "uses_conv1d"]
