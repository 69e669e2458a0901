#!/usr/bin/env python
"""How ratiorl's and TRL's seconds per RL step and peak memory grow with completion length and
model size.

The step is ``vs_trl.py``'s (same GRPO configuration on both sides, fp32, CPU), on ratiorl's tiny
GPT-2 family (``make_tiny_model``, character tokenizer) with two sweeps:

- length: completion limits ``--lengths`` (default 64,128,256,512,1024) on the ``--length-model``
  (default 6 layers x 384, 10.8M parameters);
- size: models ``--sizes`` (default 4x128, 6x384, 12x768: about 0.8M, 10.8M and 85M parameters;
  ``LAYERSxWIDTH[xHEADS]``) at ``--size-length`` new tokens (default 64).

Every completion runs to the limit: the model is edited so that EOS can never be drawn (the final
LayerNorm's output dimension 0 is the constant 1, and the tied embedding's column 0 is 0 for every
token but EOS, -1000 for EOS: EOS's logit is always -1000, every other logit is the same function
of the hidden state as before). The table reports the mean completion length next to the limit,
so this is checked, not assumed.

Each (library, model, length) cell runs in a fresh Python process (``--cell``, internal): the
library's trainer is built (TRL's in a child of that process: ``vs_trl.TRLSide``), ``--warmup``
steps run untimed, then ``--steps`` timed steps. Peak memory is the ``ru_maxrss`` of the process
that trains (the resident-set high-water mark; it includes the Python runtime, torch, and the
library's imports), reported with its resident set once its trainer is built, before the first step, so that the growth during training can be read off. With ``--roofline`` each cell also
measures the matmul rate of its model at its shapes (``benchmarks/roofline.py``) and reports the
sampling and training fractions; without it the table still shows the achieved model GFLOP/s.

Usage::

    python benchmarks/scaling.py --quick                      # smoke: a tiny grid, seconds
    python benchmarks/scaling.py                              # the full grid (long: a quiet machine)
    python benchmarks/scaling.py --lengths 64,256,1024 --sizes 4x128,6x384 --steps 2 --out scaling.png

Output: a table on stdout and a PNG (``--out``) with three panels: seconds per step against
completion length, seconds per step against parameters, peak memory against completion length
(log axes). The last line is ``scaling_exponent=<ratiorl's slope of log s/step on log length>``
(1.0 = linear in the length).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

LIBS = ("ratiorl", "trl")


def parse_size(text):
    """``"6x384"`` -> (6, 384, 6); ``"6x384x12"`` -> (6, 384, 12). Default heads: width / 64
    (at least 4 when the width allows it)."""
    parts = [int(x) for x in str(text).lower().split("x")]
    if len(parts) == 2:
        layers, width = parts
        heads = max(width // 64, 1)
        if heads < 4 and width % 4 == 0:
            heads = 4
    elif len(parts) == 3:
        layers, width, heads = parts
    else:
        raise argparse.ArgumentTypeError(f"a size is LAYERSxWIDTH or LAYERSxWIDTHxHEADS, got {text!r}")
    if width % heads:
        raise argparse.ArgumentTypeError(f"{text}: width {width} is not divisible by {heads} heads")
    return layers, width, heads


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--lengths", default="64,128,256,512,1024", help="completion limits of the length sweep")
    p.add_argument("--length-model", default="6x384", help="model of the length sweep (LAYERSxWIDTH[xHEADS])")
    p.add_argument("--sizes", default="4x128,6x384,12x768", help="models of the size sweep")
    p.add_argument("--size-length", type=int, default=64, help="completion limit of the size sweep")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("-G", "--num-generations", type=int, default=4, help="completions per prompt")
    p.add_argument("--steps", type=int, default=3, help="timed steps per cell (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per cell first")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--libs", default="ratiorl,trl", help="libraries to run")
    p.add_argument("--roofline", action="store_true",
                   help="also measure each cell's matmul rate and report the fractions (slower)")
    p.add_argument("--out", default="scaling.png", help="the PNG")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: lengths 8,16, sizes 2x64,4x128, 2 prompts x 2, 1 step, no warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell (JSON) and print its result
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.sizes, args.size_length = "8,16", "2x64,4x128", 8
        args.length_model = "2x64"
        args.prompts, args.num_generations, args.steps, args.warmup = 2, 2, 1, 0
    args.lengths = [int(x) for x in str(args.lengths).split(",") if x]
    args.sizes = [parse_size(x) for x in str(args.sizes).split(",") if x]
    args.length_model = parse_size(args.length_model)
    args.libs = [x.strip() for x in str(args.libs).split(",") if x.strip()]
    bad = [x for x in args.libs if x not in LIBS]
    if bad:
        p.error(f"--libs: unknown {bad}; choose from {LIBS}")
    if args.num_generations < 2:
        p.error("-G must be >= 2 (GRPO needs a group)")
    return args


# --------------------------------------------------------------------------------------------
# one cell, in its own process
# --------------------------------------------------------------------------------------------


def never_eos(model, eos_id: int) -> None:
    """Edit a tiny GPT-2 (tied head) so that EOS is never sampled; see the module docstring."""
    import torch

    with torch.no_grad():
        ln_f = model.transformer.ln_f
        ln_f.weight[0] = 0.0
        ln_f.bias[0] = 1.0  # final hidden state: h[0] == 1 for every token
        wte = model.get_input_embeddings().weight  # tied to the output head
        wte[:, 0] = 0.0  # dimension 0 no longer moves any logit ...
        wte[eos_id] = 0.0
        wte[eos_id, 0] = -1000.0  # ... except EOS's: -1000 always


def run_cell(cell: dict) -> dict:
    warnings.filterwarnings("ignore")
    import roofline
    import torch
    import vs_trl

    vs_trl.quiet_transformers()
    from ratiorl.policy import make_tiny_model
    from ratiorl.tasks import get_task

    layers, width, heads = cell["size"]
    length = cell["length"]
    argv = ["--num-prompts", str(cell["prompts"]), "-G", str(cell["G"]), "--max-new-tokens", str(length),
            "--n-layer", str(layers), "--n-embd", str(width), "--n-head", str(heads),
            "--threads", str(cell["threads"]), "--warmup", str(cell["warmup"]), "--rounds", "1",
            "--block", str(cell["steps"]), "--seed", str(cell["seed"]), "--only", cell["lib"]]
    args = vs_trl.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    vs_trl.install_global_timers()
    with tempfile.TemporaryDirectory(prefix="ratiorl_scaling_") as tmp:
        model_dir = os.path.join(tmp, "model")
        model, tok = make_tiny_model(None, n_layer=layers, n_embd=width, n_head=heads,
                                     n_positions=cell.get("positions", length + 64), seed=args.seed)
        never_eos(model, tok.eos_token_id)
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        n_params = sum(p.numel() for p in model.parameters())
        del model
        rows = [{"prompt": r["prompt"], "answer": str(r["answer"])} for r in get_task("addition", seed=args.seed).train]
        setup = vs_trl.Setup(model_dir, None, rows, "exact_match", None, False, "tiny GPT-2, EOS never sampled")
        out_dir = os.path.join(tmp, cell["lib"])
        side = (vs_trl.RatiorlSide(setup, args, out_dir) if cell["lib"] == "ratiorl"
                else vs_trl.TRLSide(setup, args, out_dir))
        try:
            if args.threads and torch.get_num_threads() != args.threads:
                torch.set_num_threads(args.threads)
            side.run_block(args.warmup)
            t0 = time.perf_counter()
            times = side.run_block(args.block)
            wall = time.perf_counter() - t0
            phases = side.phase_steps(len(times))
            flops = side.flops
            model_ref = side.model if side.model is not None else vs_trl.roofline_model(setup)
            tot = vs_trl.merge_steps(phases)
            sampled, seqs = tot.get("#sampled", 0.0), tot.get("#sequences", 0.0)
            s_flops = flops.sampling_flops(sampled, tot.get("#prefill", 0.0))
            t_flops = flops.training_flops(tot.get("#trained", 0.0), tot.get("#trained_completion", 0.0))
            s_sec = tot.get("sampling", 0.0)
            t_sec = tot.get("forward", 0.0) + tot.get("backward", 0.0)
            res = {
                **cell, "params": n_params, "s_per_step": statistics.median(times), "steps_run": len(times),
                "wall": wall, "mean_length": sampled / seqs if seqs else float("nan"),
                # of the process that trains (TRL: a child of this one, vs_trl.TRLSide)
                "peak_rss_mib": side.peak_rss_mib, "rss_before_mib": side.ready_rss_mib,
                "sampling_s": s_sec / len(times), "training_s": t_sec / len(times),
                "sampling_gflops": s_flops / s_sec / 1e9 if s_sec else float("nan"),
                "training_gflops": t_flops / t_sec / 1e9 if t_sec else float("nan"),
            }
            if cell.get("roofline"):
                micro = tot.get("#max_micro_tokens", 1.0)
                rates = roofline.measure_rates(model_ref, {"sampling": cell["prompts"] * cell["G"],
                                                           "training": int(min(4096, micro))},
                                               dtypes=("float32",), threads=torch.get_num_threads())
                res["sampling_fraction"] = roofline.fraction(s_flops, s_sec, rates[("sampling", "float32")])
                res["training_fraction"] = roofline.fraction(t_flops, t_sec, rates[("training", "float32")])
        finally:
            side.close()
    return res


# --------------------------------------------------------------------------------------------
# the grid
# --------------------------------------------------------------------------------------------


def cells(args):
    """The cells to run; a (library, model, length) point shared by both sweeps runs once."""
    seen, out = {}, []
    # one position table for every cell, so a model has the same parameter count in both sweeps
    positions = max(args.lengths + [args.size_length]) + 64
    base = {"prompts": args.prompts, "G": args.num_generations, "steps": args.steps, "warmup": args.warmup,
                "threads": args.threads, "seed": args.seed, "roofline": args.roofline, "positions": positions}
    points = [(args.length_model, L) for L in args.lengths] + [(s, args.size_length) for s in args.sizes]
    for size, length in points:
        for lib in args.libs:
            key = (lib, tuple(size), length)
            if key not in seen:
                seen[key] = dict(base, lib=lib, size=list(size), length=length)
                out.append(seen[key])
    return out


def run_subprocess(cell):
    cmd = [sys.executable, os.path.abspath(__file__), "--cell", json.dumps(cell)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("CELL "):
            return json.loads(line[5:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return dict(cell, error=f"exit {proc.returncode}: " + " | ".join(tail))


def slope(xs, ys):
    """Least-squares slope of log y on log x (nan with fewer than two points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y and y > 0 and math.isfinite(y)]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else float("nan")


