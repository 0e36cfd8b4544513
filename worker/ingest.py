"""Turn an uploaded archive into a dataset: labels, splits, a report, and a decoded uint8 cache."""

import hashlib
import logging
import os
import shutil
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from sqlalchemy import select, update

from shared.config import Settings, get_settings
from shared.db import changed, session_scope
from shared.jobstate import DATASET_DELETED, DatasetStatus
from shared.orm import Dataset, utcnow
from shared.quota import remaining_bytes
from shared.storage import atomic_dir, dataset_cache, dataset_dir, dataset_upload, redact_paths, write_json
from shared.webhooks import dataset_finished
from worker.archive import ArchiveError, ArchiveReader, Member
from worker.images import ImageRejected, decode_image
from worker.layout import resolve_layout

log = logging.getLogger(__name__)

SPLIT_CODES = {None: -1, "train": 0, "val": 1, "test": 2}
MANIFEST_MAX_BYTES = 64 * 2**20
PROGRESS_SECONDS = 1.0  # how often processed/total is written to the row while decoding
# Rows kept in the database for the UI; the counts in the report are always complete.
LIST_LIMIT = 1000
GROUP_LIMIT = 100
GROUP_PATHS = 20  # paths listed per group: 200k copies of one image must not become a 10 MB report


class DatasetInvalid(ValueError):
    def __init__(self, message: str, code: str, rejected: list[dict[str, str]]) -> None:
        super().__init__(message)
        self.code = code
        self.rejected = rejected


def _set(dataset_id: str, **values: Any) -> bool:
    """Update a dataset that is still processing; False if it was deleted or finished meanwhile."""
    with session_scope() as session:
        won = changed(session, update(Dataset)
                      .where(Dataset.id == dataset_id, Dataset.status == DatasetStatus.processing)
                      .values(updated_at=utcnow(), **values)) == 1
        # its webhook event commits with the change
        if won and values.get("status") in (DatasetStatus.ready, DatasetStatus.failed):
            dataset_finished(session=session, dataset_id=dataset_id, status=values["status"])
        return won


def _status(dataset_id: str) -> str | None:
    with session_scope() as session:
        dataset = session.get(Dataset, dataset_id)
        return None if dataset is None else dataset.status


def _start_attempt(dataset_id: str) -> int:
    with session_scope() as session:
        session.execute(update(Dataset).where(Dataset.id == dataset_id).values(attempts=Dataset.attempts + 1))
        return session.scalar(select(Dataset.attempts).where(Dataset.id == dataset_id)) or 0


def _discard_if_deleted(settings: Settings, dataset_id: str) -> None:
    """A DELETE while we worked removed the row and files; remove what we wrote after it."""
    if _status(dataset_id) in (None, DATASET_DELETED):
        log.info("dataset %s was deleted during ingestion; removing its files", dataset_id)
        shutil.rmtree(dataset_dir(settings, dataset_id), ignore_errors=True)


def _fail(settings: Settings, dataset_id: str, **values: Any) -> bool:
    """Mark the dataset failed and remove its files: a failed dataset can never be trained on, so its
    upload and partial cache would only hold disk. False if it was no longer processing."""
    if _set(dataset_id, status=DatasetStatus.failed, **values):
        shutil.rmtree(dataset_dir(settings, dataset_id), ignore_errors=True)
        return True
    _discard_if_deleted(settings, dataset_id)
    return False


def ingest_dataset(*, dataset_id: str, settings: Settings | None = None) -> None:
    """Build the dataset's cache and report; the row ends ``ready`` or ``failed`` with a reason."""
    settings = settings or get_settings()
    if _status(dataset_id) != DatasetStatus.processing:
        log.info("dataset %s is not processing; nothing to do", dataset_id)
        return
    attempt = _start_attempt(dataset_id)
    if attempt > settings.ingest_max_attempts:
        # Earlier deliveries started and never finished: each killed its worker (a decoder crash, the
        # OOM killer). Redelivering it again would only take down the next worker.
        log.error("dataset %s stopped its worker %d times; failing it", dataset_id, attempt - 1)
        _fail(settings, dataset_id, error=f"ingesting this upload stopped the worker {attempt - 1} times "
              f"(TUNESERVE_INGEST_MAX_ATTEMPTS={settings.ingest_max_attempts}); it may hold a file that crashes "
              "the image decoder; check the worker logs, remove the file and upload again", error_code="worker_lost")
        return
    try:
        result = build_cache(dataset_id=dataset_id, settings=settings)
    except (ArchiveError, DatasetInvalid) as exc:
        log.warning("dataset %s failed: %s", dataset_id, exc)
        _fail(settings, dataset_id, error=str(exc), error_code=exc.code,
              rejected=getattr(exc, "rejected", [])[:LIST_LIMIT])
        return
    except Exception as exc:
        if not _fail(settings, dataset_id, error=f"ingestion failed: {type(exc).__name__}: {redact_paths(str(exc))}",
                     error_code="ingest_error"):
            return  # its files may have vanished under us (deleted meanwhile): not a failure
        log.exception("dataset %s failed unexpectedly", dataset_id)
        raise
    if not _set(dataset_id, status=DatasetStatus.ready, error=None, error_code=None, **result):
        _discard_if_deleted(settings, dataset_id)


