#!/usr/bin/env python
"""Seconds per RL step: ratiorl's trainer against TRL 1.16's GRPOTrainer, same work.

Both libraries load the same tiny GPT-2-style model (char-level tokenizer) from one temporary
directory and run the same GRPO step: P prompts of the addition task x G completions of at most
L new tokens sampled at temperature 1, an exact-match reward (the same Python function for both),
group-normalised advantages, the token-ratio clipped objective with per-sequence token-mean
aggregation (TRL ``loss_type="grpo"``, ratiorl preset ``grpo``), beta = 0 (no reference model),
``num_iterations`` optimizer updates per rollout batch in one mini-batch, AdamW at the same
learning rate, fp32 on CPU.

The two run interleaved: TRL's ``Trainer.train()`` runs in a background thread and a
``TrainerCallback`` parks it after each block of steps, while the main thread runs a block of
ratiorl steps; the starting library alternates between rounds. A step is timed from
``on_step_begin`` to ``on_step_end`` for TRL (generation, reward, loss, backward, optimizer) and
around ``Trainer.step()`` for ratiorl. With ``--num-iterations k > 1`` one "RL step" is a full
cycle: one rollout batch and its k optimizer updates (k TRL optimizer steps, one ratiorl
``step()``).

Usage::

    python benchmarks/vs_trl.py                      # defaults: 16 prompts x 8, 8 tokens
    python benchmarks/vs_trl.py --rounds 8 --block 6 --num-iterations 2
    python benchmarks/vs_trl.py --profile            # also cProfile a few ratiorl steps

Both run with one intra-op thread by default (``--threads``). On a shared CPU, two OpenMP
threads per process under load turn every tiny kernel into a wait for a descheduled thread
(the sampling loop was 14x slower with 2 threads than with 1 here), which swamps what is being
compared. ``--threads 0`` keeps torch's default, for a quiet machine.

The last line printed is ``speedup=<trl_s_per_step / ratiorl_s_per_step>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import typing
import warnings

import torch

# --------------------------------------------------------------------------------------------
# set-up shared by both libraries
# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=16, help="prompts per RL step")
    p.add_argument("--num-generations", "-G", type=int, default=8, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=8, help="completion length limit")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (both)")
    p.add_argument("--num-iterations", type=int, default=1,
                   help="optimizer updates per rollout batch (TRL num_iterations, ratiorl epochs)")
    p.add_argument("--n-layer", type=int, default=4, help="4 x 128 gives ~0.84M parameters")
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (after warm-up)")
    p.add_argument("--block", type=int, default=6, help="RL steps per library per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed RL steps per library first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads for both libraries (0: torch's default). One thread by "
                        "default: on a machine shared with other jobs, OpenMP threads waiting for each "
                        "other make every small kernel slow and the timings meaningless")
    p.add_argument("--profile", action="store_true",
                   help="after the timing, cProfile --profile-steps ratiorl steps and print the top")
    p.add_argument("--profile-steps", type=int, default=10)
    p.add_argument("--ratiorl-override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra ratiorl.train.load_config override, e.g. logging.diagnostics=false")
    p.add_argument("--only", choices=["both", "ratiorl", "trl"], default="both",
                   help="run one side only (no speedup line unless both)")
    args = p.parse_args(argv)
    if args.num_iterations < 1:
        p.error("--num-iterations must be >= 1")
    if args.num_generations < 2:
        p.error("--num-generations must be >= 2 (GRPO needs a group)")
    return args


def build_model(save_dir, args):
    """Save the shared tiny model (``ratiorl.policy.make_tiny_model``) to ``save_dir``."""
    from ratiorl.policy import make_tiny_model

    model, _tok = make_tiny_model(save_dir, n_layer=args.n_layer, n_embd=args.n_embd,
                                  n_head=args.n_head, seed=args.seed)
    return sum(p.numel() for p in model.parameters())


def build_prompts(args):
    """The addition task's training rows, as the ratiorl trainer builds them (same seed)."""
    from ratiorl.tasks import get_task

    task = get_task("addition", seed=args.seed)
    return [{"prompt": r["prompt"], "answer": str(r["answer"])} for r in task.train]


def get_shared_reward():
    """ratiorl's exact-match reward: the ratiorl trainer uses it by name, TRL calls it directly."""
    from ratiorl.rewards import get_reward

    return get_reward("exact_match")


