"""Ingestion and loader throughput on one generated JPEG dataset, measured side by side.

  (1) ingestion: the worker's real path (archive -> decode -> uint8 cache -> SQLite row), images/s;
  (2) decode pool: the same decode (JPEG decode + EXIF + resize to the cache square) serially, on
      threads and on processes, to show which pool ingestion should use;
  (3) JPEG draft: decoding large photos straight at reduced scale vs full decode then resize;
  (4) loader feeding a training step (no model): ours = iterate_batches + prepare_batch from the cache,
      vs. the naive torchvision ImageFolder + PIL + RandomResizedCrop/flip/ToTensor/Normalize with a
      DataLoader (num_workers=2). Both deliver a normalised float batch on --device.

    python bench/ingest.py                                  # 2,000 JPEGs of ~300 px, CPU (~2-4 min on 2 cores)
    python bench/ingest.py --images 20000 --device cuda --batches 200
"""

import argparse
import io
import os
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_jpeg(rng: np.random.Generator, size: tuple[int, int], quality: int = 90) -> bytes:
    """Smooth colour fields with noise: compresses like a photo, unlike flat colour or pure noise."""
    coarse = rng.integers(0, 255, (size[1] // 16 + 1, size[0] // 16 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
    noisy = np.clip(np.asarray(image, dtype=np.int16) + rng.integers(-12, 12, (size[1], size[0], 3)), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(noisy.astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def make_dataset(root: Path, *, images: int, size: int, classes: int) -> tuple[Path, Path, list[bytes]]:
    """The same JPEGs as an ImageFolder on disk (for torchvision) and as a zip upload (for us)."""
    rng = np.random.default_rng(0)
    folder, archive, blobs = root / "folder", root / "upload.zip", []
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as upload:
        for i in range(images):
            label = f"class_{i % classes:02d}"
            data = make_jpeg(rng, (size + int(rng.integers(0, size // 3)), size))
            path = folder / label / f"{i:06d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            upload.writestr(f"photos/{label}/{i:06d}.jpg", data)
            blobs.append(data)
    return folder, archive, blobs


def bench_ingest(archive: Path) -> tuple[float, str]:
    from shared.config import get_settings
    from shared.db import session_scope
    from shared.migrate import upgrade
    from shared.orm import Dataset, new_id
    from shared.storage import dataset_upload
    from worker.ingest import ingest_dataset

    upgrade()
    settings = get_settings()
    dataset_id = new_id()
    dataset_upload(settings, dataset_id).parent.mkdir(parents=True)
    os.link(archive, dataset_upload(settings, dataset_id))
    with session_scope() as session:
        session.add(Dataset(id=dataset_id, name="bench", status="processing", filename=archive.name,
                            size_bytes=archive.stat().st_size, rejected=[], report={}, progress={}))
    started = time.perf_counter()
    ingest_dataset(dataset_id=dataset_id, settings=settings)
    seconds = time.perf_counter() - started
    with session_scope() as session:
        row = session.get(Dataset, dataset_id)
        assert row is not None
        if row.status != "ready":
            raise SystemExit(f"ingestion failed: {row.error}")
        return row.num_images / seconds, dataset_id


def _decode(data: bytes) -> np.ndarray:
    from worker.images import decode_image

    return decode_image(data, side=256, max_pixels=64_000_000, min_side=16)


def _decode_full(data: bytes) -> np.ndarray:
    """The same result without draft: full-size decode, then resize."""
    from PIL import ImageOps

    from shared.modeling.transforms import center_square, to_rgb

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return np.asarray(center_square(to_rgb(ImageOps.exif_transpose(image) or image), 256))


def bench_pools(blobs: list[bytes], workers: int) -> dict[str, float]:
    rates = {}
    started = time.perf_counter()
    for data in blobs:
        _decode(data)
    rates["serial"] = len(blobs) / (time.perf_counter() - started)
    with ThreadPoolExecutor(workers) as pool:
        started = time.perf_counter()
        list(pool.map(_decode, blobs))
        rates[f"threads x{workers}"] = len(blobs) / (time.perf_counter() - started)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_decode, blobs[:workers]))  # start the processes outside the timing
        started = time.perf_counter()
        list(pool.map(_decode, blobs, chunksize=16))
        rates[f"processes x{workers}"] = len(blobs) / (time.perf_counter() - started)
    return rates


def bench_draft(count: int) -> dict[str, float]:
    rng = np.random.default_rng(1)
    photos = [make_jpeg(rng, (2048, 1536)) for _ in range(count)]
    rates = {}
    for name, fn in (("full decode + resize", _decode_full), ("draft (ours)", _decode)):
        started = time.perf_counter()
        for data in photos:
            fn(data)
        rates[name] = count / (time.perf_counter() - started)
    return rates


def bench_ours(cache: Path, *, batch: int, image_size: int, batches: int, device: torch.device) -> float:
    from worker.training.data import iterate_batches, load_cache, prepare_batch

    data = load_cache(cache)
    generator = torch.Generator().manual_seed(0)
    indices = np.arange(len(data.labels))
    seen, started = 0, None
    while seen < batches:
        for images, labels in iterate_batches(data, indices, batch_size=batch, shuffle=True, generator=generator,
                                              device=device, drop_last=True):
            out = prepare_batch(images, image_size=image_size, train=True, augment="basic", generator=generator,
                                channels_last=False)
            assert out.shape == (len(labels), 3, image_size, image_size)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seen += 1
            if started is None:  # the first batch pays for page faults and kernel set-up
                started, seen = time.perf_counter(), 0
            if seen >= batches:
                break
    assert started is not None, "no batch was read"
    return batches * batch / (time.perf_counter() - started)


def bench_naive(folder: Path, *, batch: int, image_size: int, batches: int, device: torch.device,
                workers: int) -> float:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    loader = DataLoader(datasets.ImageFolder(folder, transform=transform), batch_size=batch, shuffle=True,
                        num_workers=workers, drop_last=True, persistent_workers=True,
                        pin_memory=device.type == "cuda")
    seen, started = 0, None
    while seen < batches:
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seen += 1
            if started is None:  # skip worker start-up
                started, seen = time.perf_counter(), 0
            if seen >= batches:
                break
    assert started is not None, "no batch was read"
    return batches * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=300, help="shorter side of the generated JPEGs")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per loader")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers and decode pool size")
    parser.add_argument("--large", type=int, default=40, help="2048x1536 JPEGs for the draft comparison")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory(prefix="tuneserve-bench-") as tmp:
        root = Path(tmp)
        os.environ.update({"TUNESERVE_DATA_DIR": str(root / "data"),
                           "TUNESERVE_DATABASE_URL": f"sqlite:///{root / 'bench.db'}"})
        started = time.perf_counter()
        folder, archive, blobs = make_dataset(root, images=args.images, size=args.size, classes=args.classes)
        print(f"generated {args.images} JPEGs of ~{args.size} px in {time.perf_counter() - started:.1f}s "
              f"({archive.stat().st_size / 2**20:.0f} MiB); cpus available: {len(os.sched_getaffinity(0))}; "
              f"torch threads: {torch.get_num_threads()}; device: {device}")

        rows: list[tuple[str, str, float]] = []
        ingest_rate, dataset_id = bench_ingest(archive)
        rows.append(("ingestion (zip -> cache, real worker path)", "images/s", ingest_rate))
        for name, rate in bench_pools(blobs[:600], args.workers).items():
            rows.append((f"decode pool: {name}", "images/s", rate))
        if args.large:
            for name, rate in bench_draft(args.large).items():
                rows.append((f"2048x1536 JPEG: {name}", "images/s", rate))
        cache = root / "data" / "datasets" / dataset_id / "cache"
        common = {"batch": args.batch_size, "image_size": args.image_size, "batches": args.batches, "device": device}
        naive = bench_naive(folder, workers=args.workers, **common)
        ours = bench_ours(cache, **common)
        rows.append((f"loader: naive ImageFolder + PIL, DataLoader x{args.workers}", "images/s", naive))
        rows.append(("loader: ours, uint8 cache + batched crops", "images/s", ours))

    width = max(len(name) for name, _, _ in rows)
    print(f"\n{'measurement':<{width}}  {'unit':<9} {'value':>9}")
    for name, unit, value in rows:
        print(f"{name:<{width}}  {unit:<9} {value:>9.0f}")
    print(f"\nloader speed-up, ours / naive: {ours / naive:.1f}x (target >= 5x); image_size {args.image_size}, "
          f"batch {args.batch_size}, {args.batches} batches each")


if __name__ == "__main__":
    main()
