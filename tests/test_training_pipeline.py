"""The engine's input and output paths as a GPU needs them (issue 17 part 2): the batch producer thread, the
background checkpoint writer, augmentation drawn on the device generator, and compile: auto."""

import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.hyperparameters import Hyperparameters
from tests.training_helpers import write_cache
from worker.training.checkpoint import CheckpointWriter, host_copy, load_checkpoint
from worker.training.data import CachedDataset, load_cache, make_splits, prepare_batch, random_boxes
from worker.training.engine import BEST, CHECKPOINT, _mix, fit
from worker.training.loader import BatchProducer, plan_batches
from worker.training.optim import compile_pays_off

CPU = torch.device("cpu")


def indexed_dataset(count: int, side: int = 4) -> CachedDataset:
    """Image i is filled with i % 251 and labelled i: every batch says which rows it holds."""
    images = np.empty((count, side, side, 3), dtype=np.uint8)
    images[:] = (np.arange(count) % 251).astype(np.uint8).reshape(-1, 1, 1, 1)
    return CachedDataset(images=images, labels=np.arange(count, dtype=np.int64),
                         preset_splits=np.full(count, -1, dtype=np.int8), classes=[str(i) for i in range(count)])


def saved_epoch(path: Path) -> int:
    checkpoint = load_checkpoint(path)
    assert checkpoint is not None, f"no checkpoint at {path}"
    return int(checkpoint["epoch"])


def producer_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "batch-producer"]


