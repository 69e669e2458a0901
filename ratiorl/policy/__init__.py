"""ratiorl.policy: the model side (HF causal LM, LoRA, reference model, memory-lean head)."""

from .lean_head import lean_token_stats, naive_token_stats
from .policy import Policy, TokenStats, position_ids_from_mask
from .tiny import make_char_tokenizer, make_tiny_model

__all__ = [
    "Policy",
    "TokenStats",
    "lean_token_stats",
    "naive_token_stats",
    "make_tiny_model",
    "make_char_tokenizer",
    "position_ids_from_mask",
]
