"""Fine-tuning hyperparameters: one validated schema that the API checks and the worker trusts."""

import operator
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema, field_validator, model_validator
from pydantic_core import PydanticCustomError

FreezePolicy = Annotated[str, Field(pattern=r"^(none|backbone|stages:[0-4])$")]


# The classic Keras-era recipe: pretrained ResNet-50, GAP, Dense 1024 + ReLU, Dense num_classes, Adam 1e-4,
# batch 32, 10 epochs, no augmentation, fp32. Sending exactly these hyperparameters reproduces it.
CLASSIC_RECIPE: dict[str, object] = {
    "base_model": "resnet50", "weights": "imagenet", "head": "mlp", "dropout": 0.0, "optimizer": "adam",
    "learning_rate": 1e-4, "backbone_lr_factor": 1.0, "weight_decay": 0.0, "lr_schedule": "constant",
    "batch_size": 32, "epochs": 10, "augment": "none", "label_smoothing": 0.0, "mixed_precision": "off",
    "channels_last": False,
}


def _auto_or_number(kind: type[int] | type[float], **bounds: float) -> tuple[PlainValidator, WithJsonSchema]:
    """``"auto"`` or a number within ``bounds`` (pydantic's ge/gt/le/lt), failing with ONE error that names
    the field (a plain ``int | Literal["auto"]`` union reports a failure per member)."""
    checks = {"ge": (operator.ge, "greater than or equal to", "greater_than_equal"),
              "gt": (operator.gt, "greater than", "greater_than"),
              "le": (operator.le, "less than or equal to", "less_than_equal"),
              "lt": (operator.lt, "less than", "less_than")}

    def validate(value: Any) -> Any:
        if value == "auto":
            return "auto"
        if isinstance(value, bool) or not isinstance(value, int | float) or (
                kind is int and not float(value).is_integer()):
            noun = "an integer" if kind is int else "a number"
            raise PydanticCustomError("auto_or_number", f"Input should be 'auto' or {noun}")
        for name, limit in bounds.items():
            compare, words, error_type = checks[name]
            if not compare(value, limit):
                raise PydanticCustomError(error_type, f"Input should be {words} {limit}", {name: limit})
        return kind(value)

    number: dict[str, Any] = {"type": "integer" if kind is int else "number"}
    number |= {{"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}[k]: v
               for k, v in bounds.items()}
    return PlainValidator(validate), WithJsonSchema({"anyOf": [number, {"const": "auto", "type": "string"}]})


BatchSize = Annotated[int | Literal["auto"], *_auto_or_number(int, ge=1, le=4096)]
LearningRate = Annotated[float | Literal["auto"], *_auto_or_number(float, gt=0, le=10)]
Fraction = Annotated[float | Literal["auto"], *_auto_or_number(float, ge=0, lt=0.5)]


class Hyperparameters(BaseModel):
    """Defaults are chosen per run by the worker from the dataset, the device and what the user set
    (``auto``; worker/training/auto.py resolves them and the job records the values used): the batch size
    from the number of training images (enough optimizer steps per epoch), the learning rate from the
    optimizer and batch size, the augmentation from the weights and epochs, held-out splits sized for
    small classes, weight averaging (EMA) and BatchNorm recalibration for short runs, bf16 on CPUs that
    have it. Fixed defaults: AdamW with the pretrained backbone at 0.1x the head's lr, weight decay 0.05
    (none on norms and biases), cosine decay after a warmup of min(1, epochs / 10) epochs, label smoothing
    0.1, channels_last.

    The classic recipe is one request away (``CLASSIC_RECIPE``): ``{"optimizer": "adam",
    "learning_rate": 1e-4, "backbone_lr_factor": 1.0, "weight_decay": 0, "lr_schedule": "constant",
    "augment": "none", "label_smoothing": 0, "dropout": 0, "mixed_precision": "off",
    "channels_last": false, "batch_size": 32, "epochs": 10}`` (base_model resnet50, head mlp and
    weights imagenet are already the defaults).
    """

    model_config = ConfigDict(extra="forbid")

    base_model: Literal["resnet50", "resnet18", "resnet34", "resnet101"] = "resnet50"
    weights: str = Field("imagenet", max_length=255)
    epochs: int = Field(10, ge=1, le=1000)
    batch_size: BatchSize = "auto"
    # An epoch is at least this many optimizer steps: smaller datasets are passed over several times.
    min_steps_per_epoch: int = Field(25, ge=1, le=100_000)
    learning_rate: LearningRate = "auto"
    backbone_lr_factor: float = Field(0.1, ge=0, le=10)
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    weight_decay: float = Field(0.05, ge=0, le=1)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup_epochs: float | None = Field(None, ge=0, le=100)  # None: min(1, epochs / 10)
    image_size: int = Field(224, ge=32, le=640)
    freeze: FreezePolicy = "none"
    head: Literal["mlp", "linear"] = "mlp"
    dropout: float = Field(0.2, ge=0, lt=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    # flip: horizontal flips only; basic: random-resized-crop + flip; strong: + colour jitter and erasing.
    augment: Literal["auto", "none", "flip", "basic", "strong"] = "auto"
    mixup: float = Field(0.0, ge=0, le=10)
    cutmix: float = Field(0.0, ge=0, le=10)
    mixed_precision: Literal["auto", "bf16", "fp16", "off"] = "auto"
    channels_last: bool = True
    compile: Literal["auto", "on", "off"] = "auto"
    early_stopping_patience: int | None = Field(None, ge=1, le=1000)
    class_weighting: Literal["none", "balanced"] = "none"
    # auto: 15% each of a class with 60+ images, down to 8% (at least one image) for small classes.
    val_fraction: Fraction = "auto"
    test_fraction: Fraction = "auto"
    # Exponential moving average of the weights, evaluated beside the raw weights every epoch.
    ema: Literal["auto", "on", "off"] = "auto"
    # Re-estimate BatchNorm running statistics on training images before each evaluation.
    recalibrate_bn: Literal["auto", "on", "off"] = "auto"
    # on: after the run picks its best epoch on validation, train again from the start on train + validation
    # images for that many epochs and publish that model (about twice the time; worker/training/refit.py).
    refit: Literal["on", "off"] = "off"
    seed: int = Field(0, ge=0, le=2**31 - 1)
    max_minutes: float | None = Field(None, gt=0, le=60 * 24 * 14)
    # DistributedDataParallel over this many GPUs of the worker's host. batch_size is per GPU: one step
    # trains batch_size x gpus images (the learning rate is not rescaled).
    gpus: int | Literal["all"] = 1

    @field_validator("weights")
    @classmethod
    def _weights_name(cls, value: str) -> str:
        if value in ("imagenet", "none"):
            return value
        # A file name inside WEIGHTS_DIR: no separators that could climb out of it.
        if not re.fullmatch(r"[A-Za-z0-9_.-]+\.(safetensors|pth|pt)", value) or value.startswith("."):
            raise ValueError(
                "must be 'imagenet', 'none', or the file name of a .safetensors/.pth state dict in "
                "WEIGHTS_DIR (no directories)"
            )
        return value

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 64:
            raise ValueError("must be between 1 and 64, or 'all'")
        return value

    @model_validator(mode="after")
    def _one_image_batches(self) -> "Hyperparameters":
        # Training BatchNorm normalises over the batch: one image (ResNet's last stage is 1x1 below 64 px) leaves one
        # value per channel and the first step fails. A frozen backbone trains only the head, which has none.
        if self.batch_size == 1 and self.freeze != "backbone":
            raise ValueError("batch_size: 1 image a step cannot train BatchNorm layers; use 2 or more, or freeze "
                             "the backbone")
        return self

    @model_validator(mode="after")
    def _refit(self) -> "Hyperparameters":
        if self.refit == "on" and self.max_minutes is not None:
            raise ValueError("refit: a time budget cannot be split between the run and its refit; drop max_minutes "
                             "or refit")
        if self.refit == "on" and self.gpus != 1:
            raise ValueError("refit: runs on one GPU; set gpus to 1 or refit to off")
        if self.refit == "on" and self.val_fraction == 0:
            raise ValueError("refit: needs validation images to pick the epoch count; set val_fraction above 0")
        return self

    @model_validator(mode="after")
    def _fractions(self) -> "Hyperparameters":
        if isinstance(self.val_fraction, float) and isinstance(self.test_fraction, float) and (
                self.val_fraction + self.test_fraction >= 0.8):
            raise ValueError("val_fraction + test_fraction must leave at least 20% for training")
        return self

    @property
    def effective_warmup_epochs(self) -> float:
        # A whole epoch of warmup would eat a short run; a tenth of the run keeps the cosine useful.
        return min(1.0, self.epochs / 10) if self.warmup_epochs is None else self.warmup_epochs

    @property
    def freeze_stages(self) -> int:
        """How many leading backbone stages are frozen: stem = stage 0, layer1..layer4 = 1..4."""
        if self.freeze == "none":
            return -1
        if self.freeze == "backbone":
            return 4
        return int(self.freeze.split(":")[1])
