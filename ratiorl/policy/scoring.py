"""Scoring completions: per-token log-probs, entropy, exact KL and reference log-probs.

:func:`completion_stats` runs the transformer body once over ``cat(prompt, completion)`` (once
per distinct prompt when the G completions of a prompt share it), keeps only the final hidden
states that predict completion tokens and feeds them to the memory-lean head (``lean_head.py``),
which never materialises a (tokens x vocabulary) tensor. ``Policy.completion_stats`` calls it.

What the training forward does not compute:

- padding: rows run in at most ``policy.length_buckets`` buckets of similar completion length,
  each trimmed to its longest completion (``forward.length_buckets``, a cost model picks the
  split; one bucket when splitting would not pay);
- a second head pass: log-prob, entropy, exact KL and the reference log-prob come from one
  streamed pass over the vocabulary (``head_token_stats``);
- the policy's forward when only log pi_ref is wanted (:func:`reference_logp`).

``policy.autocast_dtype = torch.bfloat16`` runs the body (policy and reference) under
``torch.autocast`` and the head's matmuls in bfloat16, while the log-sum-exp, entropy and KL
accumulate in float32 and the parameters, their gradients and the optimizer state keep the
model's dtype. ``policy.gradient_checkpointing`` runs the body in training mode while gradients
are recorded, so that transformers' activation checkpointing (active only in training mode)
applies; dropout is off in RL (``models.disable_dropout``), so training mode changes nothing else.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .forward import (
    completion_lengths,
    length_buckets,
    masked_completion_hidden,
    prompt_groups,
)
from .lean_head import _matmul_weight, lean_token_stats
from .lora import is_linear
from .models import is_fsdp_managed


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


def reference_log_softmax(policy, ref_head, ref_hidden):
    """(N, V) float32 tempered log-probabilities of the reference from its hidden states (the
    full-logits path for heads the lean head cannot stream), no gradient."""
    with torch.no_grad(), autocast(policy):
        if policy.reference == "adapter":
            with policy.model.disable_adapter():
                zq = apply_head(policy.hf_model, ref_head, ref_hidden)
        else:
            zq = apply_head(policy.ref_model, ref_head, ref_hidden)
    return torch.log_softmax(zq / policy.temperature, -1)


def head_token_stats(policy, hidden, head, plain, targets, ref_hidden, ref_head, with_entropy, with_kl,
                     with_ref_logp):
    """(logp, entropy, kl, ref_logp) over the N selected positions (hidden states (N, H))."""
    T = policy.temperature
    if plain:
        ref_w = ref_head.weight if ref_head is not None else None
        ref_b = ref_head.bias if ref_head is not None else None
        chunks = {"vocab_chunk": policy.vocab_chunk, "token_chunk": policy.token_chunk,
                  "matmul_dtype": policy.autocast_dtype}  # the head's matmuls in bf16 under autocast
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
    with autocast(policy):
        logits = apply_head(policy.hf_model, head, hidden) / T
    logq = reference_log_softmax(policy, ref_head, ref_hidden) if ref_hidden is not None else None
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    kl = (logp_all.exp() * (logp_all - logq)).sum(-1) if with_kl else None
    ref_logp = logq.gather(-1, targets[:, None]).squeeze(-1) if with_ref_logp else None
    return logp, ent, kl, ref_logp


class ScoringBatch(NamedTuple):
    """A checked scoring batch on the policy's device, and how its body forward runs."""

    prompt_ids: torch.Tensor  # (B, Tp), ids under a 0 mask set to 0
    prompt_mask: torch.Tensor  # (B, Tp) long
    completion_ids: torch.Tensor  # (B, Tc)
    completion_mask: torch.Tensor  # (B, Tc) long
    targets: torch.Tensor  # (N,) the real completion tokens, row-major
    groups: tuple | None  # forward.prompt_groups: one prompt pass per group
    buckets: list  # forward.length_buckets

    def hidden(self, model) -> torch.Tensor:
        """(N, H): ``model``'s final states that predict the real completion tokens."""
        return masked_completion_hidden(model, self.prompt_ids, self.prompt_mask, self.completion_ids,
                                        self.completion_mask, self.groups, self.buckets)

    def scatter(self, v):
        """(N,) values -> (B, Tc) float32 with zeros on padding (None stays None)."""
        if v is None:
            return None
        out = torch.zeros(self.completion_mask.shape, dtype=torch.float32, device=self.completion_mask.device)
        out[self.completion_mask.bool()] = v.float()
        return out


def prepare_batch(policy, prompt_ids, prompt_mask, completion_ids, completion_mask) -> ScoringBatch:
    """Check the batch (shapes, token ids in the vocabulary), move it to the policy's device and
    choose how the body runs: shared prompts and length buckets."""
    check_batch(prompt_ids, prompt_mask, completion_ids, completion_mask)
    dev = policy.device
    prompt_ids, completion_ids = prompt_ids.to(dev), completion_ids.to(dev)
    pmask, cmask = prompt_mask.to(dev).long(), completion_mask.to(dev).long()
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
    # The G completions of a prompt: run the prompt once per group, not once per row.
    groups = prompt_groups(prompt_ids, pmask) if policy.share_prompts else None
    # Rows of similar completion length run together, each bucket trimmed to its longest row. A
    # sharded (FSDP) model needs the same body calls on every rank: one bucket there.
    n_buckets = 1 if is_fsdp_managed(policy.model) else policy.length_buckets
    buckets = length_buckets(completion_lengths(cmask), n_buckets, policy.bucket_overhead_tokens)
    return ScoringBatch(prompt_ids, pmask, completion_ids, cmask, completion_ids[cmask.bool()], groups, buckets)


