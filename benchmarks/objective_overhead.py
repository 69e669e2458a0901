"""Forward+backward time of every preset relative to ``grpo`` (B=64, T=1024 by default).

Timings are interleaved: each round runs every preset once (round-robin, ``--iters`` calls each,
keeping the fastest call of the block, i.e. the least disturbed by other processes), and the
reported time is the median over ``--rounds`` rounds, so slow drifts of the machine hit all
presets alike. Exact-KL presets get a random ``token_kl``; every preset gets ``ref_logp`` and
``group_ids``. The last line is ``max_ratio=<x> preset=<name>`` for the slowest preset without
exact KL, grpo itself excluded (target: <= 1.05). The preset ``grpo`` carries a k3 KL term
(beta = 0.04), so the table also shows each preset against a KL-free grpo (``vs_beta0``) and the
line before the last gives the worst KL-free preset on that stricter scale. CPU timings are single-threaded by default
(``--threads 0`` keeps torch's default); ``--device cuda`` times on a GPU.

    python benchmarks/objective_overhead.py [--B 64] [--T 1024] [--rounds 20] [--iters 5] [--threads 1]
                                            [--device cpu] [--only ctpo,aspo]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import ratiorl


def make_inputs(B, T, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    logp = (old + 0.1 * torch.randn(B, T, generator=g)).to(device)
    ref = (old + 0.1 * torch.randn(B, T, generator=g)).to(device)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)
    adv = torch.randn(B, generator=g).to(device)
    group_ids = (torch.arange(B) // 8).to(device)
    token_kl = (torch.rand(B, T, generator=g) * 0.1).to(device)
    return dict(logp=logp, old=old.to(device), adv=adv, mask=mask, group_ids=group_ids, ref=ref, token_kl=token_kl)


def step(obj, d):
    logp = d["logp"].detach().requires_grad_(True)
    kl = d["token_kl"].detach().requires_grad_(True) if obj.kl_estimator == "exact" else None
    out = obj(logp, d["old"], d["adv"], d["mask"], group_ids=d["group_ids"], ref_logp=d["ref"], token_kl=kl)
    out.loss.backward()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (default 1: on a shared machine intra-op threads fighting "
                         "other processes dominate the timings; 0 leaves torch's default)")
    ap.add_argument("--only", default="", help="comma-separated presets to time (grpo is always included)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    d = make_inputs(args.B, args.T, dev)
    names = ratiorl.available_objectives()
    if args.only:
        names = sorted(set(args.only.split(",")) | {"grpo"})
    objs = {n: ratiorl.objective(n) for n in names}
    # grpo's preset carries a k3 KL term (beta = 0.04); a KL-free grpo is the stricter yardstick
    objs["grpo_beta0"] = ratiorl.objective("grpo", beta=0.0)
    names = names + ["grpo_beta0"]
    for obj in objs.values():  # warm-up
        for _ in range(3):
            step(obj, d)
    sync()
    times = {n: [] for n in names}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            block = []
            for _ in range(args.iters):
                sync()
                t0 = time.perf_counter()
                step(objs[n], d)
                sync()
                block.append(time.perf_counter() - t0)
            times[n].append(min(block))  # least-disturbed call of the block; median over rounds
    med = {n: statistics.median(v) for n, v in times.items()}
    base = med["grpo"]
    print(f"B={args.B} T={args.T} device={dev} threads={torch.get_num_threads()} rounds={args.rounds} iters={args.iters}")
    base0 = med["grpo_beta0"]
    print(f"{'preset':<12} {'ms':>8} {'ratio':>7} {'vs_beta0':>9}  exact_kl")
    for n in names:
        exact = objs[n].kl_estimator == "exact" and objs[n].beta > 0
        print(f"{n:<12} {med[n] * 1e3:8.3f} {med[n] / base:7.3f} {med[n] / base0:9.3f}  {'yes' if exact else ''}")
    cand = {n: med[n] / base for n in names
            if n not in ("grpo", "grpo_beta0") and not (objs[n].kl_estimator == "exact" and objs[n].beta > 0)}
    worst = max(cand, key=cand.get)
    worst0 = max((n for n in cand if objs[n].beta == 0), key=lambda n: med[n] / base0)
    print(f"max_ratio_vs_grpo_beta0={med[worst0] / base0:.3f} preset={worst0}  (KL-free presets against KL-free grpo)")
    print(f"max_ratio={cand[worst]:.3f} preset={worst}")


if __name__ == "__main__":
    main()