def batches_of(data: CachedDataset, chunks: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    with BatchProducer(data, chunks, device=CPU) as batches:
        for images, labels in batches:
            out.append((images[:, 0, 0, 0].numpy().copy(), labels.numpy().copy()))
    return out


def test_plan_drops_a_ragged_tail_under_8_and_keeps_every_other_index_once():
    order = np.random.default_rng(0).permutation(100)  # 3 x 32 + 4
    chunks = plan_batches(order, 32, pad=True)
    assert [len(chunk) for chunk in chunks] == [32, 32, 32]
    assert np.array_equal(np.concatenate(chunks), order[:96])


def test_plan_pads_a_kept_ragged_tail_with_the_first_images_of_the_order():
    order = np.random.default_rng(1).permutation(110)  # 3 x 32 + 14
    chunks = plan_batches(order, 32, pad=True)
    assert [len(chunk) for chunk in chunks] == [32, 32, 32, 32]
    assert np.array_equal(chunks[-1], np.concatenate([order[96:], order[:18]]))
    seen, counts = np.unique(np.concatenate(chunks), return_counts=True)
    assert np.array_equal(seen, np.arange(110))
    assert sorted(seen[counts == 2].tolist()) == sorted(order[:18].tolist())  # the pad, and nothing else, twice
    assert len(set(chunks[-1].tolist())) == 32  # no image twice in one batch


def test_plan_for_evaluation_keeps_the_ragged_tail_unpadded_and_a_small_split_is_one_batch():
    order = np.arange(70)
    assert [len(chunk) for chunk in plan_batches(order, 32, pad=False)] == [32, 32, 6]
    assert [len(chunk) for chunk in plan_batches(np.arange(20), 32, pad=True)] == [20]
    assert plan_batches(np.arange(0), 32, pad=True) == []


def test_producer_yields_the_planned_batches_in_order_with_matching_labels():
    data = indexed_dataset(300)
    order = np.random.default_rng(2).permutation(300)
    chunks = plan_batches(order, 64, pad=True)
    got = batches_of(data, chunks)
    assert len(got) == len(chunks) == 5
    for (pixels, labels), chunk in zip(got, chunks, strict=True):
        assert np.array_equal(labels, np.sort(chunk))  # each batch is read in sorted order
        assert np.array_equal(pixels, (labels % 251).astype(np.uint8))  # images and labels stay paired


def test_same_seed_gives_the_same_batches_and_another_seed_another_order():
    data = indexed_dataset(200)

    def epoch(seed: int) -> list[list[int]]:
        order = np.arange(200)[torch.randperm(200, generator=torch.Generator().manual_seed(seed)).numpy()]
        return [labels.tolist() for _, labels in batches_of(data, plan_batches(order, 32, pad=True))]

    assert epoch(7) == epoch(7)
    assert epoch(7) != epoch(8)


def test_a_held_batch_is_not_overwritten_while_the_producer_runs_ahead():
    data = indexed_dataset(256)
    chunks = plan_batches(np.arange(256), 32, pad=True)
    with BatchProducer(data, chunks, device=CPU) as batches:
        iterator = iter(batches)
        first_images, first_labels = next(iterator)
        time.sleep(0.3)  # the producer fills the other buffer and waits for this one
        assert first_labels.tolist() == list(range(32))
        assert first_images[:, 0, 0, 0].tolist() == list(range(32))
        _, second_labels = next(iterator)
        assert second_labels.tolist() == list(range(32, 64))


class FailingImages(np.ndarray):
    """An image store whose reads fail from the third batch on (a disk error, a truncated cache)."""

    reads = 0

    def take(self, *args, **kwargs):
        FailingImages.reads += 1
        if FailingImages.reads >= 3:
            raise OSError("read error in the cache")
        return super().take(*args, **kwargs)


def test_an_error_in_the_producer_is_raised_in_the_consumer_and_the_thread_ends():
    data = indexed_dataset(256)
    FailingImages.reads = 0
    data.images = data.images.view(FailingImages)
    received = []
    chunks = plan_batches(np.arange(256), 32, pad=True)
    with pytest.raises(OSError, match="read error in the cache"), BatchProducer(data, chunks, device=CPU) as batches:
        for _, labels in batches:
            received.append(labels[0].item())
    assert received == [0, 32]  # the two good batches, then the error at the batch it would have been
    assert producer_threads() == []


def test_leaving_early_stops_the_thread_and_many_epochs_leave_no_thread_behind():
    data = indexed_dataset(512)
    for _ in range(20):
        with BatchProducer(data, plan_batches(np.arange(512), 16, pad=True), device=CPU) as batches:
            for step, _ in enumerate(batches, 1):
                if step == 2:
                    break
    assert producer_threads() == []


def test_iterating_outside_the_with_block_is_refused():
    producer = BatchProducer(indexed_dataset(16), plan_batches(np.arange(16), 8, pad=True), device=CPU)
    with pytest.raises(RuntimeError, match="inside its with-block"):
        next(iter(producer))


def test_checkpoint_is_written_atomically_and_the_newest_submit_wins(tmp_path):
    path = tmp_path / "checkpoint.pt"
    with CheckpointWriter() as writer:
        for epoch in (1, 2, 3):
            writer.submit([(path, {"epoch": epoch, "weights": torch.full((1000,), float(epoch))})])
    state = load_checkpoint(path)
    assert state["epoch"] == 3
    assert torch.equal(state["weights"], torch.full((1000,), 3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left


def test_checkpoint_holds_the_state_as_submitted_not_as_training_changed_it_after(tmp_path):
    weights = torch.zeros(100_000)
    path = tmp_path / "checkpoint.pt"
    with CheckpointWriter() as writer:
        writer.submit([(path, {"model": {"w": weights}, "history": [{"epoch": 1}]})])
        weights.add_(1.0)  # the next optimiser step, in place, while the write may be in flight
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.zeros(100_000))


def test_the_snapshot_shares_no_memory_with_the_live_state():
    weights, moments = torch.zeros(10), torch.zeros(10)
    snapshot = host_copy({"model": {"w": weights}, "optimizer": {"state": [moments]}, "epoch": 4})
    weights.add_(1.0)
    moments.add_(1.0)
    assert torch.equal(snapshot["model"]["w"], torch.zeros(10))
    assert torch.equal(snapshot["optimizer"]["state"][0], torch.zeros(10))
    assert snapshot["epoch"] == 4


def test_a_failed_write_raises_on_the_training_thread_and_keeps_the_last_complete_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    writer = CheckpointWriter()
    writer.submit([(path, {"epoch": 1})])
    writer.submit([(path, {"epoch": 2, "bad": lambda: None})])  # torch.save cannot pickle a lambda
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        writer.wait()
    assert load_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    writer.submit([(path, {"epoch": 3})])  # the error was reported once; the writer goes on
    writer.wait()
    assert load_checkpoint(path) == {"epoch": 3}


def test_then_runs_on_the_callers_thread_once_the_files_are_on_disk(tmp_path):
    path = tmp_path / "checkpoint.pt"
    reported: list[tuple[int, str]] = []

    def report(epoch: int) -> None:
        reported.append((saved_epoch(path), threading.current_thread().name))

    writer = CheckpointWriter()
    writer.submit([(path, {"epoch": 1, "w": torch.ones(1_000_000)})], then=lambda: report(1))
    while not writer.poll():
        assert reported == []  # not before the write has finished
    writer.submit([(path, {"epoch": 2})], then=lambda: report(2))
    writer.wait()
    writer.wait()  # each then runs once
    assert reported == [(1, "MainThread"), (2, "MainThread")]


def test_a_failed_write_runs_no_then(tmp_path):
    reported: list[int] = []
    writer = CheckpointWriter()
    writer.submit([(tmp_path / "checkpoint.pt", {"bad": lambda: None})], then=lambda: reported.append(1))
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        writer.wait()
    assert reported == []


def test_leaving_on_another_error_waits_for_the_write_in_flight(tmp_path):
    path = tmp_path / "best.pt"
    with pytest.raises(RuntimeError, match="training failed"), CheckpointWriter() as writer:
        writer.submit([(path, {"w": torch.ones(2_000_000)})])
        raise RuntimeError("training failed")
    assert [t for t in threading.enumerate() if t.name == "checkpoint-writer"] == []
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(2_000_000))


@pytest.mark.parametrize("augment", ["basic", "strong"])
def test_augmentation_is_identical_for_the_same_seed_and_differs_for_another(augment):
    raw = torch.randint(0, 256, (6, 40, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def augmented(seed: int) -> torch.Tensor:
        return prepare_batch(raw, image_size=32, train=True, augment=augment,
                             generator=torch.Generator(device=CPU).manual_seed(seed), channels_last=True)

    assert torch.equal(augmented(3), augmented(3))
    assert not torch.equal(augmented(3), augmented(4))


def test_crop_boxes_are_drawn_on_the_generators_device_and_stay_inside_the_image():
    boxes = random_boxes(64, 40, torch.Generator(device=CPU).manual_seed(0))
    assert boxes.device == CPU
    assert bool((boxes[:, :2] >= 0).all()) and bool((boxes[:, 2:] <= 40 + 1e-4).all())
    assert bool((boxes[:, 2] - boxes[:, 0] >= 8 - 1e-4).all())


def test_mixup_and_cutmix_are_identical_for_the_same_seed():
    hp = Hyperparameters(base_model="resnet18", weights="none", augment="basic", mixup=0.4, cutmix=1.0)
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8)

    def mixed(seed: int) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        generator, rng = torch.Generator(device=CPU).manual_seed(seed), np.random.default_rng(seed)
        return [_mix(images, labels, hp, generator, rng) for _ in range(6)]

    first, again = mixed(5), mixed(5)
    for (a_images, a_partner, a_lam), (b_images, b_partner, b_lam) in zip(first, again, strict=True):
        assert torch.equal(a_images, b_images) and torch.equal(a_partner, b_partner) and a_lam == b_lam
    assert sorted(first[0][1].tolist()) == list(range(8))  # partners are a permutation of the batch
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, mixed(6), strict=True))


