"""Temperature scaling on synthetic logits whose right temperature is known."""

import numpy as np
import pytest

from worker.training.calibration import (
    MAX_TEMPERATURE,
    apply_temperature,
    calibration_report,
    fit_temperature,
    logits_from_probs,
    softmax,
)
from worker.training.metrics import expected_calibration_error


def sampled(true_temperature: float, n: int, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits that are ``true_temperature`` times too sharp: labels are drawn from softmax(logits / T)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3.0, size=(n, classes))
    truth = softmax(logits / true_temperature)
    labels = np.array([rng.choice(classes, p=row) for row in truth])
    return logits, labels


def test_fit_recovers_the_temperature_of_over_confident_logits():
    logits, labels = sampled(2.5, 6000)

    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.08)


def test_fit_leaves_calibrated_logits_near_one_and_sharpens_under_confident_ones():
    calibrated, labels = sampled(1.0, 6000, seed=1)
    timid, timid_labels = sampled(0.5, 6000, seed=2)

    assert fit_temperature(calibrated, labels) == pytest.approx(1.0, rel=0.08)
    assert fit_temperature(timid, timid_labels) == pytest.approx(0.5, rel=0.08)


def test_fit_on_nothing_is_one_and_a_few_perfect_answers_do_not_make_the_model_certain():
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=np.int64)) == 1.0
    logits = np.array([[5.0, 0.0], [0.0, 5.0], [4.0, 1.0]])
    right = fit_temperature(logits, np.array([0, 1, 0]))
    wrong = fit_temperature(logits, np.array([1, 0, 1]))
    # Without the prior NLL keeps falling to T -> 0 (all right) or T -> MAX_TEMPERATURE (all wrong).
    assert 0.5 < right < 1.0
    assert 1.0 < wrong < MAX_TEMPERATURE / 2


def test_probs_stand_in_for_logits_and_the_argmax_never_changes():
    logits, _ = sampled(3.0, 200, seed=3)
    probs = softmax(logits).astype(np.float32)

    np.testing.assert_allclose(apply_temperature(probs, 3.0), softmax(logits / 3.0), atol=1e-5)
    assert (apply_temperature(probs, 3.0).argmax(1) == probs.argmax(1)).all()
    assert np.isfinite(logits_from_probs(np.array([[1.0, 0.0]], dtype=np.float32))).all()


def test_report_lowers_test_ece_of_an_over_confident_model():
    val_logits, val_labels = sampled(2.0, 3000, seed=4)
    test_logits, test_labels = sampled(2.0, 3000, seed=5)

    report = calibration_report(val=(softmax(val_logits), val_labels), test=(softmax(test_logits), test_labels))

    assert report["temperature"] == pytest.approx(2.0, rel=0.1) and report["fitted_on"] == 3000
    assert report["ece_before"] == pytest.approx(expected_calibration_error(softmax(test_logits), test_labels))
    assert report["ece_before"] > 0.1 and report["ece_after"] < 0.04
    assert report["nll_after"] < report["nll_before"]
