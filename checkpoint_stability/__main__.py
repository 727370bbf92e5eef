"""``python -m checkpoint_stability``: the same command line as ``checkpoint-stability``."""

import sys

from checkpoint_stability.offline.cli import main

if __name__ == "__main__":
    sys.exit(main())
