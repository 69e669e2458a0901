"""What crosses the network in one RL step of a ratiorl objective inside verl (docs/scale.md).

    python benchmarks/scale_sim.py --params 7e9 --gpus 64 --prompts 512 --group 8 --length 1024

prints one row per transfer: what it is, where it is produced and consumed, its formula and its
size in bytes per step. The numbers are counts from the shapes (no timing); `estimate()` returns
them for the tests and for other cluster shapes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


@dataclass(frozen=True)
class Cluster:
    params: float = 7e9           # model parameters
    gpus: int = 64                # actor data-parallel world (FSDP, colocated rollout)
    prompts: int = 512            # prompts per step
    group: int = 8                # G responses per prompt
    length: int = 1024            # mean response tokens
    prompt_length: int = 256      # mean prompt tokens
    dtype: str = "bf16"           # weights on the wire (weight sync, FSDP collectives)
    logp_dtype: str = "fp32"      # per-token log-probs / advantages on the wire
    mini_batches: int = 4         # optimizer steps per RL step (ppo_mini_batch_size)
    split_groups: bool = False    # True if a group can straddle ranks (no whole-group precondition)


@dataclass(frozen=True)
class Row:
    item: str
    where: str
    formula: str
    bytes: float


def estimate(c: Cluster) -> list[Row]:
    seqs = c.prompts * c.group
    toks = seqs * c.length
    lb, wb = DTYPE_BYTES[c.logp_dtype], DTYPE_BYTES[c.dtype]
    ring = 2 * (c.gpus - 1) / c.gpus  # bytes per GPU of a ring all-reduce, per byte reduced
    rows = [
        Row("response token ids", "rollout -> driver -> actor", "2 * P*G*L * 4", 2 * toks * 4),
        Row("old log-probs (pi_old, every objective)", "actor -> driver -> actor", "2 * P*G*L * b_logp",
            2 * toks * lb),
        Row("advantages (verl stores them per token)", "driver -> actor", "P*G*L * b_logp", toks * lb),
        Row("token counts for the global token mean", "actor all-gather", "n_mb * P*G * 8", c.mini_batches * seqs * 8),
        # objective-specific extras
        Row("GRPO/DAPO/GSPO/CTPO extra", "actor (local)", "0: token log-probs only", 0.0),
        Row("SNIB group normaliser", "actor all-reduce" if c.split_groups else "actor (local, whole groups)",
            "P * 2 * 4 if groups split (max, sum of w) else 0", c.prompts * 2 * 4 if c.split_groups else 0.0),
        Row("mismatch correction: behaviour log-probs mu", "rollout -> driver -> actor", "2 * P*G*L * b_logp",
            2 * toks * lb),
        Row("reference log-probs (beta > 0, k1/k2/k3)", "ref worker -> driver -> actor", "2 * P*G*L * b_logp",
            2 * toks * lb),
        # the engine's own traffic, for scale
        Row("weight sync actor -> rollout", "per rollout replica (in-GPU when colocated)", "params * b_w",
            c.params * wb),
        Row("FSDP all-gather x2 + reduce-scatter, per GPU", "actor collectives (at least)",
            "n_mb * 3 * params * b_w * (n-1)/n", c.mini_batches * 3 * c.params * wb * ring / 2),
    ]
    return rows


def table(c: Cluster) -> str:
    rows = estimate(c)
    w = max(len(r.item) for r in rows)
    lines = [f"{'item':<{w}}  {'bytes/step':>12}  where / formula", "-" * (w + 60)]
    for r in rows:
        lines.append(f"{r.item:<{w}}  {human(r.bytes):>12}  {r.where}; {r.formula}")
    return "\n".join(lines)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Cluster()
    p.add_argument("--params", type=float, default=d.params)
    p.add_argument("--gpus", type=int, default=d.gpus)
    p.add_argument("--prompts", type=int, default=d.prompts)
    p.add_argument("--group", type=int, default=d.group)
    p.add_argument("--length", type=int, default=d.length)
    p.add_argument("--prompt-length", type=int, default=d.prompt_length)
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default=d.dtype)
    p.add_argument("--logp-dtype", choices=sorted(DTYPE_BYTES), default=d.logp_dtype)
    p.add_argument("--mini-batches", type=int, default=d.mini_batches)
    p.add_argument("--split-groups", action="store_true")
    a = p.parse_args(argv)
    c = Cluster(a.params, a.gpus, a.prompts, a.group, a.length, a.prompt_length, a.dtype, a.logp_dtype,
                a.mini_batches, a.split_groups)
    print(table(c))


if __name__ == "__main__":
    main()
