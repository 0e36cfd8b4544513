"""Hostile and heavy clients against a live service on embedded defaults (SQLite, filesystem broker), as
`make run` starts it: one row per attack with the answer, the API's and the worker's peak-RSS growth,
disk growth under DATA_DIR, and the worst /healthz latency while the attack ran.

    python bench/abuse.py                      # this checkout
    git worktree add /tmp/before <commit>      # an older one, for a before/after table
    python bench/abuse.py --src /tmp/before

Peak RSS is reset before each case (/proc/PID/clear_refs), so each row is that case's own peak.
"""

import argparse
import io
import json
import os
import random
import socket
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import httpx
from PIL import Image

KEY = "abuse-bench-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MiB = 2**20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def disk_mb(root: Path) -> float:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / MiB


class Service:
    def __init__(self, src: Path, data: Path) -> None:
        self.src, self.data, self.port = src, data, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "PYTHONPATH": str(src), "TUNESERVE_DATA_DIR": str(data), "TUNESERVE_API_KEYS": KEY,
                    "TUNESERVE_DEVICE": "cpu"}
        for name in ("TUNESERVE_DATABASE_URL", "TUNESERVE_BROKER_URL"):
            self.env.pop(name, None)
        subprocess.run([sys.executable, "-m", "shared.cli", "migrate"], cwd=src, env=self.env, check=True,
                       capture_output=True)
        log = (data / "service.log").open("wb")
        self.api = subprocess.Popen([sys.executable, "-m", "shared.cli", "api", "--port", str(self.port)], cwd=src,
                                    env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.worker = subprocess.Popen([sys.executable, "-m", "shared.cli", "worker", "--queues", "ingest,train"],
                                       cwd=src, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait(lambda: self.get("/healthz").status_code == 200, 90)
        time.sleep(8)  # the inference thread imports torch in the background: let the API settle

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return httpx.get(self.url + path, headers=AUTH, timeout=60, **kwargs)
        except httpx.HTTPError:
            return httpx.Response(599)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url + path, headers=AUTH, timeout=300, **kwargs)

    def stop(self) -> None:
        for proc in (self.api, self.worker):
            proc.terminate()
        for proc in (self.api, self.worker):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait(predicate: Callable[[], object], timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        time.sleep(0.25)
    raise TimeoutError("timed out")


def raw(service: Service, head: str, chunks: list[bytes]) -> str:
    """Send a request head and as much of the body as the server takes; the status line's code."""
    with socket.create_connection(("127.0.0.1", service.port), timeout=120) as sock:
        sock.sendall(head.encode() + b"\r\n")
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except OSError:
            pass
        answer = b""
        try:
            while not answer.endswith(b"}") and len(answer) < 65536:
                data = sock.recv(4096)
                if not data:
                    break
                answer += data
        except OSError:
            pass
    if not answer:
        return "connection closed"
    body = answer.split(b"\r\n\r\n", 1)[-1]
    code = json.loads(body).get("code", "") if body.startswith(b"{") and body.endswith(b"}") else ""
    return f"{answer[9:12].decode()} {code}".strip()


def png(side: int, color: tuple[int, int, int] = (120, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), color).save(buffer, format="PNG")
    return buffer.getvalue()


def dataset_outcome(service: Service, response: httpx.Response) -> str:
    if response.status_code != 202:
        return f"{response.status_code} {response.json().get('code', '')}"
    dataset_id = response.json()["id"]
    body = cast(dict[str, Any], wait(
        lambda: (d := service.get(f"/v1/datasets/{dataset_id}").json())["status"] != "processing" and d, 600))
    return f"202, dataset {body['status']}" + (f" {body['error_code']}" if body.get("error_code") else "")


def json_without_key(service: Service) -> str:
    head = f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: {100 * MiB}\r\n"
    return raw(service, head, [b"[" + b"1," * (MiB // 2)] * 100)


def json_with_key(service: Service) -> str:
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\nauthorization: Bearer {KEY}\r\n"
            "transfer-encoding: chunked\r\n")
    chunk = b"[" + b"1," * (MiB // 2)
    return raw(service, head, [f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"] * 100 + [b"0\r\n\r\n"])


def multipart(parts: list[tuple[str, str | None, bytes]], close: bool = True) -> bytes:
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--bnd\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return body + (b"--bnd--\r\n" if close else b"")


def form_head(path: str, body: bytes) -> str:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nauthorization: Bearer {KEY}\r\n"
            f"content-type: multipart/form-data; boundary=bnd\r\ncontent-length: {len(body)}\r\n")


def upload_cut_short(service: Service) -> str:
    body = multipart([("file", "d.zip", b"PK\x03\x04" + os.urandom(20 * MiB))], close=False)
    return raw(service, form_head("/v1/datasets", body), [body])


def predict_300_files(service: Service) -> str:
    body = multipart([("file", f"{i}.jpg", os.urandom(64 * 1024)) for i in range(300)])
    return raw(service, form_head("/v1/predict", body), [body])


def tiny_png_tgz(service: Service) -> str:
    buffer = io.BytesIO()
    image = png(16)
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for i in range(5000):
            info = tarfile.TarInfo(f"{'ab'[i % 2]}/{i:05d}.png")
            data = image[:-12] + i.to_bytes(4, "big") + image[-8:]  # distinct bytes, same picture
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    files = {"file": ("tiny.tar.gz", buffer.getvalue())}
    return f"{len(buffer.getvalue()) // 1024} KiB upload -> " + dataset_outcome(service, service.post(
        "/v1/datasets", files=files))


def zip_directory_lie(service: Service) -> str:
    one = io.BytesIO()
    with zipfile.ZipFile(one, "w") as archive:
        archive.writestr("a/x.jpg", b"")
    data = one.getvalue()
    start, end = data.index(b"PK\x01\x02"), data.index(b"PK\x05\x06")
    record, records = data[start:end], 300_000
    tail = bytearray(data[end:])
    tail[12:16] = (len(record) * records).to_bytes(4, "little")
    lying = data[:start] + record * records + bytes(tail)
    return dataset_outcome(service, service.post("/v1/datasets", files={"file": ("lie.zip", lying)}))


def pixel_bomb(service: Service) -> str:
    bomb = png(8000)
    answer = service.post("/v1/predict", files=[("file", (f"{i}.png", bomb)) for i in range(5)])
    return f"{answer.status_code} {answer.json().get('code', '')}".strip()


def sqlite_locked(service: Service) -> str:
    holder = sqlite3.connect(service.data / "tuneserve.db", timeout=30, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    result: list[str] = []
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:
        for i in range(10):
            archive.writestr(f"{'ab'[i % 2]}/{i}.png", png(32, (i * 20, 40, 40)))
    poster = threading.Thread(target=lambda: result.append(str(service.post(
        "/v1/datasets", files={"file": ("d.zip", zipped.getvalue())}).status_code)))
    poster.start()
    time.sleep(6)
    holder.execute("ROLLBACK")
    holder.close()
    poster.join(timeout=120)
    return f"upload {result[0] if result else 'no answer'} once the lock went (6 s)"


def sse_flood(service: Service, dataset_id: str) -> str:
    job = service.post("/v1/jobs", json={"dataset_id": dataset_id, "hyperparameters": {
        "base_model": "resnet18", "weights": "none", "epochs": 500, "image_size": 32, "batch_size": 8}}).json()
    codes: list[int] = []
    streams = []
    for _ in range(50):
        client = httpx.Client(base_url=service.url, headers=AUTH, timeout=30)
        stream = client.stream("GET", f"/v1/jobs/{job['id']}/events")
        response = stream.__enter__()
        codes.append(response.status_code)
        streams.append((client, stream))
    time.sleep(2)
    for client, stream in streams:
        stream.__exit__(None, None, None)
        client.close()
    service.post(f"/v1/jobs/{job['id']}/cancel")
    return f"{codes.count(200)} open, {codes.count(429)} x 429"


def setup_model(service: Service) -> str:
    zipped = io.BytesIO()
    rng = random.Random(0)
    with zipfile.ZipFile(zipped, "w") as archive:
        for label, color in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            for i in range(12):
                shade = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in color)
                archive.writestr(f"{label}/{i}.png", png(32, shade))  # type: ignore[arg-type]
    created = service.post("/v1/datasets", files={"file": ("colours.zip", zipped.getvalue())}).json()
    wait(lambda: service.get(f"/v1/datasets/{created['id']}").json()["status"] == "ready", 120)
    job = service.post("/v1/jobs", json={"dataset_id": created["id"], "hyperparameters": {
        "base_model": "resnet18", "weights": "none", "epochs": 1, "image_size": 32, "batch_size": 8}}).json()
    wait(lambda: service.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded", 300)
    # One ordinary prediction, so loading the model is not counted against the first predict attack.
    service.post("/v1/predict", files={"file": ("warm.png", png(64))}).raise_for_status()
    return created["id"]


def measure(service: Service, name: str, case: Callable[[], str]) -> dict[str, object]:
    latencies: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            started = time.monotonic()
            service.get("/healthz")
            latencies.append(time.monotonic() - started)
            time.sleep(0.05)

    for pid in (service.api.pid, service.worker.pid):
        reset_peak(pid)
    api_before, worker_before = rss_mb(service.api.pid, "VmRSS"), rss_mb(service.worker.pid, "VmRSS")
    disk_before = disk_mb(service.data)
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        answer = case()
    except Exception as exc:  # a case that breaks the service is itself a result
        answer = f"error: {type(exc).__name__}"
    stop.set()
    poller.join(timeout=60)
    time.sleep(1)
    alive = service.get("/healthz").status_code == 200
    return {"case": name, "answer": answer, "api_peak_mb": rss_mb(service.api.pid, "VmHWM") - api_before,
            "worker_peak_mb": rss_mb(service.worker.pid, "VmHWM") - worker_before,
            "disk_mb": disk_mb(service.data) - disk_before, "healthz_max_ms": max(latencies or [0]) * 1000,
            "healthy_after": alive}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the checkout whose service is attacked")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="abuse-") as tmp:
        service = Service(args.src.resolve(), Path(tmp))
        try:
            dataset_id = setup_model(service)
            cases: list[tuple[str, Callable[[], str]]] = [
                ("100 MB JSON, no key", lambda: json_without_key(service)),
                ("100 MB JSON (chunked), with key", lambda: json_with_key(service)),
                ("upload cut short (20 MB, no closing boundary)", lambda: upload_cut_short(service)),
                ("predict with 300 files", lambda: predict_300_files(service)),
                ("tar.gz of 5,000 16 px PNGs", lambda: tiny_png_tgz(service)),
                ("zip directory: 300k records, declares 1", lambda: zip_directory_lie(service)),
                ("predict 5 x 8000x8000 PNG", lambda: pixel_bomb(service)),
                ("SQLite locked 6 s during an upload", lambda: sqlite_locked(service)),
                ("50 event streams on one job", lambda: sse_flood(service, dataset_id)),
            ]
            rows = [measure(service, name, case) for name, case in cases]
        finally:
            service.stop()
    print(f"\nsource: {args.src}")
    print("| case | answer | API peak +MB | worker peak +MB | disk +MB | /healthz max ms | healthy after |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['answer']} | {r['api_peak_mb']:.0f} | {r['worker_peak_mb']:.0f} | "
              f"{r['disk_mb']:.1f} | {r['healthz_max_ms']:.0f} | {'yes' if r['healthy_after'] else 'NO'} |")


if __name__ == "__main__":
    main()
