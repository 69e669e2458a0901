"""Peak memory and time of the lean LM head vs the naive full-logits path (CPU).

Workload (per run): N = B*T = 8 * 1024 token positions, hidden size H = 512, vocabulary
V = 32000, float32. Both variants compute, for every position, the target log-prob, the
entropy and the exact KL to a reference head (separate reference hidden states and weight),
then backpropagate a random linear combination of the three into the policy's hidden states
and head weight:

- naive: logits = h W^T / T (N x V), log_softmax, gather, entropy = -sum p log p, reference
  logits and log_softmax, KL = sum p (log p - log q); autograd does the backward.
- lean:  ``ratiorl.policy.lean_token_stats`` (vocabulary and tokens streamed in tiles with an
  online log-sum-exp; the backward recomputes each tile).

How memory is measured (honestly, on CPU): each measurement runs in a *fresh* Python
subprocess. The subprocess imports torch, allocates the inputs and runs a tiny warm-up of the
same code path at a small size (so thread pools and library buffers exist), then reads its peak
resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) as the baseline. It then runs
forward + backward once at full size and reads the peak RSS again. The reported peak memory is
the difference: the extra resident memory the computation needed at its worst moment, including
every temporary, the autograd graph's saved tensors and the gradients. glibc returns large blocks
to the OS, so nothing from before the baseline is reused to hide allocations.

How time is measured: the same subprocesses time their full-size forward + backward with
``time.perf_counter`` (after the warm-up); variants are interleaved (lean, naive, lean, naive,
...) so that load from other processes hits both alike. The time ratio uses the fastest run of
each variant (the least disturbed one, as ``timeit`` recommends on a shared machine); medians
and process CPU times are printed as well. The memory ratio uses the median peaks.

Usage: ``python benchmarks/logprob_memory.py [--repeats 3]`` (``--batch/--seq/--hidden/--vocab``
change the sizes for a quick look). The last line is
``peak_memory_ratio=<lean/naive> time_ratio=<lean/naive>`` (targets: <= 0.15 and <= 1.5).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

B, T, H, V = 8, 1024, 512, 32000
TEMPERATURE = 0.9


def _rss_mib() -> float:
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024.0


def _make_inputs(N, Hd, Vd, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, Hd, generator=g).requires_grad_()
    W = (torch.randn(Vd, Hd, generator=g) / Hd**0.5).requires_grad_()
    ref_h = h.detach() + 0.1 * torch.randn(N, Hd, generator=g)
    ref_W = W.detach() + 0.1 * torch.randn(Vd, Hd, generator=g) / Hd**0.5
    targets = torch.randint(0, Vd, (N,), generator=g)
    up = [torch.randn(N, generator=g) for _ in range(3)]
    return h, W, ref_h, ref_W, targets, up


def _run(variant, inputs, vocab_chunk, token_chunk):
    import torch

    from ratiorl.policy import lean_token_stats, naive_token_stats

    h, W, ref_h, ref_W, targets, up = inputs
    kw = dict(temperature=TEMPERATURE, ref_hidden=ref_h, ref_weight=ref_W, with_entropy=True, with_kl=True)
    if variant == "lean":
        out = lean_token_stats(h, W, targets, vocab_chunk=vocab_chunk, token_chunk=token_chunk, **kw)
    else:
        out = naive_token_stats(h, W, targets, **kw)
    loss = sum((o * u).sum() for o, u in zip(out, up))
    gh, gW = torch.autograd.grad(loss, [h, W])
    return loss.item(), gh, gW


def worker(variant, vocab_chunk, token_chunk, N, Hd, Vd):
    """One measurement in this (fresh) process; prints a JSON line."""
    import time

    import torch

    small = _make_inputs(256, Hd, 4096, seed=1)
    _run(variant, small, min(vocab_chunk, 4096), token_chunk)  # warm-up at a small size
    del small
    inputs = _make_inputs(N, Hd, Vd)
    base = _rss_mib()
    t0, c0 = time.perf_counter(), time.process_time()
    loss, gh, gW = _run(variant, inputs, vocab_chunk, token_chunk)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _rss_mib()
    # fingerprints of the gradients (after the measurement): random projections
    g = torch.Generator().manual_seed(123)
    proj_h = float((gh.double() * torch.randn(gh.shape, generator=g, dtype=torch.float64)).sum())
    proj_W = float((gW.double() * torch.randn(gW.shape, generator=g, dtype=torch.float64)).sum())
    print(json.dumps({"variant": variant, "time_s": dt, "cpu_s": cpu, "peak_mib": peak - base, "loss": loss,
                      "grad_h_proj": proj_h, "grad_W_proj": proj_W, "threads": torch.get_num_threads()}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab-chunk", type=int, default=None)
    ap.add_argument("--token-chunk", type=int, default=None)
    ap.add_argument("--batch", type=int, default=B)
    ap.add_argument("--seq", type=int, default=T)
    ap.add_argument("--hidden", type=int, default=H)
    ap.add_argument("--vocab", type=int, default=V)
    ap.add_argument("--worker", choices=["lean", "naive"], help=argparse.SUPPRESS)
    args = ap.parse_args()

    from ratiorl.policy.lean_head import DEFAULT_TOKEN_CHUNK, DEFAULT_VOCAB_CHUNK

    vc = args.vocab_chunk or DEFAULT_VOCAB_CHUNK
    tc = args.token_chunk or DEFAULT_TOKEN_CHUNK
    sizes = ["--batch", str(args.batch), "--seq", str(args.seq), "--hidden", str(args.hidden), "--vocab", str(args.vocab)]
    if args.worker:
        worker(args.worker, vc, tc, args.batch * args.seq, args.hidden, args.vocab)
        return

    print(f"N = B*T = {args.batch}*{args.seq} = {args.batch * args.seq} positions, H = {args.hidden}, "
          f"V = {args.vocab}, float32, temperature {TEMPERATURE}")
    print(f"lean tiles: token_chunk = {tc}, vocab_chunk = {vc}; {args.repeats} interleaved repeats, "
          "each in a fresh subprocess (peak RSS above a post-allocation baseline)")
    results = {"lean": [], "naive": []}
    for r in range(args.repeats):
        for variant in ("lean", "naive"):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant,
                   "--vocab-chunk", str(vc), "--token-chunk", str(tc), *sizes]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            results[variant].append(res)
            print(f"  repeat {r}: {variant:5s} time {res['time_s']:7.2f} s (cpu {res['cpu_s']:7.2f} s)"
                  f"   peak +{res['peak_mib']:8.1f} MiB   loss {res['loss']:.6g}")

    lean, naive = results["lean"], results["naive"]
    # Same numbers from both paths (a benchmark of a wrong computation would be meaningless).
    def rel(key):
        return abs(lean[0][key] - naive[0][key]) / max(1e-12, abs(naive[0][key]))

    print(f"agreement (relative differences): loss {rel('loss'):.1e}, random projection of grad_h "
          f"{rel('grad_h_proj'):.1e}, of grad_W {rel('grad_W_proj'):.1e}")
    mem_l = statistics.median(x["peak_mib"] for x in lean)
    mem_n = statistics.median(x["peak_mib"] for x in naive)
    t_l = min(x["time_s"] for x in lean)
    t_n = min(x["time_s"] for x in naive)
    med = {v: statistics.median(x["time_s"] for x in results[v]) for v in results}
    cpu = {v: statistics.median(x["cpu_s"] for x in results[v]) for v in results}
    print(f"peak memory (median): lean {mem_l:.1f} MiB, naive {mem_n:.1f} MiB")
    print(f"time (fastest):       lean {t_l:.2f} s, naive {t_n:.2f} s   (ratio {t_l / t_n:.3f})")
    print(f"time (median):        lean {med['lean']:.2f} s, naive {med['naive']:.2f} s   "
          f"(ratio {med['lean'] / med['naive']:.3f})")
    print(f"cpu time (median):    lean {cpu['lean']:.2f} s, naive {cpu['naive']:.2f} s   "
          f"(ratio {cpu['lean'] / cpu['naive']:.3f})")
    print(f"peak_memory_ratio={mem_l / mem_n:.3f} time_ratio={t_l / t_n:.3f}")


if __name__ == "__main__":
    main()
