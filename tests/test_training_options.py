"""What each training option does (issue 16): the optimizer class and its groups, the lr of every step, the loss's
class weights and smoothing, the precision the forward runs in, the head's layers and what augmentation does to a
batch. A run is watched from inside with torch's global optimizer and module hooks: they observe, replace nothing."""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torchvision import models

from shared.hyperparameters import Hyperparameters
from shared.modeling import build_model
from shared.modeling.transforms import IMAGENET_MEAN, IMAGENET_STD
from tests.training_helpers import TINY, Recorder, write_cache
from worker.training.auto import cpu_has_native_bf16
from worker.training.data import TEST, TRAIN, VAL, CachedDataset, load_cache, stored_splits
from worker.training.engine import FitResult, evaluate, fit, image_preparer
from worker.training.optim import amp_dtype, build_optimizer, class_weights

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


@dataclass
class Observed:
    """What a ``fit`` run did, seen through torch's global hooks."""

    result: FitResult
    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)  # each distinct one that stepped
    lrs: list[dict[str, float]] = field(default_factory=list)  # per optimizer step: lr of each group as it stepped
    criteria: list[nn.Module] = field(default_factory=list)  # each distinct loss module called
    conv_dtypes: set[torch.dtype] = field(default_factory=set)  # outputs of convolutions in training steps


def observed_fit(data: CachedDataset, work: Path, weights_dir: Path | None = None, **overrides: Any) -> Observed:
    hp = Hyperparameters(**{**TINY, **overrides})
    splits = stored_splits(splits_dir=work / "splits", data=data, hp=hp)
    seen: dict[str, Any] = {"optimizers": [], "lrs": [], "criteria": [], "conv_dtypes": set()}

    def before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not any(optimizer is known for known in seen["optimizers"]):
            seen["optimizers"].append(optimizer)
        seen["lrs"].append({group["name"]: group["lr"] for group in optimizer.param_groups})

    def after_forward(module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(module, nn.CrossEntropyLoss) and not any(module is known for known in seen["criteria"]):
            seen["criteria"].append(module)
        # Training steps only: evaluation and BatchNorm recalibration run without gradients, in eval mode.
        if isinstance(module, nn.Conv2d) and module.training and torch.is_grad_enabled():
            seen["conv_dtypes"].add(output.dtype)

    hooks = [register_optimizer_step_pre_hook(before_step),
             nn.modules.module.register_module_forward_hook(after_forward)]
    try:
        result = fit(hp=hp, data=data, splits=splits, device=CPU, work_dir=work / "job", weights_dir=weights_dir,
                     reporter=Recorder())
    finally:
        for hook in hooks:
            hook.remove()
    # A run that did not finish its epochs with finite losses is evidence of nothing.
    assert [row["epoch"] for row in result.history] == list(range(1, hp.epochs + 1))
    assert all(np.isfinite(row["train_loss"]) and np.isfinite(row["val_loss"]) for row in result.history)
    return Observed(result=result, **seen)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> CachedDataset:
    """30 images, 3 classes; TINY's splits leave 18 for training: 2 steps of 8 per pass (a ragged 2 is dropped)."""
    return load_cache(write_cache(tmp_path_factory.mktemp("tiny") / "cache", classes=["red", "green", "blue"],
                                  per_class=10))


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory: pytest.TempPathFactory) -> CachedDataset:
    """Training counts 12 / 4 / 2 (18 images) with one validation and one test image per class, as preset splits
    (which the run keeps)."""
    full = load_cache(write_cache(tmp_path_factory.mktemp("imbalanced") / "cache",
                                  classes=["red", "green", "blue"], per_class=14))
    rows, splits = [], []
    for label, train in enumerate((12, 4, 2)):
        rows += np.flatnonzero(full.labels == label)[:train + 2].tolist()
        splits += [TRAIN] * train + [VAL, TEST]
    return CachedDataset(images=np.asarray(full.images[rows]), labels=full.labels[rows],
                         preset_splits=np.array(splits, dtype=np.int8), classes=full.classes)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet18 state dict in WEIGHTS_DIR: starting from weights is what gives the backbone its own lr."""
    directory = tmp_path_factory.mktemp("weights")
    save_file({k: v.contiguous() for k, v in models.resnet18(weights=None).state_dict().items()},
              str(directory / "r18.safetensors"))
    return directory


# Optimizer ---------------------------------------------------------------------------------------------------------

def expected_groups(optimizer: str, *, head_lr: float, backbone_lr: float, weight_decay: float
                    ) -> dict[str, dict[str, Any]]:
    """Per group: the lr and weight decay asked for (none on norms and biases), and each class's own settings."""
    settings: dict[str, dict[str, Any]] = {"sgd": {"momentum": 0.9, "nesterov": True},
                                           "adam": {"decoupled_weight_decay": False},
                                           "adamw": {"decoupled_weight_decay": True}}
    own = settings[optimizer]
    return {"head": {"lr": head_lr, "weight_decay": weight_decay, **own},
            "head_no_decay": {"lr": head_lr, "weight_decay": 0.0, **own},
            "backbone": {"lr": backbone_lr, "weight_decay": weight_decay, **own},
            "backbone_no_decay": {"lr": backbone_lr, "weight_decay": 0.0, **own}}


