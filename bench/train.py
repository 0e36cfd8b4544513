"""Training throughput: the naive recipe vs ours, and a linear probe on cached features vs full fine-tuning.

One generated JPEG dataset (class folders), one stratified split, the same model and epochs for every row:
  (a) naive: torchvision ImageFolder decoding JPEGs with PIL every step, fp32, NCHW, Adam 1e-4, batch 32,
      ResNet + Dense 1024 head (the classic recipe written the obvious way);
  (b) ours with default hyperparameters, from the decoded uint8 cache (the cache build is timed apart);
  (c) linear probe (freeze backbone, no augmentation) on cached backbone features, cold and warm cache;
  (f) the floor: ours' model, optimizer, precision, memory format and EMA stepping on one batch already in memory.
      No input path, no loader, no bookkeeping: what this hardware does with this model, and the most (b) can reach.
Weights are random (this machine is offline); throughput does not depend on them.

    python bench/train.py                       # CPU, 600 images, 64 px, 5 epochs (~2-4 min on 2 cores)
    python bench/train.py --device cuda --image-size 224 --batch-size 256 --images 20000
    python bench/train.py --only naive,ours --data-dir /tmp/d   # what bench/gpu.sh times (and --only compiled)
    python bench/train.py --only naive,ours,floor --epochs 3    # how far ours is from the bare model step

Every row (and every epoch of ours) is printed and recorded as it is measured (bench/gpu_report.py, $GPU_JSON).
"""

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_report import emit  # noqa: E402
from shared.hyperparameters import Hyperparameters  # noqa: E402
from shared.modeling import build_model, resize_size_for  # noqa: E402
from shared.storage import write_json  # noqa: E402
from tests.synthetic import PALETTE, make_image  # noqa: E402
from worker.images import decode_image  # noqa: E402
from worker.training.auto import batch_size_of, resolve  # noqa: E402
from worker.training.averaging import WeightEma, ema_decay  # noqa: E402
from worker.training.data import TEST, TRAIN, load_cache, make_splits  # noqa: E402
from worker.training.engine import apply_gradients, fit  # noqa: E402
from worker.training.optim import amp_dtype, build_optimizer  # noqa: E402


class Quiet:
    """Prints progress now and then and records each epoch's rate as a row (what a killed step keeps)."""

    def __init__(self, step: str = "", label: str = "") -> None:
        self.step, self.label = step, label

    def progress(self, progress: dict[str, Any]) -> None:
        if self.step:
            print(f"  {self.label}: epoch {progress['epoch']} step {progress['step']}/{progress['steps']} "
                  f"{progress['images_per_second']:.0f} img/s", flush=True)

    def epoch_done(self, epoch: int, metrics: dict[str, Any]) -> None:
        if self.step:
            emit(self.step, f"{self.label}, epoch {epoch}", metrics["images_per_second"],
                 seconds=metrics["seconds"])

    def resumed_after(self, epoch: int, metrics: dict[str, Any]) -> None:
        pass  # every bench run starts in a fresh directory

    def stop_requested(self) -> bool:
        return False


def make_jpegs(root: Path, *, images: int, size: int, seed: int = 0) -> list[tuple[Path, int]]:
    classes = sorted(PALETTE)
    rng = random.Random(seed)
    files = []
    for i in range(images):
        label = i % len(classes)
        path = root / classes[label] / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        make_image(classes[label], rng, size).save(path, quality=90)
        files.append((path, label))
    return files


def build_cache(files: list[tuple[Path, int]], cache: Path, side: int) -> None:
    """What ingestion does once per dataset: decode every image to a uint8 square on disk."""
    cache.mkdir(parents=True)
    images = np.lib.format.open_memmap(cache / "images.npy", mode="w+", dtype=np.uint8,
                                       shape=(len(files), side, side, 3))
    for i, (path, _) in enumerate(files):
        images[i] = decode_image(path.read_bytes(), side=side, max_pixels=64_000_000, min_side=8)
    images.flush()
    np.save(cache / "labels.npy", np.array([label for _, label in files], dtype=np.int64))
    np.save(cache / "splits.npy", np.full(len(files), -1, dtype=np.int8))
    write_json(cache / "index.json", {"classes": sorted(PALETTE), "cache_size": side})


