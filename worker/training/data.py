"""The training data path: the uint8 cache, stratified splits, and batches augmented as tensors.

Batches leave the cache as uint8 and are cropped, resized, flipped and normalised wherever the
model lives, so the same code feeds a CPU run and keeps a GPU busy.
"""

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from shared.hyperparameters import Hyperparameters
from shared.modeling.transforms import normalize_batch, resize_size_for
from shared.storage import atomic_path, read_json

TRAIN, VAL, TEST = 0, 1, 2
_CPU = torch.device("cpu")


@dataclass
class CachedDataset:
    images: np.ndarray  # N x S x S x 3 uint8, memory-mapped
    labels: np.ndarray  # N int64
    preset_splits: np.ndarray  # N int8: -1 none, 0 train, 1 val, 2 test
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_cache(cache_dir: Path) -> CachedDataset:
    index = read_json(cache_dir / "index.json")
    return CachedDataset(
        images=np.load(cache_dir / "images.npy", mmap_mode="r"),
        labels=np.load(cache_dir / "labels.npy"),
        preset_splits=np.load(cache_dir / "splits.npy"),
        classes=index["classes"],
    )


def _carve(indices: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split off ``fraction`` of ``indices`` (at least one when there are three or more)."""
    count = int(round(len(indices) * fraction))
    if fraction > 0 and count == 0 and len(indices) >= 3:
        count = 1
    shuffled = rng.permutation(indices)
    return shuffled[count:], shuffled[:count]


def held_out_fraction(setting: float | str, class_count: int) -> float:
    """``auto``: 15% of a class with 60 or more images, shrinking to 8% at 20 or fewer, so that a class of
    two dozen images keeps 20 of them for training (and still gives one or two to each held-out split)."""
    if setting != "auto":
        return float(setting)
    return 0.15 - 0.07 * (1.0 - min(1.0, max(0.0, (class_count - 20) / 40)))


def make_splits(
    *, labels: np.ndarray, preset: np.ndarray, val_fraction: float | str, test_fraction: float | str, seed: int
) -> np.ndarray:
    """Stratified split codes per image; keeps the splits the dataset came with where it has them."""
    rng = np.random.default_rng(seed)
    splits = np.full(len(labels), TRAIN, dtype=np.int8)
    if (preset >= 0).all():
        splits[:] = preset
        have = set(np.unique(preset).tolist())
        for code, fraction in ((TEST, test_fraction), (VAL, val_fraction)):
            if code in have:
                continue
            for cls in np.unique(labels):
                pool = np.flatnonzero((splits == TRAIN) & (labels == cls))
                _, taken = _carve(pool, held_out_fraction(fraction, len(pool)), rng)
                splits[taken] = code
        return splits
    for cls in np.unique(labels):
        pool = np.flatnonzero(labels == cls)
        test_share = held_out_fraction(test_fraction, len(pool))
        val_share = held_out_fraction(val_fraction, len(pool))
        rest, test = _carve(pool, test_share, rng)
        _, val = _carve(rest, val_share / max(1e-9, 1 - test_share), rng)
        splits[test] = TEST
        splits[val] = VAL
    return splits


def stored_splits(*, splits_dir: Path, data: CachedDataset, hp: Hyperparameters) -> np.ndarray:
    """The split for this dataset + seed + fractions, made once and kept on disk so that the same images
    are always the test set, whichever job, worker or library version asks later."""
    path = splits_dir / f"seed{hp.seed}-val{hp.val_fraction}-test{hp.test_fraction}.npy"
    if path.is_file():
        kept: np.ndarray = np.load(path)
        return kept
    splits = make_splits(labels=data.labels, preset=data.preset_splits, val_fraction=hp.val_fraction,
                         test_fraction=hp.test_fraction, seed=hp.seed)
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        np.save(handle, splits)
    return splits


def random_boxes(
    count: int, side: int, generator: torch.Generator, scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """RandomResizedCrop boxes (x1, y1, x2, y2) for ``count`` images of ``side`` x ``side``, drawn where
    ``generator`` lives: a CUDA generator keeps the draw on the GPU, with no host round trip per step."""
    device = generator.device
    area = torch.empty(count, device=device).uniform_(*scale, generator=generator) * side * side
    log_ratio = torch.empty(count, device=device).uniform_(float(np.log(ratio[0])), float(np.log(ratio[1])),
                                                           generator=generator)
    aspect = torch.exp(log_ratio)
    width = torch.sqrt(area * aspect).clamp(8, side)
    height = torch.sqrt(area / aspect).clamp(8, side)
    x1 = torch.rand(count, generator=generator, device=device) * (side - width)
    y1 = torch.rand(count, generator=generator, device=device) * (side - height)
    return torch.stack([x1, y1, x1 + width, y1 + height], dim=1)


@functools.lru_cache(maxsize=32)
def center_boxes(count: int, side: int, image_size: int, device: torch.device = _CPU) -> torch.Tensor:
    """The eval crop: what is left of the cache square after resizing to resize_size and cropping. Cached per
    device: a fresh tensor would be a blocking host-to-device copy every batch. Callers must not modify it."""
    crop = side * image_size / resize_size_for(image_size)
    start = (side - crop) / 2
    return torch.tensor([[start, start, start + crop, start + crop]], device=device).repeat(count, 1)


def crop_resize(batch: torch.Tensor, boxes: torch.Tensor, image_size: int) -> torch.Tensor:
    """Crop each box and resize it to ``image_size`` (uint8 NCHW in).

    On CUDA one batched roi_align kernel (float out). On CPU roi_align is ~10x slower than cropping each
    image at whole pixels and resizing it with antialiased bilinear straight on uint8 channels-last memory,
    which has a vectorised kernel (uint8 out; 1.9 vs 30 ms per 32 images at 64 px, one thread).
    """
    if batch.device.type == "cuda":
        boxes = boxes.to(batch.device)
        index = torch.arange(len(boxes), dtype=torch.float32, device=batch.device).unsqueeze(1)
        rois = torch.cat([index, boxes.float()], dim=1)
        aligned: torch.Tensor = roi_align(batch.float(), rois, output_size=image_size, spatial_scale=1.0,
                                          sampling_ratio=-1, aligned=True)
        return aligned
    batch = batch.contiguous(memory_format=torch.channels_last)
    size = (image_size, image_size)
    pixels = boxes.round().long()
    if bool((pixels == pixels[:1]).all()):  # the eval crop: one box for all, one call
        x1, y1, x2, y2 = pixels[0].tolist()
        return F.interpolate(batch[:, :, y1:y2, x1:x2], size=size, mode="bilinear", antialias=True)
    return torch.cat([F.interpolate(batch[i:i + 1, :, y1:y2, x1:x2], size=size, mode="bilinear", antialias=True)
                      for i, (x1, y1, x2, y2) in enumerate(pixels.tolist())])


def prepare_batch(
    images: torch.Tensor, *, image_size: int, train: bool, augment: str, generator: torch.Generator,
    channels_last: bool,
) -> torch.Tensor:
    """uint8 NHWC batch on the target device -> normalised float NCHW model input."""
    batch = images.permute(0, 3, 1, 2)
    count, side = batch.shape[0], batch.shape[-1]
    if train and augment in ("basic", "strong"):
        boxes = random_boxes(count, side, generator, scale=(0.08, 1.0) if augment == "strong" else (0.25, 1.0))
        out = crop_resize(batch, boxes, image_size)
    else:
        out = crop_resize(batch, center_boxes(count, side, image_size, batch.device), image_size)
    if train and augment != "none":
        flip = (torch.rand(count, generator=generator, device=generator.device) < 0.5).to(out.device)
        out = torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)
        if augment == "strong":
            out = _strong(out, generator)
    out = normalize_batch(out)
    return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _strong(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Colour jitter per image plus random erasing, done on whole batches."""
    count = batch.shape[0]
    device, drawn = batch.device, generator.device  # drawn on the device too with a CUDA generator

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.empty(count, device=drawn).uniform_(low, high, generator=generator).to(device)

    brightness = uniform(0.6, 1.4).view(-1, 1, 1, 1)
    contrast = uniform(0.6, 1.4).view(-1, 1, 1, 1)
    saturation = uniform(0.6, 1.4).view(-1, 1, 1, 1)
    out = batch * brightness
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * contrast + mean
    gray = out.mean(dim=1, keepdim=True)
    out = ((out - gray) * saturation + gray).clamp(0, 255)
    side = out.shape[-1]
    erase = uniform(0, 1) < 0.25
    size = (uniform(0.1, 0.4) * side).long()
    x0 = (uniform(0, 1) * (side - size)).long()
    y0 = (uniform(0, 1) * (side - size)).long()
    coords = torch.arange(side, device=device)
    in_x = (coords.view(1, -1) >= x0.view(-1, 1)) & (coords.view(1, -1) < (x0 + size).view(-1, 1))
    in_y = (coords.view(1, -1) >= y0.view(-1, 1)) & (coords.view(1, -1) < (y0 + size).view(-1, 1))
    mask = (in_y.unsqueeze(2) & in_x.unsqueeze(1) & erase.view(-1, 1, 1)).unsqueeze(1)
    return torch.where(mask, torch.full_like(out, 127.0), out)


def batch_count(count: int, batch_size: int, drop_last: bool) -> int:
    """Batches ``iterate_batches`` yields for ``count`` images. ``drop_last`` drops only a ragged last
    batch too small (< 8) for BatchNorm statistics to mean anything."""
    full, remainder = divmod(count, batch_size)
    if remainder and not (drop_last and full > 0 and remainder < 8):
        full += 1
    return full


def iterate_batches(
    data: CachedDataset, indices: np.ndarray, *, batch_size: int, shuffle: bool, generator: torch.Generator,
    device: torch.device, drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (uint8 NHWC images, labels) on ``device``; pinned host memory and async copies on CUDA."""
    order = indices[torch.randperm(len(indices), generator=generator).numpy()] if shuffle else indices
    pin = device.type == "cuda"
    stop = min(len(order), batch_count(len(order), batch_size, drop_last) * batch_size)
    for start in range(0, stop, batch_size):
        chunk = np.sort(order[start:start + batch_size])  # sorted reads are sequential on the memmap
        images = torch.from_numpy(np.ascontiguousarray(data.images[chunk]))
        labels = torch.from_numpy(data.labels[chunk])
        if pin:
            images, labels = images.pin_memory(), labels.pin_memory()
        yield images.to(device, non_blocking=pin), labels.to(device, non_blocking=pin)