def group_settings(optimizer: torch.optim.Optimizer, keys: list[str]) -> dict[str, dict[str, Any]]:
    return {group["name"]: {key: group[key] for key in keys} for group in optimizer.param_groups}


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_optimizer_is_that_class_with_each_groups_lr_decay_and_parameters(optimizer):
    # Named starting weights give the backbone its factor; build_optimizer only reads the name, loads nothing.
    hp = Hyperparameters(**{**TINY, "weights": "r18.safetensors", "optimizer": optimizer, "learning_rate": 3e-3,
                            "backbone_lr_factor": 0.25, "weight_decay": 0.02})
    model = build_model(base_model="resnet18", num_classes=3, head="mlp")
    built = build_optimizer(model, hp)
    assert type(built) is OPTIMIZERS[optimizer]
    expected = expected_groups(optimizer, head_lr=3e-3, backbone_lr=3e-3 * 0.25, weight_decay=0.02)
    assert group_settings(built, list(expected["head"])) == expected
    names = {id(param): name for name, param in model.named_parameters()}
    members = {group["name"]: sorted(names[id(param)] for param in group["params"]) for group in built.param_groups}
    named = dict(model.named_parameters())
    assert members["head"] == ["fc.0.weight", "fc.3.weight"]
    assert members["head_no_decay"] == ["fc.0.bias", "fc.3.bias"]
    assert members["backbone"] == sorted(n for n, p in named.items() if not n.startswith("fc.") and p.ndim > 1)
    assert members["backbone_no_decay"] == sorted(n for n, p in named.items()
                                                  if not n.startswith("fc.") and p.ndim == 1)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_a_run_steps_one_optimizer_of_the_chosen_class_with_the_backbone_at_its_factor(tmp_path, weights_dir,
                                                                                        tiny, optimizer):
    seen = observed_fit(tiny, tmp_path, weights_dir=weights_dir, weights="r18.safetensors", optimizer=optimizer,
                        learning_rate=4e-3, backbone_lr_factor=0.5, weight_decay=0.03, lr_schedule="constant",
                        augment="none", ema="off", recalibrate_bn="off")
    assert len(seen.optimizers) == 1 and type(seen.optimizers[0]) is OPTIMIZERS[optimizer]
    expected = expected_groups(optimizer, head_lr=4e-3, backbone_lr=2e-3, weight_decay=0.03)
    assert group_settings(seen.optimizers[0], list(expected["head"])) == expected
    assert seen.lrs == [{name: group["lr"] for name, group in expected.items()}] * 2


# Learning-rate schedule --------------------------------------------------------------------------------------------

def warmup_then_cosine(step: int, *, base: float, warmup: int, total: int) -> float:
    """By hand: linear from base/(warmup+1) up to base over ``warmup`` steps, then half a cosine from base down to
    1% of it at the end of the run."""
    if step < warmup:
        return base * (step + 1) / (warmup + 1)
    progress = (step - warmup) / (total - warmup)
    return base * (0.01 + 0.99 * (1 + math.cos(math.pi * progress)) / 2)


@pytest.mark.parametrize(("schedule", "warmup_epochs", "warmup_steps"), [
    ("cosine", None, 1),  # default warmup: min(1, 3 epochs / 10) = 0.3 epochs of 6 steps -> 1 step
    ("cosine", 0.5, 3),
    ("constant", 0.5, 0),  # a constant schedule has no warmup
])
def test_every_step_trains_at_the_scheduled_lr_and_history_records_the_lr_after_each_epoch(
        tiny, tmp_path, schedule, warmup_epochs, warmup_steps):
    # 18 training images, 5 steps asked per epoch: 3 passes of 18 = 54 images = 6 batches of 8 (6 left over dropped).
    seen = observed_fit(tiny, tmp_path, epochs=3, min_steps_per_epoch=5, learning_rate=1e-2, lr_schedule=schedule,
                        warmup_epochs=warmup_epochs, augment="none", ema="off", recalibrate_bn="off")
    total = 18
    if schedule == "constant":
        expected = [1e-2] * (total + 1)
    else:
        expected = [warmup_then_cosine(step, base=1e-2, warmup=warmup_steps, total=total) for step in range(total + 1)]
    assert len(seen.lrs) == total
    for step, lrs in enumerate(seen.lrs):  # weights "none": every group trains at the head's lr
        assert set(lrs) == {"head", "head_no_decay", "backbone", "backbone_no_decay"}
        assert all(lr == pytest.approx(expected[step], rel=0, abs=1e-9) for lr in lrs.values()), (step, lrs)
    # History's lr is the one the next step would use: after steps 6, 12 and 18.
    assert [row["lr"] for row in seen.result.history] == pytest.approx([expected[6], expected[12], expected[18]],
                                                                       rel=0, abs=1e-9)


