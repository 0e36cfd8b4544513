"""The bar for bench/quality.py: a plain PyTorch loop, tuned by hand, on the same images and budget.

Same model (shared.modeling.build_model), same epochs and image size, same uploaded images (10% kept
for validation while tuning), images centre-cropped once to the training size, no augmentation, AdamW
(weight decay 0.05, none on norms and biases), one-cycle schedule (30% warm-up), label smoothing 0.1.
Learning rate and batch were picked on MNIST's validation images: 3e-3 with batch 32 gave 0.9675 val /
0.967 held-out (seed 0); the session's CPU budget allowed no wider grid, so the bar may sit a little low.
"""

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.modeling import build_model
from shared.modeling.transforms import normalize_batch
from worker.training.data import center_boxes, crop_resize

LEARNING_RATE, BATCH, WARMUP = 3e-3, 32, 0.3


def _tensors(data: Any, indices: np.ndarray, image_size: int) -> torch.Tensor:
    out = []
    for start in range(0, len(indices), 256):
        chunk = indices[start:start + 256]
        batch = torch.from_numpy(np.ascontiguousarray(data.images[chunk])).permute(0, 3, 1, 2)
        side = batch.shape[-1]
        out.append(normalize_batch(crop_resize(batch, center_boxes(len(chunk), side, image_size), image_size)))
    return torch.cat(out).contiguous(memory_format=torch.channels_last)


def hand_tuned(*, data: Any, user: dict[str, Any], seed: int, weights_dir: Any, lr: float = LEARNING_RATE,
               batch: int = BATCH) -> dict[str, Any]:
    started = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    uploaded = rng.permutation(np.flatnonzero(~data.heldout))
    val_count = max(1, len(uploaded) // 10)
    val_idx, train_idx = uploaded[:val_count], uploaded[val_count:]
    image_size, epochs = user["image_size"], user["epochs"]
    x_train = _tensors(data, train_idx, image_size)
    y_train = torch.from_numpy(data.labels[train_idx])
    model = build_model(base_model="resnet50", num_classes=len(data.classes), weights=user["weights"],
                        weights_dir=weights_dir, head="mlp", dropout=0.2).to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0}],
                                  lr=lr)
    steps = epochs * (len(train_idx) // batch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(1, steps),
                                                    pct_start=WARMUP)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    seen, train_seconds = 0, 0.0
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train_idx))
        epoch_start = time.perf_counter()
        for start in range(0, len(order) - batch + 1, batch):
            rows = order[start:start + batch]
            loss = criterion(model(x_train[rows]), y_train[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(rows)
        train_seconds += time.perf_counter() - epoch_start
    model.eval()
    held = np.flatnonzero(data.heldout)
    return {"heldout": _accuracy(model, data, held, image_size), "val": _accuracy(model, data, val_idx, image_size),
            "test": None, "test_samples": 0, "wall": time.perf_counter() - started,
            "img_s": seen / max(train_seconds, 1e-9), "best_epoch": epochs}


@torch.no_grad()
def _accuracy(model: nn.Module, data: Any, indices: np.ndarray, image_size: int) -> float:
    logits = torch.cat([model(_tensors(data, indices[i:i + 256], image_size)) for i in range(0, len(indices), 256)])
    return float((F.softmax(logits, 1).argmax(1).numpy() == data.labels[indices]).mean())
