"""Test metrics from a known confusion matrix equal the values worked out by hand."""

import numpy as np
import pytest

from worker.training.metrics import (
    classification_report,
    confusion_matrix,
    expected_calibration_error,
    wilson_interval,
)

CLASSES = ["cat", "dog", "fox"]
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
PREDS = np.array([0, 0, 1, 2, 1, 1, 0, 2, 2, 2])


def probabilities(preds: np.ndarray, confidence: np.ndarray, classes: int) -> np.ndarray:
    """The predicted class gets ``confidence``; the rest share what is left equally."""
    probs = np.repeat(((1 - confidence) / (classes - 1))[:, None], classes, axis=1)
    probs[np.arange(len(preds)), preds] = confidence
    return probs


def test_report_matches_hand_computed_values():
    # Correct predictions at 0.95 confidence, wrong ones at 0.5.
    confidence = np.where(PREDS == LABELS, 0.95, 0.5)
    report = classification_report(probs=probabilities(PREDS, confidence, 3), labels=LABELS, classes=CLASSES)
    # Rows are true classes, columns predictions: TP 2/2/3, predicted 3/3/4, support 4/3/3.
    assert report["confusion_matrix"] == [[2, 1, 1], [1, 2, 0], [0, 0, 3]]
    assert report["samples"] == 10 and report["accuracy"] == pytest.approx(0.7)
    assert report["per_class"] == {
        "cat": {"precision": pytest.approx(2 / 3), "recall": pytest.approx(0.5), "f1": pytest.approx(4 / 7),
                "support": 4},
        "dog": {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3), "f1": pytest.approx(2 / 3),
                "support": 3},
        "fox": {"precision": pytest.approx(0.75), "recall": pytest.approx(1.0), "f1": pytest.approx(6 / 7),
                "support": 3},
    }
    assert report["macro_f1"] == pytest.approx(44 / 63)
    # Two occupied bins: 7 correct at 0.95 (gap 0.05), 3 wrong at 0.5 (gap 0.5).
    assert report["ece"] == pytest.approx(0.7 * 0.05 + 0.3 * 0.5)
    assert "top5_accuracy" not in report  # fewer than five classes


def test_a_class_never_predicted_has_zero_precision_not_nan():
    matrix = confusion_matrix(np.array([0, 1, 1]), np.array([0, 0, 0]), 2)
    assert matrix.tolist() == [[1, 0], [2, 0]]
    report = classification_report(probs=np.array([[0.9, 0.1]] * 3), labels=np.array([0, 1, 1]),
                                   classes=["a", "b"])
    assert report["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert report["per_class"]["a"]["precision"] == pytest.approx(1 / 3)
    assert report["macro_f1"] == pytest.approx((2 * (1 / 3) / (4 / 3)) / 2)


def test_top5_counts_a_hit_when_the_true_class_ranks_fifth_or_better():
    scores = np.array([0.30, 0.25, 0.20, 0.12, 0.08, 0.05])  # class i ranks i + 1
    probs = np.tile(scores, (4, 1))
    labels = np.array([0, 4, 5, 2])  # ranks 1, 5, 6, 3
    report = classification_report(probs=probs, labels=labels, classes=list("abcdef"))
    assert report["top5_accuracy"] == pytest.approx(0.75)
    assert report["accuracy"] == pytest.approx(0.25)


def test_perfectly_calibrated_predictions_have_zero_ece_and_empty_split_reports_zero_samples():
    probs = probabilities(np.array([0, 0, 1, 1]), np.array([0.5, 0.5, 0.5, 0.5]), 2)
    assert expected_calibration_error(probs, np.array([0, 1, 1, 0])) == pytest.approx(0.0)
    assert classification_report(probs=np.zeros((0, 3)), labels=np.zeros(0, dtype=np.int64),
                                 classes=CLASSES) == {"samples": 0}


def test_accuracy_has_a_wilson_interval_and_small_splits_say_how_little_they_mean():
    # Textbook values: 7/10 is 0.397..0.892; 0/10 and 10/10 stay inside [0, 1] (the normal approximation does not).
    assert wilson_interval(7, 10) == pytest.approx((0.39677, 0.89221), abs=1e-5)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27754), abs=1e-5)
    assert wilson_interval(10, 10) == pytest.approx((0.72246, 1.0), abs=1e-5)
    small = classification_report(probs=np.array([[0.9, 0.1]] * 5 + [[0.1, 0.9]]), labels=np.zeros(6, dtype=int),
                                  classes=["a", "b"])
    assert small["accuracy_interval"] == pytest.approx([0.43649, 0.96994], abs=1e-5)
    assert small["warning"] == ("only 6 held-out images: accuracy 0.83 could be anywhere from 0.44 to 0.97 (95%); "
                                "upload more images per class for a figure that means much")
    labels = np.array([0] * 100)
    preds = np.array([0] * 90 + [1] * 10)
    large = classification_report(probs=probabilities(preds, np.full(100, 0.9), 2), labels=labels, classes=["a", "b"])
    assert large["accuracy_interval"] == pytest.approx([0.82563, 0.94477], abs=1e-5)
    assert "warning" not in large  # 12 points wide