# Loss: class weights and label smoothing; head: dropout ------------------------------------------------------------

@pytest.fixture(scope="module", params=[("none", 0.0, 0.0), ("balanced", 0.3, 0.35)],
                ids=["unweighted-no-smoothing-no-dropout", "balanced-smoothing-0.3-dropout-0.35"])
def loss_run(request: pytest.FixtureRequest, imbalanced: CachedDataset, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[dict[str, Any], Observed]:
    weighting, smoothing, dropout = request.param
    options = {"class_weighting": weighting, "label_smoothing": smoothing, "dropout": dropout}
    return options, observed_fit(imbalanced, tmp_path_factory.mktemp("loss"), head="mlp", augment="none", **options)


def test_balanced_class_weights_are_n_over_k_times_each_class_count(loss_run):
    options, seen = loss_run
    assert len(seen.criteria) == 1
    weight = seen.criteria[0].weight
    if options["class_weighting"] == "none":
        assert weight is None
    else:
        # 18 training images, 3 classes, counts 12 / 4 / 2: 18 / (3 x 12), 18 / (3 x 4), 18 / (3 x 2).
        assert weight.tolist() == [0.5, 1.5, 3.0]


def test_label_smoothing_reaches_the_loss(loss_run):
    options, seen = loss_run
    assert [criterion.label_smoothing for criterion in seen.criteria] == [options["label_smoothing"]]


def test_dropout_reaches_the_trained_heads_dropout_layer(loss_run):
    options, seen = loss_run
    assert describe(seen.result.model.get_submodule("fc")) == [
        ("Linear", 512, 1024, True), ("ReLU",), ("Dropout", options["dropout"]), ("Linear", 1024, 3, True)]


def test_class_weights_of_a_split_without_exact_ratios():
    labels = np.array([0] * 5 + [1] * 2 + [2])
    weight = class_weights(labels, 3, "balanced")
    assert weight is not None and weight.dtype == torch.float32
    assert weight.tolist() == pytest.approx([8 / 15, 8 / 6, 8 / 3], rel=1e-6)
    assert class_weights(labels, 3, "none") is None


# Head structure ----------------------------------------------------------------------------------------------------

def describe(module: nn.Module) -> list[tuple[Any, ...]]:
    assert type(module) is nn.Sequential
    out: list[tuple[Any, ...]] = []
    for layer in module:
        if type(layer) is nn.Linear:
            out.append(("Linear", layer.in_features, layer.out_features, layer.bias is not None))
        elif type(layer) is nn.Dropout:
            out.append(("Dropout", layer.p))
        else:
            out.append((type(layer).__name__,))
    return out


@pytest.mark.parametrize(("base_model", "features"), [("resnet18", 512), ("resnet50", 2048)])
@pytest.mark.parametrize(("head", "dropout"), [("mlp", 0.25), ("linear", 0.6)])
def test_head_is_exactly_the_documented_layers(base_model, features, head, dropout):
    fc = build_model(base_model=base_model, num_classes=5, head=head, dropout=dropout).get_submodule("fc")
    if head == "mlp":  # a 1024-unit hidden layer with dropout
        assert describe(fc) == [("Linear", features, 1024, True), ("ReLU",), ("Dropout", dropout),
                                ("Linear", 1024, 5, True)]
    else:
        assert describe(fc) == [("Dropout", dropout), ("Linear", features, 5, True)]


# Mixed precision ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("setting", "device", "expected"), [
    ("off", CPU, None), ("bf16", CPU, torch.bfloat16), ("fp16", CPU, torch.bfloat16),  # CPU autocast has no fp16
    # auto: bf16 where the CPU has it in hardware (AVX512-BF16 or AMX), else fp32
    ("auto", CPU, torch.bfloat16 if cpu_has_native_bf16() else None),
    ("off", CUDA, None), ("bf16", CUDA, torch.bfloat16), ("fp16", CUDA, torch.float16),  # none of these asks CUDA
])
def test_autocast_dtype_for_each_setting_and_device(setting, device, expected):
    assert amp_dtype(Hyperparameters(mixed_precision=setting), device) is expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="auto on CUDA asks the GPU whether it has bf16")
