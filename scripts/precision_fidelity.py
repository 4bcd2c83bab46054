"""Fidelity of bf16 and int8 inference to fp32 on real audio.

The check is experiments/precision_fidelity.py; this file keeps the documented command line.
"""

from experiments.precision_fidelity import main

if __name__ == "__main__":
    main()
