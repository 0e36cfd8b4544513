"""``refit: on``: once a run has picked its epoch count on the validation images, train again from the start on
training + validation images for that many epochs, and publish that model.

On small datasets the validation split is images the published model never learnt from: bench/quality.py's
digits scored 0.961 held-out with 15% + 15% held out and 0.978 with one image per class held out. The price is
a second run. The first run's choices stand: its best epoch, its resolved hyperparameters and the temperature
fitted on its validation images (the refit model has none left to fit one on).
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.hyperparameters import Hyperparameters
from worker.training.checkpoint import load_checkpoint, save_checkpoint
from worker.training.data import TRAIN, VAL, CachedDataset
from worker.training.engine import FitResult, fit
from worker.training.monitor import Reporter

SELECTION = "selection.pt"
REFIT_DIR = "refit"


class _Continued:
    """The second run's reports, numbered after the first run's epochs and marked ``phase: refit``."""

    def __init__(self, reporter: Reporter, *, offset: int, epochs: int) -> None:
        self.reporter, self.offset, self.epochs = reporter, offset, epochs

    def progress(self, progress: dict[str, Any]) -> None:
        self.reporter.progress({**progress, "epoch": progress["epoch"] + self.offset, "epochs": self.epochs,
                                "phase": "refit"})

    def epoch_done(self, epoch: int, metrics: dict[str, Any]) -> None:
        self.reporter.epoch_done(epoch + self.offset, self.row(metrics))

    def resumed_after(self, epoch: int, metrics: dict[str, Any]) -> None:
        self.reporter.resumed_after(epoch + self.offset, self.row(metrics))

    def stop_requested(self) -> bool:
        return self.reporter.stop_requested()

    def row(self, metrics: dict[str, Any]) -> dict[str, Any]:
        # No validation images are left: the engine's stand-in (training figures) would chart as validation.
        return {**metrics, "epoch": metrics["epoch"] + self.offset, "phase": "refit", "val_loss": None,
                "val_accuracy": None}


def refit_splits(splits: np.ndarray) -> np.ndarray:
    """Validation images join training; test images stay out, so the published test figures stay honest."""
    return np.where(splits == VAL, TRAIN, splits).astype(splits.dtype)


def fit_with_refit(
    *, hp: Hyperparameters, data: CachedDataset, splits: np.ndarray, device: torch.device, work_dir: Path,
    weights_dir: Path | None, reporter: Reporter, compile_model: bool = False, features_dir: Path | None = None,
    may_write: Callable[[], bool] | None = None,
) -> FitResult:
    """The selection run (resumable as any run), its outcome saved, then the refit (resumable too).

    A job resumed during the refit does not train the selection run again: ``selection.pt`` holds what the refit
    and the published metrics need from it."""
    common: dict[str, Any] = {"data": data, "device": device, "weights_dir": weights_dir,
                              "compile_model": compile_model, "features_dir": features_dir, "may_write": may_write}
    selection = load_checkpoint(work_dir / SELECTION)
    if selection is None:
        first = fit(hp=hp, splits=splits, work_dir=work_dir, reporter=reporter, **common)
        if first.stopped in ("cancelled", "max_minutes") or not (splits == VAL).any() or first.best_epoch < 1:
            return first  # cancelled, or nothing to refit on: the selection run's model is the answer
        selection = {"hp": first.hp.model_dump(), "history": first.history, "best_epoch": first.best_epoch,
                     "val": first.val, "calibration": first.calibration}
        if may_write is None or may_write():
            save_checkpoint(work_dir / SELECTION, selection)
    chosen = Hyperparameters.model_validate(selection["hp"])
    offset, best_epoch = len(selection["history"]), int(selection["best_epoch"])
    continued = _Continued(reporter, offset=offset, epochs=offset + best_epoch)
    second = fit(hp=chosen.model_copy(update={"epochs": best_epoch, "early_stopping_patience": None,
                                              "refit": "off"}),
                 splits=refit_splits(splits), work_dir=work_dir / REFIT_DIR, reporter=continued, **common)
    history = [*selection["history"], *(continued.row(row) for row in second.history)]
    if second.stopped == "cancelled":
        second.history = history
        return second
    calibration = {**{k: v for k, v in selection["calibration"].items() if k in ("temperature", "fitted_on")},
                   "fitted_by": "the selection run (its validation images are in the refit's training set)"}
    return FitResult(model=second.model, history=history, best_epoch=best_epoch, stopped=None, hp=chosen,
                     features_reused=second.features_reused, val=selection["val"], test=second.test,
                     calibration=calibration)
