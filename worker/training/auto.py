"""``auto`` hyperparameters made concrete for one run, from the data, the device and what the user set.

Every rule here was chosen by measurement on real data (bench/quality.py); the job records the values
it used, so a user can pin any of them in the next request.
"""

import math

import torch

from shared.hyperparameters import Hyperparameters

# Large datasets get the batch that still leaves this many steps per epoch; small ones get MIN_BATCH and
# min_steps_per_epoch passes over them. Below 32 a CPU trains markedly slower per image (ResNet-50 at 32 px,
# one thread: 41 img/s at 16, 66 at 32, 79 at 64) for no accuracy gained (the colours: 0.99 at 8 and at 32).
STEPS_PER_EPOCH = 25
MIN_BATCH = 32
MAX_BATCH = {"cpu": 64, "cuda": 256}
BASE_BATCH = 32
BASE_LR = {"adamw": 2e-3, "adam": 2e-3, "sgd": 0.1}
# Short from-scratch runs: augmentation costs more than it teaches before the network has features (the
# walk-through's colours, 4 seeds: none 0.99, flips 0.93, crops + flips 0.60 held-out accuracy).
CROP_EPOCHS = 10
# BatchNorm statistics with momentum 0.1 lag the weights until the run has this many steps.
RECALIBRATE_STEPS = 3000


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 convolutions and matmuls run in hardware. Elsewhere oneDNN emulates them, slower
    than fp32. (torch.cpu's probes are private; a torch without them reports no support.)"""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in probes)


def auto_precision(device: torch.device) -> str:
    """bf16 where the hardware has it, fp16 (with a GradScaler) on older GPUs, fp32 on other CPUs.

    On CPUs with native bf16 it kept the held-out accuracy of fp32 on real data (bench/quality.py,
    defaults+bf16: colours 1.000, digits and MNIST within a seed's spread) once EMA and BatchNorm
    recalibration were on; before them, short runs from scratch lost accuracy with it (bench/precision.py)."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "off"


def _power_of_two_floor(value: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(value, 1)))))


def auto_batch_size(train_count: int, device: torch.device) -> int:
    cap = MAX_BATCH.get(device.type, MAX_BATCH["cpu"])
    return max(MIN_BATCH, min(cap, _power_of_two_floor(train_count / STEPS_PER_EPOCH)))


def auto_learning_rate(hp: Hyperparameters, batch_size: int) -> float:
    """Square-root scaling with the batch for the Adam family, linear for SGD (Goyal et al.)."""
    if hp.optimizer == "sgd":
        return BASE_LR["sgd"] * batch_size / 256
    base = BASE_LR[hp.optimizer] if hp.weights == "none" else BASE_LR[hp.optimizer] / 2
    return base * math.sqrt(batch_size / BASE_BATCH)


def auto_augment(hp: Hyperparameters) -> str:
    return "basic" if hp.weights != "none" or hp.epochs >= CROP_EPOCHS else "none"


def resolve(hp: Hyperparameters, *, train_count: int, device: torch.device) -> Hyperparameters:
    """A copy of ``hp`` with no ``auto`` left but the split fractions (data.make_splits sizes those per
    class, before the training set exists)."""
    batch_size = hp.batch_size if isinstance(hp.batch_size, int) else auto_batch_size(train_count, device)
    steps = hp.epochs * max(1, train_count // batch_size)
    return hp.model_copy(update={
        "batch_size": batch_size,
        "learning_rate": auto_learning_rate(hp, batch_size) if hp.learning_rate == "auto"
        else float(hp.learning_rate),
        "augment": auto_augment(hp) if hp.augment == "auto" else hp.augment,
        "ema": hp.ema if hp.ema != "auto" else "on",
        "mixed_precision": auto_precision(device) if hp.mixed_precision == "auto" else hp.mixed_precision,
        "recalibrate_bn": hp.recalibrate_bn if hp.recalibrate_bn != "auto"
        else ("on" if steps < RECALIBRATE_STEPS else "off"),
    })


def passes_per_epoch(train_count: int, hp: Hyperparameters) -> int:
    """Passes over the training images that make one epoch of at least ``min_steps_per_epoch`` steps: a
    dataset of a few dozen images would otherwise give a 3-epoch run some 20 optimizer steps in all."""
    batch = batch_size_of(hp)
    return max(1, math.ceil(hp.min_steps_per_epoch * batch / max(train_count, 1)))


def learning_rate_of(hp: Hyperparameters) -> float:
    """The head's learning rate of a resolved run."""
    if isinstance(hp.learning_rate, str):
        raise ValueError("learning_rate is still 'auto': resolve() the hyperparameters first")
    return float(hp.learning_rate)


def batch_size_of(hp: Hyperparameters) -> int:
    """The batch size of a resolved run (``resolve`` has replaced ``auto``)."""
    if isinstance(hp.batch_size, str):
        raise ValueError("batch_size is still 'auto': resolve() the hyperparameters first")
    return hp.batch_size