def worker_count() -> int:
    """CPUs this process may run on (a container's cpuset, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decode_members(members: Iterator[Member], *, settings: Settings, workers: int
                   ) -> Iterator[tuple[str, np.ndarray | str, str]]:
    """(path, square or rejection reason, sha256) in archive order, decoded on ``workers`` threads.

    Pillow and hashlib release the GIL while they work, so threads use every core without copying
    images between processes. At most a few images per thread are in memory at once.
    """
    side, pixels, min_side = settings.cache_size, settings.max_image_pixels, settings.min_image_side

    def work(member: Member) -> tuple[str, np.ndarray | str, str]:
        if member.problem:
            return member.path, member.problem, ""
        digest = hashlib.sha256(member.data).hexdigest()
        try:
            return member.path, decode_image(member.data, side=side, max_pixels=pixels, min_side=min_side), digest
        except ImageRejected as exc:
            return member.path, str(exc), digest

    pending: deque[Future[Any]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingest") as pool:
        for member in members:
            pending.append(pool.submit(work, member))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class ImageStore:
    """images.npy written row by row; the header is rewritten with the final count at the end, so
    rejected images leave no holes and the data is written once."""

    def __init__(self, path: Path, *, capacity: int, side: int) -> None:
        self.side = side
        self.count = 0
        self.handle: BinaryIO = path.open("wb")
        self.data_offset = self._header(capacity)

    def _header(self, count: int) -> int:
        self.handle.seek(0)
        np.lib.format.write_array_header_1_0(
            self.handle, {"descr": "|u1", "fortran_order": False, "shape": (count, self.side, self.side, 3)})
        return self.handle.tell()

    def append(self, square: np.ndarray) -> None:
        self.handle.write(np.ascontiguousarray(square, dtype=np.uint8).tobytes())
        self.count += 1

    def close(self) -> None:
        # numpy pads the header for any row count, so rewriting it never moves the data.
        if self._header(self.count) != self.data_offset:
            raise RuntimeError("npy header changed length; the cache would be misaligned")
        self.handle.truncate(self.data_offset + self.count * self.side * self.side * 3)
        self.handle.close()


def _quota_left(dataset_id: str, settings: Settings) -> int | None:
    """Bytes the dataset's project may still add (its upload already counted); None without a quota."""
    with session_scope() as session:
        project = session.scalar(select(Dataset.project).where(Dataset.id == dataset_id))
        if project is None:
            return None
        return remaining_bytes(session=session, settings=settings, project=project)


def _over_quota(written: int, left: int, rejected: list[dict[str, str]]) -> DatasetInvalid:
    return DatasetInvalid(f"the decoded images need more than the {left // 2**20} MiB left in the project's quota "
                          f"(already {written // 2**20} MiB); delete data in the project or ask an admin to raise "
                          "its quota_mb", "quota_exceeded", rejected)


def _check_disk(settings: Settings, needed: int, rejected: list[dict[str, str]]) -> None:
    free = shutil.disk_usage(settings.data_dir).free
    reserve = int(settings.min_free_disk_gb * 2**30)
    if free - needed < reserve:
        raise DatasetInvalid(f"the decoded images need about {needed // 2**20} MiB, and {free // 2**20} MiB are "
                             f"free of which {reserve // 2**20} MiB stay in reserve (TUNESERVE_MIN_FREE_DISK_GB); "
                             "free disk space or upload fewer images", "insufficient_storage", rejected)


