"""Evaluation: metrics, clip-level and strong (event) evaluation, plots."""