def naive(files: list[tuple[Path, int]], splits: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """The classic recipe as usually written: decode + resize every JPEG every epoch, fp32, NCHW."""
    from PIL import Image
    from torchvision import transforms

    device = torch.device(args.device)
    transform = transforms.Compose([
        transforms.Resize((args.image_size, args.image_size)), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    class Files(torch.utils.data.Dataset):
        def __init__(self, items: list[tuple[Path, int]]) -> None:
            self.items = items

        def __len__(self) -> int:
            return len(self.items)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            path, label = self.items[i]
            with Image.open(path) as image:
                return transform(image.convert("RGB")), label

    train = [files[i] for i in np.flatnonzero(splits == TRAIN)]
    test = [files[i] for i in np.flatnonzero(splits == TEST)]
    torch.manual_seed(0)
    model = build_model(base_model=args.base_model, num_classes=len(PALETTE), head="mlp", dropout=0.0).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loader = torch.utils.data.DataLoader(Files(train), batch_size=32, shuffle=True, num_workers=args.naive_workers)
    criterion = nn.CrossEntropyLoss()
    started = time.perf_counter()
    train_seconds, seen = 0.0, 0
    for _ in range(args.epochs):
        model.train()
        epoch_start = time.perf_counter()
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            loss = criterion(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(labels)
        loss.item()  # wait for the device before reading the clock
        train_seconds += time.perf_counter() - epoch_start
    model.eval()
    correct = 0
    with torch.no_grad():
        for images, labels in torch.utils.data.DataLoader(Files(test), batch_size=64):
            correct += int((model(images.to(device)).argmax(1).cpu() == labels).sum())
    return {"images_per_second": seen / train_seconds, "wall": time.perf_counter() - started,
            "accuracy": correct / max(1, len(test)), "batch": 32, "precision": "off"}


def ours(data: Any, splits: np.ndarray, work: Path, args: argparse.Namespace, features_dir: Path | None = None,
         compile_model: bool = False, label: str = "", **overrides: Any) -> dict[str, Any]:
    hp = Hyperparameters(base_model=args.base_model, weights="none", epochs=args.epochs, image_size=args.image_size,
                         batch_size=args.batch_size or "auto", **overrides)
    started = time.perf_counter()
    result = fit(hp=hp, data=data, splits=splits, device=torch.device(args.device), work_dir=work,
                 weights_dir=None, reporter=Quiet(args.step, label), features_dir=features_dir,
                 compile_model=compile_model)
    # Compiling happens in the first epoch: the compiled row's rate is that of the epochs after it.
    timed = result.history[1:] if compile_model and len(result.history) > 1 else result.history
    trained = sum(row["train_images"] for row in timed)
    train_seconds = sum(row["train_images"] / row["images_per_second"] for row in timed)
    return {"images_per_second": trained / train_seconds, "wall": time.perf_counter() - started,
            "accuracy": result.test["accuracy"], "batch": result.hp.batch_size,
            "precision": result.hp.mixed_precision}


def floor(train_count: int, args: argparse.Namespace, steps: int = 8) -> dict[str, Any]:
    """The bare training step of the hyperparameters (b) resolves to, on one random batch already on the device:
    forward, then the engine's own ``apply_gradients`` (backward, optimizer, EMA). Two warm-up steps, then ``steps``
    timed."""
    device = torch.device(args.device)
    hp = resolve(Hyperparameters(base_model=args.base_model, weights="none", epochs=args.epochs,
                                 image_size=args.image_size, batch_size=args.batch_size or "auto"),
                 train_count=train_count, device=device)
    batch, dtype = batch_size_of(hp), amp_dtype(hp, device)
    torch.manual_seed(0)
    model = build_model(base_model=hp.base_model, num_classes=len(PALETTE), head=hp.head, dropout=hp.dropout)
    model.to(device).train()
    images = torch.randn(batch, 3, hp.image_size, hp.image_size, device=device)
    if hp.channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, len(PALETTE), (batch,), device=device)
    optimizer = build_optimizer(model, hp)
    ema = WeightEma(model, decay=ema_decay(steps)) if hp.ema == "on" else None
    criterion = nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    started, loss = 0.0, torch.zeros((), device=device)
    for step in range(steps + 2):
        if step == 2:
            loss.item()  # wait for the device before reading the clock
            started = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = criterion(model(images), labels)
        apply_gradients(loss=loss, optimizer=optimizer, scaler=scaler, ema=ema)
    loss.item()
    wall = time.perf_counter() - started
    return {"images_per_second": steps * batch / wall, "wall": wall, "accuracy": float("nan"), "batch": batch,
            "precision": hp.mixed_precision}


def input_pipeline(data: Any, splits: np.ndarray, args: argparse.Namespace) -> dict[str, float]:
    """The input path alone, no model: producer thread (gather into reusable, pinned on CUDA, buffers; copy on a
    side stream), then crop/flip/normalise on the device. What it sustains is the most training could reach."""
    from worker.training.data import prepare_batch
    from worker.training.loader import BatchProducer, plan_batches

    device = torch.device(args.device)
    train = np.flatnonzero(splits == TRAIN)
    generator = torch.Generator(device=device).manual_seed(0)
    started = time.perf_counter()
    seen, out = 0, torch.zeros(())
    for epoch in range(args.epochs):
        order = np.random.default_rng(epoch).permutation(train)
        with BatchProducer(data, plan_batches(order, args.batch_size or 64, pad=True), device=device) as batches:
            for raw, labels in batches:
                out = prepare_batch(raw, image_size=args.image_size, train=True, augment="basic",
                                    generator=generator, channels_last=True)
                seen += len(labels)
    out.sum().item()  # wait for the device before reading the clock
    wall = time.perf_counter() - started
    return {"images_per_second": seen / wall, "wall": wall, "accuracy": float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="for ours (default: auto, as a job that names none); the naive recipe always uses 32")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--base-model", default="resnet50")
    parser.add_argument("--naive-workers", type=int, default=0, help="DataLoader workers for the naive recipe")
    parser.add_argument("--ablate", action="store_true", 
                        help="also run ours in fp32 (mixed_precision off), and without channels_last")
    parser.add_argument("--only", default="naive,ours,probe",
                        help="rows to run, of naive, ours, compiled (ours with torch.compile), loader (the input "
                        "path alone, no model), floor (the bare model step, no input), probe")
    parser.add_argument("--jpeg-size", type=int, help="side of the generated JPEGs (default image size + 1/8)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--data-dir", type=Path, help="keep the generated JPEGs and cache here, and reuse them "
                        "when they match (bench/gpu.sh's train and compile steps share one set)")
    parser.add_argument("--step", default="", help="bench/gpu.sh step name: record rows and epochs under it")
    args = parser.parse_args()
    only = set(args.only.split(","))
    torch.backends.cudnn.benchmark = True

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        jpeg_size = args.jpeg_size or args.image_size + args.image_size // 8
        side = resize_size_for(args.image_size)
        store = args.data_dir / f"{args.images}-{jpeg_size}-{side}" if args.data_dir else root
        cache_start = time.perf_counter()
        if (store / "done.json").is_file():
            files = [(store / "jpegs" / p, label) for p, label in json.loads((store / "done.json").read_text())]
            print(f"reusing {len(files)} JPEGs and their cache from {store}", flush=True)
        else:
            shutil.rmtree(store / "jpegs", ignore_errors=True)
            shutil.rmtree(store / "cache", ignore_errors=True)
            files = make_jpegs(store / "jpegs", images=args.images, size=jpeg_size)
            build_cache(files, store / "cache", side)
            if args.data_dir:
                (store / "done.json").write_text(json.dumps([(str(p.relative_to(store / "jpegs")), label)
                                                             for p, label in files]))
        cache_seconds = time.perf_counter() - cache_start
        print(f"{args.images} JPEGs ({jpeg_size} px) and their {side} px cache ready in {cache_seconds:.1f} s",
              flush=True)
        data = load_cache(store / "cache")
        splits = make_splits(labels=data.labels, preset=data.preset_splits, val_fraction=0.15, test_fraction=0.15,
                             seed=0)
        rows = []

        def add(name: str, row: dict[str, float], **extra: Any) -> None:
            rows.append((name, row))
            if args.step:
                emit(args.step, name, row["images_per_second"], wall=round(row["wall"], 1),
                     accuracy=round(row["accuracy"], 3), **extra)

        target = {"target": 5000} if args.device == "cuda" and args.image_size == 224 else {}
        for run in [run for run in args.only.split(",") if run in ("naive", "ours", "compiled", "loader", "floor")]:
            if run == "floor":
                add("(f) floor: ours' bare step on one batch in memory", floor(int((splits == TRAIN).sum()), args))
            elif run == "naive":
                add("(a) naive: PIL per step, fp32, NCHW, Adam 1e-4, b32", naive(files, splits, args))
            elif run == "loader":
                add("(l) input path alone (producer, device crop/flip)", input_pipeline(data, splits, args))
            elif run == "ours":
                add("(b) ours, defaults, from the uint8 cache", ours(data, splits, root / "b", args,
                                                                     label="(b) ours"), **target)
            else:
                add("(b) ours, torch.compile (epochs after the first)", ours(data, splits, root / "bc", args,
                                                                          compile_model=True, label="(b) compiled"),
                    **target)
        if args.ablate:
            add("(b') ours, fp32 (mixed_precision off)", ours(data, splits, root / "b1", args,
                                                              mixed_precision="off"))
            add("(b'') ours, NCHW (channels_last off)", ours(data, splits, root / "b2", args, channels_last=False))
        probe: dict[str, Any] = {"freeze": "backbone", "augment": "none", "head": "linear", "learning_rate": 1e-2}
        if "probe" in only:
            add("(c) linear probe, features computed (cold)", ours(data, splits, root / "c1", args,
                                                                   root / "features", **probe))
            add("(c) linear probe, features cached (warm)", ours(data, splits, root / "c2", args,
                                                                 root / "features", **probe))

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"\n{args.base_model}, {args.images} images ({int((splits == TRAIN).sum())} train), {args.image_size} px, "
          f"{args.epochs} epochs, {device}; cache build (once per dataset) {cache_seconds:.1f} s\n")
    naive_row = next((row for name, row in rows if name.startswith("(a)")), rows[0][1])
    full_row = next((row for name, row in rows if name.startswith("(b) ours, defaults")), rows[0][1])
    floor_rate = next((row["images_per_second"] for name, row in rows if name.startswith("(f)")), float("nan"))
    print(f"| {'run':<52} | batch, amp | train img/s | vs (a) | vs (f) | wall s | vs (b) wall | test acc |")
    print(f"|{'-' * 54}|------------|-------------|--------|--------|--------|-------------|----------|")
    for name, row in rows:
        used = f"{row.get('batch', '')}, {row.get('precision', '')}" if "batch" in row else "-"
        print(f"| {name:<52} | {used:<10} | {row['images_per_second']:11.1f} | "
              f"{row['images_per_second'] / naive_row['images_per_second']:5.2f}x | "
              f"{row['images_per_second'] / floor_rate:5.2f}x | {row['wall']:6.1f} | "
              f"{full_row['wall'] / row['wall']:10.1f}x | {row['accuracy']:8.3f} |")
    if args.json:
        args.json.write_text(json.dumps({
            "device": device, "base_model": args.base_model, "images": args.images, "image_size": args.image_size,
            "batch_size": args.batch_size, "epochs": args.epochs, "cache_build_seconds": cache_seconds,
            "rows": [{"run": name, **row} for name, row in rows]}, indent=2))


if __name__ == "__main__":
    main()
