"""Classification metrics from predictions: plain numpy, so they are easy to check by hand."""

import math
from typing import Any

import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, preds), 1)
    return matrix


def per_class_scores(matrix: np.ndarray, classes: list[str]) -> dict[str, dict[str, float]]:
    true_pos = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    support = matrix.sum(axis=1).astype(np.float64)
    precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
    recall = np.divide(true_pos, support, out=np.zeros_like(true_pos), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(true_pos), where=denom > 0)
    return {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
               "support": int(support[i])}
        for i, name in enumerate(classes)
    }


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


# A held-out accuracy whose 95% interval is wider than this is reported with a warning: 30 images scored 0.9 could
# be anything from 0.74 to 0.97.
WIDE_INTERVAL = 0.2


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion: unlike the normal approximation it stays within [0, 1]
    and is honest at 0/n and n/n, which small test splits produce."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def small_sample_warning(*, correct: int, total: int) -> str | None:
    low, high = wilson_interval(correct, total)
    if high - low <= WIDE_INTERVAL:
        return None
    return (f"only {total} held-out images: accuracy {correct / total:.2f} could be anywhere from {low:.2f} to "
            f"{high:.2f} (95%); upload more images per class for a figure that means much")


def classification_report(*, probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, top-5 (five or more classes), per-class P/R/F1, macro-F1, confusion matrix, ECE."""
    if len(labels) == 0:
        return {"samples": 0}
    preds = probs.argmax(axis=1)
    matrix = confusion_matrix(labels, preds, len(classes))
    per_class = per_class_scores(matrix, classes)
    correct = int((preds == labels).sum())
    report: dict[str, Any] = {
        "samples": int(len(labels)),
        "accuracy": correct / len(labels),
        "accuracy_interval": list(wilson_interval(correct, len(labels))),
        "macro_f1": float(np.mean([s["f1"] for s in per_class.values()])),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "ece": expected_calibration_error(probs, labels),
    }
    warning = small_sample_warning(correct=correct, total=len(labels))
    if warning:
        report["warning"] = warning
    if len(classes) >= 5:
        top5 = np.argsort(-probs, axis=1)[:, :5]
        report["top5_accuracy"] = float((top5 == labels[:, None]).any(axis=1).mean())
    return report
