"""Frozen-backbone fast path: run the backbone over the dataset once, keep the features on disk.

With ``freeze: backbone`` and ``augment: none`` every epoch would push the same crops through the same
frozen weights, so the pooled features are computed once per (dataset, base_model, weights, image size)
and every later epoch, and every later job with that key, trains only the head on them.
"""

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.hyperparameters import Hyperparameters
from shared.storage import atomic_path
from worker.training.auto import batch_size_of
from worker.training.data import CachedDataset, iterate_batches, prepare_batch


def uses_feature_cache(hp: Hyperparameters) -> bool:
    return hp.freeze == "backbone" and hp.augment == "none"


def _weights_tag(hp: Hyperparameters, weights_dir: Path | None) -> str:
    if hp.weights == "imagenet":
        return "imagenet"
    if hp.weights == "none":
        # Random weights come from the seed, so features from another seed are other features.
        return f"random-seed{hp.seed}"
    path = (weights_dir or Path()) / hp.weights
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"{path.stem}-{digest.hexdigest()[:16]}"


def features_path(*, features_dir: Path, hp: Hyperparameters, weights_dir: Path | None) -> Path:
    return features_dir / f"{hp.base_model}-{_weights_tag(hp, weights_dir)}-{hp.image_size}px.npy"


@torch.no_grad()
def compute_features(
    *, model: nn.Module, data: CachedDataset, hp: Hyperparameters, device: torch.device, dtype: torch.dtype | None,
) -> np.ndarray:
    """Pooled backbone output (N x F float16) for every image, with the eval crop."""
    head, model.fc = model.fc, nn.Identity()
    try:
        model.eval()
        generator = torch.Generator().manual_seed(0)
        chunks = []
        for raw, _ in iterate_batches(data, np.arange(len(data.labels)), batch_size=max(64, batch_size_of(hp) * 2),
                                      shuffle=False, generator=generator, device=device):
            images = prepare_batch(raw, image_size=hp.image_size, train=False, augment="none",
                                   generator=generator, channels_last=hp.channels_last)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                chunks.append(model(images).float().to("cpu", torch.float16))
    finally:
        model.fc = head
    # float16 halves the disk and RAM cost; the head is trained in fp32 on top of it.
    return torch.cat(chunks).numpy()


def cached_features(
    *, path: Path, model: nn.Module, data: CachedDataset, hp: Hyperparameters, device: torch.device,
    dtype: torch.dtype | None,
) -> tuple[np.ndarray, bool]:
    """The features for ``data`` and whether they came from disk; computed and stored when missing."""
    if path.is_file():
        features = np.load(path, mmap_mode="r")
        if features.shape[0] == len(data.labels):
            return features, True
    features = compute_features(model=model, data=data, hp=hp, device=device, dtype=dtype)
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        np.save(handle, features)
    return np.load(path, mmap_mode="r"), False
