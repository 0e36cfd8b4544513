"""Downloadable model files: the safetensors weights as trained, or exports made once and cached."""

from enum import StrEnum
from pathlib import Path

from api.errors import ApiError
from shared.config import Settings
from shared.modeling.artifact import WEIGHTS_FILE
from shared.storage import model_dir


class ArtifactFormat(StrEnum):
    safetensors = "safetensors"
    torchscript = "torchscript"
    onnx = "onnx"


def artifact_path(*, settings: Settings, model_id: str, fmt: ArtifactFormat) -> Path:
    directory = model_dir(settings, model_id)
    if fmt == ArtifactFormat.safetensors:
        path = directory / WEIGHTS_FILE
    else:
        from shared.modeling.export import export_model

        path = export_model(directory=directory, fmt=fmt.value)
    if not path.is_file():
        raise ApiError(404, "artifact_missing", f"model {model_id} has no {fmt} file on disk")
    return path