def reference_hidden(policy, batch: ScoringBatch, head, plain) -> tuple:
    """``(ref_hidden (N, H), ref_head, plain)`` of the reference policy, without gradients: the
    same model with LoRA adapters disabled, or the separate frozen copy."""
    with torch.no_grad():
        if policy.reference == "adapter":
            with policy.model.disable_adapter():
                return batch.hidden(policy.hf_model), head, plain  # adapters never touch a plain Linear head
        ref = policy.ref_model
        ref_head, ref_plain = output_head(ref)
        return batch.hidden(ref), ref_head, plain and ref_plain


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
    if (with_kl or with_ref_logp) and policy.reference == "none":
        raise ValueError("KL / reference log-probs requested but the policy has reference='none'")
    batch = prepare_batch(policy, prompt_ids, prompt_mask, completion_ids, completion_mask)
    hf = policy.hf_model
    head, plain = output_head(hf)
    ref_hidden = ref_head = None
    # one autocast region for every body call: autocast's cache casts each trainable weight once
    with autocast(policy):
        checkpointed = policy.gradient_checkpointing and torch.is_grad_enabled()
        with training_mode(hf, checkpointed):  # transformers checkpoints only in training mode
            hidden = batch.hidden(hf)
        if with_kl or with_ref_logp:
            ref_hidden, ref_head, plain = reference_hidden(policy, batch, head, plain)

    logp, ent, kl, ref_logp = head_token_stats(
        policy, hidden, head, plain, batch.targets, ref_hidden, ref_head, with_entropy, with_kl, with_ref_logp
    )
    return TokenStats(
        logp=batch.scatter(logp),
        entropy=batch.scatter(ent),
        token_kl=batch.scatter(kl),
        ref_logp=batch.scatter(ref_logp.detach() if ref_logp is not None else None),
    )


def reference_logp(policy, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    """(B, Tc) float32 log pi_ref of the completion tokens (0 on padding), without gradients:
    ``completion_stats(..., with_ref_logp=True).ref_logp`` without the policy's own forward."""
    if policy.reference == "none":
        raise ValueError("reference log-probs requested but the policy has reference='none'")
    batch = prepare_batch(policy, prompt_ids, prompt_mask, completion_ids, completion_mask)
    head, plain = output_head(policy.hf_model)
    with autocast(policy):
        ref_hidden, ref_head, plain = reference_hidden(policy, batch, head, plain)
    with torch.no_grad():
        if plain:
            logq, _, _ = lean_token_stats(ref_hidden, ref_head.weight, batch.targets, bias=ref_head.bias,
                                          temperature=policy.temperature, vocab_chunk=policy.vocab_chunk,
                                          token_chunk=policy.token_chunk, matmul_dtype=policy.autocast_dtype)
        else:
            logq = reference_log_softmax(policy, ref_head, ref_hidden).gather(-1, batch.targets[:, None]).squeeze(-1)
    return batch.scatter(logq)


@contextlib.contextmanager
def autocast(policy):
    """``torch.autocast`` on the policy's device type with ``policy.autocast_dtype``, or nothing.

    Inside it, on CPU, the frozen weights of the matmul layers of the policy's and the reference
    model's bodies (a LoRA model's base layers, a frozen reference) read their kept casts
    (:func:`frozen_matmul_weights`)."""
    if policy.autocast_dtype is None:
        yield
        return
    ref = getattr(policy, "_ref_model", None)  # a separate reference once loaded (not loaded here)
    models = [policy.hf_model] + ([ref] if ref is not None else [])
    with torch.autocast(device_type=policy.device.type, dtype=policy.autocast_dtype), \
            frozen_matmul_weights(models, policy.autocast_dtype):
        yield


@contextlib.contextmanager
def frozen_matmul_weights(models, dtype: torch.dtype):
    """While open, every matmul layer (nn.Linear, Conv1D) of ``models`` whose weight is frozen,
    on the CPU and not in ``dtype`` reads a cast of it to ``dtype`` that is kept while the weight
    lives with the same storage and version (``lean_head._matmul_weight``); output heads keep
    theirs (the lean head casts and keeps its own). Autocast casts a weight once per region only
    when it requires grad, so a frozen one was cast again at every body call: SmolLM2's 30
    layers of LoRA base weights, 106M elements, took 70-90 ms a cast here (2 threads), and a
    training step makes several body calls (the shared prompt pass and each length bucket). The
    values are the same: autocast rounds each weight to ``dtype`` exactly as the kept cast is."""
    swapped = []
    try:
        for model in models:
            if is_fsdp_managed(model):  # FSDP owns its modules' parameters (they are views it swaps itself)
                continue
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            for module in model.modules():
                w = module._parameters.get("weight") if is_linear(module) and module is not head else None
                if w is None or w.requires_grad or w.device.type != "cpu" or w.dtype == dtype \
                        or not w.is_floating_point():
                    continue
                module._parameters["weight"] = nn.Parameter(_matmul_weight(w, dtype), requires_grad=False)
                swapped.append((module, w))
        yield
    finally:
        for module, w in reversed(swapped):
            module._parameters["weight"] = w


@contextlib.contextmanager
def training_mode(model: nn.Module, on: bool):
    """``model`` in training mode inside the block when ``on`` (its mode restored after)."""
    if not on or model.training:
        yield
        return
    model.train(True)
    try:
        yield
    finally:
        model.train(False)


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
