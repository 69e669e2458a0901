"""Scoring completions: per-token log-probs, entropy, exact KL and reference log-probs.

:func:`completion_stats` runs the transformer body once over ``cat(prompt, completion)`` (once
per distinct prompt when the G completions of a prompt share it), keeps only the final hidden
states that predict completion tokens and feeds them to the memory-lean head (``lean_head.py``),
which never materialises a (tokens x vocabulary) tensor. ``Policy.completion_stats`` calls it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .forward import completion_hidden, prompt_groups
from .lean_head import lean_token_stats


@dataclass
class TokenStats:
    """Per-token statistics of completions, all (B, Tc) float32 with zeros on padding."""

    logp: torch.Tensor  # log pi_theta(y_t | s_t), differentiable
    entropy: torch.Tensor | None = None  # H(pi_theta(. | s_t)), differentiable
    token_kl: torch.Tensor | None = None  # exact KL(pi_theta(.|s_t) || pi_ref(.|s_t)), differentiable
    ref_logp: torch.Tensor | None = None  # log pi_ref(y_t | s_t), no gradient


def output_head(hf_model):
    """``(head, plain)``: the output layer, and whether logits are exactly ``head(h)`` from a
    plain ``nn.Linear`` (no soft-capping, no logit scale) so the lean head can stream it."""
    head = hf_model.get_output_embeddings()
    cfg = hf_model.config
    plain = (
        type(head) is nn.Linear
        and getattr(cfg, "final_logit_softcapping", None) is None
        and getattr(cfg, "logit_scale", None) is None
    )
    return head, plain


def apply_head(hf_model, head, hidden):
    """Float32 logits of ``hidden`` with the model's logit scale and soft-capping applied."""
    z = head(hidden).float()
    cfg = hf_model.config
    if getattr(cfg, "logit_scale", None) is not None:
        z = z * cfg.logit_scale
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap is not None:
        z = torch.tanh(z / cap) * cap
    return z


def head_token_stats(policy, hidden, head, plain, targets, ref_hidden, ref_head, with_entropy, with_kl,
                     with_ref_logp):
    """(logp, entropy, kl, ref_logp) over the N selected positions (hidden states (N, H))."""
    T = policy.temperature
    if plain:
        ref_w = ref_head.weight if ref_head is not None else None
        ref_b = ref_head.bias if ref_head is not None else None
        chunks = dict(vocab_chunk=policy.vocab_chunk, token_chunk=policy.token_chunk)
        if with_kl:
            # one pass gives logp, entropy, KL and (for free) the reference log-prob
            logp, ent, kl, ref_logp = lean_token_stats(
                hidden, head.weight, targets, bias=head.bias, temperature=T, ref_hidden=ref_hidden,
                ref_weight=ref_w, ref_bias=ref_b, with_entropy=with_entropy, with_kl=True,
                return_ref_logp=True, **chunks,
            )
        else:
            logp, ent, kl = lean_token_stats(
                hidden, head.weight, targets, bias=head.bias, temperature=T, with_entropy=with_entropy, **chunks
            )
            ref_logp = None
        if not with_ref_logp:
            ref_logp = None
        elif ref_logp is None:
            with torch.no_grad():
                ref_logp, _, _ = lean_token_stats(ref_hidden, ref_w, targets, bias=ref_b, temperature=T, **chunks)
        return logp, ent, kl, ref_logp
    # Fallback for heads that are not a plain Linear (LoRA on lm_head, logit soft-capping):
    # full logits, but only on the completion positions.
    logits = apply_head(policy.hf_model, head, hidden) / T
    logq = None
    if ref_hidden is not None:
        with torch.no_grad():
            if policy.reference == "adapter":
                with policy.model.disable_adapter():
                    zq = apply_head(policy.hf_model, ref_head, ref_hidden)
            else:
                zq = apply_head(policy.ref_model, ref_head, ref_hidden)
            logq = torch.log_softmax(zq / T, -1)
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    kl = (logp_all.exp() * (logp_all - logq)).sum(-1) if with_kl else None
    ref_logp = logq.gather(-1, targets[:, None]).squeeze(-1) if with_ref_logp else None
    return logp, ent, kl, ref_logp


