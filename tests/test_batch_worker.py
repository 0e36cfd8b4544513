"""Batch predictions run by a real Celery worker (API and worker as subprocesses, Postgres, Redis): exact
results files, cancel while running, and a worker killed mid-batch whose batch another worker finishes
without predicting any image twice."""

import csv
import io
import json
import random
import signal
import zipfile
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from shared.config import get_settings
from shared.modeling import load_model_artifact
from shared.modeling.transforms import eval_uint8, normalize_batch
from shared.storage import dataset_upload, model_dir
from tests.helpers import ready_dataset
from tests.model_rows import CLASSES, publish_model
from tests.processes import Service, wait_for
from tests.synthetic import jpeg_bytes, make_image
from worker.images import decode_image

URL = "/v1/batch-predictions"
FAST_RECOVERY = {"TUNESERVE_HEARTBEAT_SECONDS": "0.5", "TUNESERVE_LEASE_TIMEOUT_SECONDS": "4",
                 "TUNESERVE_RECONCILE_INTERVAL_SECONDS": "0.5", "TUNESERVE_BATCH_CHUNK_IMAGES": "4"}
NOT_AN_IMAGE = "not a JPEG, PNG, WEBP, BMP, GIF or TIFF image"
TOO_SMALL = "8x8 is smaller than 16 px on its shorter side"


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def mixed_archive() -> tuple[bytes, list[tuple[str, str | None]]]:
    """Six images across two chunks of four, and three files that must be rejected: (name, reason) in order."""
    rng = random.Random(1)
    files = [("red_0.jpg", jpeg_bytes(make_image("red", rng, 40)), None),
             ("notes.txt", b"hello", "not an image file (.txt extension)"),
             ("sub/blue_1.png", png_bytes(make_image("blue", rng, 40)), None),
             ("bad.jpg", b"this is not a jpeg", NOT_AN_IMAGE),
             ("tiny.png", png_bytes(Image.new("RGB", (8, 8), (1, 2, 3))), TOO_SMALL),
             ("green_2.jpg", jpeg_bytes(make_image("green", rng, 40)), None),
             ("sub/deeper/red_3.jpg", jpeg_bytes(make_image("red", rng, 40)), None),
             ("blue_4.JPG", jpeg_bytes(make_image("blue", rng, 40)), None),
             ("green_5.jpeg", jpeg_bytes(make_image("green", rng, 40)), None)]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data, _ in files:
            archive.writestr(name, data)
    return buffer.getvalue(), [(name, reason) for name, _, reason in files]


def big_archive(count: int) -> bytes:
    rng = random.Random(2)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(count):
            label = CLASSES[i % 3]
            archive.writestr(f"{label}/{i:04d}.jpg", jpeg_bytes(make_image(label, rng, 64)))
    return buffer.getvalue()


def batch(client: httpx.Client, batch_id: str) -> dict:
    return client.get(f"{URL}/{batch_id}").json()


def wait_status(client: httpx.Client, batch_id: str, statuses: set[str], timeout: float = 120) -> dict:
    return wait_for(lambda: (b := batch(client, batch_id))["status"] in statuses and b, timeout,
                    what=f"batch to reach {statuses}")


def expected_top(model_id: str, data: bytes, k: int) -> list[tuple[str, float]]:
    """What the pinned model says for one image, decoded and cropped as ingestion and evaluation do."""
    settings = get_settings()
    model, meta = load_model_artifact(directory=model_dir(settings, model_id))
    square = decode_image(data, side=settings.cache_size, max_pixels=settings.max_image_pixels,
                          min_side=settings.min_image_side)
    crop = eval_uint8(Image.fromarray(square), meta["image_size"]).unsqueeze(0)
    with torch.inference_mode():
        probs = torch.softmax(model(normalize_batch(crop, tuple(meta["mean"]), tuple(meta["std"]))), dim=1)[0]
    scores, indices = probs.topk(k)
    return [(meta["classes"][i], s) for s, i in zip(scores.tolist(), indices.tolist(), strict=True)]


@pytest.fixture
def service(migrated, start_service) -> Service:
    return start_service({**migrated, **FAST_RECOVERY})


