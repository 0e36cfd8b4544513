"""Turn an uploaded archive into a dataset: labels, splits, a report, and a decoded uint8 cache."""

import hashlib
import logging
import os
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from sqlalchemy import update

from shared.config import Settings, get_settings
from shared.db import session_scope
from shared.orm import Dataset, utcnow
from shared.storage import atomic_dir, dataset_cache, dataset_upload, write_json
from worker.archive import ArchiveError, ArchiveReader
from worker.images import ImageRejected, decode_image
from worker.layout import resolve_layout

log = logging.getLogger(__name__)

SPLIT_CODES = {None: -1, "train": 0, "val": 1, "test": 2}


class DatasetInvalid(ValueError):
    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def _set(dataset_id: str, **values: Any) -> None:
    with session_scope() as session:
        session.execute(
            update(Dataset)
            .where(Dataset.id == dataset_id, Dataset.status == "processing")
            .values(updated_at=utcnow(), **values)
        )


def ingest_dataset(*, dataset_id: str, settings: Settings | None = None) -> None:
    """Build the dataset's cache and report; the row ends ``ready`` or ``failed`` with a reason."""
    settings = settings or get_settings()
    with session_scope() as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None or dataset.status != "processing":
            log.info("dataset %s is not processing; nothing to do", dataset_id)
            return
    try:
        result = build_cache(dataset_id=dataset_id, settings=settings)
    except (ArchiveError, DatasetInvalid) as exc:
        log.warning("dataset %s failed: %s", dataset_id, exc)
        _set(dataset_id, status="failed", error=str(exc), error_code=exc.code,
             rejected=getattr(exc, "rejected", []))
        return
    except Exception as exc:
        log.exception("dataset %s failed unexpectedly", dataset_id)
        _set(dataset_id, status="failed", error=f"ingestion failed: {exc}", error_code="ingest_error")
        raise
    _set(dataset_id, status="ready", error=None, error_code=None, **result)


def build_cache(*, dataset_id: str, settings: Settings) -> dict[str, Any]:
    reader = ArchiveReader(
        dataset_upload(settings, dataset_id),
        max_entries=settings.max_archive_entries,
        max_bytes=settings.max_archive_mb * 2**20,
    )
    paths = [e.path for e in reader.entries()]

    def read_one(path: str) -> bytes:
        return next(data for _, data in reader.iter_files({path}))

    layout = resolve_layout(paths, read_one)
    rejected = list(layout.rejected)
    wanted = {path: (label, split) for path, label, split in layout.items}
    total = len(wanted)
    side = settings.cache_size
    slots = {path: i for i, path in enumerate(wanted)}
    hashes: dict[str, str] = {}
    last_report = 0.0

    def work(item: tuple[str, bytes]) -> tuple[str, np.ndarray | str, str]:
        path, data = item
        digest = hashlib.sha256(data).hexdigest()
        try:
            return path, decode_image(data, side=side, max_pixels=settings.max_image_pixels,
                                      min_side=settings.min_image_side), digest
        except ImageRejected as exc:
            return path, str(exc), digest

    with atomic_dir(dataset_cache(settings, dataset_id)) as tmp:
        # Decoded squares go straight to disk so memory stays flat however large the dataset is.
        raw = np.lib.format.open_memmap(tmp / "raw.npy", mode="w+", dtype=np.uint8,
                                        shape=(max(total, 1), side, side, 3))
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            stream = pool.map(work, reader.iter_files(set(wanted)))
            for done, (path, outcome, digest) in enumerate(stream, 1):
                if isinstance(outcome, str):
                    rejected.append({"path": path, "reason": outcome})
                else:
                    raw[slots[path]] = outcome
                    hashes[path] = digest
                if time.monotonic() - last_report > 1.0:
                    last_report = time.monotonic()
                    _set(dataset_id, progress={"processed": done, "total": total})

        kept = [p for p, _, _ in layout.items if p in hashes]
        counts = Counter(wanted[p][0] for p in kept)
        _validate(counts, settings, rejected)
        classes = sorted(counts)
        index = {c: i for i, c in enumerate(classes)}
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8,
                                           shape=(len(kept), side, side, 3))
        for start in range(0, len(kept), 256):
            chunk = kept[start:start + 256]
            images[start:start + len(chunk)] = raw[[slots[p] for p in chunk]]
        images.flush()
        del images, raw
        (tmp / "raw.npy").unlink()
        np.save(tmp / "labels.npy", np.array([index[wanted[p][0]] for p in kept], dtype=np.int64))
        np.save(tmp / "splits.npy", np.array([SPLIT_CODES[wanted[p][1]] for p in kept], dtype=np.int8))
        write_json(tmp / "index.json", {"classes": classes, "paths": kept, "cache_size": side})
    return {
        "classes": classes,
        "class_counts": {c: counts[c] for c in classes},
        "splits": _split_counts(kept, wanted),
        "num_images": len(kept),
        "rejected": rejected,
        "report": _report(kept, wanted, hashes, counts),
        "progress": {"processed": total, "total": total},
    }


def _validate(counts: Counter, settings: Settings, rejected: list[dict[str, str]]) -> None:
    def fail(message: str, code: str) -> None:
        error = DatasetInvalid(message, code)
        error.rejected = rejected  # type: ignore[attr-defined]
        raise error

    if not counts:
        fail("no valid images were found; put images in one sub-folder per class "
             "(e.g. cats/1.jpg, dogs/2.jpg) or add a labels.csv with filename,label", "no_images")
    if len(counts) < 2:
        only = next(iter(counts))
        fail(f"the dataset has 1 class ('{only}'); at least 2 are needed", "too_few_classes")
    small = {c: n for c, n in sorted(counts.items()) if n < settings.min_images_per_class}
    if small:
        listed = ", ".join(f"'{c}' ({n})" for c, n in small.items())
        fail(f"classes with fewer than {settings.min_images_per_class} valid images: {listed}; add images "
             "or remove those folders", "class_too_small")


def _split_counts(kept: list[str], wanted: dict[str, tuple[str, str | None]]) -> dict[str, Any] | None:
    if all(wanted[p][1] is None for p in kept):
        return None
    per_split: dict[str, Counter] = defaultdict(Counter)
    for p in kept:
        label, split = wanted[p]
        per_split[split or "unassigned"][label] += 1
    return {split: dict(sorted(c.items())) for split, c in sorted(per_split.items())}


def _report(kept: list[str], wanted: dict, hashes: dict[str, str], counts: Counter) -> dict[str, Any]:
    by_hash: dict[str, list[str]] = defaultdict(list)
    for p in kept:
        by_hash[hashes[p]].append(p)
    groups = [paths for paths in by_hash.values() if len(paths) > 1]
    leakage = [g for g in groups if len({wanted[p][1] for p in g}) > 1]
    conflicting = [g for g in groups if len({wanted[p][0] for p in g}) > 1]
    return {
        "duplicates": groups,
        "leakage": leakage,
        "conflicting_labels": conflicting,
        "imbalance_ratio": round(max(counts.values()) / min(counts.values()), 3),
    }