def print_table(results, roofline_on):
    head = (f"  {'library':<9}{'model':>10}{'params':>12}{'limit':>7}{'mean len':>9}{'s/step':>9}"
            f"{'sampling':>10}{'training':>10}{'samp GF/s':>10}{'train GF/s':>11}{'peak MiB':>10}{'+MiB':>8}")
    if roofline_on:
        head += f"{'samp frac':>10}{'train frac':>11}"
    print(head)
    for r in results:
        size = "x".join(str(x) for x in r["size"])
        if "error" in r:
            print(f"  {r['lib']:<9}{size:>10}{'':>12}{r['length']:>7}  failed: {r['error']}")
            continue
        line = (f"  {r['lib']:<9}{size:>10}{r['params']:>12,}{r['length']:>7}{r['mean_length']:>9.1f}"
                f"{r['s_per_step']:>9.3f}{r['sampling_s']:>10.3f}{r['training_s']:>10.3f}"
                f"{r['sampling_gflops']:>10.2f}{r['training_gflops']:>11.2f}{r['peak_rss_mib']:>10.0f}"
                f"{r['peak_rss_mib'] - r['rss_before_mib']:>8.0f}")
        if roofline_on:
            line += f"{r.get('sampling_fraction', float('nan')):>10.3f}{r.get('training_fraction', float('nan')):>11.3f}"
        print(line)


