"""How much of a decode step is per-operation cost that no faster matmul removes.

ratiorl's sampler runs a decode step as about 25 tensor operations per layer (norms, the weight
matmuls, the cache writes, attention's two matmuls per cache part, softmax, residual adds) plus the
drawing of the next tokens. On a CPU every operation has a fixed cost (dispatch, threading, its
loops' start-up) whatever its size. This script measures that cost directly: it runs ratiorl's
``generate`` on the realistic preset's shape (GPT-2, 6 layers, 64 rows = 8 prompts x 8, 64 new
tokens, 2 threads) at the preset's width (384, 6 heads) and at width 64 (1 head), where the
arithmetic is 36x smaller and nearly all that is left is the per-operation cost. Same layers,
same rows, same steps, same code path; the two widths are interleaved, median of ``--repeats``.

It prints seconds per call and per decode step for both widths and both dtypes, and the share of
the wide model's sampling time that the narrow model's step time accounts for: a lower bound on
what the sampler spends outside arithmetic that scales with the model (the narrow model still
does a little arithmetic, so the bound is slightly generous to the wide one).

    python benchmarks/decode_floor.py
    python benchmarks/decode_floor.py --repeats 12 --threads 2

Last line: ``fixed_share=<narrow step time / wide step time, fp32>``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from ratiorl.policy.models import use_cpu_attention
from ratiorl.policy.tiny import make_tiny_model
from ratiorl.rollout import HFRolloutEngine

PROMPTS = ["54+10=", "3+77=", "12+12=", "99+1=", "5+5=", "40+41=", "7+80=", "66+6="]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=8, help="timed calls per variant (after one warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("-G", type=int, default=8, help="completions per prompt (8 prompts)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = {}
    for width in (384, 64):
        model, tok = make_tiny_model(n_layer=6, n_embd=width, n_head=max(1, width // 64))
        for dtype in (torch.float32, torch.bfloat16):  # as the trainer's samplers: CPU attention in the prefill
            sampler = copy.deepcopy(model).to(dtype)
            use_cpu_attention(sampler)
            variants[(width, dtype)] = HFRolloutEngine(sampler, tok)
    seconds = {k: [] for k in variants}
    steps = {}
    for rep in range(args.repeats + 1):
        for key, engine in variants.items():
            g = torch.Generator().manual_seed(rep)
            t0 = time.perf_counter()
            out = engine.generate(PROMPTS, args.G, max_new_tokens=args.new_tokens, generator=g)
            if rep:  # the first call warms up
                seconds[key].append(time.perf_counter() - t0)
            steps[key] = int(out.completion_mask.sum(1).max())
    print(f"ratiorl generate: GPT-2, 6 layers, {len(PROMPTS)} prompts x {args.G}, <= {args.new_tokens} new tokens, "
          f"{args.threads} threads, median of {args.repeats}")
    print(f"  {'width':>6}{'dtype':>10}{'s/call':>10}{'steps':>7}{'ms/step':>9}")
    per_step = {}
    for (width, dtype), ts in seconds.items():
        med = statistics.median(ts)
        per_step[(width, dtype)] = med / steps[(width, dtype)]
        print(f"  {width:>6}{str(dtype)[6:]:>10}{med:>10.3f}{steps[(width, dtype)]:>7}{per_step[(width, dtype)] * 1e3:>9.2f}")
    for dtype in (torch.float32, torch.bfloat16):
        share = per_step[(64, dtype)] / per_step[(384, dtype)]
        print(f"  {str(dtype)[6:]}: a width-64 step costs {share:.2f} of a width-384 step")
    print(f"fixed_share={per_step[(64, torch.float32)] / per_step[(384, torch.float32)]:.3f}")


if __name__ == "__main__":
    main()
