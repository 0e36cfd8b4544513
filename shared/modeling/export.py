"""TorchScript and ONNX exports of a saved model, made once and kept beside its weights."""

import threading
from pathlib import Path

import torch

from shared.modeling.artifact import load_model_artifact
from shared.storage import atomic_path

_lock = threading.Lock()
SUFFIXES = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx"}


def export_model(*, directory: Path, fmt: str) -> Path:
    target = directory / SUFFIXES[fmt]
    with _lock:
        if target.is_file():
            return target
        model, meta = load_model_artifact(directory=directory, device="cpu")
        example = torch.randn(1, 3, meta["image_size"], meta["image_size"])
        with atomic_path(target) as tmp:
            if fmt == "torchscript":
                torch.jit.trace(model, example).save(str(tmp))
            else:
                torch.onnx.export(model, (example,), str(tmp), input_names=["images"], output_names=["logits"],
                                  dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                                  dynamo=False)
    return target