def completion_stats(
    policy,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    with_entropy: bool = False,
    with_kl: bool = False,
    with_ref_logp: bool = False,
) -> TokenStats:
    """Per-token statistics of completions under ``policy`` (a :class:`~ratiorl.policy.Policy`).

    See ``Policy.completion_stats`` for the arguments and the result.
    """
    check_batch(prompt_ids, prompt_mask, completion_ids, completion_mask)
    if (with_kl or with_ref_logp) and policy.reference == "none":
        raise ValueError("KL / reference log-probs requested but the policy has reference='none'")
    dev = policy.device
    prompt_ids, completion_ids = prompt_ids.to(dev), completion_ids.to(dev)
    pmask, cmask = prompt_mask.to(dev).long(), completion_mask.to(dev).long()
    B = prompt_ids.shape[0]
    Tc = completion_ids.shape[1]
    V = policy.hf_model.get_output_embeddings().weight.shape[0]
    for name, ids, m in (("prompt_ids", prompt_ids, pmask), ("completion_ids", completion_ids, cmask)):
        real = ids[m.bool()]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= V):
            raise ValueError(
                f"{name} has token ids out of range [{int(real.min())}, {int(real.max())}] for a vocabulary of {V}"
            )
    # Ids under a 0 mask never influence the result; make them valid embedding indices.
    prompt_ids = prompt_ids.masked_fill(pmask == 0, 0)
    completion_ids = completion_ids.masked_fill(cmask == 0, 0)
    sel = cmask.bool()  # (B, Tc)
    targets = completion_ids[sel]

    hf = policy.hf_model
    # The G completions of a prompt: run the prompt once per group, not once per row.
    groups = prompt_groups(prompt_ids, pmask) if policy.share_prompts else None

    def body_hidden(model):  # (B, Tc, H): the states that predict completion tokens 0..Tc-1
        return completion_hidden(model, prompt_ids, pmask, completion_ids, cmask, groups)

    hidden = body_hidden(hf)[sel]  # (N, H)
    head, plain = output_head(hf)

    ref_hidden = ref_head = None
    if with_kl or with_ref_logp:
        with torch.no_grad():
            if policy.reference == "adapter":
                with policy.model.disable_adapter():
                    ref_hidden = body_hidden(hf)[sel]
                ref_head = head  # LoRA adapters never touch a plain Linear head here
            else:
                ref = policy.ref_model
                ref_hidden = body_hidden(ref)[sel]
                ref_head, ref_plain = output_head(ref)
                plain = plain and ref_plain

    logp, ent, kl, ref_logp = head_token_stats(
        policy, hidden, head, plain, targets, ref_hidden, ref_head, with_entropy, with_kl, with_ref_logp
    )

    def scatter(v):
        if v is None:
            return None
        out = torch.zeros(B, Tc, dtype=torch.float32, device=dev)
        out[sel] = v.float()
        return out

    return TokenStats(
        logp=scatter(logp),
        entropy=scatter(ent),
        token_kl=scatter(kl),
        ref_logp=scatter(ref_logp.detach() if ref_logp is not None else None),
    )


def check_batch(prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Shape and emptiness checks of a scoring batch; raises ``ValueError`` naming the problem."""
    for name, t in (("prompt_ids", prompt_ids), ("prompt_mask", prompt_mask),
                    ("completion_ids", completion_ids), ("completion_mask", completion_mask)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor (B, T); got {getattr(t, 'shape', type(t))}")
    if prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_mask {tuple(prompt_mask.shape)} must match prompt_ids {tuple(prompt_ids.shape)}")
    if completion_mask.shape != completion_ids.shape:
        raise ValueError(
            f"completion_mask {tuple(completion_mask.shape)} must match completion_ids {tuple(completion_ids.shape)}"
        )
    if prompt_ids.shape[0] != completion_ids.shape[0]:
        raise ValueError(
            f"batch size mismatch: {prompt_ids.shape[0]} prompts vs {completion_ids.shape[0]} completions"
        )
    if completion_ids.shape[0] == 0:
        raise ValueError("empty batch (B = 0)")
    if completion_ids.shape[1] == 0:
        raise ValueError("empty completions: completion_ids has zero length (Tc = 0)")
    if prompt_ids.shape[1] == 0:
        raise ValueError("empty prompts (Tp = 0): the first completion token needs at least one prompt token")
    if not bool(completion_mask.bool().any()):
        raise ValueError("every completion is empty (completion_mask is all 0): nothing to score")
