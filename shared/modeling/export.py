"""TorchScript and ONNX exports of a saved model, made once and kept beside its weights.

Both take normalised float NCHW images (see model.json's mean/std and image_size) and return logits;
the batch dimension is dynamic. model.json travels inside each file (TorchScript extra file, ONNX
metadata) so an export is usable on its own.
"""

import json
import threading
import warnings
from pathlib import Path

import torch

from shared.modeling.artifact import META_FILE, load_model_artifact
from shared.storage import atomic_path

_lock = threading.Lock()
SUFFIXES = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx"}


def _torchscript(model: torch.nn.Module, example: torch.Tensor, meta_json: str, path: Path) -> None:
    traced = torch.jit.trace(model, example)
    torch.jit.save(traced, str(path), _extra_files={META_FILE: meta_json})


def _onnx(model: torch.nn.Module, example: torch.Tensor, meta_json: str, path: Path) -> None:
    import onnx

    torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {META_FILE: meta_json})
    onnx.save(proto, str(path))


def export_model(*, directory: Path, fmt: str) -> Path:
    target = directory / SUFFIXES[fmt]
    with _lock:
        if target.is_file():
            return target
        model, meta = load_model_artifact(directory=directory, device="cpu")
        example = torch.randn(2, 3, meta["image_size"], meta["image_size"])
        meta_json = json.dumps(meta, sort_keys=True)
        with atomic_path(target) as tmp, warnings.catch_warnings():
            # Both exporters are the TorchScript-based ones; they warn that newer ones exist.
            warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
            (_torchscript if fmt == "torchscript" else _onnx)(model, example, meta_json, tmp)
    return target
