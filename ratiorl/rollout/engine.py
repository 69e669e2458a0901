"""Rollout engines: sample G completions per prompt and log the sampler's per-token log-probs.

``HFRolloutEngine`` drives any Hugging Face causal LM with its own KV-cached sampling loop
(one batched forward per new token for the rows still generating) instead of ``model.generate``:
the loop does only what RL needs (temperature, top-k, top-p, min-p, stop at EOS or at a stop
string, log-probs) and so has little per-token Python overhead. Each distinct prompt is
prefilled once and its KV cache shared by its G rows; rows that have finished are dropped from
the batch (and from the KV cache) as they accumulate, so a few long completions do not keep
the finished ones computing.

The logged log-prob of a sampled token y (``Rollout.behaviour_logp``, log mu) is the log-prob
of the distribution the token was actually drawn from: softmax(logits / T), restricted to the
``top_k`` most likely tokens, then to the top-p nucleus of that (renormalised) distribution,
then to the tokens with at least ``min_p`` times the largest probability, and renormalised
(``ratiorl.rollout.truncation``: the order of transformers' default logits processors). With
``top_k=0``, ``top_p=1`` and ``min_p=0`` nothing is truncated and it equals
log softmax(logits / T)[y] over the full vocabulary, the function ``Policy.completion_stats``
computes; with truncation it is larger than the policy's log-prob (the kept tokens share the
dropped mass), and that difference is a real sampler/trainer mismatch the objective can correct.
Logging the untruncated log-prob instead would silently bias every importance ratio against the
sampler (TRL issue 6789).

Stop strings (``stop=[...]``, ``ratiorl.rollout.stops``) end a completion at the first
occurrence of any of them in its decoded text: the token that completes it is kept (with its
log-prob), later tokens are dropped and masked as after EOS, and the completion text ends with
the stop string.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ratiorl.policy import is_peft_model, position_ids_from_mask
from ratiorl.policy.compat import cache_kwarg, cache_row_selector, output_cache

from . import native
from .batch import Rollout
from .decoder import LeanDecoder, _base_model
from .stops import StopStrings
from .truncation import DRAWS, check_sampling_options, sample_tokens, truncated_logp

ATTENTIONS = ("auto", "native", "torch")


def attention_kernel(attention: str):
    """The native decode-attention kernel for ``attention`` ("auto" | "native" | "torch"), or None
    for torch's matmuls (see ``HFRolloutEngine``)."""
    if attention == "torch":
        return None
    try:
        return native.decode_attention()
    except native.NativeUnavailable as e:
        if attention == "native":
            raise RuntimeError(f"attention='native': {e}") from e
        warnings.warn(f"the lean decoder's attention runs on torch's matmuls: {e}", RuntimeWarning, stacklevel=3)
        return None


