"""run_training_job against real Postgres: a job trains and records its epochs and model, frozen-backbone
jobs share cached features, and missing ImageNet weights fail the job with a sentence saying what to do."""


import pytest
from sqlalchemy import select

from shared.config import get_settings
from shared.db import session_scope
from shared.orm import JobEpoch, Model
from shared.storage import dataset_dir, job_dir, model_dir, read_json
from tests.training_helpers import load, queue, ready_dataset_row
from worker.training.job import run_training_job


@pytest.fixture
def dataset_id(migrated) -> str:
    return ready_dataset_row(classes=["red", "green", "blue"], per_class=10)


def test_job_records_each_epoch_the_test_metrics_and_the_model(dataset_id):
    job_id = queue(dataset_id, epochs=2)
    run_training_job(job_id)
    job = load(job_id)
    assert (job.status, job.error_code, job.attempts) == ("succeeded", None, 1)
    with session_scope() as session:
        epochs = session.scalars(select(JobEpoch.epoch).where(JobEpoch.job_id == job_id).order_by(JobEpoch.epoch))
        assert list(epochs) == [1, 2]
        model = session.get(Model, job.model_id)
        assert model.classes == ["red", "green", "blue"]
    test = job.metrics["test"]
    assert test["samples"] == 6 and sum(map(sum, test["confusion_matrix"])) == 6
    assert set(test["per_class"]) == {"red", "green", "blue"} and "top5_accuracy" not in test
    meta = read_json(model_dir(get_settings(), job.model_id) / "model.json")
    assert meta["metrics"] == job.metrics and meta["image_size"] == 32
    assert not job_dir(get_settings(), job_id).exists()  # checkpoints go once the model is published
    assert [p.name for p in (dataset_dir(get_settings(), dataset_id) / "splits").iterdir()] == [
        "seed0-val0.2-test0.2.npy"]


def test_second_frozen_backbone_job_reuses_the_cached_features(dataset_id):
    features = dataset_dir(get_settings(), dataset_id) / "features"
    first = queue(dataset_id, freeze="backbone", augment="none", epochs=2)
    run_training_job(first)
    [cached] = list(features.iterdir())
    stamp = cached.stat().st_mtime_ns
    second = queue(dataset_id, freeze="backbone", augment="none", epochs=2)
    run_training_job(second)
    assert (load(first).status, load(second).status) == ("succeeded", "succeeded")
    assert list(features.iterdir()) == [cached] and cached.stat().st_mtime_ns == stamp
    assert load(second).metrics["test"] == load(first).metrics["test"]


def test_imagenet_weights_missing_offline_fail_the_job_with_weights_unavailable(dataset_id, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    job_id = queue(dataset_id, weights="imagenet")
    run_training_job(job_id)
    job = load(job_id)
    assert (job.status, job.error_code, job.model_id) == ("failed", "weights_unavailable", None)
    assert "resnet18-f37072fd.pth" in job.error and "never downloads" in job.error
    assert "weights 'none' or a file in WEIGHTS_DIR" in job.error
