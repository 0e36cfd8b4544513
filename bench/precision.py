"""fp32 vs bf16 autocast on CPU for short from-scratch runs: accuracy and speed, seed by seed.

Synthetic colours at 48 px, batch 16: where bf16 lost accuracy before EMA and BatchNorm recalibration were
defaults. ``mixed_precision: auto`` was decided on real data (bench/quality.py, defaults vs defaults+fp32). Not a
test; prints a table.
    .venv/bin/python bench/precision.py [--seeds 0,1,2,3] [--epochs 4]
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train import Quiet  # noqa: E402
from shared.hyperparameters import Hyperparameters  # noqa: E402
from tests.synthetic import make_zip  # noqa: E402
from worker.ingest import build_cache  # noqa: E402
from worker.training.data import load_cache, make_splits  # noqa: E402
from worker.training.engine import fit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        import os

        os.environ["TUNESERVE_DATA_DIR"] = tmp
        from shared.config import get_settings
        from shared.migrate import upgrade
        from shared.storage import dataset_upload

        settings = get_settings()
        upgrade()
        upload = dataset_upload(settings, "bench")
        upload.parent.mkdir(parents=True)
        make_zip(upload, classes=["red", "green", "blue"], per_class=args.per_class)
        build_cache(dataset_id="bench", settings=settings)
        data = load_cache(settings.data_dir / "datasets" / "bench" / "cache")
        print(f"resnet50 from scratch, 48 px, batch 16, {args.epochs} epochs, {len(data.labels)} images, CPU\n")
        print("| seed | precision | test accuracy | train img/s |\n|---|---|---|---|")
        for seed in (int(s) for s in args.seeds.split(",")):
            for precision in ("off", "bf16"):
                hp = Hyperparameters(weights="none", epochs=args.epochs, image_size=48, batch_size=16, seed=seed,
                                     mixed_precision=precision)
                splits = make_splits(labels=data.labels, preset=data.preset_splits, val_fraction=hp.val_fraction,
                                     test_fraction=hp.test_fraction, seed=seed)
                result = fit(hp=hp, data=data, splits=splits, device=torch.device("cpu"),
                             work_dir=Path(tmp) / f"job-{seed}-{precision}", weights_dir=None, reporter=Quiet())
                rate = sum(h["train_images"] for h in result.history) / sum(
                    h["train_images"] / h["images_per_second"] for h in result.history)
                name = "fp32" if precision == "off" else "bf16"
                print(f"| {seed} | {name} | {result.test['accuracy']:.3f} | {rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
