"""refit: on. The selection run picks the epoch count on validation, a second run trains train + validation images
for that many epochs and is what gets published; a job killed during the refit does not train the selection again."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from sqlalchemy import select

from shared.config import get_settings
from shared.db import session_scope
from shared.hyperparameters import Hyperparameters
from shared.orm import JobEpoch
from shared.storage import job_dir, model_dir, read_json
from tests.training_helpers import TINY, Recorder, load, queue, ready_dataset_row, write_cache
from worker.training.data import TEST, TRAIN, VAL, CachedDataset, load_cache, stored_splits
from worker.training.job import run_training_job
from worker.training.refit import SELECTION, fit_with_refit, refit_splits

CPU = torch.device("cpu")
# Three epochs, no early stopping: the selection's best epoch is whatever validation says; refit trains that many.
REFIT: dict[str, Any] = {**TINY, "epochs": 3, "refit": "on", "val_fraction": 0.2, "test_fraction": 0.2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> CachedDataset:
    root = tmp_path_factory.mktemp("refit")
    return load_cache(write_cache(root / "cache", classes=["red", "green", "blue"], per_class=20))


def refit(data: CachedDataset, work: Path, reporter: Recorder) -> Any:
    hp = Hyperparameters(**REFIT)
    splits = stored_splits(splits_dir=work / "splits", data=data, hp=hp)
    return splits, fit_with_refit(hp=hp, data=data, splits=splits, device=CPU, work_dir=work / "job",
                                  weights_dir=None, reporter=reporter)


def test_validation_images_join_training_and_test_images_stay_out() -> None:
    splits = np.array([TRAIN, VAL, TEST, VAL, TRAIN, TEST], dtype=np.int8)
    assert refit_splits(splits).tolist() == [TRAIN, TRAIN, TEST, TRAIN, TRAIN, TEST]
    assert refit_splits(splits).dtype == np.int8


def test_refit_trains_the_chosen_epochs_on_train_and_validation_and_publishes_that_model(tiny, tmp_path) -> None:
    recorder = Recorder()
    splits, result = refit(tiny, tmp_path, recorder)
    train, val, test = (int((splits == code).sum()) for code in (TRAIN, VAL, TEST))
    selection, second = result.history[:3], result.history[3:]
    best = result.best_epoch
    assert 1 <= best <= 3
    assert [row["epoch"] for row in result.history] == [1, 2, 3, *range(4, 4 + best)]
    assert recorder.epochs == [row["epoch"] for row in result.history]  # each reported once, numbered on
    assert [row.get("phase") for row in result.history] == [None] * 3 + ["refit"] * best
    assert all(row["val_accuracy"] is not None for row in selection)
    assert all(row["val_accuracy"] is None and row["val_loss"] is None for row in second)  # none left to score
    # Full batches of 8, one pass (TINY): the refit's epochs see the validation images too.
    assert {row["train_images"] for row in selection} == {train // 8 * 8}
    assert {row["train_images"] for row in second} == {(train + val) // 8 * 8}
    assert result.test["samples"] == test  # the same untouched test images
    assert result.val["samples"] == val  # the selection's validation report: the refit model has none
    assert result.calibration["fitted_on"] == val and result.calibration["temperature"] > 0
    assert result.hp.refit == "on" and result.hp.batch_size == 8
    assert read_selection(tmp_path)["best_epoch"] == best  # what a job resumed during the refit starts from


def read_selection(tmp_path: Path) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(tmp_path / "job" / SELECTION, weights_only=True)
    return state


def test_a_refit_stopped_midway_resumes_without_training_the_selection_again(tiny, tmp_path) -> None:
    whole = Recorder()
    _, uninterrupted = refit(tiny, tmp_path / "whole", whole)
    best = uninterrupted.best_epoch
    if best < 2:
        pytest.skip("validation picked epoch 1: a one-epoch refit has no middle to stop in")  # seeded: not today
    stopped = Recorder(stop_after_epochs=4)  # the selection's 3 epochs and the refit's first
    _, first = refit(tiny, tmp_path / "cut", stopped)
    assert first.stopped == "cancelled"
    assert read_selection(tmp_path / "cut")["best_epoch"] == best
    resumed = Recorder()
    _, result = refit(tiny, tmp_path / "cut", resumed)
    assert resumed.resumed == [4]  # the refit's checkpoint, numbered after the selection's 3 epochs
    assert resumed.epochs == list(range(5, 4 + best))  # no selection epoch trained or reported again
    assert [row["epoch"] for row in result.history] == [row["epoch"] for row in uninterrupted.history]
    for mine, theirs in zip(result.history, uninterrupted.history, strict=True):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)
    assert result.test["accuracy"] == pytest.approx(uninterrupted.test["accuracy"])


@pytest.mark.parametrize(("body", "says"), [
    ({"refit": "on", "max_minutes": 5}, "refit: a time budget cannot be split"),
    ({"refit": "on", "gpus": 2}, "refit: runs on one GPU"),
    ({"refit": "on", "val_fraction": 0.0}, "refit: needs validation images"),
])
def test_refit_refuses_what_it_cannot_honour(body: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Hyperparameters(**body)
    assert says in str(caught.value)


def test_a_refit_job_records_both_phases_and_publishes_the_refit_model(migrated) -> None:
    dataset_id = ready_dataset_row(classes=["red", "green", "blue"], per_class=20)
    job_id = queue(dataset_id, epochs=2, refit="on")
    run_training_job(job_id)
    job = load(job_id)
    assert (job.status, job.error_code) == ("succeeded", None)
    assert job.metrics is not None and job.model_id is not None
    best = job.metrics["best_epoch"]
    with session_scope() as session:
        rows = session.scalars(select(JobEpoch).where(JobEpoch.job_id == job_id).order_by(JobEpoch.epoch)).all()
        assert [row.epoch for row in rows] == [1, 2, *range(3, 3 + best)]
        assert [row.metrics.get("phase") for row in rows] == [None, None] + ["refit"] * best
    assert job.metrics["epochs_run"] == 2 + best
    assert job.metrics["calibration"]["fitted_by"].startswith("the selection run")
    meta = read_json(model_dir(get_settings(), job.model_id) / "model.json")
    assert meta["hyperparameters"]["refit"] == "on" and meta["metrics"] == job.metrics
    assert not job_dir(get_settings(), job_id).exists()  # selection.pt and the refit's checkpoints go too
