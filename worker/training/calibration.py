"""Temperature scaling (Guo et al., 2017): one scalar T fitted on the validation split so that
``softmax(logits / T)`` is as likely as possible (least NLL); the argmax, so accuracy, never changes.

Pure numpy on what ``evaluate`` returns. It returns softmax probabilities, not logits; ``log(p)`` differs from
the logits only by one constant per row, which softmax ignores, so ``log(p) / T`` scales like ``logits / T``.
"""

from typing import Any

import numpy as np

from worker.training.metrics import expected_calibration_error

# Search bounds on T: below 0.05 or above 20 the fit is chasing a handful of validation images.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0
# float32 softmax underflows near 1e-38; log(0) would make a whole row -inf.
_FLOOR = 1e-30
# A prior on log T worth this many validation images pulls T toward 1. Without it a small validation split
# that the model classifies perfectly has no interior minimum (NLL falls all the way to T -> 0), and the model
# would claim certainty on everything, which is exactly what abstaining needs it not to do.
PRIOR_WEIGHT = 1.0


def logits_from_probs(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(probs.astype(np.float64), _FLOOR, None))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    probabilities: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
    return probabilities


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    return softmax(logits_from_probs(probs) / temperature)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    scaled = logits / temperature
    top = scaled.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(scaled - top).sum(axis=1)) + top[:, 0]
    return float((log_norm - scaled[np.arange(len(labels)), labels]).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *, iterations: int = 80) -> float:
    """The T in [MIN_TEMPERATURE, MAX_TEMPERATURE] that minimises the mean NLL of ``labels`` plus the prior
    ``PRIOR_WEIGHT * (log T)^2 / n``: a golden-section search on log T (the objective is unimodal in log T).
    1.0 when there is nothing to fit on."""
    if len(labels) == 0:
        return 1.0

    def objective(log_t: float) -> float:
        return nll(logits, labels, float(np.exp(log_t))) + PRIOR_WEIGHT * log_t**2 / len(labels)

    low, high = np.log(MIN_TEMPERATURE), np.log(MAX_TEMPERATURE)
    ratio = (np.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = objective(a), objective(b)
    for _ in range(iterations):
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = objective(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = objective(b)
    return float(np.exp((low + high) / 2))


def calibration_report(*, val: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]
                       ) -> dict[str, Any]:
    """T fitted on ``val`` (probs, labels) and the test split's ECE and NLL before and after applying it."""
    val_probs, val_labels = val
    test_probs, test_labels = test
    temperature = fit_temperature(logits_from_probs(val_probs), val_labels)
    report: dict[str, Any] = {"temperature": round(temperature, 4), "fitted_on": int(len(val_labels))}
    if len(test_labels):
        logits = logits_from_probs(test_probs)
        report |= {
            "ece_before": expected_calibration_error(test_probs, test_labels),
            "ece_after": expected_calibration_error(softmax(logits / temperature), test_labels),
            "nll_before": nll(logits, test_labels, 1.0),
            "nll_after": nll(logits, test_labels, temperature),
        }
    return report
