"""Run one batch prediction: claim it, predict its images chunk by chunk, write the results, release it.

The images are the archive's files in the archive's own order (an uploaded archive, or a ready dataset's
upload). Chunk ``i`` holds files ``i*C .. i*C+C-1`` and is written whole (temp name, then rename) as the
JSONL lines it contributes, so a worker that picks up a batch another worker lost skips every chunk already
on disk: no image is predicted twice and no row is written twice. The results files are made from the
chunks at the end, again atomically.
"""

import csv
import io
import json
import logging
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from PIL import Image
from sqlalchemy import select, update

from shared.batchstate import BatchStatus, transition
from shared.config import Settings, get_settings
from shared.db import changed, session_scope
from shared.modeling import load_model_artifact
from shared.modeling.transforms import eval_uint8, normalize_batch
from shared.orm import BatchPrediction, Model, utcnow
from shared.storage import atomic_path, batch_dir, dataset_upload, model_dir, redact_paths
from worker.archive import ArchiveError, ArchiveReader, Member
from worker.images import IMAGE_SUFFIXES, ImageRejected, decode_image
from worker.reliability import SHUTDOWN
from worker.training.optim import resolve_device

log = logging.getLogger(__name__)

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"
# Images per forward pass inside a chunk: bounds the activations a large chunk would need at once.
FORWARD_BATCH = 32


class BatchFailed(Exception):
    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def upload_path(settings: Settings, batch_id: str) -> Path:
    return batch_dir(settings, batch_id) / "upload"


def chunks_dir(settings: Settings, batch_id: str) -> Path:
    # Named by the chunk size: chunks written under another TUNESERVE_BATCH_CHUNK_IMAGES cover other files.
    return batch_dir(settings, batch_id) / f"chunks-{settings.batch_chunk_images}"


def results_path(settings: Settings, batch_id: str, fmt: str) -> Path:
    return batch_dir(settings, batch_id) / f"results.{fmt}"


class Lease:
    """Keeps the batch leased to this worker (heartbeat), writes progress, and notices cancels and loss."""

    def __init__(self, batch_id: str, settings: Settings) -> None:
        self.batch_id = batch_id
        self.settings = settings
        self.cancelled = threading.Event()
        self.lost = threading.Event()  # the reaper gave the batch to another worker
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{batch_id}", daemon=True)

    def __enter__(self) -> "Lease":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                self.touch()
            except Exception:  # a DB blip must not end the batch; the next beat retries
                log.warning("heartbeat for batch %s failed", self.batch_id, exc_info=True)

    def touch(self, **values: Any) -> None:
        """Renew the lease, writing ``values``, only while this worker holds it."""
        with session_scope() as session:
            owned = changed(session,
                update(BatchPrediction).where(BatchPrediction.id == self.batch_id,
                                              BatchPrediction.worker_id == WORKER_ID)
                .values(heartbeat_at=utcnow(), **values)) == 1
            status = session.scalar(select(BatchPrediction.status).where(BatchPrediction.id == self.batch_id))
        if not owned:
            log.warning("batch %s is no longer leased to %s (now %s); stopping", self.batch_id, WORKER_ID, status)
            self.lost.set()
        elif status == BatchStatus.cancelling:
            self.cancelled.set()

    def stop_requested(self) -> bool:
        return self.cancelled.is_set() or self.lost.is_set() or SHUTDOWN.is_set()


def claim(batch_id: str) -> BatchPrediction | None:
    """queued -> running for this worker, attempts + 1; None if the batch is not ours to run."""
    with session_scope() as session:
        batch = session.get(BatchPrediction, batch_id)
        if batch is None or batch.status != BatchStatus.queued:
            log.info("batch %s is %s; this delivery does nothing", batch_id, batch and batch.status)
            return None
        won = transition(session=session, batch_id=batch_id, expected=BatchStatus.queued, to=BatchStatus.running,
                         worker_id=WORKER_ID, heartbeat_at=utcnow(), attempts=batch.attempts + 1,
                         started_at=batch.started_at or utcnow(), error=None, error_code=None)
    if not won:
        return None
    with session_scope() as session:
        return session.get(BatchPrediction, batch_id)


def source_archive(settings: Settings, batch: BatchPrediction) -> Path:
    path = (dataset_upload(settings, batch.dataset_id) if batch.source == "dataset" and batch.dataset_id
            else upload_path(settings, batch.id))
    if not path.is_file():
        raise BatchFailed(f"the images of this batch are gone (dataset {batch.dataset_id} was deleted?)"
                          if batch.source == "dataset" else "the uploaded archive of this batch is gone",
                          "source_missing")
    return path


def is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def list_files(reader: ArchiveReader, *, max_images: int) -> list[str]:
    """The archive's files, each once, in archive order (the order ``read_files`` yields them)."""
    names = list(dict.fromkeys(entry.path for entry in reader.entries()))
    if not names:
        raise BatchFailed("the archive holds no files; zip or tar the images and upload that", "no_images")
    if len(names) > max_images:
        raise BatchFailed(f"the archive holds {len(names)} files, over the {max_images} one batch may hold "
                          "(TUNESERVE_BATCH_MAX_IMAGES); split it into several batches", "too_many_images")
    return names