@pytest.mark.parametrize(("base_model", "image_size", "train_images", "epochs", "expected"), [
    ("resnet50", 224, 14_000, 10, False),   # ~47 s eager: compiling (~70 s) would not pay
    ("resnet50", 224, 14_000, 120, True),   # ~560 s eager: 15% saved > 70 s
    ("resnet18", 224, 14_000, 120, False),  # ~140 s eager: 21 s saved < 40 s
    ("resnet50", 112, 14_000, 120, False),  # a quarter of the pixels, four times the rate
])
def test_compile_auto_compiles_cuda_runs_long_enough_to_repay_it(base_model, image_size, train_images, epochs,
                                                                  expected):
    hp = Hyperparameters(base_model=base_model, image_size=image_size, epochs=epochs, compile="auto")
    assert compile_pays_off(hp=hp, device=torch.device("cuda"), train_images=train_images) is expected


def test_compile_auto_is_off_on_cpu_and_on_or_off_is_obeyed():
    long_run = {"base_model": "resnet50", "image_size": 224, "epochs": 500}
    assert compile_pays_off(hp=Hyperparameters(**long_run), device=CPU, train_images=100_000) is False
    assert compile_pays_off(hp=Hyperparameters(**long_run, compile="on"), device=CPU, train_images=10) is True
    assert compile_pays_off(hp=Hyperparameters(**long_run, compile="off"), device=torch.device("cuda"),
                            train_images=100_000) is False


class CheckpointOnReport:
    """A reporter that reads the checkpoint at each epoch report: what a worker killed right then resumes from."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.seen: list[tuple[int, int]] = []

    def progress(self, progress: dict) -> None:
        pass

    def epoch_done(self, epoch: int, metrics: dict) -> None:
        self.seen.append((epoch, saved_epoch(self.work / CHECKPOINT)))

    def resumed_after(self, epoch: int, metrics: dict) -> None:
        pass

    def stop_requested(self) -> bool:
        return False


def test_each_epoch_is_reported_with_its_own_checkpoint_already_on_disk(tmp_path):
    data = load_cache(write_cache(tmp_path / "cache", classes=["red", "green"], per_class=10))
    hp = Hyperparameters(base_model="resnet18", weights="none", image_size=32, batch_size=8, epochs=3,
                         min_steps_per_epoch=1, learning_rate=1e-3, augment="basic", val_fraction=0.2,
                         test_fraction=0.2, ema="off", recalibrate_bn="off", mixed_precision="off")
    splits = make_splits(labels=data.labels, preset=data.preset_splits, val_fraction=0.2, test_fraction=0.2, seed=0)
    reporter = CheckpointOnReport(tmp_path / "work")
    result = fit(hp=hp, data=data, splits=splits, device=CPU, work_dir=tmp_path / "work", weights_dir=None,
                 reporter=reporter)
    assert reporter.seen == [(1, 1), (2, 2), (3, 3)]
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [BEST, CHECKPOINT]
