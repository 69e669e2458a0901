"""``python -m ratiorl.lab --out DIR [--seed N] [--quick]``: run the estimator study."""

import argparse

from . import run_lab


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m ratiorl.lab", description=__doc__)
    ap.add_argument("--out", required=True, help="report folder (created if missing)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smaller sweeps (smoke run)")
    ap.add_argument("--batches", type=int, default=None, help="batches per measurement (K)")
    args = ap.parse_args(argv)
    kw = {} if args.batches is None else {"K": args.batches}
    out = run_lab(args.out, seed=args.seed, quick=args.quick, **kw)
    held = sum(c["held"] for c in out["claims"].values())
    print(f"{held}/{len(out['claims'])} claims held; report in {args.out}/summary.md")


if __name__ == "__main__":
    main()