def make_trl_reward(fn):
    """TRL calls reward_funcs(prompts=..., completions=..., completion_ids=..., **dataset_columns)."""

    def exact_match(prompts, completions, answer, **kwargs):
        return [float(x) for x in fn(completions, prompts=prompts, answers=answer)]

    return exact_match


# --------------------------------------------------------------------------------------------
# TRL side: GRPOTrainer in a background thread, parked between blocks by a callback
# --------------------------------------------------------------------------------------------


class _Gate:
    """Lets the TRL thread run exactly `budget` optimizer steps, then parks it."""

    def __init__(self):
        self.cv = threading.Condition()
        self.budget = 0
        self.stop = False
        self.parked = False
        self.error = None
        self.finished = False

    def wait_for_budget(self):  # TRL thread
        with self.cv:
            self.parked = True
            self.cv.notify_all()
            self.cv.wait_for(lambda: self.budget > 0 or self.stop)
            self.parked = False
            return not self.stop

    def run(self, n):  # main thread: let n steps run and wait until they are done
        with self.cv:
            self.cv.wait_for(lambda: self.parked or self.finished)
            if self.finished:
                raise RuntimeError(f"TRL thread ended early: {self.error!r}")
            self.budget = n
            self.cv.notify_all()
            self.cv.wait_for(lambda: (self.parked and self.budget == 0) or self.finished)
            if self.error is not None:
                raise RuntimeError("TRL training failed") from self.error

    def shutdown(self):
        with self.cv:
            self.stop = True
            self.cv.notify_all()


class PhaseClock:
    """Per-step seconds spent inside wrapped methods, by phase name."""

    def __init__(self):
        self.cur: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []

    def wrap(self, obj, attr, phase):
        fn = getattr(obj, attr)
        cur = self  # the dict is replaced at every step, so look it up at call time

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                cur.cur[phase] = cur.cur.get(phase, 0.0) + time.perf_counter() - t0

        setattr(obj, attr, timed)

    def begin(self):
        self.cur = {}

    def end(self, total):
        self.cur["total"] = total
        self.steps.append(self.cur)
        self.cur = {}


class TRLSide:
    name = "trl"

    def __init__(self, model_dir, rows, args, out_dir, reward_fn):
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer

        self.args = args
        self.k = args.num_iterations
        self.gate = _Gate()
        self.step_times: list[float] = []
        self.clock = clock = PhaseClock()
        gate, times = self.gate, self.step_times

        class Timer(TrainerCallback):
            def on_train_begin(self, a, state, control, **kw):
                if not gate.wait_for_budget():
                    control.should_training_stop = True

            def on_step_begin(self, a, state, control, **kw):
                clock.begin()
                self.t0 = time.perf_counter()

            def on_step_end(self, a, state, control, **kw):
                times.append(time.perf_counter() - self.t0)
                clock.end(times[-1])
                with gate.cv:
                    gate.budget -= 1
                if gate.budget == 0 and not gate.wait_for_budget():
                    control.should_training_stop = True

        total_steps = (args.warmup + args.rounds * args.block) * self.k + 1
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
            bf16=False,
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
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        tokenizer.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        dataset = Dataset.from_list(rows)
        self.trainer = GRPOTrainer(model=model, reward_funcs=make_trl_reward(reward_fn), args=config,
                                   train_dataset=dataset, processing_class=tokenizer,
                                   callbacks=[Timer()])
        # phase clocks (instance attributes shadow the class methods; one call each per step)
        clock.wrap(self.trainer, "_generate", "generate")
        clock.wrap(self.trainer, "_calculate_rewards", "reward")
        clock.wrap(self.trainer, "compute_loss", "forward+loss")
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        for cb in (PrinterCallback, ProgressCallback):  # no console output from TRL's loop
            self.trainer.remove_callback(cb)
        self.thread = threading.Thread(target=self._train, name="trl-train", daemon=True)
        self.thread.start()

    def _train(self):
        try:
            self.trainer.train()
        except BaseException as e:  # reported to the main thread by the gate
            self.gate.error = e
        finally:
            with self.gate.cv:
                self.gate.finished = True
                self.gate.cv.notify_all()

    def run_block(self, n_rl_steps):
        """Run n RL steps; returns their durations (a cycle of k optimizer steps each)."""
        start = len(self.step_times)
        self.gate.run(n_rl_steps * self.k)
        t = self.step_times[start:]
        return [sum(t[i:i + self.k]) for i in range(0, len(t), self.k)]

    def phase_steps(self, n_rl_steps):
        """Phase seconds of the last n RL steps (each summed over its k optimizer steps)."""
        st = self.clock.steps[-n_rl_steps * self.k:] if n_rl_steps else []
        out = []
        for i in range(0, len(st), self.k):
            d: dict[str, float] = {}
            for x in st[i:i + self.k]:
                for key, v in x.items():
                    d[key] = d.get(key, 0.0) + v
            out.append(d)
        return out

    def close(self):
        self.gate.shutdown()
        self.thread.join(timeout=60)


