"""The policy engine: a Hugging Face causal LM (optionally LoRA) plus its reference model.

This module builds and holds the models (loading, LoRA adapters, the reference policy, saving);
``Policy.completion_stats`` scores completions through :mod:`ratiorl.policy.scoring`, which runs
the transformer body once over ``cat(prompt, completion)`` and feeds the states that predict
completion tokens to the memory-lean head (``lean_head.py``).
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from . import models
from .forward import bucket_overhead_tokens as default_bucket_overhead
from .forward import position_ids_from_mask
from .lean_head import DEFAULT_TOKEN_CHUNK, DEFAULT_VOCAB_CHUNK
from .loading import base_load_kwargs
from .lora import lora_target_modules, uses_conv1d
from .models import freeze, is_peft_model, require_peft, resolve_dtype
from .scoring import TokenStats, completion_stats, reference_logp

REFERENCE_MODES = ("auto", "none", "separate", "adapter")

__all__ = ["REFERENCE_MODES", "Policy", "TokenStats", "is_peft_model", "position_ids_from_mask"]


class Policy:
    """A trainable causal LM (``.model``), its tokenizer and its reference policy.

    Build it with :meth:`from_pretrained`, or wrap a model you already have with
    ``Policy(model, tokenizer, ...)``.

    Reference modes: ``"adapter"`` (the same base with LoRA adapters disabled: no second copy
    in memory), ``"separate"`` (a frozen copy, loaded lazily from ``name_or_path`` the first
    time KL or reference log-probs are requested; without a path the copy is taken now),
    ``"none"``, and ``"auto"`` (adapter with LoRA, separate otherwise).

    Speed options of the scoring forward (``completion_stats``); none changes a value beyond
    float rounding (bf16 rounding for ``autocast_dtype``):

    - ``share_prompts``: one prompt pass per group of identical consecutive prompt rows;
    - ``length_buckets``: at most this many buckets of similar completion length, each trimmed
      to its longest completion (1 = off); ``bucket_overhead_tokens`` is the cost of one more
      bucket in token positions (the split is taken only when it saves more; None = from the
      model's hidden size, ``forward.bucket_overhead_tokens``);
    - ``autocast_dtype`` (None | ``torch.bfloat16``): the body under ``torch.autocast`` and the
      head's matmuls in that dtype; weights, gradients and optimizer state keep the model's dtype.
      On CPU attention is computed the faster way for its length and dtype
      (``models.cpu_attention``: plain matmuls up to a few hundred keys, float32 flash beyond);
    - ``gradient_checkpointing``: recompute each block's activations in the backward (less
      memory, about one more forward of time); transformers' non-reentrant checkpointing.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        reference: str = "auto",
        temperature: float = 1.0,
        name_or_path: str | None = None,
        disable_dropout: bool = True,
        vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
        token_chunk: int = DEFAULT_TOKEN_CHUNK,
        share_prompts: bool = True,
        fuse_activations: bool = True,
        length_buckets: int = 4,
        bucket_overhead_tokens: float | None = None,
        autocast_dtype: torch.dtype | None = None,
        gradient_checkpointing: bool = False,
    ):
        if reference not in REFERENCE_MODES:
            raise ValueError(f"unknown reference mode {reference!r}; valid: {', '.join(REFERENCE_MODES)}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.model = model
        self.tokenizer = tokenizer
        self.temperature = float(temperature)
        self.name_or_path = name_or_path
        self.vocab_chunk = vocab_chunk
        self.token_chunk = token_chunk
        self.share_prompts = share_prompts  # one prompt forward per group of identical prompts
        self.fuse_activations = fuse_activations
        if int(length_buckets) < 1:
            raise ValueError(f"length_buckets must be >= 1 (1 = off), got {length_buckets}")
        self.length_buckets = int(length_buckets)
        if autocast_dtype not in (None, torch.bfloat16):  # float16 would need a gradient scaler
            raise ValueError(f"autocast_dtype must be None or torch.bfloat16, got {autocast_dtype!r}")
        self.autocast_dtype = autocast_dtype
        self.is_lora = is_peft_model(model)
        self.bucket_overhead_tokens = (float(bucket_overhead_tokens) if bucket_overhead_tokens is not None
                                       else default_bucket_overhead(self.hf_model))
        if reference == "auto":
            reference = "adapter" if self.is_lora else "separate"
        if reference == "adapter" and not self.is_lora:
            raise ValueError("reference='adapter' needs a LoRA model (pass lora={...}); use 'separate' or 'none'")
        self.reference = reference
        if disable_dropout:
            models.disable_dropout(model)
        if fuse_activations:
            models.fuse_activations(model)
        # attention on CPU: plain matmuls for short sequences, float32 flash attention for long ones
        self.cpu_attention = models.use_cpu_attention(self.hf_model)
        if tokenizer is not None and getattr(tokenizer, "pad_token", None) is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        self.gradient_checkpointing = False
        if gradient_checkpointing:
            self.enable_gradient_checkpointing()
        self._ref_model = None
        if reference == "separate" and name_or_path is None:
            # Nothing to reload from later: freeze a copy of the weights as they are now.
            self._ref_model = freeze(copy.deepcopy(self.hf_model))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        lora: dict | None = None,
        reference: str = "auto",
        temperature: float = 1.0,
        dtype=None,
        device: str | torch.device = "cpu",
        gguf_file: str | None = None,
        **kwargs,
    ) -> "Policy":
        """Load a causal LM and its tokenizer with ``AutoModelForCausalLM.from_pretrained``.

        ``lora`` is a dict of ``peft.LoraConfig`` keyword arguments (e.g. ``{"r": 16,
        "lora_alpha": 32, "target_modules": "all-linear"}``); the model is then wrapped with
        ``get_peft_model`` and only the adapters train. A folder saved by
        ``Policy.save_pretrained`` with LoRA (an adapter folder) is reloaded with its adapters.
        ``target_modules: "auto"`` puts adapters on every linear layer of attention and MLP
        (``ratiorl.policy.lora.lora_target_modules``). ``gguf_file`` names a GGUF file inside
        ``name_or_path`` (dequantised on load; an adapter over a GGUF base finds it again).
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        name_or_path = str(name_or_path)
        dtype = resolve_dtype(dtype)
        load_kw = {} if dtype is None else {"dtype": dtype}
        adapter_dir = os.path.isfile(os.path.join(name_or_path, "adapter_config.json"))
        if adapter_dir:
            peft = require_peft()
            pcfg = peft.PeftConfig.from_pretrained(name_or_path)
            base_kw = base_load_kwargs(pcfg.base_model_name_or_path, gguf_file)
            base = AutoModelForCausalLM.from_pretrained(pcfg.base_model_name_or_path, **load_kw, **base_kw)
            model = peft.PeftModel.from_pretrained(base, name_or_path, is_trainable=True)
            base_path = pcfg.base_model_name_or_path
        else:
            base_kw = base_load_kwargs(name_or_path, gguf_file)
            model = AutoModelForCausalLM.from_pretrained(name_or_path, **load_kw, **base_kw)
            base_path = name_or_path
            if lora is not None:
                peft = require_peft()
                cfg = dict(lora)
                cfg.setdefault("task_type", "CAUSAL_LM")
                if cfg.get("target_modules") in (None, "auto"):
                    cfg["target_modules"] = lora_target_modules(model)
                    cfg.setdefault("fan_in_fan_out", uses_conv1d(model, cfg["target_modules"]))
                model = peft.get_peft_model(model, peft.LoraConfig(**cfg))
        model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **({} if adapter_dir else base_kw))
        policy = cls(model, tokenizer, reference=reference, temperature=temperature, name_or_path=base_path, **kwargs)
        policy.base_load_kwargs = base_kw  # how the separate reference reloads the base
        return policy

    def enable_gradient_checkpointing(self) -> None:
        """Activation checkpointing of every transformer block, non-reentrant (PEFT's LoRA needs no
        ``enable_input_require_grads`` then). ``completion_stats`` runs the body in training mode
        while gradients are recorded (transformers checkpoints only then); the shared-prompt pass,
        whose KV cache checkpointing turns off, is skipped in that forward."""
        hf = self.hf_model
        kwargs = {"use_reentrant": False}
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.gradient_checkpointing = True

    # ------------------------------------------------------------------ accessors
    @property
    def hf_model(self) -> nn.Module:
        """The underlying transformers model (inside the PEFT wrapper when LoRA is on)."""
        return self.model.get_base_model() if self.is_lora else self.model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def ref_model(self) -> nn.Module | None:
        """The separate frozen reference (loaded on first use); None in adapter/none modes."""
        if self.reference != "separate":
            return None
        if self._ref_model is None:
            from transformers import AutoModelForCausalLM

            dtype = next(self.hf_model.parameters()).dtype
            ref = AutoModelForCausalLM.from_pretrained(self.name_or_path, dtype=dtype,
                                                       **getattr(self, "base_load_kwargs", {}))
            if self.fuse_activations:
                models.fuse_activations(ref)  # the policy's kernels: KL is exactly 0 at the start
            if self.cpu_attention:
                models.use_cpu_attention(ref)
            self._ref_model = freeze(ref.to(self.device))
        return self._ref_model

    def save_pretrained(self, save_dir: str | os.PathLike, *, merged: bool = False) -> None:
        """Save model (adapters only with LoRA, unless ``merged``) and tokenizer."""
        os.makedirs(save_dir, exist_ok=True)
        model = self.model
        if merged and self.is_lora:
            model = copy.deepcopy(self.model).merge_and_unload()
        model.save_pretrained(save_dir)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(save_dir)

    # ------------------------------------------------------------------ scoring
    def completion_stats(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        *,
        with_entropy: bool = False,
        with_kl: bool = False,
        with_ref_logp: bool = False,
    ) -> TokenStats:
        """Per-token log-probs (and entropy / exact KL / reference log-probs) of completions.

        Prompts are left-padded (B, Tp), completions right-padded (B, Tc); masks are 1 on real
        tokens. Returns :class:`TokenStats` of (B, Tc) float32 tensors, 0 where
        ``completion_mask`` is 0. Log-probs use logits / ``self.temperature`` (as the sampler).
        """
        return completion_stats(
            self, prompt_ids, prompt_mask, completion_ids, completion_mask,
            with_entropy=with_entropy, with_kl=with_kl, with_ref_logp=with_ref_logp,
        )

    def reference_logp(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
    ) -> torch.Tensor:
        """(B, Tc) float32 log-probs of the completion tokens under the reference policy (0 on
        padding, no gradient): ``completion_stats(..., with_ref_logp=True).ref_logp`` without
        running the policy itself."""
        return reference_logp(self, prompt_ids, prompt_mask, completion_ids, completion_mask)
