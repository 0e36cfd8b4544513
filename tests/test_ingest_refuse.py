"""Hostile and broken uploads, each built here: the dataset fails with a precise reason, bad images
are listed in ``rejected`` while the rest ingests, and nothing is written outside DATA_DIR."""

import gzip
import tarfile
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from shared.config import Settings
from shared.storage import dataset_cache, dataset_dir
from tests.hostile import (
    BLUE,
    RED,
    create_dataset,
    encode,
    image_folder,
    ingest,
    set_zip_flag,
    solid,
    write_tar,
    write_zip,
    zip_symlink,
)

TWO = {"cats": RED, "dogs": BLUE}


@pytest.fixture
def settings(migrated) -> Settings:
    return Settings(cache_size=32, min_images_per_class=2)


def files_under(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(("kind", "reason"), [
    ("climb", "climbs out of the archive with '..'"),
    ("absolute", "has an absolute path"),
    ("backslash", "climbs out of the archive with '..'"),
    ("drive", "has an absolute path"),
])
@pytest.mark.parametrize("container", ["zip", "tar"])
def test_path_escaping_entries_fail_the_dataset_and_write_nothing_outside(settings, tmp_path, kind, reason,
                                                                          container):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "evil.jpg"
    name = {"climb": "../" * 16 + str(target).lstrip("/"), "absolute": str(target),
            "backslash": "cats\\..\\..\\..\\evil.jpg", "drive": "C:/Users/evil.jpg"}[kind]
    files = {**image_folder(TWO, per_class=2), name: solid(RED)}
    archive = tmp_path / f"slip.{container}"
    write_zip(archive, files) if container == "zip" else write_tar(archive, files)
    with zipfile.ZipFile(archive) if container == "zip" else tarfile.open(archive) as opened:
        names = opened.namelist() if container == "zip" else opened.getnames()
        assert name in names  # the hostile name really is in the archive, unsanitised

    dataset = ingest(settings, archive)

    assert (dataset.status, dataset.error_code) == ("failed", "unsafe_archive")
    assert dataset.error.startswith("archive entry '") and dataset.error.endswith(reason)
    assert not target.exists() and files_under(outside) == set()
    assert files_under(tmp_path) == {archive.name}  # a failed dataset's upload is removed too


def _link(kind: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(f"cats/{kind}.jpg")
    info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "chardev": tarfile.CHRTYPE,
                 "blockdev": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}[kind]
    info.linkname = "/etc/passwd" if kind in ("symlink", "hardlink") else ""
    return info


@pytest.mark.parametrize(("kind", "error"), [
    ("zip-symlink", "archive entry 'cats/link.jpg' is a symlink"),
    ("symlink", "archive entry 'cats/symlink.jpg' is a link"),
    ("hardlink", "archive entry 'cats/hardlink.jpg' is a link"),
    ("chardev", "archive entry 'cats/chardev.jpg' is a device file"),
    ("blockdev", "archive entry 'cats/blockdev.jpg' is a device file"),
    ("fifo", "archive entry 'cats/fifo.jpg' is a device file"),
])
def test_links_and_devices_fail_the_dataset(settings, tmp_path, kind, error):
    files = image_folder(TWO, per_class=2)
    if kind == "zip-symlink":
        archive = zip_symlink(tmp_path / "links.zip", files, "cats/link.jpg", "/etc/passwd")
    else:
        archive = write_tar(tmp_path / "links.tar.gz", files, gz=True, extra=[_link(kind)])

    dataset = ingest(settings, archive)

    assert (dataset.status, dataset.error_code, dataset.error) == ("failed", "unsafe_archive", error)
    assert not dataset_cache(settings, dataset.id).exists()


def test_encrypted_zip_entry_fails_the_dataset(settings, tmp_path):
    archive = set_zip_flag(write_zip(tmp_path / "secret.zip", image_folder(TWO, per_class=2)), "dogs/001.jpg",
                           set_bits=0x1)

    dataset = ingest(settings, archive)

    assert (dataset.status, dataset.error_code) == ("failed", "unsafe_archive")
    assert dataset.error == "archive entry 'dogs/001.jpg' is encrypted"


BOMB_ERROR = "the archive expands to more than 1 MiB (TUNESERVE_MAX_ARCHIVE_MB); it may be a decompression bomb"


def test_zip_bomb_is_stopped_by_bytes_actually_read(settings, tmp_path):
    zeros = bytes(600 * 1024)  # three of these deflate to a few KiB and expand past the 1 MiB cap
    files = {**image_folder(TWO, per_class=2), **{f"cats/big{i}.jpg": zeros for i in range(3)}}
    archive = write_zip(tmp_path / "bomb.zip", files)
    assert archive.stat().st_size < 20 * 1024

    dataset = ingest(settings.model_copy(update={"max_archive_mb": 1}), archive)

    assert (dataset.status, dataset.error_code, dataset.error) == ("failed", "archive_too_large", BOMB_ERROR)


def test_tar_bomb_in_a_member_never_read_is_still_counted(settings, tmp_path):
    files = {**image_folder(TWO, per_class=2), "padding/filler.bin": bytes(3 * 2**20)}
    archive = write_tar(tmp_path / "bomb.tar.gz", files, gz=True)

    dataset = ingest(settings.model_copy(update={"max_archive_mb": 1}), archive)

    assert (dataset.status, dataset.error_code, dataset.error) == ("failed", "archive_too_large", BOMB_ERROR)


def test_tar_header_claiming_gigabytes_is_refused_before_reading(settings, tmp_path):
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type = tarfile.XHDTYPE
    pax.size = 4 * 2**30  # tarfile would read this whole record into memory
    archive = tmp_path / "liar.tar.gz"
    archive.write_bytes(gzip.compress(pax.tobuf(format=tarfile.USTAR_FORMAT) + bytes(2048)))

    started = time.monotonic()
    dataset = ingest(settings, archive)

    assert (dataset.status, dataset.error_code) == ("failed", "unsafe_archive")
    assert dataset.error == ("the archive asks to read a 4294967296-byte record in one piece; "
                             "it is malformed or hostile")
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("container", ["zip", "tar"])
def test_too_many_entries_fail_the_dataset(settings, tmp_path, container):
    files = image_folder(TWO, per_class=4)
    archive = write_zip(tmp_path / "many.zip", files) if container == "zip" else write_tar(
        tmp_path / "many.tar", files)

    dataset = ingest(settings.model_copy(update={"max_archive_entries": 5}), archive)

    assert (dataset.status, dataset.error_code) == ("failed", "archive_too_large")
    assert dataset.error == ("the archive has more than 5 entries (TUNESERVE_MAX_ARCHIVE_ENTRIES); split it into "
                             "smaller uploads")


def test_bad_images_are_rejected_with_reasons_and_the_rest_ingests(settings, tmp_path):
    files = image_folder(TWO, per_class=3)
    files |= {
        "cats/bomb.png": encode(Image.new("L", (70, 70)), "PNG"),        # over the pixel limit
        "cats/megabomb.png": encode(Image.new("1", (6000, 6000)), "PNG"),  # 36 Mpx in a few KiB
        "cats/truncated.jpg": solid(RED, size=(64, 64))[:400],
        "cats/notes.jpg": b"this is a shopping list, not a photo",
        "cats/portable.jpg": encode(Image.new("RGB", (40, 40)), "PPM"),  # a real image, but not a format we decode
        "dogs/tiny.png": encode(Image.new("RGB", (8, 8), BLUE), "PNG"),
        "dogs/huge.png": np.random.default_rng(0).integers(0, 255, 1_200_000, dtype=np.uint8).tobytes(),
        "dogs/crc.jpg": solid(BLUE, seed=99),
    }
    archive = write_zip(tmp_path / "mixed.zip", files)
    with zipfile.ZipFile(archive) as opened:
        info = opened.getinfo("dogs/crc.jpg")
    data = bytearray(archive.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + info.compress_size // 2] ^= 0xFF  # damage the entry
    archive.write_bytes(bytes(data))

    dataset = ingest(settings.model_copy(update={"max_image_pixels": 3600, "max_image_mb": 1}), archive)

    assert dataset.status == "ready", dataset.error
    assert dataset.class_counts == {"cats": 3, "dogs": 3}
    reasons = {r["path"]: r["reason"] for r in dataset.rejected}
    assert sorted(reasons) == sorted(set(files) - set(image_folder(TWO, per_class=3)))
    assert reasons["cats/bomb.png"] == ("70x70 exceeds the 3600 pixel limit (TUNESERVE_MAX_IMAGE_PIXELS); "
                                        "it may be a decompression bomb")
    assert reasons["cats/megabomb.png"].startswith("6000x6000 exceeds the 3600 pixel limit")
    assert reasons["cats/truncated.jpg"].startswith("corrupt or truncated image: ")
    assert reasons["cats/notes.jpg"] == "not a JPEG, PNG, WEBP, BMP, GIF or TIFF image"
    assert reasons["cats/portable.jpg"] == "not a JPEG, PNG, WEBP, BMP, GIF or TIFF image"
    assert reasons["dogs/tiny.png"] == "8x8 is smaller than 16 px on its shorter side"
    assert reasons["dogs/huge.png"] == "larger than 1 MiB (TUNESERVE_MAX_IMAGE_MB)"
    assert reasons["dogs/crc.jpg"].startswith("corrupt archive entry: ")
    assert dataset.report["rejected_count"] == 8


def test_a_single_class_fails_before_decoding(settings, tmp_path):
    dataset = ingest(settings, write_zip(tmp_path / "one.zip", image_folder({"cats": RED}, per_class=3)))

    assert (dataset.status, dataset.error_code) == ("failed", "too_few_classes")
    assert dataset.error == ("the dataset has 1 class ('cats'); at least 2 are needed: add a sub-folder of images "
                             "for each other class")
    assert not dataset_cache(settings, dataset.id).exists()


def test_a_class_below_the_minimum_after_rejections_fails(settings, tmp_path):
    files = {**image_folder(TWO, per_class=3), "dogs/002.jpg": b"not an image"}

    dataset = ingest(settings.model_copy(update={"min_images_per_class": 3}), write_zip(tmp_path / "s.zip", files))

    assert (dataset.status, dataset.error_code) == ("failed", "class_too_small")
    assert dataset.error == ("classes with fewer than 3 valid images: 'dogs' (2); add images or remove those "
                             "folders")
    assert dataset.rejected == [{"path": "dogs/002.jpg", "reason": "not a JPEG, PNG, WEBP, BMP, GIF or TIFF image"}]
    # The images were decoded into a temporary cache; failing removed it and the upload: nothing is left.
    assert not dataset_dir(settings, dataset.id).exists()


def test_nothing_valid_fails_with_no_images(settings, tmp_path):
    files = {f"{label}/{i}.jpg": b"<html>" for label in TWO for i in range(2)}

    dataset = ingest(settings, write_zip(tmp_path / "junk.zip", files))

    assert (dataset.status, dataset.error_code) == ("failed", "no_images")
    assert dataset.error.startswith("no valid images were found; put images in one sub-folder per class")
    assert dataset.error.endswith("(4 files were rejected, see 'rejected')")
    assert len(dataset.rejected) == 4


@pytest.mark.parametrize(("content", "code"), [
    (b"just some text, not an archive at all", "not_an_archive"),
    ("truncated-tgz", "corrupt_archive"),
    ("truncated-zip", "corrupt_archive"),
])
def test_broken_archives_fail_the_dataset(settings, tmp_path, content, code):
    archive = tmp_path / "broken"
    if content == "truncated-tgz":
        whole = write_tar(tmp_path / "whole.tgz", image_folder(TWO, per_class=3), gz=True).read_bytes()
        archive.write_bytes(whole[: len(whole) // 2])
    elif content == "truncated-zip":
        whole = write_zip(tmp_path / "whole.zip", image_folder(TWO, per_class=3)).read_bytes()
        archive.write_bytes(whole[: len(whole) // 2])
    else:
        archive.write_bytes(content)

    dataset = ingest(settings, archive)

    assert (dataset.status, dataset.error_code) == ("failed", code), dataset.error



def test_a_zip_directory_holding_more_records_than_it_declares_is_counted_while_streaming(tmp_path):
    """300,000 directory records behind an end record that declares one: refused with a bounded amount of
    memory, before zipfile would build (and hold) 300,000 ZipInfo objects."""
    import tracemalloc

    from worker.archive import ArchiveError, ArchiveReader

    one = tmp_path / "one.zip"
    with zipfile.ZipFile(one, "w") as archive:
        archive.writestr("a/x.jpg", b"")
    data = one.read_bytes()
    directory_at = data.index(b"PK\x01\x02")
    end_at = data.index(b"PK\x05\x06")
    record = data[directory_at:end_at]
    records = 300_000
    end = bytearray(data[end_at:])
    end[12:16] = (len(record) * records).to_bytes(4, "little")  # honest directory size, lying entry count (1)
    lying = tmp_path / "lying.zip"
    lying.write_bytes(data[:directory_at] + record * records + bytes(end))
    tracemalloc.start()
    try:
        with pytest.raises(ArchiveError) as refused:
            ArchiveReader(lying, max_entries=1000, max_bytes=2**30).entries()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.code == "archive_too_large"
    assert peak < 5 * 2**20, peak


def test_an_upload_that_keeps_killing_its_worker_fails_with_worker_lost(settings, tmp_path):
    """Three deliveries started and none finished (each took its worker down): the fourth fails the dataset
    instead of decoding again, and its files go."""
    from sqlalchemy import update

    from shared.db import session_scope
    from shared.orm import Dataset
    from worker.ingest import ingest_dataset

    dataset_id = create_dataset(settings, write_zip(tmp_path / "p.zip", image_folder(TWO, per_class=3)))
    with session_scope() as session:
        session.execute(update(Dataset).where(Dataset.id == dataset_id).values(attempts=settings.ingest_max_attempts))
    ingest_dataset(dataset_id=dataset_id, settings=settings)
    with session_scope() as session:
        dataset = session.get(Dataset, dataset_id)
        assert (dataset.status, dataset.error_code, dataset.attempts) == ("failed", "worker_lost", 4)
        assert "stopped the worker 3 times" in dataset.error
    assert not dataset_dir(settings, dataset_id).exists()


def test_a_healthy_ingestion_counts_one_attempt_and_one_past_its_time_limit_fails(settings, tmp_path):
    archive = write_zip(tmp_path / "t.zip", image_folder(TWO, per_class=3))
    assert ingest(settings, archive).attempts == 1
    slow = ingest(settings.model_copy(update={"ingest_max_minutes": 1e-9}), archive)
    assert (slow.status, slow.error_code) == ("failed", "ingest_timeout")
    assert not dataset_dir(settings, slow.id).exists()


def test_a_cache_that_would_eat_the_disk_reserve_is_refused_before_decoding(settings, tmp_path):
    greedy = settings.model_copy(update={"min_free_disk_gb": 10**6})
    dataset = ingest(greedy, write_zip(tmp_path / "d.zip", image_folder(TWO, per_class=3)))
    assert (dataset.status, dataset.error_code) == ("failed", "insufficient_storage")
    assert dataset.progress == {"processed": 0, "total": None}  # nothing was decoded
    assert not dataset_dir(settings, dataset.id).exists()
