"""bench/gpu.sh's first step: generate a zip of photo-like JPEGs on every core, then time the worker's real
ingestion of it (embedded SQLite in a fresh DATA_DIR), images/s.

    python bench/gpu_ingest.py --images 20000 --size 256 --json out/ingest.json
"""

import argparse
import json
import os
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_report import emit  # noqa: E402
from bench.ingest import bench_ingest, make_jpeg  # noqa: E402

CHUNK = 500


def chunk(start: int, *, images: int, size: int) -> list[bytes]:
    rng = np.random.default_rng(start)  # one generator per chunk: the same bytes whatever the core count
    return [make_jpeg(rng, (size + int(rng.integers(0, size // 3)), size)) for _ in range(min(CHUNK, images - start))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256, help="shorter side of the JPEGs")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--step", default="", help="bench/gpu.sh step name: record each row under it")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="gpu-bench-ingest-"))
    for key in ("TUNESERVE_DATABASE_URL", "TUNESERVE_BROKER_URL"):
        os.environ.pop(key, None)
    os.environ["TUNESERVE_DATA_DIR"] = str(root / "data")
    started = time.perf_counter()
    starts = range(0, args.images, CHUNK)
    with ProcessPoolExecutor() as pool, zipfile.ZipFile(root / "upload.zip", "w", zipfile.ZIP_STORED) as upload:
        for start, blobs in zip(starts, pool.map(partial(chunk, images=args.images, size=args.size), starts),
                                strict=True):
            for i, data in enumerate(blobs, start):
                upload.writestr(f"photos/class_{i % args.classes:02d}/{i:06d}.jpg", data)
    generated = time.perf_counter() - started
    if args.step:
        emit(args.step, f"generate {args.images} JPEGs ({args.size} px) on {os.cpu_count()} CPUs (setup)",
             args.images / generated)
    rate, _ = bench_ingest(root / "upload.zip")
    print(f"generated {args.images} JPEGs ({args.size} px) in {generated:.1f} s on {os.cpu_count()} CPUs; "
          f"ingested at {rate:.0f} images/s")
    if args.step:
        emit(args.step, "ingest: worker path, zip -> uint8 cache (embedded SQLite)", rate)
    if args.json:
        args.json.write_text(json.dumps({"images": args.images, "jpeg_size": args.size,
                                         "generate_seconds": generated, "ingest_images_per_second": rate}))


if __name__ == "__main__":
    main()
