"""Evaluation metrics for audio tagging and classification, matching scikit-learn without depending on it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

DEFAULT_POLYPHONY_BINS = ((1, 1), (2, 3), (4, 5), (6, None))


def _as_2d(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Return (scores, targets) as float64 (N, C) arrays and whether the input was a single column."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets)
    if scores.shape != targets.shape:
        raise ValueError(f"scores shape {scores.shape} does not match targets shape {targets.shape}")
    if scores.ndim not in (1, 2):
        raise ValueError(f"scores must be 1-D or 2-D, got shape {scores.shape}")
    single = scores.ndim == 1
    if single:
        scores, targets = scores[:, None], targets[:, None]
    return scores, targets.astype(bool), single


def _cumulative_counts(score: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True/false positive counts at each distinct threshold, highest threshold first (ties grouped)."""
    order = np.argsort(-score, kind="mergesort")
    score, positive = score[order], positive[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(score)), score.size - 1]
    tps = np.cumsum(positive)[last_of_tie].astype(np.float64)
    fps = (last_of_tie + 1) - tps
    return tps, fps


def _binary_ap(score: np.ndarray, positive: np.ndarray) -> float:
    """Step-wise average precision: sum over thresholds of (recall increase) x precision."""
    if not positive.any():
        return math.nan
    tps, fps = _cumulative_counts(score, positive)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    recall_gain = np.diff(np.r_[0.0, recall])
    return float(np.sum(recall_gain * precision))


def _binary_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve by the trapezoid rule, so tied scores count half."""
    if positive.all() or not positive.any():
        return math.nan
    tps, fps = _cumulative_counts(score, positive)
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray | float:
    """Per-class average precision as sklearn computes it; NaN for a class without positives."""
    scores, targets, single = _as_2d(scores, targets)
    values = np.array([_binary_ap(scores[:, c], targets[:, c]) for c in range(scores.shape[1])])
    return float(values[0]) if single else values


def roc_auc(scores: np.ndarray, targets: np.ndarray) -> np.ndarray | float:
    """Per-class ROC AUC as sklearn computes it; NaN for a class lacking positives or negatives."""
    scores, targets, single = _as_2d(scores, targets)
    values = np.array([_binary_auc(scores[:, c], targets[:, c]) for c in range(scores.shape[1])])
    return float(values[0]) if single else values


def d_prime(auc: float | np.ndarray) -> float | np.ndarray:
    """Sensitivity index sqrt(2) * Phi^-1(AUC); +-inf at AUC 1 or 0, NaN for NaN."""
    inverse = NormalDist().inv_cdf

    def one(value: float) -> float:
        if math.isnan(value):
            return math.nan
        if value >= 1.0:
            return math.inf
        if value <= 0.0:
            return -math.inf
        return math.sqrt(2.0) * inverse(value)

    if np.ndim(auc) == 0:
        return one(float(auc))
    return np.array([one(float(v)) for v in np.asarray(auc, dtype=np.float64).ravel()]).reshape(np.shape(auc))


def multilabel_report(scores: np.ndarray, targets: np.ndarray) -> dict:
    """Macro mAP, AUC and d' for multi-label tagging, skipping classes where a metric is undefined.

    Keys: mAP, AUC, d_prime, ap / auc / positives (per-class arrays), skipped_ap / skipped_auc (class
    indices left out of each mean), n_skipped_ap, n_skipped_auc, n_clips, n_classes.
    """
    scores, targets, _ = _as_2d(scores, targets)
    ap = average_precision(scores, targets)
    auc = roc_auc(scores, targets)
    positives = targets.sum(axis=0).astype(np.int64)
    skipped_ap = [int(c) for c in np.flatnonzero(np.isnan(ap))]
    skipped_auc = [int(c) for c in np.flatnonzero(np.isnan(auc))]
    mean_ap = float(np.nanmean(ap)) if len(skipped_ap) < ap.size else math.nan
    mean_auc = float(np.nanmean(auc)) if len(skipped_auc) < auc.size else math.nan
    return {
        "mAP": mean_ap,
        "AUC": mean_auc,
        "d_prime": d_prime(mean_auc),
        "ap": ap,
        "auc": auc,
        "positives": positives,
        "skipped_ap": skipped_ap,
        "skipped_auc": skipped_auc,
        "n_skipped_ap": len(skipped_ap),
        "n_skipped_auc": len(skipped_auc),
        "n_clips": int(scores.shape[0]),
        "n_classes": int(scores.shape[1]),
    }


def multiclass_report(scores: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy, top-k accuracy (k = min(5, C)) and per-class accuracy for single-label classification.

    Ties are broken towards the lower class index, as argmax does. Keys: accuracy, top5, k,
    per_class_accuracy (NaN for classes absent from labels), balanced_accuracy, counts, n_clips.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if scores.ndim != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(f"need scores (N, C) and labels (N,), got {scores.shape} and {labels.shape}")
    n, n_classes = scores.shape
    if n and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), got range [{labels.min()}, {labels.max()}]")
    k = min(5, n_classes)
    rows = np.arange(n)
    true_score = scores[rows, labels][:, None]
    lower_index = np.arange(n_classes)[None, :] < labels[:, None]
    rank = np.sum(scores > true_score, axis=1) + np.sum((scores == true_score) & lower_index, axis=1)
    correct = rank == 0
    counts = np.bincount(labels, minlength=n_classes)
    hits = np.bincount(labels, weights=correct.astype(np.float64), minlength=n_classes)
    per_class = np.full(n_classes, math.nan)
    per_class[counts > 0] = hits[counts > 0] / counts[counts > 0]
    return {
        "accuracy": float(correct.mean()) if n else math.nan,
        "top5": float((rank < k).mean()) if n else math.nan,
        "k": k,
        "per_class_accuracy": per_class,
        "balanced_accuracy": float(np.nanmean(per_class)) if counts.any() else math.nan,
        "counts": counts,
        "n_clips": n,
    }


def _bin_name(low: int, high: int | None) -> str:
    """Readable name of a polyphony bin: '1', '2-3', '6+'."""
    if high is None:
        return f"{low}+"
    return str(low) if low == high else f"{low}-{high}"


def polyphony_report(
    scores: np.ndarray,
    targets: np.ndarray,
    bins: Sequence[tuple[int, int | None]] = DEFAULT_POLYPHONY_BINS,
) -> dict:
    """mAP over clips grouped by how many labels they carry, to see where polyphony hurts.

    Returns {bin name: {"clips": n, "mAP": macro AP over classes with a positive in the bin, "classes": m}}.
    """
    scores, targets, _ = _as_2d(scores, targets)
    polyphony = targets.sum(axis=1)
    report = {}
    for low, high in bins:
        chosen = (polyphony >= low) & (polyphony <= (high if high is not None else np.inf))
        ap = average_precision(scores[chosen], targets[chosen]) if chosen.any() else np.array([])
        valid = ~np.isnan(ap)
        report[_bin_name(low, high)] = {
            "clips": int(chosen.sum()),
            "mAP": float(ap[valid].mean()) if valid.any() else math.nan,
            "classes": int(valid.sum()),
        }
    return report
