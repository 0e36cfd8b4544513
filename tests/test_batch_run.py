"""worker.batch.run_batch and the batch reaper called in this process, on real Postgres and real files:
resume from written chunks, second deliveries, shutdown hand-back, failures that keep nothing."""

import io
import json
import random
import zipfile
from datetime import timedelta

import pytest

from shared.config import get_settings
from shared.db import session_scope
from shared.orm import BatchPrediction, new_id, utcnow
from shared.storage import batch_dir
from tests.model_rows import CLASSES, publish_model
from tests.synthetic import jpeg_bytes, make_image
from worker.batch import run_batch
from worker.reliability import SHUTDOWN, reap_stale_batches

MARKER = {"label": "from-an-earlier-worker", "score": 1.0}


@pytest.fixture
def settings(migrated, env_for, pg_url, redis_url):
    env_for(pg_url, redis_url, TUNESERVE_BATCH_CHUNK_IMAGES="4", TUNESERVE_BATCH_MAX_IMAGES="10")
    return get_settings()


def names(count: int) -> list[str]:
    return [f"{CLASSES[i % 3]}/{i}.jpg" for i in range(count)]


def queued_batch(settings, *, count: int = 8, content: bytes | None = None, **fields) -> str:
    """A queued batch of ``count`` images (or of ``content``), as the API leaves it."""
    if content is None:
        rng = random.Random(0)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for i, name in enumerate(names(count)):
                archive.writestr(name, jpeg_bytes(make_image(CLASSES[i % 3], rng, 40)))
        content = buffer.getvalue()
    batch_id = new_id()
    folder = batch_dir(settings, batch_id)
    folder.mkdir(parents=True)
    (folder / "upload").write_bytes(content)
    values = {"status": "queued", "attempts": 0, **fields}
    with session_scope() as session:
        session.add(BatchPrediction(id=batch_id, source="archive", filename="a.zip", size_bytes=len(content),
                                    model_id=publish_model(), top_k=2, done=0, rejected=0, **values))
    return batch_id


def row(batch_id: str) -> BatchPrediction:
    with session_scope() as session:
        batch = session.get_one(BatchPrediction, batch_id)
        session.expunge(batch)
        return batch


def results(settings, batch_id: str) -> list[dict]:
    return [json.loads(line) for line in (batch_dir(settings, batch_id) / "results.jsonl").read_text().splitlines()]


