"""The training loop, in the shape of the torchvision references: plain functions, plain dicts."""

import copy
import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from shared.hyperparameters import Hyperparameters
from shared.jobstate import StopReason
from shared.modeling import build_model
from worker.training import ddp
from worker.training.auto import batch_size_of, passes_per_epoch, resolve
from worker.training.averaging import WeightEma, ema_decay, eval_batches, recalibrate_bn, recalibration_indices
from worker.training.calibration import calibration_report
from worker.training.checkpoint import CheckpointWriter, load_checkpoint
from worker.training.data import TEST, TRAIN, VAL, CachedDataset, batch_count, prepare_batch
from worker.training.features import cached_features, features_path, uses_feature_cache
from worker.training.loader import BatchProducer, plan_batches
from worker.training.metrics import classification_report
from worker.training.misclassified import pick_misclassified
from worker.training.monitor import Reporter, StepMonitor
from worker.training.optim import (
    amp_dtype,
    apply_freeze,
    build_optimizer,
    build_scheduler,
    class_weights,
)

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"

# (uint8 NHWC batch or feature rows, train?, generator) -> model input
Prepare = Callable[[torch.Tensor, bool, torch.Generator], torch.Tensor]


def image_preparer(hp: Hyperparameters) -> Prepare:
    def prepare(raw: torch.Tensor, train: bool, generator: torch.Generator) -> torch.Tensor:
        return prepare_batch(raw, image_size=hp.image_size, train=train, augment=hp.augment, generator=generator,
                             channels_last=hp.channels_last)

    return prepare


def feature_preparer(raw: torch.Tensor, train: bool, generator: torch.Generator) -> torch.Tensor:  # noqa: ARG001
    # A Prepare: cached backbone features take no augmentation, so ``train`` and ``generator`` go unused.
    return raw.float()


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, Any]]
    best_epoch: int
    stopped: StopReason | None
    hp: Hyperparameters  # as trained: every ``auto`` resolved
    features_reused: bool | None = None  # None: the frozen-backbone fast path was not taken
    val: dict[str, Any] = field(default_factory=dict)
    test: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)  # temperature fitted on val, test ECE before/after


