"""Optimiser, learning-rate schedule, freezing and precision choices for a fine-tuning run."""

import math
from typing import Any

import torch
from torch import nn

from shared.hyperparameters import Hyperparameters
from worker.training.auto import auto_precision, learning_rate_of


def resolve_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


FUSED_DEVICES = ("cuda", "cpu")


def amp_dtype(hp: Hyperparameters, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: fp32); ``auto`` is ``auto.auto_precision``. CPU autocast has no fp16."""
    precision = auto_precision(device) if hp.mixed_precision == "auto" else hp.mixed_precision
    if precision == "off":
        return None
    if precision == "fp16":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.bfloat16


def frozen_modules(model: nn.Module, stages: int) -> list[nn.Module]:
    """Stem is stage 0; layer1..layer4 are stages 1..4. ``stages`` < 0 freezes nothing."""
    if stages < 0:
        return []
    modules = [model.get_submodule("conv1"), model.get_submodule("bn1")]
    modules += [model.get_submodule(f"layer{i}") for i in range(1, stages + 1)]
    return modules


def apply_freeze(model: nn.Module, stages: int) -> list[nn.Module]:
    modules = frozen_modules(model, stages)
    for module in modules:
        for param in module.parameters():
            param.requires_grad_(False)
    return modules


def build_optimizer(model: nn.Module, hp: Hyperparameters) -> torch.optim.Optimizer:
    """Discriminative learning rates: the head at ``learning_rate``, the backbone scaled by
    ``backbone_lr_factor``. Norm and bias parameters get no weight decay."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_head = name.startswith("fc.")
        no_decay = param.ndim <= 1
        groups.setdefault((is_head, no_decay), []).append(param)
    backbone_factor = hp.backbone_lr_factor if hp.weights != "none" else 1.0
    head_lr = learning_rate_of(hp)
    param_groups: list[dict[str, Any]] = []
    for (is_head, no_decay), params in groups.items():
        lr = head_lr * (1.0 if is_head else backbone_factor)
        param_groups.append({"params": params, "lr": lr, "weight_decay": 0.0 if no_decay else hp.weight_decay,
                             "name": ("head" if is_head else "backbone") + ("_no_decay" if no_decay else "")})
    # The fused kernels update every parameter in one pass instead of several per tensor: on CUDA a few launches
    # instead of thousands; on CPU, ResNet-50's AdamW step takes 43 ms instead of 136 (one thread), a sixth of a
    # 32-image step at 64 px.
    fused = all(param.device.type in FUSED_DEVICES for group in param_groups for param in group["params"]) or None
    if hp.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=head_lr, momentum=0.9, nesterov=True, fused=fused)
    if hp.optimizer == "adam":
        # Adam's weight_decay is L2 in the gradient; kept for the classic recipe's sake.
        return torch.optim.Adam(param_groups, lr=head_lr, fused=fused)
    return torch.optim.AdamW(param_groups, lr=head_lr, fused=fused)


# compile: auto. Compiling ResNet fwd+bwd with inductor takes about this long, cold, on the H200 (bench/gpu.sh's
# compile step estimate for resnet50; the others scaled by depth), and typically saves this share of an eager
# bf16 channels_last step. Both are estimates until bench/gpu.sh's compile step measures them.
COMPILE_SECONDS = {"resnet18": 40.0, "resnet34": 50.0, "resnet50": 70.0, "resnet101": 110.0}
COMPILE_SAVING = 0.15
# Eager bf16 channels_last training on one H200 at 224 px (resnet50: issue 17's estimate; the others by FLOPs).
EAGER_IMAGES_PER_SECOND_224 = {"resnet18": 12_000.0, "resnet34": 7_000.0, "resnet50": 3_000.0, "resnet101": 1_800.0}


def compile_pays_off(*, hp: Hyperparameters, device: torch.device, train_images: int) -> bool:
    """``compile``: ``on``/``off`` as asked; ``auto`` compiles a CUDA run whose estimated eager training time
    saves more than compiling costs (resnet50 at 224 px: ~1.4M images trained, e.g. 14k images x 100 epochs).
    Never on CPU: inductor's CPU compile takes minutes and the saving is small."""
    if hp.compile != "auto":
        return hp.compile == "on"
    if device.type != "cuda":
        return False
    rate = EAGER_IMAGES_PER_SECOND_224[hp.base_model] * (224 / hp.image_size) ** 2
    eager_seconds = hp.epochs * train_images / rate
    return eager_seconds * COMPILE_SAVING > COMPILE_SECONDS[hp.base_model]


def build_scheduler(
    optimizer: torch.optim.Optimizer, hp: Hyperparameters, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(1, hp.epochs * steps_per_epoch)
    warmup = int(hp.effective_warmup_epochs * steps_per_epoch) if hp.lr_schedule == "cosine" else 0
    warmup = min(warmup, total - 1)

    def factor(step: int) -> float:
        if hp.lr_schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def class_weights(labels, num_classes: int, mode: str) -> torch.Tensor | None:  # type: ignore[no-untyped-def]
    if mode != "balanced":
        return None
    counts = torch.bincount(torch.as_tensor(labels), minlength=num_classes).float().clamp(min=1)
    return counts.sum() / (num_classes * counts)