def plot(args, results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogFormatter, NullFormatter

    from ratiorl.study.palette import COLOURS, MARKERS

    style = {lib: {"color": COLOURS[i], "marker": MARKERS[i]} for i, lib in enumerate(LIBS)}
    ok = [r for r in results if "error" not in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    lm = list(args.length_model)
    for lib in args.libs:
        by_len = sorted((r for r in ok if r["lib"] == lib and r["size"] == lm and r["length"] in args.lengths),
                        key=lambda r: r["length"])
        by_size = sorted((r for r in ok if r["lib"] == lib and r["length"] == args.size_length
                          and tuple(r["size"]) in {tuple(s) for s in args.sizes}), key=lambda r: r["params"])
        if by_len:
            axes[0].plot([r["length"] for r in by_len], [r["s_per_step"] for r in by_len], label=lib, **style[lib])
            axes[2].plot([r["length"] for r in by_len], [r["peak_rss_mib"] for r in by_len], label=lib, **style[lib])
        if by_size:
            axes[1].plot([r["params"] for r in by_size], [r["s_per_step"] for r in by_size], label=lib, **style[lib])
    lm_text = "x".join(str(x) for x in lm)
    titles = [(f"seconds per step vs completion length\n(model {lm_text}, {args.prompts} prompts x G={args.num_generations})",
               "completion length (tokens, every completion runs to the limit)", "seconds per RL step"),
              (f"seconds per step vs model size\n({args.size_length} new tokens)", "parameters", "seconds per RL step"),
              (f"peak memory vs completion length\n(model {lm_text}, one process per point)",
               "completion length (tokens)", "peak resident set (MiB)")]
    plain = LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5))  # minor labels on short ranges only
    for ax, (title, xl, yl) in zip(axes, titles):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        xs = sorted({x for line in ax.lines for x in line.get_xdata()})
        if xs:  # ticks at the measured points
            ax.set_xticks(xs)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v / 1e6:.3g}M" if v >= 1e5 else f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.cell:
        res = run_cell(json.loads(args.cell))
        print("CELL " + json.dumps(res))
        return 0
    todo = cells(args)
    print("seconds per RL step and peak memory against completion length and model size (ratiorl vs TRL)")
    print(f"  step     {args.prompts} prompts x G={args.num_generations}, GRPO as in vs_trl.py, fp32, "
          f"{args.threads or 'default'} threads; {args.warmup} warm-up + {args.steps} timed steps per cell, "
          "one process per cell")
    print(f"  lengths  {args.lengths} on {'x'.join(map(str, args.length_model))}; sizes "
          f"{['x'.join(map(str, s)) for s in args.sizes]} at {args.size_length} tokens; EOS never sampled")
    sys.stdout.flush()
    results = []
    for i, cell in enumerate(todo):
        t0 = time.perf_counter()
        r = run_subprocess(cell)
        results.append(r)
        status = r.get("error") or f"{r['s_per_step']:.3f} s/step, mean length {r['mean_length']:.1f}"
        print(f"  [{i + 1}/{len(todo)}] {cell['lib']} {'x'.join(map(str, cell['size']))} "
              f"L={cell['length']}: {status} ({time.perf_counter() - t0:.0f} s)")
        sys.stdout.flush()
    print()
    print("  mean len: the mean completion length reached (the limit when EOS is never sampled); sampling and")
    print("  training: seconds per step in sampling and in forward + backward; GF/s: achieved model GFLOP/s")
    print("  (benchmarks/roofline.py); peak MiB: ru_maxrss of the process that trains; +MiB: its rise during the steps")
    print_table(results, args.roofline)
    plot(args, results, args.out)
    print(f"  plot: {args.out}")
    lm = list(args.length_model)
    exps = {}
    for lib in args.libs:
        rs = sorted((r for r in results if "error" not in r and r["lib"] == lib and r["size"] == lm),
                    key=lambda r: r["length"])
        exps[lib] = slope([r["length"] for r in rs], [r["s_per_step"] for r in rs])
    print("  log-log slope of s/step on length: " + ", ".join(f"{k} {v:.2f}" for k, v in exps.items()))
    print(f"scaling_exponent={exps.get('ratiorl', float('nan')):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