@contextlib.contextmanager
def contiguous_head_input(model: nn.Module):
    """While open, the output head of ``model`` (a transformers causal LM or its PEFT wrapper) gets
    a contiguous input. transformers applies it to ``hidden_states[:, -1:, :]`` for the last
    position's logits, a strided view, and torch's CPU matmul of a strided 3-D input with a
    (vocabulary, hidden) weight copies the weight once per row: measured here (2 threads, 8
    prompts, SmolLM2's 49,152 x 576 head) 715 ms in bf16 and 42 ms in float32, against 7.8 and
    18.6 ms for the same product over a contiguous copy of the 8 rows."""
    get_head = getattr(_base_model(model), "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Module):
        yield
        return
    handle = head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]) if args else None)
    try:
        yield
    finally:
        handle.remove()


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a sampler (HF, vLLM, ... all plug in behind this). Optional:
    ``generate_with_greedy(prompts, G, ...) -> (sampled, greedy)`` (``HFRolloutEngine``'s), which
    evaluation uses when present to prefill each prompt once for both."""

    def generate(
        self,
        prompts: list[str],
        num_generations: int,
        *,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        stop: list[str] | None = None,
        generator: torch.Generator | None = None,
    ) -> Rollout: ...

    def load_weights(self, model: nn.Module) -> None: ...


def _unwrap(model):
    # Accept a ratiorl Policy (anything with a .model and .completion_stats) as well.
    if hasattr(model, "completion_stats") and hasattr(model, "model"):
        return model.model
    return model




def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the plain transformers model, with LoRA deltas folded into the weights.

    For a PEFT LoRA model, W_merged = W_base + delta under the original parameter names, with
    delta = scaling * B A (transposed for ``fan_in_fan_out``); the model is not modified. A plain
    LoRA layer whose A, B and base weight share a dtype is merged in one ``addmm`` in that dtype
    (:func:`lora_merged_weight`); anything else (another dtype, a LoRA variant, a LoRA bias) adds
    PEFT's own ``get_delta_weight``.
    """
    if not is_peft_model(model):
        return model.state_dict()
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    sd = {}
    for k, v in base.state_dict().items():
        if "lora_" in k:
            continue
        sd[k.replace(".base_layer.", ".")] = v
    with torch.no_grad():
        for name, mod in base.named_modules():
            if not isinstance(mod, LoraLayer) or getattr(mod, "merged", False) or getattr(mod, "disable_adapters", False):
                continue
            key = f"{name}.weight"
            for adapter in mod.active_adapters:
                if adapter in getattr(mod, "lora_A", {}):
                    merged = lora_merged_weight(mod, adapter, sd[key])
                    if merged is None:  # the sum in the wider dtype, rounded once (as PEFT's own merge)
                        merged = (sd[key] + mod.get_delta_weight(adapter)).to(sd[key].dtype)
                    sd[key] = merged
    return sd


def lora_merged_weight(layer, adapter: str, weight: torch.Tensor) -> torch.Tensor | None:
    """``weight + scaling * B A`` (``(B A)^T`` with ``fan_in_fan_out``) as one ``addmm`` in the
    weight's dtype, for a plain LoRA layer (A and B ``nn.Linear`` without bias, no LoRA variant
    such as DoRA) whose A and B have the weight's dtype and device; None otherwise.

    Why: PEFT's ``get_delta_weight`` widens bf16 adapters to float32 on the CPU, writes the
    float32 delta, scales it in another pass and rounds it to bf16 before the add: about 2 GB of
    memory traffic to merge SmolLM2-135M's 210 LoRA layers (r = 16), 117 ms a merge here, and a
    bf16 sampler merges at every weight sync. ``addmm`` accumulates in float32 and rounds once, so
    its result is the float32 sum rounded (PEFT's rounds the delta, then the sum)."""
    a, b = layer.lora_A[adapter], layer.lora_B[adapter]
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is not None or getattr(layer, "use_dora", {}).get(adapter, False) \
            or getattr(layer, "lora_bias", {}).get(adapter, False):
        return None
    if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None or b.bias is not None:
        return None
    if weight.dim() != 2 or {a.weight.dtype, b.weight.dtype} != {weight.dtype} \
            or a.weight.device != weight.device or b.weight.device != weight.device:
        return None
    scaling = float(layer.scaling[adapter])
    if getattr(layer, "fan_in_fan_out", False):  # weight stored (in, out): (B A)^T = A^T B^T
        return torch.addmm(weight, a.weight.t(), b.weight.t(), alpha=scaling)
    return torch.addmm(weight, b.weight, a.weight, alpha=scaling)


def _check_sync_keys(missing: list, unexpected: list) -> None:
    """Raise naming the keys a weight sync could not match (an output head tied to the input
    embedding may be missing from a state dict)."""
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"weight sync failed: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _unchanged(src: torch.Tensor, recorded, own) -> bool:
    """True when ``src`` is the tensor recorded at the last sync (same storage, place and version)
    and the sampler's copy ``own`` was not written since."""
    if recorded is None or own is None:
        return False
    before, src_version, own_version = recorded
    return (src.untyped_storage().data_ptr() == before.untyped_storage().data_ptr()
            and src.storage_offset() == before.storage_offset() and src.shape == before.shape
            and src.stride() == before.stride() and src._version == src_version and own._version == own_version)


class HFRolloutEngine:
    """KV-cached sampler over a Hugging Face causal LM.

    ``model`` is the sampler's own model (``load_weights`` copies policy weights into it), or
    the policy's model object itself, in which case the sampler always sees the current
    weights and ``load_weights`` is a no-op.

    ``compact_finished`` (default True): drop finished rows from the batch and the KV cache once
    at least 1/``COMPACT_FRACTION`` of the rows still in it have finished (dynamic caches only;
    the samples are the same either way).

    ``attention`` (the lean decoder's decode-step attention): ``"auto"`` the native kernel
    (``ratiorl.rollout.native``, built on first use with the machine's C compiler) where it can be
    built, else torch's matmuls, with a warning that says why; ``"native"`` the kernel or an error
    that says why not; ``"torch"`` always torch's matmuls.
    """

    compact_finished = True
    COMPACT_FRACTION = 8

    def __init__(self, model: nn.Module, tokenizer, *, eos_token_id: int | list[int] | None = None,
                 decoder: str = "auto", draw: str = "auto", attention: str = "auto"):
        if decoder not in ("auto", "hf"):
            raise ValueError(f"decoder must be 'auto' (the lean decoder where supported) or 'hf', got {decoder!r}")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
        self.attention = attention
        if draw not in DRAWS:
            raise ValueError(f"draw must be one of {', '.join(DRAWS)}, got {draw!r}")
        self.draw = draw  # how a token is drawn from its distribution (``truncation.draw_from``)
        self.model = _unwrap(model)
        self.tokenizer = tokenizer
        self.decoder = decoder  # "auto": decode steps through LeanDecoder when the model has a layout
        eos = set()
        for src in (eos_token_id, getattr(tokenizer, "eos_token_id", None),
                    getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)):
            if src is None:
                continue
            eos.update([src] if isinstance(src, int) else list(src))
        if not eos:
            raise ValueError("no EOS token id: the tokenizer has no eos_token; pass eos_token_id=")
        self.eos_token_ids = sorted(eos)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else self.eos_token_ids[0]
        self._synced: dict = {}  # key -> (source tensor, its version, the sampler's version) at the last sync

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ weights
    def load_weights(self, model: nn.Module) -> None:
        """Sampler <- policy weights (cast to the sampler's dtypes). No-op when the sampler *is*
        the policy's model.

        A tensor that is no trainable parameter of ``model`` (a LoRA model's frozen base weights,
        buffers) is copied again only when it changed since the last call: another storage, a
        bumped version counter (every in-place write bumps it; writes through ``.data`` do not),
        or the sampler's copy written since (``load_snapshot``, a checkpoint). Trainable
        parameters are copied at every call: fused optimizers update them without bumping their
        version counters. Copying SmolLM2-135M's frozen weights into a bf16 sampler took 60 ms a
        sync here (2 threads); its LoRA parameters are 3.5% of the model."""
        src = _unwrap(model)
        if src is self.model:
            return
        state = self._source_state(src)
        frozen, trainable = set(), set()
        for t in (*src.parameters(), *src.buffers()):
            (trainable if t.requires_grad else frozen).add(t.untyped_storage().data_ptr())
        frozen -= trainable
        own = self.model.state_dict(keep_vars=True)
        _check_sync_keys([k for k in own if k not in state], [k for k in state if k not in own])
        with torch.no_grad():
            for k, v in state.items():
                if _unchanged(v, self._synced.get(k), own[k]):
                    continue
                if own[k].shape != v.shape:
                    raise ValueError(f"weight sync failed: {k} is {tuple(v.shape)} in the policy, "
                                     f"{tuple(own[k].shape)} in the sampler")
                own[k].copy_(v)  # cast to the sampler's dtype
        # what a later call may skip: the model's own frozen tensors (an alias keeps each storage
        # alive, so its address cannot be reused by another tensor while it is recorded)
        self._synced = {k: (v, v._version, own[k]._version) for k, v in state.items()
                        if v.untyped_storage().data_ptr() in frozen}

    def _source_state(self, src: nn.Module) -> dict:
        if is_peft_model(self.model):
            if not is_peft_model(src):
                raise ValueError("the sampler is a PEFT model but the source model is not")
            return src.state_dict()
        return merged_state_dict(src)

    def snapshot(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A copy of the weights ``load_weights(model)`` would load, already in the sampler's dtypes
        (so loading it later gives exactly what ``load_weights`` gives now)."""
        own = self.model.state_dict()
        with torch.no_grad():
            return {k: v.detach().to(own[k].dtype if k in own else v.dtype, copy=True)
                    for k, v in self._source_state(_unwrap(model)).items()}

    def load_snapshot(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state dict (from ``snapshot``, or a checkpoint) into the sampler."""
        with torch.no_grad():
            missing, unexpected = self.model.load_state_dict(state, strict=False)
        _check_sync_keys(missing, unexpected)

    # ------------------------------------------------------------------ prompts
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize once and left-pad: (P, Tp) ids and mask."""
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings, got a single string")
        if len(prompts) == 0:
            raise ValueError("no prompts given")
        enc = self.tokenizer(list(prompts))["input_ids"]
        bos = getattr(self.tokenizer, "bos_token_id", None)
        for i, ids in enumerate(enc):
            if len(ids) == 0:
                if bos is None:
                    raise ValueError(f"prompt {i} is empty and the tokenizer has no BOS token to start from")
                enc[i] = [bos]
        Tp = max(len(ids) for ids in enc)
        ids = torch.full((len(enc), Tp), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(enc), Tp), dtype=torch.long)
        for i, row in enumerate(enc):
            ids[i, Tp - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, Tp - len(row):] = 1
        return ids, mask

    # ------------------------------------------------------------------ sampling
    @staticmethod
    def truncated_logp(logp_all: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
        """log q, the distribution a token is drawn from (``ratiorl.rollout.truncation``):
        ``logp_all`` (log softmax(logits / T)) restricted to its ``top_k`` most likely tokens
        (0 = all), then to the top-p nucleus of that renormalised distribution, then to the tokens
        with probability >= ``min_p`` times the largest, renormalised; -inf outside. ``logp_all``
        itself when nothing is truncated."""
        return truncated_logp(logp_all, top_k, top_p, min_p)

    def lean_decoder(self) -> LeanDecoder | None:
        """The decoder ``generate`` uses for its decode steps: a ``LeanDecoder`` (preallocated block KV cache,
        ``ratiorl.rollout.decoder``) when ``decoder="auto"`` and the model has a layout, else None
        (transformers' forward)."""
        dec = LeanDecoder.for_model(self.model) if self.decoder == "auto" else None
        if dec is not None:  # (the kernel is looked for only when a lean decoder will use it)
            dec.attention = attention_kernel(self.attention)
        return dec

    @staticmethod
    def _prefill(model, ids, mask, G: int, rows: torch.Tensor | None = None, expand: bool = True):
        """Prompt forward (last position's logits only), then cache and logits repeated G times
        per row (rows g*G .. g*G+G-1 get prompt g), or, with ``rows``, row r gets prompt
        ``rows[r]``. None if the model's cache cannot be expanded so. ``expand=False``: the cache
        keeps one row per prompt (only the logits are expanded)."""
        pos = position_ids_from_mask(mask)
        prefill = dict(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        with contiguous_head_input(model):
            try:  # only the last position's logits are needed
                out = model(**prefill, logits_to_keep=1)
            except TypeError:  # a model whose forward has no logits_to_keep
                out = model(**prefill)
        cache = output_cache(out)
        if not expand:
            out.logits = out.logits[:, -1:].index_select(0, rows)
        elif rows is not None:
            select = cache_row_selector(cache)
            if select is None:
                return None
            select(rows)
            out.logits = out.logits[:, -1:].index_select(0, rows)
        elif G > 1:
            if not hasattr(cache, "batch_repeat_interleave"):
                return None
            cache.batch_repeat_interleave(G)
            out.logits = out.logits[:, -1:].repeat_interleave(G, 0)
        return out

    def generate(
        self,
        prompts: list[str],
        num_generations: int = 1,
        *,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        stop: list[str] | None = None,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        """Sample ``num_generations`` completions per prompt.

        ``top_k=0``, ``top_p=1``, ``min_p=0``: no truncation (``ratiorl.rollout.truncation``).
        ``stop``: strings that end a completion at their first occurrence in its decoded text
        (``ratiorl.rollout.stops``). ``temperature=0`` means greedy decoding (log-probs then use
        temperature 1, untruncated).
        """
        return self._generate(prompts, num_generations, False, max_new_tokens, temperature, top_p, top_k, min_p,
                              stop, generator)[0]

    def generate_with_greedy(
        self,
        prompts: list[str],
        num_generations: int,
        *,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        stop: list[str] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Rollout, Rollout]:
        """``(generate(prompts, num_generations, ...), generate(prompts, 1, temperature=0,
        max_new_tokens=..., stop=stop))`` in one pass, as evaluation needs them: each prompt is
        prefilled once for its sampled rows and its greedy row, and all rows decode together.
        The same completions as the two calls (the sampled rows draw the same random numbers)."""
        return self._generate(prompts, num_generations, True, max_new_tokens, temperature, top_p, top_k, min_p,
                              stop, generator)

    def _generate(self, prompts, G, with_greedy, max_new_tokens, temperature, top_p, top_k, min_p, stop,
                  generator) -> tuple:
        if G < 1:
            raise ValueError(f"num_generations must be >= 1, got {G}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        stops = StopStrings(check_sampling_options(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                                   stop=stop), self.tokenizer)
        greedy = temperature == 0
        T = 1.0 if greedy else float(temperature)

        model, dev = self.model, self.device
        if generator is not None and generator.device != dev:
            # e.g. a CPU generator with a CUDA model: derive a device generator from it, so
            # results stay reproducible and the caller's generator still advances.
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            generator = torch.Generator(device=dev).manual_seed(seed)
        p_ids, p_mask = self.encode_prompts(prompts)
        P, Tp = p_ids.shape
        # row -> prompt: prompt g -> rows g*G .. g*G+G-1 (sampled), then row S + g (greedy, with_greedy)
        row_prompt = torch.arange(P).repeat_interleave(G)
        S = P * G  # rows [0, S) sample at ``temperature``; rows [S, R) are greedy
        if with_greedy:
            row_prompt = torch.cat([row_prompt, torch.arange(P)])
        R = len(row_prompt)
        prompt_ids, prompt_mask = p_ids[row_prompt].to(dev), p_mask[row_prompt].to(dev)

        eos = torch.tensor(self.eos_token_ids, device=dev)
        tokens = torch.full((R, max_new_tokens), self.pad_token_id, dtype=torch.long, device=dev)
        logps = torch.zeros((R, max_new_tokens), dtype=torch.float32, device=dev)
        alive_steps = torch.zeros((R, max_new_tokens), dtype=torch.long, device=dev)
        finished = torch.zeros(R, dtype=torch.bool, device=dev)
        stopped = torch.zeros(R, dtype=torch.bool, device=dev)
        # Attention mask for prompt + all possible new tokens; sliced as the cache grows.
        attn = torch.cat([prompt_mask, torch.ones((R, max_new_tokens), dtype=torch.long, device=dev)], 1)
        next_pos = position_ids_from_mask(prompt_mask)[:, -1] + 1
        pad = torch.tensor(self.pad_token_id, device=dev)

        was_training, lean = model.training, None
        model.eval()
        try:
            with torch.inference_mode():
                # Prefill each distinct prompt once (P rows, not R) and hand its KV cache to its
                # rows: the completions of a prompt share the prompt's keys and values.
                lean = self.lean_decoder()
                if lean is not None:  # decode steps over a block cache filled from this prefill
                    out = self._prefill(model, p_ids.to(dev), p_mask.to(dev), G, row_prompt.to(dev), expand=False)
                    lean.start(output_cache(out), row_prompt.to(dev), prompt_mask, next_pos, max_new_tokens)
                    past = None
                    keep_rows = lean.keep if self.compact_finished else None
                else:
                    out = self._prefill(model, p_ids.to(dev), p_mask.to(dev), G,
                                        row_prompt.to(dev) if with_greedy else None)
                    if out is None:  # a cache type that cannot be expanded: prefill every row
                        out = self._prefill(model, prompt_ids, prompt_mask, 1)
                    past = output_cache(out)
                    keep_rows = cache_row_selector(past) if self.compact_finished else None
                cache_arg = cache_kwarg(model)
                # Every row's last logits, (R, V): the model runs on the rows still generating
                # (``active``; None = all) and only their rows are refreshed; a finished row's
                # stale logits are drawn from and discarded, so that every step draws from an
                # (S, V) matrix and each row gets the same random numbers whichever rows are left.
                logits = out.logits[:, -1]
                active = None
                for t in range(max_new_tokens):
                    # log softmax(logits / T) over the full vocabulary, float32
                    if S == R or not bool(finished[:S].all()):  # (else: the sampled rows are done)
                        logp_all = torch.log_softmax(logits[:S].float() / T, dim=-1)
                        if greedy:
                            tok = logp_all.argmax(-1)
                            lp = logp_all.gather(-1, tok[:, None]).squeeze(-1)
                        else:  # lp = log mu: of the truncated, renormalised distribution drawn from
                            tok, lp = sample_tokens(logp_all, top_k, top_p, min_p, generator, self.draw)
                    else:
                        tok, lp = pad.expand(S), torch.zeros(S, device=dev)
                    if S < R:  # the greedy rows, at temperature 1
                        logp_g = torch.log_softmax(logits[S:].float(), dim=-1)
                        tok_g = logp_g.argmax(-1)
                        tok, lp = torch.cat([tok, tok_g]), torch.cat([lp, logp_g.gather(-1, tok_g[:, None]).squeeze(-1)])
                    alive = ~finished
                    tok = torch.where(alive, tok, pad)
                    tokens[:, t] = tok
                    logps[:, t] = lp.masked_fill(finished, 0.0)
                    alive_steps[:, t] = alive
                    finished = finished | torch.isin(tok, eos)
                    if stops:
                        rows = (alive & ~finished).nonzero().squeeze(1)
                        hit = rows[stops.completed(tokens, rows, t).to(dev)]
                        stopped[hit] = True
                        finished[hit] = True
                    if t + 1 == max_new_tokens or bool(finished.all()):
                        break
                    if keep_rows is not None:
                        rows = active if active is not None else torch.arange(R, device=dev)
                        done = finished[rows]
                        n_done = int(done.sum())
                        if n_done and n_done * self.COMPACT_FRACTION >= len(rows):  # drop finished rows
                            keep = (~done).nonzero().squeeze(1)
                            keep_rows(keep)
                            active = rows[keep]
                    if lean is not None:
                        new_logits = lean.step(tok if active is None else tok[active], t)
                    else:
                        if active is None:
                            step_in = dict(input_ids=tok[:, None], attention_mask=attn[:, : Tp + t + 1],
                                           position_ids=(next_pos + t)[:, None])
                        else:
                            step_in = dict(input_ids=tok[active, None], attention_mask=attn[active, : Tp + t + 1],
                                           position_ids=(next_pos[active] + t)[:, None])
                        out = model(**step_in, use_cache=True, **{cache_arg: past})
                        past = output_cache(out)
                        new_logits = out.logits[:, -1]
                    if active is None:
                        logits = new_logits
                    else:  # (the previous step's logits tensor, no longer read, is updated in place)
                        logits[active] = new_logits.to(logits.dtype)
        finally:
            model.train(was_training)
            if lean is not None:
                lean.close()
        del past, out

        def part(rows: slice, group_ids: torch.Tensor) -> Rollout:
            mask = alive_steps[rows]
            n = int(mask.sum(1).max())  # the last step a row of this part generated
            ids = tokens[rows, :n].clone()
            keep = mask[:, :n].bool() & ~torch.isin(ids, eos)  # the text leaves out EOS and padding
            texts = self.tokenizer.batch_decode([ids[i][keep[i]].tolist() for i in range(len(ids))],
                                                skip_special_tokens=True)
            for i in stopped[rows].nonzero().squeeze(1).tolist():
                texts[i] = stops.cut(texts[i])  # ends with its stop string
            logp = logps[rows, :n].clone()
            return Rollout(prompt_ids=prompt_ids[rows], prompt_mask=prompt_mask[rows], completion_ids=ids,
                           completion_mask=mask[:, :n].clone(), behaviour_logp=logp,
                           old_logp=logp,  # the sampler is pi_old unless the trainer recomputes it
                           group_ids=group_ids.to(dev), truncated=~finished[rows], completion_texts=texts,
                           pad_token_id=self.pad_token_id)

        sampled = part(slice(0, S), row_prompt[:S])
        return (sampled, part(slice(S, R), row_prompt[S:])) if with_greedy else (sampled, None)
