"""`RatioGRPOTrainer`: TRL's GRPOTrainer with its loss replaced by a ratiorl objective.

Everything except the loss is TRL's: generation, rewards, advantages (TRL's `scale_rewards`;
use `scale_rewards="none"` for the `group_mean` advantages of `snib`/`reinforce`), reference
model, old log-probs, logging. Per micro-batch the objective gets, as TRL's loss does:

- `logp`: TRL's own `_get_per_token_logps_and_entropies` on prompt + completion;
- `old_logp`: `old_per_token_logps` if TRL computed it, else the detached `logp`
  (TRL skips it when num_iterations=1 and generation is aligned with optimizer steps);
- `ref_logp`: `ref_per_token_logps` (TRL computes it when its `beta` != 0; `beta` is taken
  from the objective, see below); `mask`: completion mask (times TRL's tool mask, if any);
- `group_ids`: TRL generates `num_generations` consecutive completions per prompt (RepeatSampler)
  and each process holds a contiguous slice of that batch, but `_prepare_inputs` then
  *shuffles rows* before cutting it into `steps_per_generation` micro-batches. So the ids are
  attached in `_generate_and_score_completions`, before the shuffle, and travel with the rows.
  Self-normalised weights (`snib`, `snib_fg`) need whole groups per micro-batch: that holds with
  `steps_per_generation=1` and `per_device_train_batch_size` a multiple of `num_generations`
  (checked at construction and on every call);
- `num_sequences` = local rows x accumulation steps and `num_tokens` = the tokens of one
  accumulation window over all ranks (from TRL's `num_items_in_batch`, as TRL's `dapo`), so
  the loss is scaled for gradient accumulation and data parallelism like TRL's losses.

`args.beta` is set to the objective's `beta` (an explicit nonzero `args.beta` that differs is an
error). A KL estimator that needs the full-vocabulary KL (`obj.needs_token_kl`, e.g.
`kl_estimator="exact"`) is not supported (TRL has no full-vocabulary KL). An aggregation that
uses the generation limit (Dr.GRPO's) gets `max_completion_length` unless `max_tokens` is set.
TRL's other loss options (`loss_type`, `epsilon*`, `importance_sampling_level`, entropy
masking/bonus, off-policy mask, MoE aux loss, `delta`) are not applied.
Objective metrics are logged as `objective/<name>`, averaged over processes.

Sampler/trainer mismatch: TRL records the sampler's per-token log-probs (`sampling_per_token_logps`,
from vLLM or a `rollout_func`); they are the objective's `behaviour_logp` (NaN, a token vLLM could
not score, counts as no mismatch, as in TRL). Exactly one correction applies, ratiorl's:
- the objective has a `mismatch_level`: it is used as is, and with `use_vllm=True` TRL's own
  `vllm_importance_sampling_correction` is switched off (a warning says so);
- it has none, and `use_vllm=True` with TRL's `vllm_importance_sampling_correction=True` (TRL's
  default): TRL's mode becomes the objective's mismatch correction, token_truncate ->
  level "token" + mode "truncate", token_mask -> "token" + "mask", sequence_truncate /
  sequence_mask -> "sequence" + "truncate" / "mask", with `mismatch_low` =
  `vllm_importance_sampling_clip_min` (None -> 0, no lower bound) and `mismatch_high` =
  `vllm_importance_sampling_clip_max`; TRL's flag is then switched off. Set
  `vllm_importance_sampling_correction=False` for no correction at all.
pi_old is TRL's `old_per_token_logps` when TRL computes it, else the detached current log-probs
(equal to pi_old when generation is aligned with optimizer steps, which is when TRL skips it).

Liger: TRL 1.16 has no Liger GRPO loss (`use_liger_kernel` only patches layer kernels and refuses
the fused linear cross-entropy); a `use_liger_loss=True` (older/newer TRL) or a Liger config
with `fused_linear_cross_entropy` would compute the loss outside this class, so both are errors.
"""

from __future__ import annotations

import warnings

import torch

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(f"RatioGRPOTrainer needs TRL ({err}); install it with: pip install 'ratiorl[trl]'") from err

import ratiorl

_MODEL_INPUTS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                 "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


_TRL_IS_MODES = {  # TRL vllm_importance_sampling_mode -> (mismatch_level, mismatch_mode)
    "token_truncate": ("token", "truncate"), "token_mask": ("token", "mask"),
    "sequence_truncate": ("sequence", "truncate"), "sequence_mask": ("sequence", "mask"),
}


def check_no_liger_loss(args) -> None:
    """A Liger loss would replace the ratiorl objective: refuse it instead of bypassing silently."""
    kernel_cfg = getattr(args, "liger_kernel_config", None) or {}
    if getattr(args, "use_liger_loss", False) or (
            getattr(args, "use_liger_kernel", False) and kernel_cfg.get("fused_linear_cross_entropy")):
        raise ValueError(
            "RatioGRPOTrainer computes its loss with a ratiorl objective; TRL's Liger loss path (use_liger_loss=True "
            "or liger_kernel_config={'fused_linear_cross_entropy': True}) would bypass it. Turn it off "
            "(use_liger_kernel=True with layer kernels only is fine)")