def test_auto_on_cuda_is_bf16_from_ampere_on_and_fp16_before():
    expected = torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16
    assert amp_dtype(Hyperparameters(mixed_precision="auto"), CUDA) is expected


@pytest.mark.parametrize(("setting", "expected"), [
    ("off", torch.float32), ("auto", torch.bfloat16 if cpu_has_native_bf16() else torch.float32),
    ("bf16", torch.bfloat16), ("fp16", torch.bfloat16)])
def test_training_forward_runs_in_the_chosen_precision(tiny, tmp_path, setting, expected):
    seen = observed_fit(tiny, tmp_path, mixed_precision=setting, augment="none")
    assert seen.conv_dtypes == {expected}


# Augmentation ------------------------------------------------------------------------------------------------------

def prepared(data: CachedDataset, augment: str, *, train: bool, seed: int = 0) -> torch.Tensor:
    """16 cache images through the engine's preparer, drawing from a generator seeded with ``seed``."""
    prepare = image_preparer(Hyperparameters(**{**TINY, "augment": augment}))
    raw = torch.from_numpy(np.array(data.images[:16]))  # a writable copy of the memmap
    return prepare(raw, train, torch.Generator().manual_seed(seed))


def pixel_levels(batch: torch.Tensor) -> torch.Tensor:
    """Normalised input back to 0..255."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return batch * std + mean


@pytest.mark.parametrize("augment", ["flip", "basic", "strong"])
def test_evaluation_scores_the_same_unaugmented_images_whatever_the_policy(tiny, augment):
    torch.manual_seed(0)
    model = build_model(base_model="resnet18", num_classes=3, head="linear")

    def scores(policy: str) -> np.ndarray:
        hp = Hyperparameters(**{**TINY, "augment": policy})
        probs, _ = evaluate(model=model, data=tiny, indices=np.arange(16), hp=hp, device=CPU, dtype=None,
                            prepare=image_preparer(hp))
        return probs

    assert np.array_equal(scores(augment), scores("none"))


@pytest.mark.parametrize("seed", [0, 1])
def test_augment_none_leaves_a_training_batch_bit_identical(tiny, seed):
    assert torch.equal(prepared(tiny, "none", train=True, seed=seed), prepared(tiny, "none", train=False))


def test_augment_flip_mirrors_some_images_horizontally_and_leaves_the_rest(tiny):
    plain = prepared(tiny, "none", train=False)
    mirrored = plain.flip(-1)
    assert not any(torch.equal(a, b) for a, b in zip(plain, mirrored, strict=True))  # no image is symmetric
    out = prepared(tiny, "flip", train=True)
    flipped = [torch.equal(image, mirror) for image, mirror in zip(out, mirrored, strict=True)]
    kept = [torch.equal(image, same) for image, same in zip(out, plain, strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))  # each image: exactly one of the two
    assert 0 < sum(flipped) < len(out)


def test_augment_basic_crops_every_image_without_changing_colours(tiny):
    plain = prepared(tiny, "none", train=False)
    out = prepared(tiny, "basic", train=True)
    assert out.shape == plain.shape == (16, 3, 32, 32)
    assert not any(torch.equal(image, same) or torch.equal(image, same.flip(-1))
                   for image, same in zip(out, plain, strict=True))
    # Cropping and resizing uint8 pixels: every value is still a whole 0..255 level.
    levels = pixel_levels(out)
    assert torch.allclose(levels, levels.round(), atol=1e-3) and levels.min() > -1e-3 and levels.max() < 255 + 1e-3


def test_augment_strong_also_jitters_colours_and_erases_a_grey_square(tiny):
    plain = prepared(tiny, "none", train=False)
    out = prepared(tiny, "strong", train=True)
    assert not any(torch.equal(image, same) for image, same in zip(out, plain, strict=True))
    levels = pixel_levels(out)
    off_level = (levels - levels.round()).abs() > 1e-2
    assert off_level.float().mean() > 0.5  # brightness, contrast and saturation scale the levels
    grey = ((levels - 127).abs() < 1e-3).all(dim=1)  # erasing paints 127 in all three channels
    erased = [int(mask.sum()) for mask in grey]
    assert max(erased) >= 9 and sum(count > 0 for count in erased) < len(erased)  # some images, a 3x3 at least
