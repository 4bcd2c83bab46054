"""Does pre-training learn? Pre-train tiny encoders on FSDD and probe them.

The check is experiments/learning_check.py; this file keeps the documented command line.
"""

from experiments.learning_check import main

if __name__ == "__main__":
    main()
