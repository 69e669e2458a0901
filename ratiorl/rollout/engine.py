"""Rollout engines: sample G completions per prompt and log the sampler's per-token log-probs.

``HFRolloutEngine`` drives any Hugging Face causal LM with its own KV-cached sampling loop
(one batched forward per new token for all B*G rows) instead of ``model.generate``: the loop
does only what RL needs (temperature, top-k, top-p, stop at EOS, log-probs) and so has little
per-token Python overhead.

The logged log-prob of a sampled token y (``Rollout.behaviour_logp``, log mu) is the log-prob
of the distribution the token was actually drawn from: softmax(logits / T), restricted to the
``top_k`` most likely tokens, then to the top-p nucleus of that (renormalised) distribution, and
renormalised again. With ``top_k=0`` and ``top_p=1`` nothing is truncated and it equals
log softmax(logits / T)[y] over the full vocabulary, the function ``Policy.completion_stats``
computes; with truncation it is larger than the policy's log-prob (the kept tokens share the
dropped mass), and that difference is a real sampler/trainer mismatch the objective can correct.
Logging the untruncated log-prob instead would silently bias every importance ratio against the
sampler (TRL issue 6789).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ratiorl.policy import is_peft_model, position_ids_from_mask
from ratiorl.policy.compat import cache_kwarg, output_cache

from .batch import Rollout


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a sampler (HF, vLLM, ... all plug in behind this)."""

    def generate(
        self,
        prompts: list[str],
        num_generations: int,
        *,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
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

    For a PEFT LoRA model, W_merged = W_base + delta (delta = B A * scaling, from PEFT's own
    ``get_delta_weight``), under the original parameter names. The model is not modified.
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
                    sd[key] = sd[key] + mod.get_delta_weight(adapter).to(sd[key].dtype)
    return sd


class HFRolloutEngine:
    """KV-cached sampler over a Hugging Face causal LM.

    ``model`` is the sampler's own model (``load_weights`` copies policy weights into it), or
    the policy's model object itself, in which case the sampler always sees the current
    weights and ``load_weights`` is a no-op.
    """

    def __init__(self, model: nn.Module, tokenizer, *, eos_token_id: int | list[int] | None = None):
        self.model = _unwrap(model)
        self.tokenizer = tokenizer
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

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ weights
    def load_weights(self, model: nn.Module) -> None:
        """Sampler <- policy weights (cast to the sampler's dtypes). No-op when the sampler *is*
        the policy's model."""
        src = _unwrap(model)
        if src is self.model:
            return
        self.load_snapshot(self._source_state(src))

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
        missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the input embedding
        if missing or unexpected:
            raise ValueError(f"weight sync failed: missing {missing[:5]}, unexpected {unexpected[:5]}")

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
    def truncated_logp(logp_all: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
        """log q, the distribution a token is drawn from: ``logp_all`` (log softmax(logits / T))
        restricted to its ``top_k`` most likely tokens (0 = all), then to the smallest prefix of
        that renormalised distribution whose mass reaches ``top_p`` (a token is dropped when the
        mass strictly before it already reaches ``top_p``; the most likely token is always kept),
        renormalised; -inf outside. ``logp_all`` itself when nothing is truncated."""
        V = logp_all.shape[-1]
        use_k = 0 < top_k < V
        if not use_k and top_p >= 1.0:
            return logp_all
        sorted_lp, order = logp_all.sort(dim=-1, descending=True)
        drop = torch.zeros_like(sorted_lp, dtype=torch.bool)
        if use_k:
            drop[..., top_k:] = True
        if top_p < 1.0:
            p = torch.softmax(sorted_lp.masked_fill(drop, -torch.inf), -1) if use_k else sorted_lp.exp()
            drop |= (p.cumsum(-1) - p) >= top_p
        kept = sorted_lp.masked_fill(drop, -torch.inf)
        kept = kept - torch.logsumexp(kept, -1, keepdim=True)
        return torch.full_like(logp_all, -torch.inf).scatter(-1, order, kept)

    @staticmethod
    def _sample(logp_all: torch.Tensor, top_k: int, top_p: float, generator) -> tuple:
        """Draw one token per row from the truncated distribution; returns (tokens, log q of them)."""
        logq = HFRolloutEngine.truncated_logp(logp_all, top_k, top_p)
        if logq is logp_all:
            tok = torch.multinomial(logp_all.exp(), 1, generator=generator).squeeze(-1)
        else:  # draw in sorted order (the same draw as an untruncated sort-and-mask sampler)
            q_sorted, order = logq.exp().sort(dim=-1, descending=True)
            tok = order.gather(-1, torch.multinomial(q_sorted, 1, generator=generator)).squeeze(-1)
        return tok, logq.gather(-1, tok[:, None]).squeeze(-1)

    @staticmethod
    def _prefill(model, ids, mask, G: int):
        """Prompt forward (last position's logits only), then cache and logits repeated G times
        per row (rows g*G .. g*G+G-1 get prompt g). None if the model's cache cannot be repeated."""
        pos = position_ids_from_mask(mask)
        prefill = dict(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        try:  # only the last position's logits are needed
            out = model(**prefill, logits_to_keep=1)
        except TypeError:  # a model whose forward has no logits_to_keep
            out = model(**prefill)
        if G > 1:
            cache = output_cache(out)
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
        generator: torch.Generator | None = None,
    ) -> Rollout:
        """Sample ``num_generations`` completions per prompt (``top_k=0``: no top-k truncation).

        ``temperature=0`` means greedy decoding (log-probs then use temperature 1, untruncated).
        """
        if num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {num_generations}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
        greedy = temperature == 0
        T = 1.0 if greedy else float(temperature)

        model, dev = self.model, self.device
        if generator is not None and generator.device != dev:
            # e.g. a CPU generator with a CUDA model: derive a device generator from it, so
            # results stay reproducible and the caller's generator still advances.
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            generator = torch.Generator(device=dev).manual_seed(seed)
        G = num_generations
        p_ids, p_mask = self.encode_prompts(prompts)
        P, Tp = p_ids.shape
        prompt_ids = p_ids.repeat_interleave(G, 0).to(dev)  # prompt g -> rows g*G .. g*G+G-1
        prompt_mask = p_mask.repeat_interleave(G, 0).to(dev)
        group_ids = torch.arange(P, device=dev).repeat_interleave(G)
        R = P * G

        eos = torch.tensor(self.eos_token_ids, device=dev)
        tokens = torch.full((R, max_new_tokens), self.pad_token_id, dtype=torch.long, device=dev)
        logps = torch.zeros((R, max_new_tokens), dtype=torch.float32, device=dev)
        alive_steps = torch.zeros((R, max_new_tokens), dtype=torch.long, device=dev)
        finished = torch.zeros(R, dtype=torch.bool, device=dev)
        # Attention mask for prompt + all possible new tokens; sliced as the cache grows.
        attn = torch.cat([prompt_mask, torch.ones((R, max_new_tokens), dtype=torch.long, device=dev)], 1)
        pos = position_ids_from_mask(prompt_mask)
        next_pos = pos[:, -1] + 1
        pad = torch.tensor(self.pad_token_id, device=dev)

        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                # Prefill each distinct prompt once (P rows, not P*G) and hand its KV cache to its
                # G rows: the G completions of a prompt share the prompt's keys and values.
                out = self._prefill(model, p_ids.to(dev), p_mask.to(dev), G)
                if out is None:  # a cache type that cannot be expanded: prefill every row
                    out = self._prefill(model, prompt_ids, prompt_mask, 1)
                past = output_cache(out)
                cache_arg = cache_kwarg(model)
                steps = 0
                for t in range(max_new_tokens):
                    # log softmax(logits / T) over the full vocabulary, float32
                    logp_all = torch.log_softmax(out.logits[:, -1].float() / T, dim=-1)
                    if greedy:
                        tok = logp_all.argmax(-1)
                        lp = logp_all.gather(-1, tok[:, None]).squeeze(-1)
                    else:  # lp = log mu: of the truncated, renormalised distribution drawn from
                        tok, lp = self._sample(logp_all, top_k, top_p, generator)
                    alive = ~finished
                    tok = torch.where(alive, tok, pad)
                    tokens[:, t] = tok
                    logps[:, t] = lp.masked_fill(finished, 0.0)
                    alive_steps[:, t] = alive
                    finished = finished | torch.isin(tok, eos)
                    steps = t + 1
                    if t + 1 == max_new_tokens or bool(finished.all()):
                        break
                    out = model(input_ids=tok[:, None], attention_mask=attn[:, : Tp + t + 1],
                                position_ids=(next_pos + t)[:, None], use_cache=True, **{cache_arg: past})
                    past = output_cache(out)
        finally:
            model.train(was_training)
        del past, out

        completion_ids = tokens[:, :steps].clone()
        completion_mask = alive_steps[:, :steps].clone()
        behaviour_logp = logps[:, :steps].clone()
        # Text without EOS or padding: keep generated tokens that are not EOS.
        keep = completion_mask.bool() & ~torch.isin(completion_ids, eos)
        rows = [completion_ids[i][keep[i]].tolist() for i in range(R)]
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return Rollout(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            behaviour_logp=behaviour_logp,
            old_logp=behaviour_logp,  # the sampler is pi_old unless the trainer recomputes it
            group_ids=group_ids,
            truncated=~finished,
            completion_texts=texts,
            pad_token_id=self.pad_token_id,
        )
