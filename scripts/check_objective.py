"""Recompute one official pre-training step with the library's objective. The check is
experiments/check_objective.py; this file keeps the documented command line."""

import sys

from experiments.check_objective import main

if __name__ == "__main__":
    sys.exit(main())
