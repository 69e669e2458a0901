"""``python -m ratiorl ...``: the same command line as the ``ratiorl`` script."""

import sys

from ratiorl.cli import entry

if __name__ == "__main__":
    sys.exit(entry())
