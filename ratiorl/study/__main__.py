"""``python -m ratiorl.study STUDY.yaml --out DIR``: the study command without the main CLI."""

import argparse
import sys

from .command import add_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m ratiorl.study", description="a grid of runs compared with statistics")
    add_arguments(parser)
    parser.add_argument("--plugins", default=None, metavar="A,B.py", help="modules or .py files to import first")
    sys.exit(main(parser.parse_args()))
