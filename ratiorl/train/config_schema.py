"""The run configuration schema: a tree of plain dataclasses, one per section.

These dataclasses are the single source of defaults. ``ratiorl.train.config`` loads YAML and
command-line overrides into them (type-checked by OmegaConf) and re-exports every class here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .sft import SFTConfig

DEFAULT_MODEL_PATH = "runs/tiny-sft"  # what `ratiorl sft` writes; auto-created when missing


@dataclass
class ModelConfig:
    path: str = DEFAULT_MODEL_PATH  # HF name or local dir; AutoModelForCausalLM.from_pretrained
    auto_create: bool = True  # if `path` is missing locally, build it with `ratiorl sft` settings
    device: str = "cpu"
    dtype: Optional[str] = None  # None = checkpoint dtype; "float32" | "bfloat16" | "float16"
    gguf_file: Optional[str] = None  # a .gguf file inside `path` (dequantised on load; needs `gguf`)
    # recompute each transformer block's activations in the backward instead of keeping them
    # (non-reentrant torch.utils.checkpoint): less activation memory, about one more forward of time
    gradient_checkpointing: bool = False


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Optional[list] = None  # None = every linear layer of attention/MLP (not lm_head)


@dataclass
class RolloutConfig:
    prompts_per_step: int = 8  # prompts in one rollout batch
    num_generations: int = 8  # G completions per prompt (one group)
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # sample from the k most likely tokens only (0 = off); logged log-probs are renormalised
    min_p: float = 0.0  # keep tokens with p >= min_p * max p (after temperature, top-k, top-p; 0 = off)
    stop: list = field(default_factory=list)  # strings that end a completion (kept in its text; [] = none)
    sync_every: int = 1  # optimizer updates between sampler refreshes
    policy_lag: int = 0  # sample with the weights of k optimizer updates ago (an asynchronous trainer)
    dtype: Optional[str] = None  # sampler precision: None = the policy's | "bfloat16" | "float16" | "float32"
    recompute_old_logp: bool = False  # always compute pi_old with the trainer's forward (else only when needed)
    # which forward samples: "auto" = ratiorl's lean decoder when the architecture has one, else
    # transformers' forward | "hf" = always transformers' forward
    decoder: str = "auto"
    # how a token is drawn: auto (torch.multinomial's exponential race below 8192 tokens, inverse CDF
    # from there on) | multinomial | inverse_cdf (one uniform per row: much faster for large vocabularies)
    draw: str = "auto"
    # the lean decoder's decode-step attention: auto (the native kernel, built on first use with the
    # machine's C compiler, where it builds; else torch, with a warning) | native (or an error) | torch
    attention: str = "auto"


@dataclass
class TaskConfig:
    name: str = "addition"  # built-in task, or "jsonl" / "hf" with `path`
    path: Optional[str] = None  # JSONL file or HF dataset name/dir (for name=jsonl|hf)
    split: str = "train"
    eval_split: Optional[str] = None  # HF only; default: hold out `eval_size` training rows
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    options: dict = field(default_factory=dict)  # extra keyword arguments for get_task
    chat_template: str = "auto"  # auto (when the tokenizer has one) | true | false
    system_prompt: Optional[str] = None  # a first system message (chat) or line (plain text)


@dataclass
class RewardConfig:
    name: Optional[str] = None  # None = the task's default reward
    options: dict = field(default_factory=dict)  # keyword arguments for get_reward
    noise_sigma: float = 0.0
    overlong_penalty: float = 0.0  # DAPO soft overlong punishment factor (0 = off)
    overlong_buffer: int = 4  # tokens before max_new_tokens where the penalty ramps up
    timeout: float = 10.0  # seconds per sample and reward function; over it the sample scores 0 (counted)


@dataclass
class ObjectiveConfig:
    """Which objective to train with: a preset (``name``), optionally with some axes swapped.

    An axis left at None keeps the preset's entry. ``<axis>_options`` are keyword options of the
    selected entry (``shaping_options: {pos_power: 0.7}``); the entry's signature holds their
    defaults and names the valid ones. Any other key under ``objective`` in YAML or on the
    command line (``objective.beta: 0.1``, ``--objective.clip_low 0.3``) is a flat objective
    hyperparameter and lands in ``overrides``; ``ratiorl.objective()`` checks it.
    """

    name: str = "grpo"  # preset name (`ratiorl objectives` lists them)
    weight: Optional[str] = None  # None = the preset's
    weight_options: dict = field(default_factory=dict)
    shaping: Optional[str] = None
    shaping_options: dict = field(default_factory=dict)
    rule: Optional[str] = None
    rule_options: dict = field(default_factory=dict)
    aggregation: Optional[str] = None
    aggregation_options: dict = field(default_factory=dict)
    kl_estimator: Optional[str] = None
    kl_estimator_options: dict = field(default_factory=dict)
    kl_placement: Optional[str] = None
    token_selection: Optional[str] = None  # which tokens train: none | top_entropy | opsm | clip_cov | kl_cov
    token_selection_options: dict = field(default_factory=dict)
    advantage: Optional[str] = None  # None = the preset's default (obj.advantage)
    advantage_options: dict = field(default_factory=dict)  # e.g. {gamma: 1.0, lam: 0.95}
    kl_controller: str = "fixed"  # fixed | primal_dual | adaptive
    kl_target: float = 0.01
    kl_lr: float = 0.1  # primal_dual step size
    kl_horizon: int = 10000  # adaptive controller horizon
    overrides: dict = field(default_factory=dict)  # flat hyperparameters: ratiorl.objective(name, **overrides)


@dataclass
class CriticConfig:
    """Used by advantage methods `gae` / `gae_length_adaptive` (the `ppo` preset)."""

    lr: float = 1e-3
    value_coef: float = 0.5
    value_clip: float = 0.2  # PPO value clipping (0 = off)
    kl_coef: float = 0.05  # in-reward KL penalty coefficient (per token, k1 vs reference)
    whiten_advantages: bool = True  # normalise GAE advantages over the batch's tokens
    pretrain_steps: int = 0  # VAPO value pretraining: critic-only steps on Monte Carlo returns before step 1


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 = no clipping
    schedule: str = "constant"  # constant | linear | cosine
    warmup_steps: int = 0  # in optimizer updates
    min_lr_ratio: float = 0.0  # final lr / lr for linear and cosine


@dataclass
class TrainLoopConfig:
    steps: int = 100  # rollout batches (one "step" = one rollout batch and its updates)
    epochs: int = 1  # passes over each rollout batch
    mini_batches: int = 1  # optimizer updates per epoch; the batch is split on group boundaries
    grad_accum: int = 1  # micro-batches per mini-batch (also on group boundaries)
    count_scope: str = "rollout"  # num_tokens/num_sequences of the whole rollout | "mini_batch"
    dynamic_sampling: bool = False  # DAPO: drop groups with zero reward variance and refill
    max_sampling_tries: int = 4  # rollouts per step at most when refilling
    nll_coef: float = 0.0  # VAPO: coef x NLL of the samples whose reward >= nll_threshold (0 = off)
    nll_threshold: float = 1.0
    pf_ppo: Optional[str] = None  # PF-PPO resampling by reward: pow | max_min | max_random (None = off)
    pf_ppo_pow: float = 2.0  # the power of |R| for pf_ppo=pow
    # under torchrun: ddp (full model per rank, gradients summed over ranks) | fsdp (FSDP2: weights,
    # gradients and optimizer state sharded over ranks, weights gathered for the rollout; docs/scale.md)
    parallel: str = "ddp"
    # None | "bfloat16": the policy's (and reference's) forward and backward run under
    # torch.autocast(device_type, bfloat16), the lean head's matmuls in bf16 (its log-softmax /
    # entropy / KL in float32), attention in fp32 on CPU; master weights, gradients and optimizer
    # state stay in the model's dtype (fp32). (With LoRA, model.dtype: bfloat16 also keeps the
    # trained adapters and their optimizer state in fp32: peft upcasts them.)
    autocast: Optional[str] = None
    # at most this many length buckets in the training forward (1 = off): rows are sorted by
    # completion length and each bucket is trimmed to its longest completion, so no padding is
    # computed; the split is chosen by a cost model (one bucket at tiny sizes)
    length_buckets: int = 4


@dataclass
class EvalConfig:
    every: int = 10  # steps between evaluations (0 = only before and after training)
    num_prompts: int = 64  # eval prompts (first n of the eval split)
    k: int = 4  # samples per prompt for avg@k and pass@k
    temperature: Optional[float] = None  # None = rollout temperature
    greedy: bool = True  # also report greedy (temperature 0) accuracy
    before: bool = True  # evaluate at step 0
    headline: str = "avg@k"  # which number summary.json calls eval_accuracy: avg@k | greedy | pass@k
    reward: Optional[str] = None  # the reward that decides "correct" (None = the run's first reward)
    threshold: float = 1.0  # a sample is correct when that reward is >= threshold


@dataclass
class CheckpointConfig:
    every: int = 50  # steps between checkpoints (0 = only at the end and on Ctrl-C)
    keep_last: int = 2
    save_hf: bool = True  # also write checkpoint/model in Hugging Face format (save_pretrained)
    save_final_model: bool = True  # run_dir/model with save_pretrained


@dataclass
class LoggingConfig:
    progress: bool = True  # rich progress bar
    console_every: int = 0  # print a metrics line every n steps (0 = never)
    tensorboard: bool = True
    plots: bool = True
    diagnostics: bool = True  # cheap scalars from ratiorl.report.diagnostics


@dataclass
class TrainConfig:
    seed: int = 0
    out_dir: str = "runs/default"
    threads: Optional[int] = None  # torch CPU threads for the run (None = torch's default)
    # modules or .py files imported before anything is built, so that what they register
    # (@WEIGHTS.register("my_weight"), rewards, tasks, ...) can be named in the config
    plugins: list = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    # several rewards: [{name, weight, options}, ...]; total = weighted sum (replaces reward.name)
    rewards: list = field(default_factory=list)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)  # how `model.auto_create` / `ratiorl sft` build the model
