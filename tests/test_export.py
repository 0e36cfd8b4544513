"""TorchScript and ONNX exports compute what the PyTorch model computes, and the artifact route makes
each export once."""

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from fastapi.testclient import TestClient

from shared.config import get_settings
from shared.modeling import load_model_artifact
from shared.modeling.export import export_model
from shared.orm import new_id
from shared.storage import model_dir
from tests.model_rows import CLASSES, insert_rows, write_artifact

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


@pytest.fixture
def saved(env_for) -> Path:  # type: ignore[no-untyped-def]
    env_for()
    model_id = new_id()
    write_artifact(model_id)
    return model_dir(get_settings(), model_id)


def pytorch_logits(directory: Path, x: torch.Tensor) -> np.ndarray:
    model, _ = load_model_artifact(directory=directory)
    with torch.inference_mode():
        return model(x).numpy()


def random_batch(count: int) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(count))


def test_onnx_runtime_matches_pytorch_for_any_batch_size(saved):
    path = export_model(directory=saved, fmt="onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for count in (1, 5):
        x = random_batch(count)
        (logits,) = session.run(["logits"], {"images": x.numpy()})
        np.testing.assert_allclose(logits, pytorch_logits(saved, x), atol=1e-4, rtol=0)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["model.json"])["classes"] == CLASSES


def test_torchscript_matches_pytorch_for_any_batch_size(saved):
    path = export_model(directory=saved, fmt="torchscript")
    files = {"model.json": ""}
    scripted = torch.jit.load(str(path), _extra_files=files)
    for count in (1, 5):
        x = random_batch(count)
        with torch.inference_mode():
            np.testing.assert_allclose(scripted(x).numpy(), pytorch_logits(saved, x), atol=1e-4, rtol=0)
    assert json.loads(files["model.json"])["image_size"] == 32


@pytest.fixture
def api(migrated) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    from api.main import create_app

    with TestClient(create_app()) as client:
        yield client


def test_artifact_route_serves_weights_and_makes_each_export_once(api):
    model_id = new_id()
    insert_rows(model_id)
    write_artifact(model_id)
    directory = model_dir(get_settings(), model_id)
    weights = api.get(f"/v1/models/{model_id}/artifact")
    assert weights.status_code == 200
    assert weights.content == (directory / "model.safetensors").read_bytes()
    first = api.get(f"/v1/models/{model_id}/artifact", params={"format": "onnx"})
    assert first.status_code == 200
    made = (directory / "model.onnx").stat().st_mtime_ns
    again = api.get(f"/v1/models/{model_id}/artifact", params={"format": "onnx"})
    assert again.content == first.content
    assert (directory / "model.onnx").stat().st_mtime_ns == made
    scripted = api.get(f"/v1/models/{model_id}/artifact", params={"format": "torchscript"})
    assert scripted.status_code == 200
    assert torch.jit.load(io.BytesIO(scripted.content))(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    bad = api.get(f"/v1/models/{model_id}/artifact", params={"format": "pickle"})
    assert (bad.status_code, bad.json()["code"]) == (422, "validation_error")
    missing = api.get(f"/v1/models/{new_id()}/artifact", params={"format": "onnx"})
    assert (missing.status_code, missing.json()["code"]) == (404, "model_not_found")
