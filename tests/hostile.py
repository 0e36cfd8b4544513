"""Builders for uploads, honest and hostile: images in every format and mode, zips and tars with
symlinks, devices, climbing paths, lying flags and bombs, and a dataset row pointing at one."""

import io
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from shared.config import Settings
from shared.db import session_scope
from shared.orm import Dataset, new_id
from shared.storage import dataset_upload
from worker.ingest import ingest_dataset

RED, GREEN, BLUE = (220, 30, 30), (30, 200, 40), (30, 40, 220)


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def solid(color: tuple[int, int, int], size: tuple[int, int] = (40, 36), fmt: str = "JPEG", seed: int = 0) -> bytes:
    """A flat colour with a few noisy pixels, so images of one class differ by content hash."""
    array = np.empty((size[1], size[0], 3), dtype=np.uint8)
    array[:] = color
    rng = np.random.default_rng(seed)
    array[rng.integers(0, size[1], 4), rng.integers(0, size[0], 4)] = rng.integers(0, 255, (4, 3))
    return encode(Image.fromarray(array), fmt)


def image_folder(classes: dict[str, tuple[int, int, int]], per_class: int, prefix: str = "") -> dict[str, bytes]:
    """{archive path: JPEG bytes} in ImageFolder layout, every image distinct."""
    return {f"{prefix}{label}/{i:03d}.jpg": solid(color, seed=zlib.crc32(f"{label}/{i}".encode()))
            for label, color in classes.items() for i in range(per_class)}


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), data,
                             compress_type=zipfile.ZIP_DEFLATED)
    return path


def write_tar(path: Path, files: dict[str, bytes], *, gz: bool = False,
              extra: list[tarfile.TarInfo] | None = None) -> Path:
    """Regular files from ``files`` plus hand-made members (links, devices) from ``extra``."""
    with tarfile.open(path, "w:gz" if gz else "w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for info in extra or []:
            archive.addfile(info)
    return path


def zip_symlink(path: Path, files: dict[str, bytes], link: str, target: str) -> Path:
    """A zip whose entry ``link`` is a Unix symlink (mode bits in external_attr) to ``target``."""
    write_zip(path, files)
    with zipfile.ZipFile(path, "a") as archive:
        info = zipfile.ZipInfo(link)
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, target)
    return path


def set_zip_flag(path: Path, name: str, *, set_bits: int = 0, clear_bits: int = 0) -> Path:
    """Rewrite the general-purpose flag of ``name`` in both its local header and the central
    directory, the way a tool that encrypted it (bit 0) or wrote raw UTF-8 (bit 11 clear) would."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    encoded = name.encode("utf-8")

    def patch(at: int) -> None:
        flags = int.from_bytes(data[at:at + 2], "little")
        data[at:at + 2] = ((flags | set_bits) & ~clear_bits).to_bytes(2, "little")

    patch(info.header_offset + 6)
    central = data.find(b"PK\x01\x02")
    while central >= 0:
        length = int.from_bytes(data[central + 28:central + 30], "little")
        if bytes(data[central + 46:central + 46 + length]) == encoded:
            patch(central + 8)
        central = data.find(b"PK\x01\x02", central + 46)
    path.write_bytes(bytes(data))
    return path


def create_dataset(settings: Settings, archive: Path, *, filename: str | None = None) -> str:
    """A dataset row in ``processing`` with ``archive`` as its upload, as the API leaves it."""
    dataset_id = new_id()
    target = dataset_upload(settings, dataset_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(archive, target)
    with session_scope() as session:
        session.add(Dataset(id=dataset_id, name=archive.stem, status="processing", filename=filename or archive.name,
                            size_bytes=archive.stat().st_size, rejected=[], report={},
                            progress={"processed": 0, "total": None}))
    return dataset_id


def ingest(settings: Settings, archive: Path) -> Dataset:
    """Create the row, run the worker's ingestion on it in this process, return the finished row."""
    dataset_id = create_dataset(settings, archive)
    ingest_dataset(dataset_id=dataset_id, settings=settings)
    with session_scope() as session:
        dataset = session.get_one(Dataset, dataset_id)
        session.expunge(dataset)
    return dataset
