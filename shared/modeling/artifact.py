"""A trained model on disk: ``model.safetensors`` (weights) + ``model.json`` (how to use them)."""

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from shared.modeling.build import build_model
from shared.storage import atomic_dir, read_json, write_json

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"


def save_model_artifact(*, directory: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write weights and metadata into ``directory`` as one atomic step (rename of a temp dir).

    ``meta`` must hold base_model, head, dropout, classes, image_size, mean and std.
    """
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(directory) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE))
        write_json(tmp / META_FILE, meta)


def load_model_artifact(*, directory: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    meta = read_json(directory / META_FILE)
    model = build_model(
        base_model=meta["base_model"],
        num_classes=len(meta["classes"]),
        weights="none",
        head=meta["head"],
        dropout=meta.get("dropout", 0.0),
    )
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    model.eval().to(device)
    return model, meta
