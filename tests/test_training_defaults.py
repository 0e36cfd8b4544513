"""The ``auto`` defaults (worker/training/auto.py), small-data splits, weight averaging and BatchNorm
recalibration: each rule gives the values it documents, and a run records what it used."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from shared.hyperparameters import Hyperparameters
from tests.training_helpers import TINY, Recorder, write_cache
from worker.training.auto import auto_batch_size, cpu_has_native_bf16, resolve
from worker.training.averaging import WeightEma, ema_decay, recalibrate_bn, recalibration_indices
from worker.training.data import TEST, TRAIN, VAL, held_out_fraction, load_cache, make_splits
from worker.training.engine import CHECKPOINT, fit

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(("train_count", "device", "expected"), [
    (60, CPU, 32), (400, CPU, 32), (1000, CPU, 32), (2800, CPU, 64), (100_000, CPU, 64),
    (2800, CUDA, 64), (100_000, CUDA, 256),
])
def test_auto_batch_size_gives_enough_steps_per_epoch(train_count: int, device: torch.device, expected: int) -> None:
    assert auto_batch_size(train_count, device) == expected


def test_resolve_fills_only_what_the_user_left_auto() -> None:
    scratch = resolve(Hyperparameters(weights="none", epochs=3), train_count=2800, device=CPU)
    assert (scratch.batch_size, scratch.augment, scratch.ema, scratch.recalibrate_bn) == (64, "none", "on", "on")
    assert scratch.learning_rate == pytest.approx(2e-3 * (64 / 32) ** 0.5)
    pretrained = resolve(Hyperparameters(epochs=30), train_count=100_000, device=CPU)
    assert (pretrained.augment, pretrained.recalibrate_bn) == ("basic", "off")  # 30 x 1562 steps: stats settled
    assert pretrained.learning_rate == pytest.approx(1e-3 * 2 ** 0.5)
    sgd = resolve(Hyperparameters(optimizer="sgd"), train_count=100_000, device=CUDA)
    assert sgd.learning_rate == pytest.approx(0.1)  # linear scaling, 0.1 at batch 256
    pinned = Hyperparameters(batch_size=16, learning_rate=0.05, augment="strong", ema="off", recalibrate_bn="off",
                             mixed_precision="off")
    assert resolve(pinned, train_count=2800, device=CPU) == pinned


def cpuinfo_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="the CPU's flags are read from Linux's /proc/cpuinfo")
def test_auto_precision_is_bf16_exactly_on_cpus_with_bf16_in_hardware() -> None:
    native = bool(cpuinfo_flags() & {"avx512_bf16", "amx_bf16"})
    assert cpu_has_native_bf16() is native
    resolved = resolve(Hyperparameters(weights="none"), train_count=400, device=CPU)
    assert resolved.mixed_precision == ("bf16" if native else "off")  # what the job records is what it ran
    assert resolve(Hyperparameters(mixed_precision="off"), train_count=400, device=CPU).mixed_precision == "off"


def test_small_classes_keep_most_images_for_training() -> None:
    assert held_out_fraction("auto", 24) == pytest.approx(0.08 + 0.07 * 4 / 40)
    assert held_out_fraction("auto", 10) == pytest.approx(0.08)
    assert held_out_fraction("auto", 500) == held_out_fraction(0.15, 1) == 0.15
    labels = np.repeat(np.arange(3), 24)
    splits = make_splits(labels=labels, preset=np.full(72, -1), val_fraction="auto", test_fraction="auto", seed=0)
    for cls in range(3):  # stratified: 20 / 2 / 2 in every class
        assert np.bincount(splits[labels == cls], minlength=3).tolist() == [20, 2, 2]
    big = np.repeat(np.arange(2), 400)
    splits = make_splits(labels=big, preset=np.full(800, -1), val_fraction="auto", test_fraction="auto", seed=0)
    assert np.bincount(splits).tolist() == [560, 120, 120]


def test_ema_averages_parameters_with_a_warm_up_and_copies_buffers() -> None:
    model = nn.Sequential(nn.Linear(2, 1, bias=False), nn.BatchNorm1d(1))
    weight, running_mean = model.get_parameter("0.weight"), model.get_buffer("1.running_mean")
    with torch.no_grad():
        weight.fill_(0.0)
    ema = WeightEma(model, decay=0.9)
    with torch.no_grad():
        weight.fill_(1.0)
        running_mean.fill_(3.0)
    ema.update()  # warm-up decay min(0.9, 2 / 11)
    assert ema.module.get_parameter("0.weight").flatten().tolist() == pytest.approx([1 - 2 / 11] * 2)
    assert ema.module.get_buffer("1.running_mean").item() == 3.0
    for _ in range(200):
        ema.update()
    assert ema.module.get_parameter("0.weight").flatten().tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert ema_decay(100) == 0.9 and ema_decay(10_000) == pytest.approx(0.999) and ema_decay(10**8) == 0.9998


def test_recalibration_replaces_trainable_statistics_and_keeps_frozen_ones() -> None:
    trainable, frozen = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    model = nn.Sequential(trainable, frozen)
    frozen.requires_grad_(False)
    model.get_buffer("1.running_mean").fill_(7.0)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(64, 2, generator=generator) * 2 + 5 for _ in range(8)]
    model.train()
    assert recalibrate_bn(model, batches)
    everything = torch.cat(batches)
    assert model.get_buffer("0.running_mean").tolist() == pytest.approx(everything.mean(0).tolist(), abs=1e-5)
    assert trainable.momentum == 0.1 and model.training  # restored
    assert model.get_buffer("1.running_mean").tolist() == [7.0, 7.0]
    assert not recalibrate_bn(nn.Linear(2, 2), batches)
    picked = recalibration_indices(np.arange(10_000), seed=3)
    assert len(picked) == 512 and (np.diff(picked) > 0).all()
    assert (recalibration_indices(np.arange(10_000), seed=3) == picked).all()


def test_a_run_records_what_auto_became_and_resumes_its_average(tmp_path: Path) -> None:
    data = load_cache(write_cache(tmp_path / "cache", classes=["red", "blue"], per_class=24))
    splits = make_splits(labels=data.labels, preset=data.preset_splits, val_fraction="auto", test_fraction="auto",
                         seed=0)
    assert np.bincount(splits).tolist() == [40, 4, 4]
    hp = Hyperparameters(**{**TINY, "epochs": 2, "batch_size": "auto", "val_fraction": "auto",
                            "test_fraction": "auto", "min_steps_per_epoch": 10})
    work = tmp_path / "work"
    stopped = fit(hp=hp, data=data, splits=splits, device=CPU, work_dir=work, weights_dir=None,
                  reporter=Recorder(stop_after_epochs=1))
    assert stopped.stopped == "cancelled"
    saved = torch.load(work / CHECKPOINT, weights_only=True)
    assert saved["ema"]["updates"] == 10  # 40 images in batches of 32, passed over 8 times for 10 steps
    result = fit(hp=hp, data=data, splits=splits, device=CPU, work_dir=work, weights_dir=None, reporter=Recorder())
    resolved = result.hp
    assert (resolved.batch_size, resolved.augment, resolved.ema, resolved.recalibrate_bn) == (32, "none", "on", "on")
    assert [(h["epoch"], h["passes"], h["train_images"]) for h in result.history] == [(1, 8, 320), (2, 8, 320)]
    assert {h["weights"] for h in result.history} <= {"raw", "ema"}
    fresh = fit(hp=hp, data=data, splits=splits, device=CPU, work_dir=tmp_path / "fresh", weights_dir=None,
                reporter=Recorder())
    assert result.history[-1]["val_loss"] == pytest.approx(fresh.history[-1]["val_loss"], rel=1e-4)
    assert (TRAIN, VAL, TEST) == (0, 1, 2)
