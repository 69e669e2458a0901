"""ratiorl.policy: the model side (HF causal LM, LoRA, reference model, memory-lean head)."""

from .forward import position_ids_from_mask
from .lean_head import lean_token_stats, naive_token_stats
from .models import is_peft_model
from .policy import Policy
from .scoring import TokenStats
from .tiny import make_char_tokenizer, make_tiny_model

__all__ = [
    "Policy",
    "TokenStats",
    "is_peft_model",
    "lean_token_stats",
    "make_char_tokenizer",
    "make_tiny_model",
    "naive_token_stats",
    "position_ids_from_mask",
]
