"""Forward passes through the transformer body of a causal LM (no output head).

``completion_hidden(...)`` returns the final hidden states that predict completion tokens: the
state at position p of ``cat(prompt, completion)`` predicts token p + 1. When the G completions
of a prompt sit in consecutive rows it runs the prompt once per group and shares its KV cache.
"""

from __future__ import annotations

import torch
from torch import nn

from .compat import cache_kwarg, output_cache


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding: cumsum(mask) - 1, clamped at 0."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def backbone(hf_model: nn.Module) -> nn.Module:
    """The transformer body (embeddings ... final norm) of a *ForCausalLM model."""
    body = getattr(hf_model, getattr(hf_model, "base_model_prefix", ""), None)
    if body is None and hasattr(hf_model, "get_decoder"):
        body = hf_model.get_decoder()
    if body is None or body is hf_model:
        raise ValueError(f"cannot find the transformer body of {type(hf_model).__name__}")
    return body


def prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
    """Runs of identical consecutive prompt rows (the G completions of one prompt).

    Returns ``(first, inverse)``: the row of each distinct prompt, and for every row the index of
    its distinct prompt; None when sharing would save less than half of the prompt rows.
    """
    B = prompt_ids.shape[0]
    if B < 2:
        return None
    same = (prompt_ids[1:] == prompt_ids[:-1]).all(1) & (prompt_mask[1:] == prompt_mask[:-1]).all(1)
    starts = torch.cat([torch.ones(1, dtype=torch.bool, device=same.device), ~same])
    if 2 * int(starts.sum()) > B:
        return None
    return starts.nonzero().squeeze(1), starts.long().cumsum(0) - 1


def completion_hidden_shared(hf_model, prompt_ids, prompt_mask, completion_ids, completion_mask, groups):
    """``hidden_states(cat(prompt, completion)[:, :-1])[:, Tp-1:]`` with one prompt pass per group.

    The transformer runs once over each distinct prompt; its KV cache is gathered to every row of
    the group (``index_select``, differentiable) and the completion tokens attend to it. Values
    are those of the unshared forward and the prompt's gradient is the sum over the group's rows,
    as in the unshared forward. Returns None (the caller falls back) when the model does not
    return a plain ``DynamicCache``, uses gradient checkpointing (which turns the cache off) or has
    active dropout (each row must draw its own dropout masks over the prompt).
    """
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:  # pragma: no cover - transformers without the Cache classes
        return None
    ckpt = getattr(hf_model, "is_activation_checkpointing", None)  # transformers >= 5 (PEFT forwards it)
    if ckpt is None:
        ckpt = getattr(hf_model, "is_gradient_checkpointing", False)
    if ckpt:
        return None
    if hf_model.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in hf_model.modules()):
        return None
    first, inverse = groups
    body = backbone(hf_model)
    up, um = prompt_ids.index_select(0, first), prompt_mask.index_select(0, first)
    out = body(input_ids=up, attention_mask=um, position_ids=position_ids_from_mask(um), use_cache=True)
    cache = output_cache(out)
    if type(cache) is not DynamicCache or not all(type(layer) is DynamicLayer for layer in cache.layers):
        return None
    h_first = out.last_hidden_state[:, -1].index_select(0, inverse)  # predicts completion token 0
    if completion_ids.shape[1] == 1:
        return h_first[:, None]
    cache.reorder_cache(inverse)  # (distinct prompts, ...) -> (B, ...), keeps the autograd graph
    Tp = prompt_ids.shape[1]
    attn = torch.cat([prompt_mask, completion_mask[:, :-1]], 1)
    pos = position_ids_from_mask(attn)[:, Tp:]
    rest = body(input_ids=completion_ids[:, :-1], attention_mask=attn, position_ids=pos,
                use_cache=True, **{cache_kwarg(body): cache})
    rest = rest.last_hidden_state if hasattr(rest, "last_hidden_state") else rest[0]
    return torch.cat([h_first[:, None], rest], 1)


def hidden_states(hf_model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    out = backbone(hf_model)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def completion_hidden(hf_model, prompt_ids, prompt_mask, completion_ids, completion_mask, groups=None):
    """(B, Tc, H): the final hidden states that predict completion tokens 0..Tc-1.

    Prompts are left-padded, completions right-padded, masks long 0/1 with padded ids already
    valid. ``groups`` (from :func:`prompt_groups`) shares one prompt pass per group when the
    model allows it; otherwise one forward over ``cat(prompt, completion)[:, :-1]``.
    """
    if groups is not None:
        h = completion_hidden_shared(hf_model, prompt_ids, prompt_mask, completion_ids, completion_mask, groups)
        if h is not None:
            return h
    # The last completion token predicts nothing we need, so drop it from the input:
    # hidden state at position Tp-1+j predicts completion token j (j = 0..Tc-1).
    input_ids = torch.cat([prompt_ids, completion_ids], 1)[:, :-1]
    attn = torch.cat([prompt_mask, completion_mask], 1)[:, :-1]
    return hidden_states(hf_model, input_ids, attn, position_ids_from_mask(attn))[:, prompt_ids.shape[1] - 1 :]
