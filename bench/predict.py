"""Benchmark POST /predict over real HTTP: micro-batching on vs off, or 1 vs N API processes, side by side.

Starts the real API (`tuneserve api`, a subprocess, embedded SQLite) serving a freshly initialised model
artifact (weights do not change the cost of a forward pass), then fires single-image JPEG requests from
client threads (httpx, keep-alive) at each concurrency for a fixed time against each mode: with one
--workers value, micro-batching on (``predict_max_batch`` = --max-batch) vs off (``predict_max_batch`` = 1);
with several (``--workers 1,2``), `tuneserve api --workers N` for each N, batching on. Mean batch size comes
from the server's own /metrics (summed over its processes). The client threads share the machine with the
server: on a small box they cost part of what is measured, the same for every mode.

    python bench/predict.py                                   # resnet50, 64 px, CPU, ~3 minutes
    python bench/predict.py --workers 1,2 --concurrency 16,64  # API processes (docs/predict-scaling.md)
    python bench/predict.py --image-size 224 --device cuda --seconds 10
"""

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image, ImageFilter

REPO_ROOT = Path(__file__).resolve().parents[1]
BOUNDARY = "benchboundary7d1f"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="resnet50", choices=["resnet18", "resnet34", "resnet50", "resnet101"])
    parser.add_argument("--image-size", type=int, default=64, help="model input side (224 for the GPU run)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma-separated client thread counts")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured time per concurrency level and mode")
    parser.add_argument("--rounds", type=int, default=4, help="alternating on/off rounds that share --seconds")
    parser.add_argument("--max-batch", type=int, default=32, help="predict_max_batch when batching is on")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workers", default="1", help="API processes; several (1,2) compare them, batching on")
    parser.add_argument("--step", default="", help="bench/gpu.sh step name: record each level under it")
    return parser.parse_args()


def jpegs(count: int, side: int) -> list[bytes]:
    """Photo-like JPEGs (smooth colour fields plus noise) a little larger than the model input."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((side, side * 3 // 4), Image.Resampling.BICUBIC)
        noise = rng.normal(0, 12, (image.height, image.width, 3))
        image = Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))
        buffer = io.BytesIO()
        image.filter(ImageFilter.SMOOTH).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def multipart(image: bytes, index: int) -> bytes:
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"img{index}.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    return head + image + f"\r\n--{BOUNDARY}--\r\n".encode()


def publish_model(args: argparse.Namespace) -> str:
    """A model artifact and its rows, as a succeeded training job leaves them (TUNESERVE_* env already set)."""
    from shared.config import get_settings
    from shared.db import session_scope
    from shared.migrate import upgrade
    from shared.modeling import IMAGENET_MEAN, IMAGENET_STD, build_model, resize_size_for, save_model_artifact
    from shared.orm import Dataset, Job, Model, new_id
    from shared.storage import model_dir

    upgrade()
    classes = [f"class{i:02d}" for i in range(args.classes)]
    model_id, dataset_id, job_id = new_id(), new_id(), new_id()
    model = build_model(base_model=args.base_model, num_classes=len(classes), head="mlp")
    meta = {"model_id": model_id, "base_model": args.base_model, "head": "mlp", "dropout": 0.0, "classes": classes,
            "image_size": args.image_size, "resize_size": resize_size_for(args.image_size),
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    save_model_artifact(directory=model_dir(get_settings(), model_id), model=model, meta=meta)
    with session_scope() as session:
        session.add(Dataset(id=dataset_id, name="bench", status="ready", filename="bench.zip", classes=classes))
        session.flush()
        session.add(Job(id=job_id, dataset_id=dataset_id, status="succeeded", hyperparameters={}, model_id=model_id))
        session.flush()
        session.add(Model(id=model_id, job_id=job_id, dataset_id=dataset_id, base_model=args.base_model,
                          classes=classes, image_size=args.image_size, metrics={}))
    return model_id


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_api(env: dict[str, str], log: Path, workers: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "shared.cli", "api", "--port", str(port), "--log-level",
                                 "warning", "--workers", str(workers)], env=env, cwd=REPO_ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
    raise SystemExit(f"the API did not start; the end of {log}:\n{tail}")


def batch_totals(url: str) -> tuple[float, float]:
    """(images, forward passes) so far, from the server's tuneserve_predict_batch_size histogram."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        for name in ("tuneserve_predict_batch_size_sum", "tuneserve_predict_batch_size_count"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    return values.get("tuneserve_predict_batch_size_sum", 0.0), values.get("tuneserve_predict_batch_size_count", 0.0)