# --------------------------------------------------------------------------------------------
# ratiorl side
# --------------------------------------------------------------------------------------------


class _TimedProxy:
    """Times calls of a callable object; every other attribute goes to the object."""

    def __init__(self, target, clock, phase):
        self.__dict__.update(_target=target, _clock=clock, _phase=phase)

    def __call__(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return self._target(*a, **kw)
        finally:
            c = self._clock.cur
            c[self._phase] = c.get(self._phase, 0.0) + time.perf_counter() - t0

    def __getattr__(self, name):
        return getattr(self._target, name)


class RatiorlSide:
    name = "ratiorl"

    def __init__(self, model_dir, args, out_dir):
        from ratiorl import train as rtrain

        self.args = args
        overrides, self.skipped = ratiorl_overrides(model_dir, args, out_dir)
        overrides += list(args.ratiorl_override)
        self.overrides = overrides
        self.config = rtrain.load_config(None, overrides)
        self.trainer = rtrain.Trainer(self.config)
        self.clock = PhaseClock()
        tr = self.trainer
        engines = {id(e): e for e in (getattr(tr, "engine", None),) if e is not None}
        for e in engines.values():
            self.clock.wrap(e, "generate", "generate")
        if callable(getattr(tr, "scorer", None)):
            self.clock.wrap(tr, "scorer", "reward")
        if getattr(tr, "policy", None) is not None:
            self.clock.wrap(tr.policy, "completion_stats", "forward+loss")
        if callable(getattr(tr, "obj", None)):
            tr.obj = _TimedProxy(tr.obj, self.clock, "forward+loss")

    def run_block(self, n_rl_steps):
        out = []
        for _ in range(n_rl_steps):
            self.clock.begin()
            t0 = time.perf_counter()
            self.trainer.step()
            out.append(time.perf_counter() - t0)
            self.clock.end(out[-1])
        return out

    def phase_steps(self, n_rl_steps):
        return self.clock.steps[-n_rl_steps:] if n_rl_steps else []

    def close(self):
        close = getattr(self.trainer, "close", None)
        if callable(close):
            close()


def ratiorl_overrides(model_dir, args, out_dir):
    """Dotted-key overrides for ``ratiorl.train.load_config`` matching the TRL config.

    Keys that the installed TrainConfig lacks are skipped (and reported) rather than fatal, so the
    benchmark keeps working while the config evolves.
    """
    from ratiorl.train import config as rconfig

    wanted = [
        ("model.path", model_dir),
        ("model.auto_create", "false"),
        ("model.device", "cpu"),
        ("model.dtype", "float32"),
        ("out_dir", out_dir),
        ("seed", args.seed),
        ("task.name", "addition"),
        ("reward.name", "exact_match"),
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
    overrides, skipped = [], []
    for key, value in wanted:
        node, ok = rconfig.TrainConfig, True
        parts = key.split(".")
        for i, part in enumerate(parts):
            if key.startswith("objective.") and i == 1:
                break  # objective hyperparameters are checked by ratiorl.objective()
            hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
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


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:
        pass
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    tmp = tempfile.TemporaryDirectory(prefix="ratiorl_vs_trl_")
    model_dir = os.path.join(tmp.name, "model")
    os.makedirs(model_dir)
    n_params = build_model(model_dir, args)
    rows = build_prompts(args)
    reward_fn = get_shared_reward()

    print("ratiorl vs TRL GRPOTrainer: seconds per RL step (lower is better)")
    print(f"  model          ratiorl.policy.make_tiny_model: GPT-2, char tokenizer, {n_params:,} "
          f"parameters (n_layer={args.n_layer}, n_embd={args.n_embd}, n_head={args.n_head})")
    print(f'  prompts        ratiorl.tasks.get_task("addition"): {len(rows)} training rows, e.g. '
          f"{rows[0]['prompt']!r} -> {rows[0]['answer']!r}")
    print(f"  step           {args.num_prompts} prompts x G={args.num_generations}, "
          f"max_new_tokens={args.max_new_tokens}, temperature=1.0, objective grpo "
          f"(token ratio, clip 0.2, seq-mean-token-mean), beta=0, lr={args.lr}, "
          f"num_iterations={args.num_iterations}, 1 mini-batch")
    print('  reward         ratiorl.rewards.get_reward("exact_match"), called by both')
    print(f"  schedule       {args.warmup} warm-up + {args.rounds} rounds x {args.block} steps each, "
          f"interleaved; torch {torch.__version__}, {torch.get_num_threads()} threads")
    sys.stdout.flush()

    sides = []
    try:
        if args.only in ("both", "ratiorl"):
            side = RatiorlSide(model_dir, args, os.path.join(tmp.name, "ratiorl"))
            print(f"  ratiorl config {' '.join(side.overrides)}")
            if side.skipped:
                print(f"  (keys not in ratiorl's TrainConfig, skipped: {', '.join(side.skipped)})")
            sides.append(side)
        if args.only in ("both", "trl"):
            side = TRLSide(model_dir, rows, args, os.path.join(tmp.name, "trl"), reward_fn)
            print("  trl config     GRPOConfig(per_device_train_batch_size="
                  f"{args.num_prompts * args.num_generations}, num_generations={args.num_generations}, "
                  f"max_completion_length={args.max_new_tokens}, learning_rate={args.lr}, beta=0, "
                  f"num_iterations={args.num_iterations}, loss_type='grpo', epsilon=0.2, "
                  "scale_rewards='group', temperature=1.0, lr_scheduler_type='constant', "
                  "gradient_checkpointing=False, bf16=False, disable_dropout=True, use_cpu=True)")
            sides.append(side)

        if args.threads and torch.get_num_threads() != args.threads:  # in case a library changed it
            torch.set_num_threads(args.threads)
        times = {s.name: [] for s in sides}
        phases = {s.name: [] for s in sides}
        for s in sides:  # warm-up (not timed)
            s.run_block(args.warmup)
        for r in range(args.rounds):
            order = sides if r % 2 == 0 else sides[::-1]
            for s in order:
                times[s.name].extend(s.run_block(args.block))
                phases[s.name].extend(s.phase_steps(args.block))

        print()
        print(f"  {'library':<10}{'median s/step':>15}{'p25':>10}{'p75':>10}{'steps':>8}")
        med = {}
        for s in sides:
            t = times[s.name]
            med[s.name] = statistics.median(t)
            print(f"  {s.name:<10}{med[s.name]:>15.4f}{_pct(t, 0.25):>10.4f}{_pct(t, 0.75):>10.4f}"
                  f"{len(t):>8}")
        print()
        print_phases(sides, phases)
        print()
        if args.profile and args.only != "trl":
            profile_ratiorl(sides[0], args)
        if "trl" in med and "ratiorl" in med:
            print(f"speedup={med['trl'] / med['ratiorl']:.3f}")
    finally:
        for s in sides:
            try:
                s.close()
            except Exception:
                pass
        tmp.cleanup()


def print_phases(sides, phases):
    """Median seconds per phase; "backward+optim+rest" is the step minus the timed phases."""
    names = ["generate", "reward", "forward+loss", "backward+optim+rest"]
    print("  median seconds per phase (forward+loss: policy forward + objective; the rest of the step:")
    print("  backward, clipping, optimizer, metrics, diagnostics, library overhead)")
    print(f"  {'library':<10}" + "".join(f"{n:>21}" for n in names))
    for s in sides:
        rows = phases[s.name]
        if not rows:
            continue
        for r in rows:
            r["backward+optim+rest"] = r["total"] - sum(r.get(n, 0.0) for n in names[:3])
        cells = []
        for n in names:
            vals = [r.get(n, 0.0) for r in rows]
            cells.append(f"{statistics.median(vals):>21.4f}")
        print(f"  {s.name:<10}" + "".join(cells))


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
    main()
