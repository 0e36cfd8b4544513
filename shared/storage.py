"""Where files live under DATA_DIR, and how they are written (temp name, then rename)."""

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shared.config import Settings

_ABSOLUTE_PATH = re.compile(r"(?<![\w/.])/(?:[\w.@+-]+/)+[\w.@+-]*")


def redact_paths(text: str) -> str:
    """An exception's message as a client may read it: server paths (DATA_DIR, site-packages...) removed."""
    return _ABSOLUTE_PATH.sub("<path>", text)


def dataset_dir(settings: Settings, dataset_id: str) -> Path:
    return settings.data_dir / "datasets" / dataset_id


def dataset_upload(settings: Settings, dataset_id: str) -> Path:
    return dataset_dir(settings, dataset_id) / "upload"


def dataset_cache(settings: Settings, dataset_id: str) -> Path:
    return dataset_dir(settings, dataset_id) / "cache"


def job_dir(settings: Settings, job_id: str) -> Path:
    return settings.data_dir / "jobs" / job_id


def model_dir(settings: Settings, model_id: str) -> Path:
    return settings.data_dir / "models" / model_id


def batch_dir(settings: Settings, batch_id: str) -> Path:
    """A batch prediction's uploaded archive, its result chunks while it runs, and its results files."""
    return settings.data_dir / "batches" / batch_id


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temp path beside ``final``; rename it into place only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp directory beside ``final``; it replaces ``final`` only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
