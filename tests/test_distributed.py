"""gpus=N: DistributedDataParallel over N spawned processes (gloo on the CPU here, NCCL on GPU hosts).

Two ranks at batch 8 (per process) train like one process at batch 16: same held-out accuracy, one
checkpoint directory, every epoch and progress report once, and one model published by the job."""

from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import select

from shared.config import get_settings
from shared.db import session_scope
from shared.hyperparameters import Hyperparameters
from shared.orm import JobEpoch, Model
from shared.storage import model_dir
from tests.training_helpers import TINY, Recorder, load, queue, write_cache
from worker.training.data import load_cache, stored_splits
from worker.training.engine import BEST, CHECKPOINT, fit
from worker.training.job import run_training_job
from worker.training.launch import RESULT, NotEnoughGpus, fit_distributed, process_count

CPU = torch.device("cpu")
CLASSES = ["red", "green", "blue", "yellow"]
LEARN = {**TINY, "epochs": 2, "val_fraction": 0.15, "test_fraction": 0.25}


def test_two_gloo_ranks_match_one_process_with_one_checkpoint_and_each_report_once(tmp_path):
    cache = write_cache(tmp_path / "cache", classes=CLASSES, per_class=20)
    data = load_cache(cache)
    one_hp = Hyperparameters(**{**LEARN, "batch_size": 16})
    two_hp = Hyperparameters(**{**LEARN, "batch_size": 8})  # per process: the same 16 images a step
    splits = stored_splits(splits_dir=tmp_path / "splits", data=data, hp=one_hp)
    assert int((splits == 0).sum()) == 48

    single = fit(hp=one_hp, data=data, splits=splits, device=CPU, work_dir=tmp_path / "one", weights_dir=None,
                 reporter=Recorder())
    recorder = Recorder()
    double = fit_distributed(world=2, hp=two_hp, cache_dir=cache, classes=CLASSES, splits=splits, device=CPU,
                             work_dir=tmp_path / "two", weights_dir=None, reporter=recorder)

    assert single.test["samples"] == double.test["samples"] == 20
    assert single.test["accuracy"] >= 0.9 and double.test["accuracy"] >= 0.9, (single.history, double.history)
    assert abs(single.history[-1]["train_loss"] - double.history[-1]["train_loss"]) < 0.3
    assert recorder.epochs == [1, 2]
    assert [row["epoch"] for row in double.history] == [1, 2]
    # 48 train images, 2 ranks x 8: 3 steps an epoch, every image seen once across the ranks.
    assert [row["train_images"] for row in double.history] == [48, 48]
    finished = [(p["epoch"], p["step"]) for p in recorder.progress_calls if p["step"] == p["steps"]]
    assert finished == [(1, 3), (2, 3)]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted([BEST, CHECKPOINT, RESULT])
    assert double.stopped is None and double.model.fc[-1].out_features == 4


class StopNow(Recorder):
    def stop_requested(self) -> bool:
        return True


def test_the_parents_stop_flag_stops_every_rank_at_the_same_step(tmp_path):
    cache = write_cache(tmp_path / "cache", classes=CLASSES, per_class=10)
    data = load_cache(cache)
    hp = Hyperparameters(**{**LEARN, "epochs": 3})
    splits = stored_splits(splits_dir=tmp_path / "splits", data=data, hp=hp)
    recorder = StopNow()
    result = fit_distributed(world=2, hp=hp, cache_dir=cache, classes=CLASSES, splits=splits, device=CPU,
                             work_dir=tmp_path / "two", weights_dir=None, reporter=recorder)
    # The flag is up before the ranks start: they agree at the end of epoch 1's steps and leave together.
    assert (result.stopped, result.history, recorder.epochs) == ("cancelled", [], [])
    assert [p.name for p in (tmp_path / "two").iterdir()] == [RESULT]


def test_gpus_resolves_to_processes_or_fails_with_not_enough_gpus():
    assert process_count(Hyperparameters(gpus="all"), CPU, allow_cpu=False) == 1
    assert process_count(Hyperparameters(gpus=3), CPU, allow_cpu=True) == 3
    assert process_count(Hyperparameters(gpus=3, freeze="backbone", augment="none"), CPU, allow_cpu=True) == 1
    with pytest.raises(NotEnoughGpus, match="gpus=2 asks for 2 GPUs but this worker trains on the CPU"):
        process_count(Hyperparameters(gpus=2), CPU, allow_cpu=False)


@pytest.fixture
def four_colours(migrated) -> str:
    from shared.orm import Dataset
    from shared.storage import dataset_cache

    with session_scope() as session:
        dataset = Dataset(name="colours", status="ready", filename="colours.zip", classes=CLASSES)
        session.add(dataset)
        session.flush()
        dataset_id = dataset.id
    write_cache(dataset_cache(get_settings(), dataset_id), classes=CLASSES, per_class=10)
    return dataset_id


def test_job_with_two_processes_records_each_epoch_once_and_publishes_one_model(four_colours, monkeypatch):
    monkeypatch.setenv("TUNESERVE_DDP_ON_CPU", "1")
    get_settings.cache_clear()
    job_id = queue(four_colours, epochs=2, gpus=2)
    run_training_job(job_id)
    job = load(job_id)
    assert (job.status, job.error_code) == ("succeeded", None)
    with session_scope() as session:
        epochs = list(session.scalars(select(JobEpoch.epoch).where(JobEpoch.job_id == job_id)
                                      .order_by(JobEpoch.epoch)))
        models = list(session.scalars(select(Model.id).where(Model.job_id == job_id)))
    assert epochs == [1, 2] and models == [job.model_id]
    assert job.metrics["test"]["samples"] == 8 and job.metrics["epochs_run"] == 2
    assert [p.name for p in Path(model_dir(get_settings(), job.model_id)).parent.iterdir()] == [job.model_id]
    assert np.isfinite(job.metrics["val"]["loss"])


def test_job_asking_more_gpus_than_the_worker_has_fails_with_not_enough_gpus(four_colours):
    job_id = queue(four_colours, gpus=2)
    run_training_job(job_id)
    job = load(job_id)
    assert (job.status, job.error_code, job.model_id) == ("failed", "not_enough_gpus", None)
    assert job.error.startswith("gpus=2 asks for 2 GPUs but this worker trains on the CPU")
