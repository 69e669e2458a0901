"""`ratiorl` command line: a thin layer over ratiorl.train, ratiorl.lab and ratiorl.report.

    ratiorl sft [--out DIR]                         tiny default model, warm-started on addition
    ratiorl train --config examples/snib.yaml [--objective.beta 0.05 ...] [--resume | --overwrite]
    ratiorl eval --model RUN_OR_MODEL [--config CFG] [--task jsonl --task.path F] [--eval.k 8 ...]
    ratiorl demo [--out DIR]                        SFT then RL with snib; accuracy before/after
    ratiorl lab [--out DIR]                         exact-gradient estimator study
    ratiorl study STUDY.yaml --out DIR [--jobs N]   a grid of runs over seeds, with intervals and a report
    ratiorl compare RUN_DIR... --out PNG            learning curves of several runs in one figure
    ratiorl report RUN_DIR                          markdown + HTML summary of a run
    ratiorl objectives                              the objective presets
    ratiorl config --show [--config X] [overrides]  the full resolved config as YAML

Every sub-command takes ``--plugins a,b.py``: modules or .py files imported first, so that what
they register (weights, shapings, rewards, tasks, ...) can be named. For the commands that read a
config (train, demo, sft, config) it sets the config's ``plugins`` key. ``python -m ratiorl``
runs the same command line.

User errors (bad config keys or values, missing files, unknown names) print one line and exit
with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _console():
    from rich.console import Console  # noqa: PLC0415

    return Console(stderr=True)


# ----------------------------------------------------------------------------- commands


def cmd_sft(args, extra):
    from ratiorl.train.config import DEFAULT_MODEL_PATH, load_config  # noqa: PLC0415
    from ratiorl.train.sft import run_sft  # noqa: PLC0415

    # the `sft:` section of a config (default: the built-in defaults) plus --sft.key overrides
    overrides = [a if not a.startswith("--") or a.startswith("--sft.") else "--sft." + a[2:] for a in extra]
    cfg = load_config(args.config, overrides + _plugin_override(args))
    out = args.out or DEFAULT_MODEL_PATH
    console = _console()
    console.print(f"SFT of the tiny model on {cfg.sft.task} for {cfg.sft.steps} steps -> {out}")
    every = max(1, cfg.sft.steps // 10)
    res = run_sft(out, cfg.sft, progress=lambda s, n, loss: console.print(f"  step {s}/{n} loss {loss:.3f}")
                  if s % every == 0 else None)
    print(json.dumps(res))


def cmd_train(args, extra):
    from ratiorl.train import load_config, train  # noqa: PLC0415

    cfg = load_config(args.config, extra + _plugin_override(args))
    summary = train(cfg, resume=args.resume, overwrite=args.overwrite, console=_console())
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 prints the summary
        print(json.dumps(summary, indent=2))


def cmd_eval(args, extra):
    from ratiorl.train.evaluate import evaluate_run  # noqa: PLC0415

    # the short flags are config keys; anything else (--task.options.n_digits 1, --eval.reward x) too
    short = {"task": "task.name", "k": "eval.k", "num_prompts": "eval.num_prompts", "temperature": "eval.temperature",
             "max_new_tokens": "rollout.max_new_tokens", "seed": "seed", "device": "model.device"}
    overrides = [f"--{key}={getattr(args, a)}" for a, key in short.items() if getattr(args, a) is not None]
    out = evaluate_run(args.model, args.config, overrides + extra + _plugin_override(args), out_dir=args.out,
                       console=_console())
    print(json.dumps(out, indent=2))


def cmd_demo(args, extra):
    from ratiorl.train.demo import run_demo  # noqa: PLC0415

    s = run_demo(args.out, config_path=args.config, overrides=extra + _plugin_override(args), console=_console())
    print(json.dumps(s, indent=2))
    print(f"\nheadline metric: {s['eval_metric']}")
    print(f"eval accuracy before RL (after SFT): {s['eval_accuracy_before']:.3f}")
    print(f"eval accuracy after RL ({s['objective']}, {s['steps']} steps): {s['eval_accuracy_after']:.3f} "
          f"({s['eval_accuracy_gain_points']:+.1f} points)")
    for key in sorted(s):
        if key.endswith("_before") and key != "eval_accuracy_before" and s[key] is not None:
            name = key[: -len("_before")]
            print(f"  {name}: {s[key]:.3f} -> {s[name + '_after']:.3f}")
    print(f"wall time: {s['wall_seconds']:.0f} s (SFT {s['sft_seconds']:.0f} s, RL {s['rl_seconds']:.0f} s)")


def cmd_lab(args, extra):
    from ratiorl.lab import run_lab  # noqa: PLC0415
    from ratiorl.train.config import parse_overrides, parse_value  # noqa: PLC0415

    kw = {k: parse_value(v) for k, v in parse_overrides(extra)}
    out = run_lab(args.out, seed=args.seed, quick=args.quick, **kw)
    brief = {k: v for k, v in out.items() if k not in ("rows",)}
    print(json.dumps(brief, indent=2, default=str))


def cmd_study(args, extra):
    from ratiorl.study.command import main as study_main  # noqa: PLC0415

    args.overrides = list(args.overrides) + extra  # `ratiorl study X --train.steps 4` as `--set train.steps=4`
    return study_main(args)


def cmd_compare(args, extra):
    from ratiorl.report.plots import compare_runs  # noqa: PLC0415

    if extra:
        raise ValueError(f"unknown arguments for compare: {' '.join(extra)}")
    path = compare_runs(args.runs, args.out)
    print(path)


def cmd_report(args, extra):
    from ratiorl.report.html import write_report  # noqa: PLC0415

    if extra:
        raise ValueError(f"unknown arguments for report: {' '.join(extra)}")
    paths = write_report(args.run, args.out)
    print("\n".join(paths))


def cmd_objectives(args, extra):
    import ratiorl  # noqa: PLC0415
    from ratiorl.objectives import PRESETS, SHAPINGS  # noqa: PLC0415

    if extra:
        raise ValueError(f"unknown arguments for objectives: {' '.join(extra)}")
    from ratiorl.objectives.options import PLAIN_FIELDS  # noqa: PLC0415

    header = ("name", "weight", "shaping", "aggregation", "advantage", "KL (beta est placement)", "axes set",
              "source")
    rows = [header]
    for name in ratiorl.available_objectives():
        o = ratiorl.objective(name)
        # what to show is read from the selected entries: a rule if the shaping uses one,
        # the clip range if the shaping takes clip_low/clip_high
        shaping = o.shaping + (f"/{o.rule}" if getattr(SHAPINGS.get(o.shaping), "uses_rule", False) else "")
        opts = o.options("shaping")
        if "clip_low" in opts and "clip_high" in opts:
            shaping += f" {opts['clip_low']}/{opts['clip_high']}"
        kl = f"{o.beta} {o.kl_estimator} {o.kl_placement}" if o.beta > 0 else "0"
        src = getattr(PRESETS[name], "source", "") if name in PRESETS else ""
        if not getattr(o.entry("token_selection"), "identity", False):
            shaping += f" +{o.token_selection}"
        fields = getattr(PRESETS[name], "fields", {}) if name in PRESETS else {}
        axes = ",".join(k for k in PLAIN_FIELDS if k in fields)  # the axes and fields the preset sets
        rows.append((name, o.weight, shaping, o.aggregation, o.advantage, kl, axes, src))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def cmd_config(args, extra):
    from ratiorl.train.config import config_to_yaml, load_config  # noqa: PLC0415

    cfg = load_config(args.config, extra + _plugin_override(args))
    print(config_to_yaml(cfg), end="")


def _plugin_override(args) -> list:
    """--plugins given to a command that reads a config sets the config's `plugins` key."""
    return [f"plugins={args.plugins}"] if args.plugins is not None else []


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ratiorl", description="RL post-training of LMs with principled importance sampling")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("sft", help="create the tiny default model and warm-start it with SFT", allow_abbrev=False)
    s.add_argument("--out", default=None, help="output folder (default runs/tiny-sft)")
    s.add_argument("--config", default=None, help="YAML whose `sft:` section to use (e.g. examples/demo.yaml)")
    s.set_defaults(fn=cmd_sft)

    s = sub.add_parser("train", help="RL training from a YAML config plus --section.key value overrides", allow_abbrev=False)
    s.add_argument("--config", default=None, help="YAML config (examples/*.yaml)")
    s.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    s.add_argument("--overwrite", action="store_true",
                   help="out_dir holds a run: move it aside to <out_dir>.old-<timestamp> and start fresh")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("eval", help="avg@k / pass@k / greedy accuracy of a saved model", allow_abbrev=False)
    s.add_argument("--model", required=True, help="a run folder (its model/ and config.yaml), a model folder, "
                   "a LoRA adapter folder, pkg:<package> or a hub name")
    s.add_argument("--config", default=None, help="YAML config whose task/reward/eval to use (default: the run's)")
    s.add_argument("--out", default=None, help="output folder (default RUN/eval, else runs/eval)")
    s.add_argument("--task", default=None, help="task.name (a built-in task, jsonl or hf with --task.path)")
    s.add_argument("--k", type=int, default=None, help="eval.k")
    s.add_argument("--num-prompts", type=int, default=None, help="eval.num_prompts")
    s.add_argument("--temperature", type=float, default=None, help="eval.temperature (default: the rollout's)")
    s.add_argument("--max-new-tokens", type=int, default=None, help="rollout.max_new_tokens")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--device", default=None, help="model.device")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("demo", help="SFT warm start then RL with snib on addition (a few minutes on CPU)", allow_abbrev=False)
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--config", default=None, help="default: examples/demo.yaml")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("lab", help="exact-gradient estimator study (bias, variance, MSE)", allow_abbrev=False)
    s.add_argument("--out", default="runs/lab")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quick", action="store_true", help="small sweeps (smoke run)")
    s.set_defaults(fn=cmd_lab)

    s = sub.add_parser("study", help="a grid of runs (settings x seeds) compared with confidence intervals",
                       allow_abbrev=False)
    from ratiorl.study.command import add_arguments as add_study_arguments  # noqa: PLC0415

    add_study_arguments(s)
    s.set_defaults(fn=cmd_study)

    s = sub.add_parser("compare", help="learning curves of several run folders in one PNG", allow_abbrev=False)
    s.add_argument("runs", nargs="+")
    s.add_argument("--out", default="compare.png")
    s.set_defaults(fn=cmd_compare)

    s = sub.add_parser("report", help="markdown + HTML summary of a run folder", allow_abbrev=False)
    s.add_argument("run")
    s.add_argument("--out", default=None, help="folder for report.md/report.html (default: the run folder)")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("objectives", help="print the objective presets", allow_abbrev=False)
    s.set_defaults(fn=cmd_objectives)

    s = sub.add_parser("config", help="print the full resolved config (defaults <- YAML <- overrides) as YAML",
                       allow_abbrev=False)
    s.add_argument("--config", default=None, help="YAML config (examples/*.yaml)")
    s.add_argument("--show", action="store_true", help="print the resolved config (the default action)")
    s.set_defaults(fn=cmd_config)

    for s in sub.choices.values():
        s.add_argument("--plugins", default=None, metavar="A,B.py",
                       help="modules or .py files to import first (comma-separated)")
    return p


def _quiet_transformers() -> None:
    """Our own progress bars and lines say what happens; hide transformers' per-load/save bars
    and advisory log lines (errors still show)."""
    try:
        from transformers.utils import logging as hf_logging  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    _quiet_transformers()
    try:
        if args.plugins:
            from ratiorl.train.config import import_plugins  # noqa: PLC0415

            import_plugins(args.plugins)
        status = args.fn(args, extra)
    except (ValueError, FileNotFoundError) as e:
        print(f"ratiorl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ratiorl {args.command}: interrupted", file=sys.stderr)
        return 130
    return status if isinstance(status, int) else 0


def _exit_under_torchrun(code: int) -> None:
    """Under torchrun, leave without the interpreter's teardown once the run is written and the
    process group is closed: a rank now and then aborted there ("terminate called without an active
    exception", seen in about 1 of 20 launches with gloo on CPU, ddp and fsdp alike), which turned
    a finished run into a failed launch."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def entry() -> int:
    """The console script and ``python -m ratiorl``."""
    code = main()
    _exit_under_torchrun(code)
    return code


if __name__ == "__main__":
    sys.exit(entry())