def test_a_requeued_batch_keeps_the_chunks_already_written(settings):
    batch_id = queued_batch(settings, attempts=1)  # as the reaper leaves a batch whose worker died
    chunks = batch_dir(settings, batch_id) / "chunks-4"
    chunks.mkdir()
    stale = batch_dir(settings, batch_id) / "chunks-2"  # written under another chunk size: other files
    stale.mkdir()
    (stale / "000001.jsonl").write_text(json.dumps({"filename": "red/0.jpg", "top": [MARKER]}) + "\n")
    written = [{"filename": name, "top": [MARKER]} for name in names(4)]
    (chunks / "000000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in written))

    run_batch(batch_id)

    batch = row(batch_id)
    assert (batch.status, batch.attempts, batch.progress) == ("succeeded", 2, {"total": 8, "done": 8, "rejected": 0})
    rows = results(settings, batch_id)
    assert rows[:4] == written  # not predicted again
    assert [r["filename"] for r in rows] == names(8)
    assert all(len(r["top"]) == 2 and r["top"][0]["label"] in CLASSES for r in rows[4:])
    assert sorted(p.name for p in batch_dir(settings, batch_id).iterdir()) == ["results.csv", "results.jsonl"]


def test_rows_under_the_models_thresholds_abstain_with_label_null(settings):
    from shared.orm import Model

    batch_id = queued_batch(settings, count=4)
    with session_scope() as session:
        model = session.get(Model, row(batch_id).model_id)
        model.min_score, model.class_min_scores = 0.0, {label: 0.999 for label in CLASSES[:2]}
    run_batch(batch_id)
    rows = results(settings, batch_id)
    assert [r["label"] for r in rows] == [None if r["top"][0]["label"] in CLASSES[:2] else r["top"][0]["label"]
                                          for r in rows]
    with session_scope() as session:
        session.get(Model, row(batch_id).model_id).min_score = 0.999
    again = queued_batch(settings, count=4)
    with session_scope() as session:
        session.get(BatchPrediction, again).model_id = row(batch_id).model_id
    run_batch(again)
    assert [r["label"] for r in results(settings, again)] == [None] * 4
    lines = (batch_dir(settings, again) / "results.csv").read_text().splitlines()
    assert lines[0] == "filename,label,label_1,score_1,label_2,score_2,rejected"
    assert all(line.split(",")[1] == "" for line in lines[1:])


def test_a_delivery_of_a_batch_another_worker_runs_does_nothing(settings):
    batch_id = queued_batch(settings, status="running", attempts=1, worker_id="elsewhere:1", heartbeat_at=utcnow())
    run_batch(batch_id)
    batch = row(batch_id)
    assert (batch.status, batch.attempts, batch.worker_id, batch.done) == ("running", 1, "elsewhere:1", 0)
    assert not (batch_dir(settings, batch_id) / "chunks-4").exists()


def test_a_worker_shutting_down_hands_the_batch_back(settings):
    batch_id = queued_batch(settings)
    SHUTDOWN.set()
    try:
        run_batch(batch_id)
    finally:
        SHUTDOWN.clear()
    batch = row(batch_id)
    assert (batch.status, batch.attempts, batch.worker_id, batch.enqueued_at) == ("queued", 1, None, None)
    run_batch(batch_id)
    assert (row(batch_id).status, row(batch_id).attempts) == ("succeeded", 2)


def test_more_files_than_batch_max_images_fails_and_keeps_nothing(settings):
    batch_id = queued_batch(settings, count=11)
    run_batch(batch_id)
    batch = row(batch_id)
    assert (batch.status, batch.error_code, batch.done) == ("failed", "too_many_images", 0)
    assert batch.error == ("the archive holds 11 files, over the 10 one batch may hold (TUNESERVE_BATCH_MAX_IMAGES); "
                           "split it into several batches")
    assert not batch_dir(settings, batch_id).exists()


def test_a_corrupt_archive_fails_with_its_reason(settings):
    batch_id = queued_batch(settings, content=b"PK\x03\x04" + b"\x00" * 64)
    run_batch(batch_id)
    batch = row(batch_id)
    assert (batch.status, batch.error_code) == ("failed", "corrupt_archive")
    assert not batch_dir(settings, batch_id).exists()


def test_a_deleted_model_fails_the_batch(settings):
    import shutil

    from shared.storage import model_dir

    batch_id = queued_batch(settings)
    shutil.rmtree(model_dir(settings, row(batch_id).model_id))
    run_batch(batch_id)
    assert (row(batch_id).status, row(batch_id).error_code) == ("failed", "model_missing")


def test_the_reaper_requeues_fails_or_cancels_batches_whose_worker_went_silent(settings):
    silent = utcnow() - timedelta(seconds=settings.lease_timeout_seconds + 5)
    requeue = queued_batch(settings, status="running", attempts=1, worker_id="dead:1", heartbeat_at=silent,
                           enqueued_at=silent)
    exhausted = queued_batch(settings, status="running", attempts=settings.job_max_attempts, worker_id="dead:1",
                             heartbeat_at=silent)
    cancelling = queued_batch(settings, status="cancelling", attempts=1, worker_id="dead:1", heartbeat_at=silent)
    alive = queued_batch(settings, status="running", attempts=1, worker_id="live:1", heartbeat_at=utcnow())

    assert sorted(reap_stale_batches(settings=settings)) == sorted([requeue, exhausted, cancelling])

    batch = row(requeue)
    assert (batch.status, batch.attempts, batch.worker_id, batch.enqueued_at) == ("queued", 1, None, None)
    assert (batch_dir(settings, requeue) / "upload").exists()  # it resumes: its archive stays
    batch = row(exhausted)
    assert (batch.status, batch.error_code) == ("failed", "worker_lost")
    assert row(cancelling).status == "cancelled"
    assert not batch_dir(settings, exhausted).exists() and not batch_dir(settings, cancelling).exists()
    assert row(alive).status == "running"