def run_level(url: str, bodies: list[bytes], concurrency: int, seconds: float) -> tuple[list[float], int, float]:
    """(latencies of the 200s, non-200 count, elapsed seconds) for ``concurrency`` client threads."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    start = time.monotonic()
    deadline = start + seconds

    def client(offset: int) -> None:
        mine, failed = [], 0
        with httpx.Client(base_url=url, timeout=120, headers=headers) as http:
            i = offset
            while time.monotonic() < deadline:
                sent = time.perf_counter()
                response = http.post("/v1/predict", content=bodies[i % len(bodies)])
                if response.status_code == 200:
                    mine.append(time.perf_counter() - sent)
                else:
                    failed += 1
                i += concurrency
        with lock:
            latencies.extend(mine)
            errors[0] += failed

    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors[0], time.monotonic() - start


def measure(url: str, bodies: list[bytes], concurrency: int, seconds: float) -> dict[str, Any]:
    images_before, passes_before = batch_totals(url)
    latencies, errors, elapsed = run_level(url, bodies, concurrency, seconds)
    images_after, passes_after = batch_totals(url)
    return {"latencies": latencies, "errors": errors, "elapsed": elapsed, "images": images_after - images_before,
            "passes": passes_after - passes_before}


def summarise(parts: list[dict]) -> dict[str, float]:
    ordered = sorted(x for part in parts for x in part["latencies"]) or [float("nan")]
    return {"rps": sum(len(p["latencies"]) for p in parts) / sum(p["elapsed"] for p in parts),
            "p50": statistics.median(ordered) * 1000,
            "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000,
            "errors": sum(p["errors"] for p in parts),
            "batch": sum(p["images"] for p in parts) / max(sum(p["passes"] for p in parts), 1)}


def modes_of(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """Mode name -> (predict_max_batch, API processes), in the order of the table's columns."""
    workers = [int(w) for w in args.workers.split(",")]
    if len(workers) == 1:
        return {"batching off": (1, workers[0]), "batching on": (args.max_batch, workers[0])}
    return {f"{w} process{'es' if w > 1 else ''}": (args.max_batch, w) for w in workers}


def main() -> int:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    for key in ("TUNESERVE_DATABASE_URL", "TUNESERVE_BROKER_URL", "TUNESERVE_API_KEYS", "TUNESERVE_API_WORKERS"):
        os.environ.pop(key, None)  # embedded SQLite in a fresh DATA_DIR, open API
    os.environ.update(TUNESERVE_DATA_DIR=str(work / "data"), TUNESERVE_DEVICE=args.device,
                      TUNESERVE_PREDICT_MAX_WAIT_MS=str(args.max_wait_ms))
    env = dict(os.environ)
    sys.path.insert(0, str(REPO_ROOT))
    from bench.gpu_report import emit

    model_id = publish_model(args)
    bodies = [multipart(image, i) for i, image in enumerate(jpegs(16, args.image_size * 5 // 4))]
    print(f"model {model_id}: {args.base_model} at {args.image_size} px, {args.classes} classes, device "
          f"{args.device}; JPEG bodies ~{sum(map(len, bodies)) // len(bodies) // 1024} KiB; {os.cpu_count()} CPUs; "
          f"{args.seconds:g} s per level", flush=True)
    modes = modes_of(args)
    servers = {}
    try:
        for i, (mode, (max_batch, workers)) in enumerate(modes.items()):
            servers[mode] = start_api({**env, "TUNESERVE_PREDICT_MAX_BATCH": str(max_batch)}, work / f"api-{i}.log",
                                      workers)
        for mode, (_, url) in servers.items():  # load the model in each process, warm kernels and connections
            run_level(url, bodies, 4 * modes[mode][1], 3.0)
        rows: dict[str, dict[int, dict[str, float]]] = {mode: {} for mode in modes}
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            parts: dict[str, list[dict]] = {mode: [] for mode in modes}
            # Alternate short rounds so drift in a shared machine's load hits every mode alike.
            for round_ in range(args.rounds):
                for mode in list(modes) if round_ % 2 == 0 else list(modes)[::-1]:
                    parts[mode].append(measure(servers[mode][1], bodies, concurrency, args.seconds / args.rounds))
            for mode in modes:
                row = rows[mode][concurrency] = summarise(parts[mode])
                print(f"  {mode:<13} c={concurrency:<3} {row['rps']:7.1f} img/s  p50 {row['p50']:7.1f} ms  "
                      f"p99 {row['p99']:7.1f} ms  mean batch {row['batch']:.1f}", flush=True)
                if args.step:
                    headline = mode == list(modes)[-1] and args.device == "cuda"
                    target: dict[str, Any] = {"target": 3000} if headline else {}
                    emit(args.step, f"/predict HTTP c={concurrency}, {mode}", row["rps"],
                         p50_ms=round(row["p50"], 1), p99_ms=round(row["p99"], 1), errors=row["errors"],
                         mean_batch=round(row["batch"], 1), **target)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
    print_table(rows)
    return 0


def print_table(rows: dict[str, dict[int, dict[str, float]]]) -> None:
    """img/s, p50/p99 and mean batch per mode at each concurrency; the last mode against the first."""
    first, last = list(rows)[0], list(rows)[-1]
    print("\n| concurrency | " + " | ".join(f"{m} img/s | {m} p50 / p99 ms | {m} mean batch" for m in rows)
          + f" | {last} vs {first} | errors |")
    print("|---" * (3 * len(rows) + 3) + "|")
    for concurrency in rows[first]:
        cells = [f"{r[concurrency]['rps']:.1f} | {r[concurrency]['p50']:.1f} / {r[concurrency]['p99']:.1f} "
                 f"| {r[concurrency]['batch']:.1f}" for r in rows.values()]
        ratio = rows[last][concurrency]["rps"] / rows[first][concurrency]["rps"]
        errors = int(sum(r[concurrency]["errors"] for r in rows.values()))
        print(f"| {concurrency} | " + " | ".join(cells) + f" | {ratio:.2f}x | {errors} |")
    if first == "batching off":
        low = min(rows[first])
        print(f"\np50 at c={low}: batching on is {rows[last][low]['p50'] / rows[first][low]['p50'] - 1:+.1%} vs off "
              f"(target: at most +10%)")
        if 16 in rows[first]:
            print(f"throughput at c=16: {rows[last][16]['rps'] / rows[first][16]['rps']:.2f}x with batching "
                  "(target: at least 2x)")


if __name__ == "__main__":
    sys.exit(main())
