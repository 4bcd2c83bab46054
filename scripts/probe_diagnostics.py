"""Converged logistic-regression probes of an encoder's blocks on FSDD.

The check is experiments/probe_diagnostics.py; this file keeps the documented command line.
"""

from experiments.probe_diagnostics import main

if __name__ == "__main__":
    main()