def _mix(images: torch.Tensor, labels: torch.Tensor, hp: Hyperparameters, generator: torch.Generator,
         rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup or CutMix (chosen per batch when both are on); returns mixed images, partner labels, lam.

    The per-batch scalars (which mix, lam, the CutMix box) come from the host ``rng`` and the pairing from the
    device ``generator``: nothing is read back from the device, so a GPU step never waits here."""
    use_cutmix = hp.cutmix > 0 and (hp.mixup == 0 or rng.random() < 0.5)
    alpha = hp.cutmix if use_cutmix else hp.mixup
    lam = float(rng.beta(alpha, alpha))
    perm = torch.randperm(images.shape[0], generator=generator, device=generator.device).to(images.device)
    if use_cutmix:
        side = images.shape[-1]
        cut = int(side * (1 - lam) ** 0.5)
        cx, cy = (int(value) for value in rng.integers(0, side, 2))
        x1, x2 = max(cx - cut // 2, 0), min(cx + cut // 2, side)
        y1, y2 = max(cy - cut // 2, 0), min(cy + cut // 2, side)
        images = images.clone()
        images[:, :, y1:y2, x1:x2] = images[perm, :, y1:y2, x1:x2]
        lam = 1 - (x2 - x1) * (y2 - y1) / (side * side)
    else:
        images = lam * images + (1 - lam) * images[perm]
    return images, labels[perm], lam


def apply_gradients(*, loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    ema: WeightEma | None) -> None:
    """One optimizer step from ``loss`` (scaled when fp16 needs it), then the weight average follows."""
    optimizer.zero_grad(set_to_none=True)
    torch.autograd.backward(scaler.scale(loss))
    scaler.step(optimizer)
    scaler.update()
    if ema is not None:
        ema.update()


def train_one_epoch(
    *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
    criterion: nn.Module, data: CachedDataset, indices: np.ndarray, hp: Hyperparameters, device: torch.device,
    generator: torch.Generator, dtype: torch.dtype | None, frozen: list[nn.Module],
    on_step: Callable[[int, int, int], bool], prepare: Prepare, ema: WeightEma | None = None,
) -> dict[str, float]:
    """One pass over ``indices`` in full batches (``plan_batches``), assembled by a producer thread;
    ``on_step(step, steps, images)`` returns True to stop early.

    ``generator`` (on the host) draws the order and seeds the augmentation, which is drawn on ``device``; the
    loss and accuracy add up on the device and are read once, at the end of the epoch: no step waits for the
    device to answer."""
    model.train()
    for module in frozen:
        module.eval()  # frozen stages keep their BatchNorm statistics too
    order = indices[torch.randperm(len(indices), generator=generator).numpy()]
    chunks = plan_batches(order, batch_size_of(hp), pad=True)
    steps = max(1, len(chunks))
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    augment = torch.Generator(device=device).manual_seed(seed)
    rng = np.random.default_rng(seed)
    mixed = (hp.mixup > 0 or hp.cutmix > 0) and hp.augment != "none"
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = 0
    with BatchProducer(data, chunks, device=device) as batches:
        for step, (raw, labels) in enumerate(batches, 1):
            images = prepare(raw, True, augment)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                if mixed:
                    images, partner, lam = _mix(images, labels, hp, augment, rng)
                    logits = model(images)
                    loss = lam * criterion(logits, labels) + (1 - lam) * criterion(logits, partner)
                else:
                    logits = model(images)
                    loss = criterion(logits, labels)
            apply_gradients(loss=loss, optimizer=optimizer, scaler=scaler, ema=ema)
            scheduler.step()
            loss_sum += loss.detach() * labels.shape[0]
            correct += (logits.detach().argmax(1) == labels).sum()
            seen += labels.shape[0]
            if on_step(step, steps, seen):
                break
    ddp.broadcast_buffers(model)
    loss_sum, correct, seen = ddp.epoch_totals(loss_sum, correct, seen)
    seen = max(seen, 1)
    return {"train_loss": loss_sum.item() / seen, "train_accuracy": correct.item() / seen, "train_images": seen}


@torch.no_grad()
def evaluate(
    *, model: nn.Module, data: CachedDataset, indices: np.ndarray, hp: Hyperparameters, device: torch.device,
    dtype: torch.dtype | None, prepare: Prepare, batch_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and labels for ``indices``, with the eval crop."""
    model.eval()
    probs, labels_out = [], []
    generator = torch.Generator(device=device).manual_seed(0)  # the eval crop draws nothing
    chunks = plan_batches(np.sort(indices), batch_size or batch_size_of(hp) * 2, pad=False)
    with BatchProducer(data, chunks, device=device) as batches:
        for raw, labels in batches:
            images = prepare(raw, False, generator)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = model(images)
            probs.append(torch.softmax(logits.float(), dim=1))
            labels_out.append(labels.clone())  # the producer reuses its buffers
    if not probs:
        return np.zeros((0, data.num_classes), dtype=np.float32), np.zeros(0, dtype=np.int64)
    # One copy back at the end instead of a device round trip per batch.
    return torch.cat(probs).cpu().numpy(), torch.cat(labels_out).cpu().numpy()


def _weights_of(model: nn.Module, trainable: nn.Module, ema: WeightEma | None, weights: str) -> dict[str, Any]:
    """The whole model's state with the chosen weights (``trainable`` is the model or, on cached
    features, its head)."""
    state = model.state_dict()
    if weights == "ema" and ema is not None:
        prefix = "" if trainable is model else "fc."
        state.update({prefix + key: value for key, value in ema.module.state_dict().items()})
    return state


def _loss(probs: np.ndarray, labels: np.ndarray) -> float:
    if len(labels) == 0:
        return float("nan")
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


def fit(
    *, hp: Hyperparameters, data: CachedDataset, splits: np.ndarray, device: torch.device, work_dir: Path,
    weights_dir: Path | None, reporter: Reporter, compile_model: bool = False, features_dir: Path | None = None,
    may_write: Callable[[], bool] | None = None,
) -> FitResult:
    """``_fit`` with its checkpoint writer, which is joined however training ends (a failed job's files are
    removed after this returns: no write may land after that). ``may_write``: see CheckpointWriter."""
    with CheckpointWriter(may_write) as writer:
        return _fit(hp=hp, data=data, splits=splits, device=device, work_dir=work_dir, weights_dir=weights_dir,
                    reporter=reporter, compile_model=compile_model, features_dir=features_dir, writer=writer)


def _fit(
    *, hp: Hyperparameters, data: CachedDataset, splits: np.ndarray, device: torch.device, work_dir: Path,
    weights_dir: Path | None, reporter: Reporter, compile_model: bool, features_dir: Path | None,
    writer: CheckpointWriter,
) -> FitResult:
    """Train, keep the best epoch by validation accuracy, resume from ``work_dir`` if it has a checkpoint.

    With ``features_dir`` and a frozen backbone without augmentation only the head is trained, on
    backbone features cached under ``features_dir``. Every epoch reseeds from (seed, epoch), so the RNG
    state a checkpoint needs is its epoch number, and a resumed run matches an uninterrupted one.
    """
    if device.type == "cuda":
        # Static shapes (plan_batches pads the last batch): one autotuning pass per layer shape, then the fastest
        # kernels. Set here so every caller (the job, ranks, benches) gets it.
        torch.backends.cudnn.benchmark = True
    train_idx, val_idx, test_idx = (np.flatnonzero(splits == code) for code in (TRAIN, VAL, TEST))
    hp = resolve(hp, train_count=ddp.shard_size(len(train_idx)), device=device)
    torch.manual_seed(hp.seed)
    model = build_model(base_model=hp.base_model, num_classes=data.num_classes, weights=hp.weights,
                        weights_dir=weights_dir, head=hp.head, dropout=hp.dropout)
    frozen = apply_freeze(model, hp.freeze_stages)
    model.to(device)
    if hp.channels_last:
        model = model.to(memory_format=torch.channels_last)
    dtype = amp_dtype(hp, device)
    passes = passes_per_epoch(ddp.shard_size(len(train_idx)), hp)
    steps_per_epoch = max(1, batch_count(ddp.shard_size(len(train_idx)) * passes, batch_size_of(hp),
                                         drop_last=True))
    optimizer = build_optimizer(model, hp)
    scheduler = build_scheduler(optimizer, hp, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    weight = class_weights(data.labels[train_idx], data.num_classes, hp.class_weighting)
    criterion = nn.CrossEntropyLoss(weight=None if weight is None else weight.to(device),
                                    label_smoothing=hp.label_smoothing)
    prepare, source, features_reused = image_preparer(hp), data, None
    if features_dir is not None and uses_feature_cache(hp):
        features, features_reused = cached_features(
            path=features_path(features_dir=features_dir, hp=hp, weights_dir=weights_dir), model=model, data=data,
            hp=hp, device=device, dtype=dtype)
        prepare, source = feature_preparer, dataclasses.replace(data, images=features)
    trainable = model.get_submodule("fc") if features_reused is not None else model
    runner = cast(nn.Module, torch.compile(trainable)) if compile_model else trainable
    trainer = ddp.wrap(runner, device)
    ema = WeightEma(trainable, decay=ema_decay(hp.epochs * steps_per_epoch)) if hp.ema == "on" else None
    recalibration = recalibration_indices(train_idx, seed=hp.seed) if hp.recalibrate_bn == "on" else None

    state = load_checkpoint(work_dir / CHECKPOINT)
    history: list[dict[str, Any]] = []
    best = {"epoch": 0, "val_accuracy": -1.0, "val_loss": float("inf")}
    bad_epochs, elapsed_before, start_epoch = 0, 0.0, 1
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        history, best, bad_epochs = state["history"], state["best"], state["bad_epochs"]
        elapsed_before, start_epoch = state["elapsed"], state["epoch"] + 1
        if ddp.is_main():
            reporter.resumed_after(state["epoch"], history[-1])

    started = time.monotonic()
    deadline = None if hp.max_minutes is None else started + hp.max_minutes * 60 - elapsed_before
    monitor = StepMonitor(hp=hp, reporter=reporter, writer=writer, deadline=deadline)
    stopped: StopReason | None = None
    for epoch in range(start_epoch, hp.epochs + 1):
        torch.manual_seed(hp.seed * 100_003 + epoch)
        # Ranks shuffle alike and split the order; each augments its own share with its own generator.
        train_shard = ddp.shard(train_idx, seed=hp.seed * 100_003 + epoch)
        generator = torch.Generator().manual_seed(hp.seed * 100_003 + epoch + 1_000_003 * ddp.rank())
        epoch_start = monitor.start_epoch(epoch)
        train_metrics = train_one_epoch(
            model=trainer, optimizer=optimizer, scheduler=scheduler, scaler=scaler, criterion=criterion, data=source,
            indices=np.tile(train_shard, passes), hp=hp, device=device, generator=generator, dtype=dtype, frozen=frozen,
            on_step=monitor, prepare=prepare, ema=ema,
        )
        stopped = monitor.stopped
        if stopped == "cancelled":
            break
        train_seconds = time.monotonic() - epoch_start
        # Validation runs the eager module: a compiled one would compile (and recompile) an eval graph too.
        # The raw and the averaged weights are both scored; the better one is what this epoch would publish.
        scores: dict[str, tuple[float, float]] = {}
        for name, module in (("raw", trainable), *((("ema", ema.module),) if ema is not None else ())):
            if recalibration is not None:
                recalibrate_bn(module, eval_batches(data=source, indices=recalibration, batch_size=batch_size_of(hp),
                                                    device=device, prepare=prepare), autocast=(device, dtype))
            probs, labels = ddp.gather(*evaluate(
                model=module, data=source, indices=ddp.shard(val_idx), hp=hp, device=device, dtype=dtype,
                prepare=prepare))
            scores[name] = ((float((probs.argmax(1) == labels).mean()), _loss(probs, labels)) if len(labels)
                            else (train_metrics["train_accuracy"], train_metrics["train_loss"]))
        weights = max(scores, key=lambda name: (scores[name][0], -scores[name][1], name == "ema"))
        val_accuracy, val_loss = scores[weights]
        metrics = {
            "epoch": epoch, **train_metrics, "val_loss": val_loss, "val_accuracy": val_accuracy, "weights": weights,
            "passes": passes,
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_second": round(train_metrics["train_images"] / max(train_seconds, 1e-9), 2),
            "seconds": round(time.monotonic() - epoch_start, 3),
        }
        history.append(metrics)
        files: list[tuple[Path, dict[str, Any]]] = []
        # Without validation images (a refit) there is nothing to select on: the last epoch is the model.
        improved = not len(val_idx) or val_accuracy > best["val_accuracy"] or (
            val_accuracy == best["val_accuracy"] and val_loss < best["val_loss"])
        if improved:
            best = {"epoch": epoch, "val_accuracy": val_accuracy, "val_loss": val_loss}
            bad_epochs = 0
            if ddp.is_main():
                files.append((work_dir / BEST, {"model": _weights_of(model, trainable, ema, weights), "epoch": epoch}))
        else:
            bad_epochs += 1
        if ddp.is_main():
            files.append((work_dir / CHECKPOINT, {
                "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "history": history,
                "best": best, "bad_epochs": bad_epochs, "elapsed": elapsed_before + time.monotonic() - started,
                **({"ema": ema.state_dict()} if ema is not None else {}),
            }))
            # Snapshot now, written while the next epoch trains; the epoch is reported once its checkpoint is on
            # disk, so a worker killed after the report resumes after this epoch.
            writer.submit(files, then=functools.partial(reporter.epoch_done, epoch, metrics))
        else:
            reporter.epoch_done(epoch, metrics)
        if stopped is None and hp.early_stopping_patience and bad_epochs >= hp.early_stopping_patience:
            stopped = "early_stopping"
        if stopped is not None:
            break

    if not ddp.is_main():  # rank 0 alone scores and returns the model
        return FitResult(model=model, history=history, best_epoch=int(best["epoch"]), stopped=stopped, hp=hp)
    writer.wait()  # best.pt of the last epoch may still be in flight
    best_state = load_checkpoint(work_dir / BEST)
    final = copy.deepcopy(model)
    if best_state is not None:
        final.load_state_dict(best_state["model"])
    result = FitResult(model=final, history=history, best_epoch=int(best["epoch"]), stopped=stopped, hp=hp,
                       features_reused=features_reused)
    if stopped != "cancelled":
        scorer = final.get_submodule("fc") if features_reused is not None else final
        scored: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, idx in (("val", val_idx), ("test", test_idx)):
            probs, labels = evaluate(model=scorer, data=source, indices=idx, hp=hp, device=device, dtype=dtype,
                                     prepare=prepare)
            scored[name] = (probs, labels)
            report = classification_report(probs=probs, labels=labels, classes=data.classes)
            if len(labels):
                report["loss"] = _loss(probs, labels)
            if name == "test":  # evaluate scores indices in sorted order
                report["misclassified"] = pick_misclassified(indices=np.sort(idx), probs=probs, labels=labels,
                                                             classes=data.classes)
            setattr(result, name, report)
        result.calibration = calibration_report(val=scored["val"], test=scored["test"])
    return result
