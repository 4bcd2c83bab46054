"""Sound event detection on polydigits from a fine-tuned tiny encoder.

The check is experiments/sed_check.py; this file keeps the documented command line.
"""

from experiments.sed_check import main

if __name__ == "__main__":
    main()
