"""The project's embedded default model: a small GPT-2 with a character-level tokenizer.

No model hub is reachable on the machines this project targets, so the trainer starts from a
model that is created here (random init), supervised-fine-tuned on a built-in task by
``ratiorl sft``, and saved with ``save_pretrained``. Everything downstream loads it with
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``, exactly like a
hub model, so the same code paths serve Qwen or Llama on a machine with a network.

The tokenizer is a real Hugging Face fast tokenizer: a ``tokenizers`` BPE model with an
empty merge list, so every character is its own token ("12+34=" -> 6 ids). The vocabulary is
4 special tokens followed by printable ASCII (32..126) and newline: 100 ids in all.
"""

from __future__ import annotations

import os

import torch

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIAL_TOKENS = [PAD, EOS, BOS, UNK]
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]


def make_char_tokenizer():
    """Character-level ``PreTrainedTokenizerFast`` over printable ASCII + newline."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    # BPE with no merges == one token per character; unknown characters map to <unk>.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.add_special_tokens(SPECIAL_TOKENS)
    backend.decoder = decoders.Fuse()  # join characters back without separators
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=1_000_000,
    )
    return tok


def make_tiny_model(
    save_dir: str | os.PathLike | None = None,
    *,
    n_layer: int = 2,
    n_head: int = 4,
    n_embd: int = 128,
    n_positions: int = 256,
    seed: int = 0,
):
    """Create (and optionally save) a randomly initialised GPT-2 with a char tokenizer.

    Returns ``(model, tokenizer)``. With ``save_dir`` both are written with ``save_pretrained``
    so that ``AutoModelForCausalLM.from_pretrained(save_dir)`` and
    ``AutoTokenizer.from_pretrained(save_dir)`` reload them (no remote code, no download).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    if n_embd % n_head != 0:
        raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
    tok = make_char_tokenizer()
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
        # No dropout: RL needs log pi_theta to be a deterministic function of the weights
        # (on-policy ratios must be exactly 1).
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    # The init is seeded locally so that callers' global RNG state is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.eval()
    if save_dir is not None:
        os.makedirs(save_dir, exist_ok=True)
        model.save_pretrained(save_dir)
        tok.save_pretrained(save_dir)
    return model, tok
