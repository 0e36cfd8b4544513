"""ResNet backbones with our classification head, and where their starting weights come from."""

from pathlib import Path
from typing import cast

import torch
from torch import nn
from torchvision import models

ARCHS = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V2),
    "resnet101": (models.resnet101, models.ResNet101_Weights.IMAGENET1K_V2),
}


class WeightsUnavailable(RuntimeError):
    code = "weights_unavailable"


def make_head(*, in_features: int, num_classes: int, head: str, dropout: float) -> nn.Module:
    if head == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
    return nn.Sequential(
        nn.Linear(in_features, 1024), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(1024, num_classes)
    )


def _imagenet_state_dict(base_model: str) -> dict[str, torch.Tensor]:
    _, weights_enum = ARCHS[base_model]
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    file = hub_dir / Path(weights_enum.url).name
    if not file.is_file():
        raise WeightsUnavailable(
            f"ImageNet weights for {base_model} are not in the torch cache ({file}); this service never "
            f"downloads at run time. Bake them into the image (Dockerfile.gpu does), copy "
            f"{Path(weights_enum.url).name} into {hub_dir}, or train with weights 'none' or a file in "
            "WEIGHTS_DIR."
        )
    state: dict[str, torch.Tensor] = torch.load(file, map_location="cpu", weights_only=True)
    return state


def _file_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsUnavailable(f"weights file {path.name} is not in WEIGHTS_DIR ({path.parent})")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a checkpoint, or pickled objects weights_only refuses
        raise WeightsUnavailable(f"weights file {path.name} could not be read: {type(exc).__name__}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsUnavailable(f"weights file {path.name} does not hold a state dict")
    return state


def build_model(
    *,
    base_model: str,
    num_classes: int,
    weights: str = "none",
    weights_dir: Path | None = None,
    head: str = "mlp",
    dropout: float = 0.0,
) -> nn.Module:
    """A torchvision ResNet whose ``fc`` is our head: GAP -> [Linear 1024 -> ReLU -> Dropout] -> Linear."""
    factory, _ = ARCHS[base_model]
    model: nn.Module = factory(weights=None)
    if weights != "none":
        if weights == "imagenet":
            state = _imagenet_state_dict(base_model)
        else:
            if weights_dir is None:
                raise WeightsUnavailable("no WEIGHTS_DIR is configured")
            state = _file_state_dict(weights_dir / weights)
        backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
        try:
            missing, unexpected = model.load_state_dict(backbone, strict=False)
        except RuntimeError as exc:  # the right names with the wrong shapes: another architecture's file
            raise WeightsUnavailable(f"weights '{weights}' do not fit {base_model}: {str(exc)[:300]}") from exc
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise WeightsUnavailable(
                f"weights '{weights}' do not fit {base_model}: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
    in_features = cast(nn.Linear, model.get_submodule("fc")).in_features
    model.fc = make_head(in_features=in_features, num_classes=num_classes, head=head, dropout=dropout)
    return model


def classifier_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.get_submodule("fc").parameters())
