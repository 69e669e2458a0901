"""The policy engine: a Hugging Face causal LM (optionally LoRA) plus its reference model.

``Policy.completion_stats`` scores completions given prompts: it runs the transformer body
once over ``cat(prompt, completion)``, keeps only the final hidden states that predict
completion tokens (the state at position p predicts token p + 1), and feeds them to the
memory-lean head (``lean_head.py``), which never materialises a (tokens x vocabulary) tensor.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
from torch import nn

from .lean_head import DEFAULT_TOKEN_CHUNK, DEFAULT_VOCAB_CHUNK, lean_token_stats

_REFERENCE_MODES = ("auto", "none", "separate", "adapter")


@dataclass
class TokenStats:
    """Per-token statistics of completions, all (B, Tc) float32 with zeros on padding."""

    logp: torch.Tensor  # log pi_theta(y_t | s_t), differentiable
    entropy: torch.Tensor | None = None  # H(pi_theta(. | s_t)), differentiable
    token_kl: torch.Tensor | None = None  # exact KL(pi_theta(.|s_t) || pi_ref(.|s_t)), differentiable
    ref_logp: torch.Tensor | None = None  # log pi_ref(y_t | s_t), no gradient


def _require_peft():
    try:
        import peft  # noqa: F401
    except ImportError as e:  # pragma: no cover - peft is installed in the test env
        raise ImportError(
            "LoRA needs the 'peft' package: pip install 'ratiorl[lora]'"
        ) from e
    return peft


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _resolve_dtype(dtype):
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


def _disable_dropout(model: nn.Module) -> None:
    """RL needs log pi_theta to be deterministic: on-policy ratios must be exactly 1."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def _fuse_activations(model: nn.Module) -> int:
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


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding: cumsum(mask) - 1, clamped at 0."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _backbone(hf_model: nn.Module) -> nn.Module:
    """The transformer body (embeddings ... final norm) of a *ForCausalLM model."""
    body = getattr(hf_model, getattr(hf_model, "base_model_prefix", ""), None)
    if body is None and hasattr(hf_model, "get_decoder"):
        body = hf_model.get_decoder()
    if body is None or body is hf_model:
        raise ValueError(f"cannot find the transformer body of {type(hf_model).__name__}")
    return body


def _prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
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


