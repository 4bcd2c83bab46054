import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score, top_k_accuracy_score

from sslam_core.evaluation.metrics import (
    average_precision,
    d_prime,
    multiclass_report,
    multilabel_report,
    polyphony_report,
    roc_auc,
)

RTOL = 1e-9


def _sklearn_per_class(metric, scores, targets):
    out = []
    for c in range(scores.shape[1]):
        positives = targets[:, c].sum()
        if positives == 0 or (metric is roc_auc_score and positives == len(targets)):
            out.append(math.nan)
        else:
            out.append(metric(targets[:, c], scores[:, c]))
    return np.array(out)


def _datasets():
    rng = np.random.default_rng(0)
    random_scores = rng.random((200, 12))
    random_targets = rng.random((200, 12)) < 0.2
    tied_scores = rng.integers(0, 4, (150, 9)) / 4.0
    tied_targets = rng.random((150, 9)) < 0.3
    degenerate_scores = rng.random((20, 5))
    degenerate_scores[:, 3] = 0.5
    degenerate_targets = np.zeros((20, 5), dtype=bool)
    degenerate_targets[:, 0] = True
    degenerate_targets[7, 1] = True
    degenerate_targets[::3, 3] = True
    degenerate_targets[:, 4] = degenerate_scores[:, 4] > 0.5
    return {
        "random": (random_scores, random_targets),
        "tied": (tied_scores, tied_targets),
        "degenerate": (degenerate_scores, degenerate_targets),
    }


@pytest.mark.parametrize("name", ["random", "tied", "degenerate"])
def test_average_precision_matches_sklearn(name):
    scores, targets = _datasets()[name]
    expected = _sklearn_per_class(average_precision_score, scores, targets)
    np.testing.assert_allclose(average_precision(scores, targets), expected, rtol=RTOL, equal_nan=True)


@pytest.mark.parametrize("name", ["random", "tied", "degenerate"])
def test_roc_auc_matches_sklearn(name):
    scores, targets = _datasets()[name]
    expected = _sklearn_per_class(roc_auc_score, scores, targets)
    np.testing.assert_allclose(roc_auc(scores, targets), expected, rtol=RTOL, equal_nan=True)


def test_binary_inputs_give_floats_and_hand_values():
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx((1 + 2 / 3) / 2, rel=RTOL)
    assert roc_auc([0.5, 0.5, 0.2], [1, 0, 0]) == pytest.approx(0.75, rel=RTOL)
    assert math.isnan(average_precision([0.1, 0.2], [0, 0]))
    assert math.isnan(roc_auc([0.1, 0.2], [1, 1]))
    with pytest.raises(ValueError, match="shape"):
        average_precision(np.zeros((3, 2)), np.zeros((3, 3)))


def test_d_prime_values():
    assert d_prime(0.5) == 0.0
    assert d_prime(0.9) == pytest.approx(math.sqrt(2) * 1.2815515655446004, rel=1e-12)
    assert d_prime(1.0) == math.inf and d_prime(0.0) == -math.inf
    np.testing.assert_allclose(
        d_prime(np.array([0.5, 0.9])), [0.0, math.sqrt(2) * 1.2815515655446004], rtol=1e-12
    )


def test_multilabel_report_skips_undefined_classes():
    scores, targets = _datasets()["degenerate"]
    report = multilabel_report(scores, targets)
    assert report["skipped_ap"] == [2] and report["n_skipped_ap"] == 1
    assert report["skipped_auc"] == [0, 2] and report["n_skipped_auc"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept_ap = [average_precision_score(targets[:, c], scores[:, c]) for c in (0, 1, 3, 4)]
    kept_auc = [roc_auc_score(targets[:, c], scores[:, c]) for c in (1, 3, 4)]
    assert report["mAP"] == pytest.approx(np.mean(kept_ap), rel=RTOL)
    assert report["AUC"] == pytest.approx(np.mean(kept_auc), rel=RTOL)
    assert report["d_prime"] == pytest.approx(d_prime(np.mean(kept_auc)), rel=RTOL)
    assert report["positives"].tolist() == [20, 1, 0, 7, int(targets[:, 4].sum())]
    assert report["n_clips"] == 20 and report["n_classes"] == 5


def test_multiclass_report_matches_sklearn():
    rng = np.random.default_rng(1)
    scores = rng.random((300, 8))
    labels = rng.integers(0, 7, 300)
    report = multiclass_report(scores, labels)
    assert report["accuracy"] == pytest.approx(accuracy_score(labels, scores.argmax(1)), rel=RTOL)
    top5 = top_k_accuracy_score(labels, scores, k=5, labels=np.arange(8))
    assert report["top5"] == pytest.approx(top5, rel=RTOL) and report["k"] == 5
    per_class = report["per_class_accuracy"]
    for c in range(7):
        chosen = labels == c
        assert per_class[c] == pytest.approx((scores[chosen].argmax(1) == c).mean(), rel=RTOL)
    assert math.isnan(per_class[7]) and report["counts"][7] == 0


def test_multiclass_ties_follow_argmax_and_small_k():
    scores = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.1, 0.2, 0.3]])
    report = multiclass_report(scores, np.array([0, 1, 0]))
    assert report["accuracy"] == pytest.approx(1 / 3)
    assert report["k"] == 3 and report["top5"] == 1.0


def test_polyphony_report_bins():
    rng = np.random.default_rng(2)
    targets = np.zeros((60, 8), dtype=bool)
    counts = np.repeat([1, 2, 3, 4, 6, 7], 10)
    for i, n in enumerate(counts):
        targets[i, rng.choice(8, n, replace=False)] = True
    scores = rng.random((60, 8))
    report = polyphony_report(scores, targets)
    assert list(report) == ["1", "2-3", "4-5", "6+"]
    assert [report[b]["clips"] for b in report] == [10, 20, 10, 20]
    chosen = (counts >= 2) & (counts <= 3)
    expected = _sklearn_per_class(average_precision_score, scores[chosen], targets[chosen])
    assert report["2-3"]["mAP"] == pytest.approx(np.nanmean(expected), rel=RTOL)
    empty = polyphony_report(scores, targets, bins=((5, 5),))
    assert empty["5"]["clips"] == 0 and math.isnan(empty["5"]["mAP"])