def test_an_archive_or_a_dataset_gives_one_row_per_file_with_sorted_top_k_or_the_reason(service: Service):
    model_id = publish_model()
    content, files = mixed_archive()
    dataset_id = ready_dataset()
    upload = dataset_upload(get_settings(), dataset_id)
    upload.parent.mkdir(parents=True, exist_ok=True)
    upload.write_bytes(content)
    with service.client() as client:
        by_id = client.post(URL, json={"dataset_id": dataset_id, "top_k": 1})
        assert by_id.status_code == 202, by_id.text
        created = client.post(URL, files={"file": ("mixed.zip", content)}, data={"top_k": "2"})
        assert created.status_code == 202, created.text
        batch_id = created.json()["id"]
        final = wait_status(client, batch_id, {"succeeded", "failed"})
        assert final["status"] == "succeeded", final
        assert final["progress"] == {"total": 9, "done": 9, "rejected": 3}
        assert (final["attempts"], final["model_id"], final["top_k"]) == (1, model_id, 2)
        rows = [json.loads(line) for line in client.get(f"{URL}/{batch_id}/results?format=jsonl").text.splitlines()]
        table = list(csv.reader(io.StringIO(client.get(f"{URL}/{batch_id}/results?format=csv").text)))
        from_dataset = wait_status(client, by_id.json()["id"], {"succeeded", "failed"})
        assert from_dataset["status"] == "succeeded", from_dataset
        dataset_rows = [json.loads(line) for line in
                        client.get(f"{URL}/{by_id.json()['id']}/results?format=jsonl").text.splitlines()]

    assert [(r["filename"], r.get("rejected")) for r in rows] == files
    for row in rows:
        if "rejected" in row:
            assert "top" not in row
            continue
        scores = [t["score"] for t in row["top"]]
        assert len(row["top"]) == 2 and scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001
        assert len({t["label"] for t in row["top"]}) == 2 and {t["label"] for t in row["top"]} <= set(CLASSES)
        assert row["label"] == row["top"][0]["label"]  # the model has no abstain threshold
    first = [(t["label"], t["score"]) for t in rows[0]["top"]]
    for (label, score), (want_label, want_score) in zip(first, expected_top(model_id, zipfile.ZipFile(
            io.BytesIO(content)).read("red_0.jpg"), 2), strict=True):
        assert label == want_label and score == pytest.approx(want_score, abs=1e-4)

    assert table[0] == ["filename", "label", "label_1", "score_1", "label_2", "score_2", "rejected"]
    assert len(table) == 1 + len(files)
    for line, row in zip(table[1:], rows, strict=True):
        if "rejected" in row:
            assert line == [row["filename"], "", "", "", "", "", row["rejected"]]
        else:
            top = row["top"]
            assert line == [row["filename"], row["label"], top[0]["label"], f"{top[0]['score']:.6f}", top[1]["label"],
                            f"{top[1]['score']:.6f}", ""]
    # Only the results are kept: the upload and the chunks went when the batch succeeded.
    folder = get_settings().data_dir / "batches" / batch_id
    assert sorted(p.name for p in folder.iterdir()) == ["results.csv", "results.jsonl"]
    # The same files read from a ready dataset's upload, which the dataset keeps.
    assert [(r["filename"], r.get("rejected")) for r in dataset_rows] == files
    assert [r["top"][:1] for r in dataset_rows if "top" in r] == [r["top"][:1] for r in rows if "top" in r]
    assert upload.read_bytes() == content


def slow_model() -> str:
    """Big enough per image (resnet50, 128 px) on a CPU that a test can act between chunks."""
    return publish_model(base_model="resnet50", image_size=128)


def test_cancelling_a_running_batch_stops_it_and_removes_its_files(service: Service):
    model_id = slow_model()
    with service.client() as client:
        batch_id = client.post(URL, files={"file": ("big.zip", big_archive(120))},
                               data={"model_id": model_id}).json()["id"]
        wait_for(lambda: batch(client, batch_id)["progress"]["done"] >= 4, 120, interval=0.1, what="a chunk")
        response = client.post(f"{URL}/{batch_id}/cancel")
        assert response.status_code == 202 and response.json()["status"] in ("cancelling", "cancelled")
        final = wait_status(client, batch_id, {"cancelled", "succeeded", "failed"})
        assert final["status"] == "cancelled"
        assert final["progress"]["done"] < 120
        response = client.get(f"{URL}/{batch_id}/results?format=csv")
        assert (response.status_code, response.json()["code"]) == (409, "batch_not_finished")
    assert not (get_settings().data_dir / "batches" / batch_id).exists()


def test_kill_9_mid_batch_a_second_worker_finishes_it_without_duplicates(service: Service):
    model_id = slow_model()
    count = 48  # 12 chunks: the kill lands after two of them on any machine this suite runs on
    with service.client() as client:
        batch_id = client.post(URL, files={"file": ("big.zip", big_archive(count))},
                               data={"model_id": model_id, "top_k": "1"}).json()["id"]
        wait_for(lambda: batch(client, batch_id)["progress"]["done"] >= 8, 120, interval=0.05, what="two chunks")
        first_worker = service.processes[1]
        first_worker.send_signal(signal.SIGKILL)
        first_worker.wait()
        killed_at = batch(client, batch_id)
        assert killed_at["status"] == "running" and killed_at["progress"]["done"] < count, killed_at
        service.start_worker("second")
        final = wait_status(client, batch_id, {"succeeded", "failed"}, 240)
        assert final["status"] == "succeeded", final
        assert final["attempts"] == 2
        assert final["progress"] == {"total": count, "done": count, "rejected": 0}
        rows = [json.loads(line) for line in client.get(f"{URL}/{batch_id}/results?format=jsonl").text.splitlines()]
    names = [r["filename"] for r in rows]
    assert names == [f"{CLASSES[i % 3]}/{i:04d}.jpg" for i in range(count)]  # each once, in archive order
    second_log = next(Path(service.log_dir).glob("second-*.log")).read_text()
    resumed = [line for line in second_log.splitlines() if f"batch {batch_id}: " in line and "resuming" in line]
    assert len(resumed) == 1, second_log[-3000:]
    already = int(resumed[0].split("chunks already written (")[1].split(" images")[0])
    assert already >= killed_at["progress"]["done"] >= 8  # what the first worker wrote was not predicted again