def _completion_hidden_shared(hf_model, prompt_ids, prompt_mask, completion_ids, completion_mask, groups):
    """``_hidden_states(cat(prompt, completion)[:, :-1])[:, Tp-1:]`` with one prompt pass per group.

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
    body = _backbone(hf_model)
    up, um = prompt_ids.index_select(0, first), prompt_mask.index_select(0, first)
    out = body(input_ids=up, attention_mask=um, position_ids=position_ids_from_mask(um), use_cache=True)
    cache = getattr(out, "past_key_values", None)
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
                past_key_values=cache, use_cache=True)
    rest = rest.last_hidden_state if hasattr(rest, "last_hidden_state") else rest[0]
    return torch.cat([h_first[:, None], rest], 1)


def _hidden_states(hf_model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    out = _backbone(hf_model)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


class Policy:
    """A trainable causal LM (``.model``), its tokenizer and its reference policy.

    Build it with :meth:`from_pretrained`, or wrap a model you already have with
    ``Policy(model, tokenizer, ...)``.

    Reference modes: ``"adapter"`` (the same base with LoRA adapters disabled: no second copy
    in memory), ``"separate"`` (a frozen copy, loaded lazily from ``name_or_path`` the first
    time KL or reference log-probs are requested; without a path the copy is taken now),
    ``"none"``, and ``"auto"`` (adapter with LoRA, separate otherwise).
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
    ):
        if reference not in _REFERENCE_MODES:
            raise ValueError(f"unknown reference mode {reference!r}; valid: {', '.join(_REFERENCE_MODES)}")
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
        self.is_lora = _is_peft(model)
        if reference == "auto":
            reference = "adapter" if self.is_lora else "separate"
        if reference == "adapter" and not self.is_lora:
            raise ValueError("reference='adapter' needs a LoRA model (pass lora={...}); use 'separate' or 'none'")
        self.reference = reference
        if disable_dropout:
            _disable_dropout(model)
        if fuse_activations:
            _fuse_activations(model)
        if tokenizer is not None and getattr(tokenizer, "pad_token", None) is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        self._ref_model = None
        if reference == "separate" and name_or_path is None:
            # Nothing to reload from later: freeze a copy of the weights as they are now.
            self._ref_model = self._freeze(copy.deepcopy(self.hf_model))

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
        **kwargs,
    ) -> "Policy":
        """Load a causal LM and its tokenizer with ``AutoModelForCausalLM.from_pretrained``.

        ``lora`` is a dict of ``peft.LoraConfig`` keyword arguments (e.g. ``{"r": 16,
        "lora_alpha": 32, "target_modules": "all-linear"}``); the model is then wrapped with
        ``get_peft_model`` and only the adapters train. A folder saved by
        ``Policy.save_pretrained`` with LoRA (an adapter folder) is reloaded with its adapters.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        name_or_path = str(name_or_path)
        dtype = _resolve_dtype(dtype)
        load_kw = {} if dtype is None else {"dtype": dtype}
        adapter_dir = os.path.isfile(os.path.join(name_or_path, "adapter_config.json"))
        if adapter_dir:
            peft = _require_peft()
            pcfg = peft.PeftConfig.from_pretrained(name_or_path)
            base = AutoModelForCausalLM.from_pretrained(pcfg.base_model_name_or_path, **load_kw)
            model = peft.PeftModel.from_pretrained(base, name_or_path, is_trainable=True)
            base_path = pcfg.base_model_name_or_path
        else:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, **load_kw)
            base_path = name_or_path
            if lora is not None:
                peft = _require_peft()
                cfg = dict(lora)
                cfg.setdefault("task_type", "CAUSAL_LM")
                model = peft.get_peft_model(model, peft.LoraConfig(**cfg))
        model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        return cls(model, tokenizer, reference=reference, temperature=temperature, name_or_path=base_path, **kwargs)

    @staticmethod
    def _freeze(model: nn.Module) -> nn.Module:
        model.eval()
        _disable_dropout(model)
        for p in model.parameters():
            p.requires_grad_(False)
        return model

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
            ref = AutoModelForCausalLM.from_pretrained(self.name_or_path, dtype=dtype)
            if self.fuse_activations:
                _fuse_activations(ref)  # the policy's kernels: KL is exactly 0 at the start
            self._ref_model = self._freeze(ref.to(self.device))
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
    def _head(self, hf_model):
        head = hf_model.get_output_embeddings()
        cfg = hf_model.config
        plain = (
            type(head) is nn.Linear
            and getattr(cfg, "final_logit_softcapping", None) is None
            and getattr(cfg, "logit_scale", None) is None
        )
        return head, plain

    def _token_stats(self, hidden, head, plain, targets, ref_hidden, ref_head, with_entropy, with_kl, with_ref_logp):
        """(logp, entropy, kl, ref_logp) over the N selected positions."""
        T = self.temperature
        if plain:
            ref_w = ref_head.weight if ref_head is not None else None
            ref_b = ref_head.bias if ref_head is not None else None
            chunks = dict(vocab_chunk=self.vocab_chunk, token_chunk=self.token_chunk)
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
        logits = self._apply_head(self.hf_model, head, hidden) / T
        logq = None
        if ref_hidden is not None:
            with torch.no_grad():
                if self.reference == "adapter":
                    with self.model.disable_adapter():
                        zq = self._apply_head(self.hf_model, ref_head, ref_hidden)
                else:
                    zq = self._apply_head(self.ref_model, ref_head, ref_hidden)
                logq = torch.log_softmax(zq / T, -1)
        logp_all = torch.log_softmax(logits, -1)
        logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
        kl = (logp_all.exp() * (logp_all - logq)).sum(-1) if with_kl else None
        ref_logp = logq.gather(-1, targets[:, None]).squeeze(-1) if with_ref_logp else None
        return logp, ent, kl, ref_logp

    @staticmethod
    def _apply_head(hf_model, head, hidden):
        z = head(hidden).float()
        cfg = hf_model.config
        if getattr(cfg, "logit_scale", None) is not None:
            z = z * cfg.logit_scale
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap is not None:
            z = torch.tanh(z / cap) * cap
        return z

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
        _check_batch(prompt_ids, prompt_mask, completion_ids, completion_mask)
        if (with_kl or with_ref_logp) and self.reference == "none":
            raise ValueError("KL / reference log-probs requested but the policy has reference='none'")
        dev = self.device
        prompt_ids, completion_ids = prompt_ids.to(dev), completion_ids.to(dev)
        pmask, cmask = prompt_mask.to(dev).long(), completion_mask.to(dev).long()
        B, Tp = prompt_ids.shape
        Tc = completion_ids.shape[1]
        V = self.hf_model.get_output_embeddings().weight.shape[0]
        for name, ids, m in (("prompt_ids", prompt_ids, pmask), ("completion_ids", completion_ids, cmask)):
            real = ids[m.bool()]
            if real.numel() and (int(real.min()) < 0 or int(real.max()) >= V):
                raise ValueError(
                    f"{name} has token ids out of range [{int(real.min())}, {int(real.max())}] for a vocabulary of {V}"
                )
        # Ids under a 0 mask never influence the result; make them valid embedding indices.
        prompt_ids = prompt_ids.masked_fill(pmask == 0, 0)
        completion_ids = completion_ids.masked_fill(cmask == 0, 0)

        # The last completion token predicts nothing we need, so drop it from the input:
        # hidden state at position Tp-1+j predicts completion token j (j = 0..Tc-1).
        input_ids = torch.cat([prompt_ids, completion_ids], 1)[:, :-1]
        attn = torch.cat([pmask, cmask], 1)[:, :-1]
        pos = position_ids_from_mask(attn)
        sel = cmask.bool()  # (B, Tc)
        targets = completion_ids[sel]

        hf = self.hf_model
        # The G completions of a prompt: run the prompt once per group, not once per row.
        groups = _prompt_groups(prompt_ids, pmask) if self.share_prompts else None

        def body_hidden(model):  # (B, Tc, H): the states that predict completion tokens 0..Tc-1
            if groups is not None:
                h = _completion_hidden_shared(model, prompt_ids, pmask, completion_ids, cmask, groups)
                if h is not None:
                    return h
            return _hidden_states(model, input_ids, attn, pos)[:, Tp - 1 :]

        hidden = body_hidden(hf)[sel]  # (N, H)
        head, plain = self._head(hf)

        ref_hidden = ref_head = None
        if with_kl or with_ref_logp:
            with torch.no_grad():
                if self.reference == "adapter":
                    with self.model.disable_adapter():
                        ref_hidden = body_hidden(hf)[sel]
                    ref_head = head  # LoRA adapters never touch a plain Linear head here
                else:
                    ref = self.ref_model
                    ref_hidden = body_hidden(ref)[sel]
                    ref_head, ref_plain = self._head(ref)
                    plain = plain and ref_plain

        logp, ent, kl, ref_logp = self._token_stats(
            hidden, head, plain, targets, ref_hidden, ref_head, with_entropy, with_kl, with_ref_logp
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


def _check_batch(prompt_ids, prompt_mask, completion_ids, completion_mask):
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
