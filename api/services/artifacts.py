"""Downloadable model files: the safetensors weights as trained, or exports made once and cached."""

from enum import StrEnum
from pathlib import Path

from api.errors import ApiError
from shared.config import Settings
from shared.storage import model_dir


class ArtifactFormat(StrEnum):
    safetensors = "safetensors"
    torchscript = "torchscript"
    onnx = "onnx"


def artifact_path(*, settings: Settings, model_id: str, fmt: ArtifactFormat) -> Path:
    from shared.modeling.artifact import WEIGHTS_FILE  # torch comes with it: not at API import time

    directory = model_dir(settings, model_id)
    missing = ApiError(404, "artifact_missing", f"model {model_id} has no files on disk to make a {fmt} file from")
    if not (directory / WEIGHTS_FILE).is_file():
        raise missing
    if fmt == ArtifactFormat.safetensors:
        return directory / WEIGHTS_FILE
    from shared.modeling.export import export_model

    try:
        return export_model(directory=directory, fmt=fmt.value)
    except FileNotFoundError as exc:  # deleted while exporting
        raise missing from exc
