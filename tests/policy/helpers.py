"""Shared helpers for the policy and rollout tests: tiny models and float64 references."""

from __future__ import annotations

import torch

from ratiorl.policy import make_tiny_model


def perturb_(model, std=0.3, seed=0):
    """Give a freshly initialised model peaked, input-dependent distributions (as if trained)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def save_tiny(path, *, n_embd=32, n_head=2, n_layer=2, seed=0):
    model, tok = make_tiny_model(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=64, seed=seed)
    perturb_(model, seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def save_tiny_llama(path, *, seed=0):
    """A Llama-style model (RoPE, RMSNorm, GQA, untied head) with the char tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ratiorl.policy import make_char_tokenizer

    tok = make_char_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    perturb_(model, std=0.3, seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def random_batch(B, Tp, Tc, V, *, seed, min_special=4, empty_row=True):
    """Left-padded prompts and right-padded completions of random lengths (fresh each call)."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(min_special, V, (B, Tp), generator=g)
    completion_ids = torch.randint(min_special, V, (B, Tc), generator=g)
    plen = torch.randint(1, Tp + 1, (B,), generator=g)
    clen = torch.randint(1, Tc + 1, (B,), generator=g)
    plen[0], clen[0] = Tp, Tc  # one full row
    if empty_row and B > 2:
        clen[1] = 0  # a row with no completion tokens is allowed
    ar_p, ar_c = torch.arange(Tp), torch.arange(Tc)
    prompt_mask = (ar_p[None] >= Tp - plen[:, None]).long()
    completion_mask = (ar_c[None] < clen[:, None]).long()
    prompt_ids = prompt_ids.masked_fill(prompt_mask == 0, 0)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, 0)
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def full_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Logits (B, Tc, V) predicting each completion token, via the model's own forward."""
    ids = torch.cat([prompt_ids, completion_ids], 1)
    attn = torch.cat([prompt_mask, completion_mask], 1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    Tp = prompt_ids.shape[1]
    return model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, Tp - 1 : -1]


def naive_stats(logits, completion_ids, completion_mask, temperature, ref_logits=None):
    """Full-vocabulary log-prob / entropy / KL / ref log-prob, in the logits' dtype."""
    m = completion_mask.to(logits.dtype)
    logp_all = torch.log_softmax(logits / temperature, -1)
    p = logp_all.exp()
    out = {
        "logp": logp_all.gather(-1, completion_ids[..., None]).squeeze(-1) * m,
        "entropy": -(p * logp_all).sum(-1) * m,
    }
    if ref_logits is not None:
        logq_all = torch.log_softmax(ref_logits / temperature, -1)
        out["token_kl"] = (p * (logp_all - logq_all)).sum(-1) * m
        out["ref_logp"] = logq_all.gather(-1, completion_ids[..., None]).squeeze(-1) * m
    return out