def mismatch_from_trl(obj, args):
    """The objective with TRL's vLLM importance-sampling correction mapped onto ratiorl's mismatch
    correction, and ``args.vllm_importance_sampling_correction`` switched off (module docstring)."""
    if not (getattr(args, "use_vllm", False) and getattr(args, "vllm_importance_sampling_correction", False)):
        return obj
    if obj.uses_mismatch:
        warnings.warn(f"objective {obj.name!r} has its own mismatch correction (mismatch_level="
                      f"{obj.mismatch_level!r}); TRL's vllm_importance_sampling_correction is switched off so that "
                      "the correction is applied once", stacklevel=3)
    else:
        mode = args.vllm_importance_sampling_mode
        if mode not in _TRL_IS_MODES:
            raise ValueError(f"unknown vllm_importance_sampling_mode {mode!r}; valid: {', '.join(_TRL_IS_MODES)}")
        level, how = _TRL_IS_MODES[mode]
        low, high = args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max
        obj = obj.replace(mismatch_level=level, mismatch_mode=how, mismatch_low=0.0 if low is None else float(low),
                          mismatch_high=float("inf") if high is None else float(high))
    args.vllm_importance_sampling_correction = False
    return obj


class RatioGRPOTrainer(GRPOTrainer):
    """`GRPOTrainer(model, reward_funcs, args, ..., objective="snib")`: `objective` is a preset
    name or a `ratiorl.Objective`; all other arguments are GRPOTrainer's."""

    def __init__(self, model, reward_funcs, args: GRPOConfig | None = None, *rest, objective="grpo", **kwargs):
        obj = ratiorl.objective(objective) if isinstance(objective, str) else objective
        args = args if args is not None else GRPOConfig()
        check_no_liger_loss(args)
        obj = mismatch_from_trl(obj, args)
        if obj.needs_token_kl:
            raise ValueError(
                f"objective {obj.name!r} uses kl_estimator={obj.kl_estimator!r} (full-vocabulary KL), which "
                "RatioGRPOTrainer cannot supply from TRL's inputs; use kl_estimator='k3' (e.g. ratiorl.objective("
                f"{obj.name!r}, kl_estimator='k3')), beta=0, or ratiorl's own trainer (`ratiorl train`)")
        if args.beta not in (0.0, obj.beta):
            raise ValueError(f"args.beta={args.beta} conflicts with the objective's beta={obj.beta}; "
                             "set beta on the objective (args.beta is taken from it)")
        args.beta = obj.beta  # TRL loads the reference model and computes ref log-probs iff beta != 0
        # the loss itself needs whole groups (TRL computes the advantages on whole groups itself)
        if obj.loss_needs_groups and (args.steps_per_generation != 1
                                         or args.per_device_train_batch_size % args.num_generations):
            raise ValueError(
                f"objective {obj.name!r} normalises weights within each group, so every micro-batch needs whole "
                "groups, but TRL shuffles completions across steps_per_generation micro-batches; set "
                "steps_per_generation=1 and per_device_train_batch_size to a multiple of num_generations "
                f"(got {args.steps_per_generation} and {args.per_device_train_batch_size})")
        obj = obj.with_generation_limit(args.max_completion_length)  # Dr.GRPO's constant, as TRL
        self.objective = obj
        super().__init__(model, reward_funcs, args, *rest, **kwargs)

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        B = out["completion_ids"].size(0)  # this process's contiguous slice of the gathered batch
        mode = "train" if self.model.training else "eval"
        G = self.num_generations if mode == "train" else self.num_generations_eval
        rows = self.accelerator.process_index * B + torch.arange(B, device=out["completion_ids"].device)
        out["group_ids"] = rows // G
        return out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("RatioGRPOTrainer does not support returning outputs")
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        logp, _, _ = self._get_per_token_logps_and_entropies(
            model, torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), completion_ids.size(1),
            **{k: inputs.get(k) for k in _MODEL_INPUTS})
        old_logp = inputs.get("old_per_token_logps")
        B, mode = logp.size(0), "train" if self.model.training else "eval"
        group_ids = inputs.get("group_ids")
        if group_ids is None:  # hand-built inputs: TRL's layout before the shuffle
            group_ids = torch.arange(B, device=logp.device) // self.num_generations
        if self.objective.loss_needs_groups:
            G = self.num_generations if mode == "train" else self.num_generations_eval
            if bool((torch.unique(group_ids, return_counts=True)[1] != G).any()):
                raise ValueError(f"objective {self.objective.name!r} needs whole groups of {G} in each "
                                 "micro-batch (steps_per_generation=1, batch size a multiple of num_generations)")
        # Global counts of one accumulation window (the eval batch is neither split nor accumulated):
        # num_items_in_batch counts the tokens of the whole generation batch on all ranks.
        accum = getattr(self, "current_gradient_accumulation_steps", 1) if mode == "train" else 1
        spg = self.args.steps_per_generation if mode == "train" else 1
        num_tokens = torch.as_tensor(inputs["num_items_in_batch"]).clamp(min=1) * accum / spg
        old_logp = logp.detach() if old_logp is None else old_logp
        behaviour = None
        if self.objective.needs_behaviour_logp:
            behaviour = inputs.get("sampling_per_token_logps")
            if behaviour is None:
                raise ValueError(
                    f"objective {self.objective.name!r} corrects the sampler mismatch and needs the sampler's "
                    "log-probs, which TRL records only with use_vllm=True or a rollout_func returning logprobs")
            behaviour = torch.where(torch.isnan(behaviour), old_logp, behaviour)  # unscored token: ratio 1, as TRL
        out = self.objective(
            logp, old_logp, inputs["advantages"], mask,
            group_ids=group_ids, ref_logp=inputs.get("ref_per_token_logps"), behaviour_logp=behaviour,
            num_tokens=num_tokens / self.accelerator.num_processes, num_sequences=B * accum)
        names = [k for k, v in out.metrics.items() if isinstance(v, float)]
        if names:
            local = torch.tensor([out.metrics[k] for k in names], device=logp.device)
            mean = self.accelerator.gather(local).view(-1, len(names)).mean(0).tolist()
            for k, v in zip(names, mean):
                self._metrics[mode][f"objective/{k}"].append(v)
        return out.loss