def build_cache(*, dataset_id: str, settings: Settings) -> dict[str, Any]:
    started = time.monotonic()
    quota_left = _quota_left(dataset_id, settings)
    deadline = started + settings.ingest_max_minutes * 60
    reader = ArchiveReader(dataset_upload(settings, dataset_id), max_entries=settings.max_archive_entries,
                           max_bytes=settings.max_archive_mb * 2**20)
    paths = [e.path for e in reader.entries()]
    layout = resolve_layout(paths, lambda p: reader.read_file(p, max_file_bytes=MANIFEST_MAX_BYTES).data)
    rejected = list(layout.rejected)
    if layout.error:
        raise DatasetInvalid(layout.error, "bad_manifest", rejected)
    wanted = {path: (label, split) for path, label, split in layout.items}
    # Fail before decoding anything when the layout alone already says what is wrong.
    _validate(Counter(label for label, _ in wanted.values()), settings, rejected, enough=False)
    total = len(wanted)
    row_bytes = settings.cache_size * settings.cache_size * 3
    # Bounded before a byte is written: the cache can only be this large (rejected images make it smaller).
    _check_disk(settings, total * row_bytes, rejected)
    _set(dataset_id, progress={"processed": 0, "total": total})
    kept: list[str] = []
    hashes: dict[str, str] = {}
    last_report = time.monotonic()

    with atomic_dir(dataset_cache(settings, dataset_id)) as tmp:
        store = ImageStore(tmp / "images.npy", capacity=total, side=settings.cache_size)
        members = reader.read_files(set(wanted), max_file_bytes=settings.max_image_mb * 2**20)
        try:
            for done, (path, outcome, digest) in enumerate(
                    decode_members(members, settings=settings, workers=worker_count()), 1):
                if isinstance(outcome, str):
                    rejected.append({"path": path, "reason": outcome})
                else:
                    if quota_left is not None and (store.count + 1) * row_bytes > quota_left:
                        raise _over_quota(store.count * row_bytes, quota_left, rejected)
                    store.append(outcome)
                    kept.append(path)
                    hashes[path] = digest
                if time.monotonic() - last_report >= PROGRESS_SECONDS:
                    last_report = time.monotonic()
                    _set(dataset_id, progress={"processed": done, "total": total})
                if time.monotonic() > deadline:
                    raise DatasetInvalid(f"ingestion took longer than {settings.ingest_max_minutes:g} minutes "
                                             "(TUNESERVE_INGEST_MAX_MINUTES); split the upload or raise the limit",
                                             "ingest_timeout", rejected)
        finally:
            store.close()
        counts = Counter(wanted[p][0] for p in kept)
        _validate(counts, settings, rejected, enough=True)
        classes = sorted(counts)
        index = {c: i for i, c in enumerate(classes)}
        np.save(tmp / "labels.npy", np.array([index[wanted[p][0]] for p in kept], dtype=np.int64))
        np.save(tmp / "splits.npy", np.array([SPLIT_CODES[wanted[p][1]] for p in kept], dtype=np.int8))
        write_json(tmp / "index.json", {"classes": classes, "paths": kept, "cache_size": settings.cache_size})
    seconds = time.monotonic() - started
    report = _report(kept, wanted, hashes, counts)
    report.update(rejected_count=len(rejected), ingest_seconds=round(seconds, 2),
                  images_per_second=round(total / max(seconds, 1e-6), 1))
    return {
        "classes": classes,
        "class_counts": {c: counts[c] for c in classes},
        "splits": _split_counts(kept, wanted),
        "num_images": len(kept),
        "rejected": rejected[:LIST_LIMIT],
        "report": report,
        "progress": {"processed": total, "total": total},
    }


def _validate(counts: Counter[str], settings: Settings, rejected: list[dict[str, str]], *, enough: bool) -> None:
    """Dataset-level checks; ``enough`` also checks per-class minimums (only known after decoding)."""
    if not counts:
        raise DatasetInvalid(
            "no valid images were found; put images in one sub-folder per class (e.g. cats/1.jpg, dogs/2.jpg) "
            "or add a labels.csv with filename,label" + (f" ({len(rejected)} files were rejected, see 'rejected')"
                                                         if rejected else ""), "no_images", rejected)
    if len(counts) < 2:
        only = next(iter(counts))
        raise DatasetInvalid(f"the dataset has 1 class ('{only}'); at least 2 are needed: add a sub-folder "
                             "of images for each other class", "too_few_classes", rejected)
    small = {c: n for c, n in sorted(counts.items()) if n < settings.min_images_per_class}
    if enough and small:
        listed = ", ".join(f"'{c}' ({n})" for c, n in small.items())
        raise DatasetInvalid(f"classes with fewer than {settings.min_images_per_class} valid images: {listed}; "
                             "add images or remove those folders", "class_too_small", rejected)


def _split_counts(kept: list[str], wanted: dict[str, tuple[str, str | None]]) -> dict[str, Any] | None:
    if all(wanted[p][1] is None for p in kept):
        return None
    per_split: dict[str, Counter[str]] = defaultdict(Counter)
    for p in kept:
        label, split = wanted[p]
        per_split[split or "unassigned"][label] += 1
    return {split: dict(sorted(c.items())) for split, c in sorted(per_split.items())}


def _report(kept: list[str], wanted: dict[str, tuple[str, str | None]], hashes: dict[str, str],
            counts: Counter[str]) -> dict[str, Any]:
    by_hash: dict[str, list[str]] = defaultdict(list)
    for p in kept:
        by_hash[hashes[p]].append(p)
    groups = [paths for paths in by_hash.values() if len(paths) > 1]
    leakage = [g for g in groups if len({wanted[p][1] for p in g}) > 1]
    conflicting = [g for g in groups if len({wanted[p][0] for p in g}) > 1]
    def shown(found: list[list[str]]) -> list[list[str]]:
        return [g[:GROUP_PATHS] for g in found[:GROUP_LIMIT]]

    return {
        "duplicates": shown(groups),
        "duplicate_groups": len(groups),
        "duplicate_images": sum(len(g) - 1 for g in groups),
        "leakage": shown(leakage),
        "leakage_groups": len(leakage),
        "conflicting_labels": shown(conflicting),
        "imbalance_ratio": round(max(counts.values()) / min(counts.values()), 3),
    }
