"""SSLAM stage-2 ablations at small scale. The check is experiments/ablation_check.py; this file keeps
the documented command line, and the helpers tests/test_ablations.py imports from here."""

from experiments.ablation_check import (
    METRICS,
    constituent_recall,
    finished,
    main,
    spread,
    table,
    trajectory,
    why_table,
)

__all__ = ["METRICS", "constituent_recall", "finished", "main", "spread", "table", "trajectory", "why_table"]

if __name__ == "__main__":
    main()