def done_chunks(folder: Path) -> set[int]:
    return {int(p.stem) for p in folder.glob("*.jsonl") if p.stem.isdigit()}


def chunk_file(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.jsonl"


def count_rows(folder: Path, indices: set[int]) -> tuple[int, int]:
    """(rows, rejected rows) in the chunks written so far."""
    rows = rejected = 0
    for index in indices:
        for line in chunk_file(folder, index).read_text().splitlines():
            rows += 1
            rejected += "rejected" in json.loads(line)
    return rows, rejected


class Predictor:
    """The pinned model, and the same crops and scores ``/v1/predict`` gives (calibrated when it is)."""

    def __init__(self, settings: Settings, model_id: str, top_k: int) -> None:
        directory = model_dir(settings, model_id)
        if not (directory / "model.json").is_file():
            raise BatchFailed(f"model {model_id} was deleted before the batch ran", "model_missing")
        self.device = resolve_device(settings.device)
        self.model, self.meta = load_model_artifact(directory=directory, device=self.device)
        self.classes: list[str] = self.meta["classes"]
        self.top_k = min(top_k, len(self.classes))
        self.temperature = float(self.meta.get("temperature", 1.0))
        self.settings = settings
        with session_scope() as session:
            model = session.get(Model, model_id)
            if model is None:
                raise BatchFailed(f"model {model_id} was deleted before the batch ran", "model_missing")
            # The abstain thresholds as they are when the batch runs, as /v1/predict applies them.
            self.min_score, self.class_min_scores = model.min_score or 0.0, dict(model.class_min_scores or {})

    def label(self, top: dict[str, Any]) -> str | None:
        """The top label, or None (abstain) when its score is under its class's threshold or the model's."""
        floor = max(self.min_score, self.class_min_scores.get(top["label"], 0.0))
        return None if top["score"] < floor else top["label"]

    def crop(self, member: Member) -> torch.Tensor:
        """uint8 CHW eval crop; raises ImageRejected with the reason ingestion would give."""
        if member.problem:
            raise ImageRejected(member.problem)
        # Decoded as ingestion caches training images (same limits), then cropped as evaluation does.
        square = decode_image(member.data, side=self.settings.cache_size, max_pixels=self.settings.max_image_pixels,
                              min_side=self.settings.min_image_side)
        return eval_uint8(Image.fromarray(square), int(self.meta["image_size"]))

    def top(self, crops: list[torch.Tensor]) -> list[list[dict[str, Any]]]:
        rows: list[list[dict[str, Any]]] = []
        with torch.inference_mode():
            for start in range(0, len(crops), FORWARD_BATCH):
                batch = torch.stack(crops[start:start + FORWARD_BATCH]).to(self.device)
                x = normalize_batch(batch, tuple(self.meta["mean"]), tuple(self.meta["std"]))
                probs = torch.softmax(self.model(x).float() / self.temperature, dim=1).cpu()
                scores, indices = probs.topk(self.top_k, dim=1)
                rows.extend([{"label": self.classes[i], "score": s} for s, i in zip(row_s, row_i, strict=True)]
                            for row_s, row_i in zip(scores.tolist(), indices.tolist(), strict=True))
        return rows


def predict_chunk(names: list[str], members: Iterator[Member], predictor: Predictor) -> list[dict[str, Any]]:
    """One results row per name, in order: its top-k, or why it was rejected."""
    rows: list[dict[str, Any]] = []
    crops: list[torch.Tensor] = []
    predicted: list[int] = []
    for name in names:
        if not is_image(name):
            rows.append({"filename": name, "rejected": f"not an image file ({PurePosixPath(name).suffix or 'no'} "
                                                      "extension)"})
            continue
        member = next(members)
        if member.path != name:  # read_files yields wanted files in archive order, as list_files listed them
            raise RuntimeError(f"the archive yielded '{member.path}' where '{name}' was expected")
        try:
            crops.append(predictor.crop(member))
        except ImageRejected as exc:
            rows.append({"filename": name, "rejected": str(exc)})
            continue
        predicted.append(len(rows))
        rows.append({"filename": name})
    for position, top in zip(predicted, predictor.top(crops) if crops else [], strict=True):
        rows[position].update(label=predictor.label(top[0]), top=top)
    return rows


def write_results(folder: Path, count: int, *, jsonl: Path, csv_path: Path, top_k: int) -> None:
    """Both results files from the chunks, each written under a temp name and renamed into place."""
    with atomic_path(jsonl) as tmp, tmp.open("w") as out:
        for index in range(count):
            out.write(chunk_file(folder, index).read_text())
    columns = [f"{kind}_{i}" for i in range(1, top_k + 1) for kind in ("label", "score")]
    header = ["filename", "label", *columns, "rejected"]
    with atomic_path(csv_path) as tmp, tmp.open("w", newline="") as out, jsonl.open() as rows:
        writer = csv.writer(out)
        writer.writerow(header)
        for line in rows:
            row = json.loads(line)
            cells = [row["filename"], row.get("label") or ""]
            for i in range(top_k):
                top = row.get("top", [])
                cells += [top[i]["label"], f"{top[i]['score']:.6f}"] if i < len(top) else ["", ""]
            writer.writerow([*cells, row.get("rejected", "")])


def dump_chunk(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    for row in rows:
        buffer.write(json.dumps(row, ensure_ascii=False) + "\n")
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


def _predict_all(batch: BatchPrediction, settings: Settings, lease: Lease) -> bool:
    """Every chunk not yet on disk, then the results files; False if it stopped early (cancel, loss, shutdown)."""
    reader = ArchiveReader(source_archive(settings, batch), max_entries=settings.max_archive_entries,
                           max_bytes=settings.max_archive_mb * 2**20)
    names = list_files(reader, max_images=settings.batch_max_images)
    size = settings.batch_chunk_images
    count = -(-len(names) // size)
    folder = chunks_dir(settings, batch.id)
    folder.mkdir(parents=True, exist_ok=True)
    finished = done_chunks(folder) & set(range(count))
    done, rejected = count_rows(folder, finished)
    if finished:
        log.info("batch %s: %d of %d chunks already written (%d images); resuming on %s", batch.id, len(finished),
                 count, done, WORKER_ID)
    lease.touch(total=len(names), done=done, rejected=rejected, updated_at=utcnow())
    todo = [i for i in range(count) if i not in finished]
    wanted = {n for i in todo for n in names[i * size:(i + 1) * size] if is_image(n)}
    predictor = Predictor(settings, batch.model_id, batch.top_k)
    members = reader.read_files(wanted, max_file_bytes=settings.max_image_mb * 2**20)
    for index in todo:
        if lease.stop_requested():
            return False
        rows = predict_chunk(names[index * size:(index + 1) * size], members, predictor)
        dump_chunk(chunk_file(folder, index), rows)
        done += len(rows)
        rejected += sum("rejected" in row for row in rows)
        lease.touch(done=done, rejected=rejected, updated_at=utcnow())
    write_results(folder, count, jsonl=results_path(settings, batch.id, "jsonl"),
                  csv_path=results_path(settings, batch.id, "csv"), top_k=predictor.top_k)
    return True


def _fail(batch_id: str, message: str, code: str, settings: Settings) -> None:
    with session_scope() as session:
        failed = any(transition(session=session, batch_id=batch_id, expected=expected, to=BatchStatus.failed,
                                also=BatchPrediction.worker_id == WORKER_ID, error=message, error_code=code,
                                worker_id=None)
                     for expected in (BatchStatus.running, BatchStatus.cancelling))
    if failed:  # a failed batch never resumes: its upload and chunks are only disk used
        shutil.rmtree(batch_dir(settings, batch_id), ignore_errors=True)


def _release(batch_id: str, settings: Settings, lease: Lease, complete: bool) -> None:
    """After the chunks: succeeded, cancelled (what the user asked), or back to queued (shutdown)."""
    mine = BatchPrediction.worker_id == WORKER_ID
    if lease.lost.is_set():
        return
    with session_scope() as session:
        if complete and transition(session=session, batch_id=batch_id, expected=BatchStatus.running,
                                   to=BatchStatus.succeeded, also=mine, worker_id=None):
            outcome = "succeeded"
        elif transition(session=session, batch_id=batch_id, expected=BatchStatus.cancelling,
                        to=BatchStatus.cancelled, also=mine, worker_id=None):
            outcome = "cancelled"
        elif not complete and transition(session=session, batch_id=batch_id, expected=BatchStatus.running,
                                         to=BatchStatus.queued, also=mine, worker_id=None, heartbeat_at=None,
                                         enqueued_at=None):
            outcome = "released"  # the reconciler sends it again; the next worker skips the written chunks
        else:
            return
    log.info("batch %s %s on %s", batch_id, outcome, WORKER_ID)
    folder = batch_dir(settings, batch_id)
    if outcome == "cancelled":
        shutil.rmtree(folder, ignore_errors=True)
    elif outcome == "succeeded":  # only the results files are kept
        for chunks in folder.glob("chunks-*"):
            shutil.rmtree(chunks, ignore_errors=True)
        (folder / "upload").unlink(missing_ok=True)


def run_batch(batch_id: str, *, settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    batch = claim(batch_id)
    if batch is None:
        return
    try:
        with Lease(batch_id, settings) as lease:
            complete = _predict_all(batch, settings, lease)
        _release(batch_id, settings, lease, complete)
    except BatchFailed as exc:
        _fail(batch_id, str(exc), exc.code, settings)
    except ArchiveError as exc:
        _fail(batch_id, str(exc), exc.code, settings)
    except Exception as exc:
        log.exception("batch %s failed", batch_id)
        _fail(batch_id, f"batch prediction failed: {type(exc).__name__}: {redact_paths(str(exc))}", "batch_error",
              settings)

