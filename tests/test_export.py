"""TorchScript, ONNX and the server's /v1/predict compute what the PyTorch model computes on what torchvision's
eval preprocessing makes of an image, and the artifact route makes each export once.

The model has seeded random BatchNorm statistics and affine parameters and the MLP head with dropout: with
the identity BatchNorm of a fresh model, an export or a server that ran BatchNorm in training mode, or
dropped its buffers, or kept dropout on, would still agree. The reference answer is independent of our code:
torchvision's Resize(resize_size) + CenterCrop(image_size) + ToImage/ToDtype + Normalize from the PIL image,
then the eager model."""

import io
import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from shared.config import get_settings
from shared.modeling import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_model,
    load_model_artifact,
    resize_size_for,
    save_model_artifact,
)
from shared.modeling.export import export_model
from shared.orm import new_id
from shared.storage import model_dir
from tests.model_rows import CLASSES, insert_rows
from tests.synthetic import make_image

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

IMAGE_SIZE = 32
# Square, landscape and portrait, sizes where a rounded (not truncated) long side or a centre offset
# rounded another way than torchvision's would move the crop by a pixel.
IMAGE_SIZES = [(48, 48), (80, 56), (56, 80), (50, 40), (300, 200), (97, 61)]
PROB_TOLERANCE = 1e-4
# Not 1: /predict, the eager reference and the exports read back must each apply it.
TEMPERATURE = 1.7


def randomise_batchnorm(model: nn.Module, seed: int) -> None:
    """Running mean/var, weight and bias drawn per channel: eval-mode BatchNorm is then far from identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm2d):
                assert layer.running_mean is not None and layer.running_var is not None  # track_running_stats
                channels = layer.num_features
                layer.running_mean.copy_(torch.randn(channels, generator=generator) * 0.2)
                layer.running_var.copy_(torch.rand(channels, generator=generator) * 1.5 + 0.5)
                layer.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
                layer.bias.copy_(torch.randn(channels, generator=generator) * 0.2)


def write_random_artifact(model_id: str) -> Path:
    """resnet18 with the MLP head (dropout 0.5) and random BatchNorm, saved as training saves a model, with a
    fitted temperature: /predict divides the logits by it, and a user of an export reads it from its model.json."""
    torch.manual_seed(0)
    model = build_model(base_model="resnet18", num_classes=len(CLASSES), head="mlp", dropout=0.5)
    randomise_batchnorm(model, seed=1)
    meta = {"model_id": model_id, "base_model": "resnet18", "head": "mlp", "dropout": 0.5, "classes": CLASSES,
            "image_size": IMAGE_SIZE, "resize_size": resize_size_for(IMAGE_SIZE), "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "temperature": TEMPERATURE}
    directory = model_dir(get_settings(), model_id)
    save_model_artifact(directory=directory, model=model, meta=meta)
    return directory


@pytest.fixture
def saved(env_for) -> Path:
    env_for()
    return write_random_artifact(new_id())


def reference_inputs(images: list[Image.Image]) -> torch.Tensor:
    """torchvision's classification eval preprocessing, driven by the numbers model.json holds."""
    preprocess = v2.Compose([v2.Resize(resize_size_for(IMAGE_SIZE)), v2.CenterCrop(IMAGE_SIZE), v2.ToImage(),
                             v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return torch.stack([preprocess(image) for image in images])


def pytorch_probabilities(directory: Path, x: torch.Tensor) -> np.ndarray:
    """The calibrated scores: the eager model's logits over the temperature in its model.json."""
    model, meta = load_model_artifact(directory=directory)
    with torch.inference_mode():
        return torch.softmax(model(x) / meta["temperature"], dim=1).numpy()


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    logits = logits / temperature
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def photos() -> list[Image.Image]:
    """Smooth synthetic photos with texture (PNG-exact: no JPEG decoding in the way), one per size."""
    return [make_image(CLASSES[i % 3], random.Random(i), 128).resize(size, Image.Resampling.BICUBIC)
            for i, size in enumerate(IMAGE_SIZES)]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_reference_model_is_not_degenerate(saved):
    """The comparisons below mean something only if BatchNorm is not identity and the answers spread."""
    model, meta = load_model_artifact(directory=saved)
    assert meta["head"] == "mlp" and isinstance(model.get_submodule("fc.0"), nn.Linear)
    assert not torch.allclose(model.get_submodule("bn1").running_var, torch.ones(64))
    probs = pytorch_probabilities(saved, reference_inputs(photos()))
    assert probs.max() < 0.99 and probs.min() > 0.01
    assert np.ptp(probs, axis=0).max() > 1e-3  # different images, different answers


def test_onnx_runtime_matches_pytorch_on_torchvision_inputs_for_any_batch_size(saved):
    path = export_model(directory=saved, fmt="onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = reference_inputs(photos())
    expected = pytorch_probabilities(saved, x)
    meta = json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["model.json"])
    assert (meta["classes"], meta["temperature"]) == (CLASSES, TEMPERATURE)
    for rows in (slice(0, 1), slice(0, len(x))):
        (logits,) = session.run(["logits"], {"images": x[rows].numpy()})
        np.testing.assert_allclose(softmax(logits, meta["temperature"]), expected[rows], atol=PROB_TOLERANCE, rtol=0)


def test_torchscript_matches_pytorch_on_torchvision_inputs_for_any_batch_size(saved):
    path = export_model(directory=saved, fmt="torchscript")
    files = {"model.json": ""}
    scripted = torch.jit.load(str(path), _extra_files=files)
    x = reference_inputs(photos())
    expected = pytorch_probabilities(saved, x)
    meta = json.loads(files["model.json"])
    assert (meta["image_size"], meta["temperature"]) == (IMAGE_SIZE, TEMPERATURE)
    for rows in (slice(0, 1), slice(0, len(x))):
        with torch.inference_mode():
            probs = torch.softmax(scripted(x[rows]) / meta["temperature"], dim=1).numpy()
        np.testing.assert_allclose(probs, expected[rows], atol=PROB_TOLERANCE, rtol=0)


@pytest.fixture
def api(migrated) -> Iterator[TestClient]:
    from api.main import create_app

    with TestClient(create_app()) as client:
        yield client


def test_predict_route_matches_torchvision_preprocessing_and_the_eager_model(api):
    model_id = new_id()
    directory = write_random_artifact(model_id)
    insert_rows(model_id)
    images = photos()
    files = [("file", (f"{i}.png", png_bytes(image), "image/png")) for i, image in enumerate(images)]
    response = api.post("/v1/predict", data={"model_id": model_id, "top_k": "3"}, files=files)
    assert response.status_code == 200, response.text
    expected = pytorch_probabilities(directory, reference_inputs(images))
    served = np.array([[{s["label"]: s["score"] for s in p["top"]}[c] for c in CLASSES]
                       for p in response.json()["predictions"]])
    for size, got, want in zip(IMAGE_SIZES, served, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=PROB_TOLERANCE, rtol=0, err_msg=f"a {size} image")


def test_artifact_route_serves_weights_and_makes_each_export_once(api):
    model_id = new_id()
    insert_rows(model_id)
    directory = write_random_artifact(model_id)
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
