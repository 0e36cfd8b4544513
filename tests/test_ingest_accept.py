"""Uploads as real file managers and tools produce them: every archive kind, layout, format and
mode becomes a ready dataset with the right labels, splits and pixels."""

import io
import unicodedata

import numpy as np
import pytest
from PIL import Image

from shared.config import Settings
from shared.storage import dataset_cache, read_json
from tests.hostile import BLUE, GREEN, RED, encode, image_folder, ingest, set_zip_flag, solid, write_tar, write_zip

TWO = {"cats": RED, "dogs": BLUE}


@pytest.fixture
def settings(migrated) -> Settings:
    return Settings(cache_size=32, min_images_per_class=2)


def cached(settings: Settings, dataset_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    folder = dataset_cache(settings, dataset_id)
    return (np.load(folder / "images.npy", mmap_mode="r"), np.load(folder / "labels.npy"),
            np.load(folder / "splits.npy"), read_json(folder / "index.json"))


def pixel(settings: Settings, dataset_id: str, path: str, row: int = 16, col: int = 16) -> tuple[int, ...]:
    images, _, _, index = cached(settings, dataset_id)
    return tuple(int(v) for v in images[index["paths"].index(path)][row, col])


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


@pytest.mark.parametrize("suffix", [".zip", ".tar", ".tar.gz", ".tgz"])
def test_every_archive_kind_becomes_the_same_ready_dataset(settings, tmp_path, suffix):
    files = image_folder(TWO, per_class=3)
    archive = tmp_path / f"pets{suffix}"
    write_zip(archive, files) if suffix == ".zip" else write_tar(archive, files, gz=suffix != ".tar")

    dataset = ingest(settings, archive)

    assert (dataset.status, dataset.error) == ("ready", None)
    assert dataset.classes == ["cats", "dogs"]
    assert dataset.class_counts == {"cats": 3, "dogs": 3}
    assert dataset.rejected == []
    images, labels, splits, index = cached(settings, dataset.id)
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 0, 0, 1, 1, 1] and splits.tolist() == [-1] * 6
    assert index["paths"] == sorted(files) and index["cache_size"] == 32
    assert close_to(pixel(settings, dataset.id, "dogs/000.jpg"), BLUE)


def test_wrapper_folder_is_seen_through_and_stray_files_are_reported(settings, tmp_path):
    files = image_folder(TWO, per_class=2, prefix="My Photos/")
    files["My Photos/README.txt"] = b"my pets"
    files["notes.txt"] = b"beside the wrapper"

    dataset = ingest(settings, write_zip(tmp_path / "photos.zip", files))

    assert dataset.status == "ready"
    assert dataset.class_counts == {"cats": 2, "dogs": 2}
    assert sorted(dataset.rejected, key=lambda r: r["path"]) == [
        {"path": "My Photos/README.txt", "reason": "not an image file (by extension)"},
        {"path": "notes.txt", "reason": "not an image file (by extension)"}]


@pytest.mark.parametrize("val_name", ["val", "valid", "validation"])
def test_presplit_folders_keep_their_split(settings, tmp_path, val_name):
    files = {**image_folder(TWO, per_class=3, prefix="data/Train/"),
             **image_folder(TWO, per_class=2, prefix=f"data/{val_name}/"),
             **image_folder({"cats": RED}, per_class=1, prefix="data/test/")}

    dataset = ingest(settings, write_tar(tmp_path / "split.tar.gz", files, gz=True))

    assert dataset.status == "ready", dataset.error
    assert dataset.class_counts == {"cats": 6, "dogs": 5}
    assert dataset.splits == {"test": {"cats": 1}, "train": {"cats": 3, "dogs": 3}, "val": {"cats": 2, "dogs": 2}}
    _, labels, splits, index = cached(settings, dataset.id)
    codes = dict(zip(index["paths"], splits.tolist(), strict=True))
    assert codes["data/Train/cats/000.jpg"] == 0
    assert codes[f"data/{val_name}/dogs/001.jpg"] == 1
    assert codes["data/test/cats/000.jpg"] == 2


@pytest.mark.parametrize("delimiter", [",", ";"])
def test_labels_csv_manifest_assigns_labels_and_splits(settings, tmp_path, delimiter):
    files = {f"export/img/{i}.png": solid(RED if i < 3 else GREEN, fmt="PNG", seed=i) for i in range(7)}
    rows = ["filename,label,split", "img/0.png,apple,train", "./img/1.png,apple,", "img/2.png,apple,test",
            "img/3.png,pear,train", "img/4.png,pear,validation", "img/9.png,pear,train"]
    files["export/labels.csv"] = "\n".join(r.replace(",", delimiter) for r in rows).encode()

    dataset = ingest(settings, write_zip(tmp_path / "manifest.zip", files))

    assert dataset.status == "ready", dataset.error
    assert dataset.class_counts == {"apple": 3, "pear": 2}
    assert dataset.splits == {"test": {"apple": 1}, "train": {"apple": 1, "pear": 1}, "unassigned": {"apple": 1},
                              "val": {"pear": 1}}
    assert sorted(dataset.rejected, key=lambda r: r["path"]) == [
        {"path": "export/img/5.png", "reason": "not listed in labels.csv"},
        {"path": "export/img/6.png", "reason": "not listed in labels.csv"},
        {"path": "export/img/9.png", "reason": "listed in labels.csv but not in the archive"}]


@pytest.mark.parametrize("kind", ["zip-utf8-flag", "zip-raw-utf8", "tar"])
def test_non_ascii_class_and_file_names(settings, tmp_path, kind):
    cafe_nfd = unicodedata.normalize("NFD", "café")  # as macOS writes it
    files = {**image_folder({cafe_nfd: RED}, per_class=2), **image_folder({"日本語": BLUE}, per_class=1),
             "日本語/über größe.jpg": solid(BLUE, seed=7)}
    if kind == "tar":
        archive = write_tar(tmp_path / "names.tar", files)
    else:
        archive = write_zip(tmp_path / "names.zip", files)
        if kind == "zip-raw-utf8":  # UTF-8 bytes without the UTF-8 flag, as many zip tools write
            for name in files:
                set_zip_flag(archive, name, clear_bits=0x800)

    dataset = ingest(settings, archive)

    assert dataset.status == "ready", dataset.error
    assert dataset.classes == ["café", "日本語"]
    assert dataset.class_counts == {"café": 2, "日本語": 2}
    assert "日本語/über größe.jpg" in cached(settings, dataset.id)[3]["paths"]


def test_every_format_and_mode_becomes_rgb(settings, tmp_path):
    transparent = Image.new("RGBA", (40, 40), (*BLUE, 0))
    grey_alpha = Image.new("LA", (40, 40), (100, 255))
    palette = Image.new("RGB", (40, 40), GREEN).convert("P")
    cmyk = Image.new("CMYK", (40, 40), (0, 255, 255, 0))
    deep = np.full((40, 40), 1000, dtype=np.uint16)
    deep[0, 0] = 4000  # the brightest value maps to 255, so 1000 becomes 63
    frames = [Image.new("RGB", (40, 40), c).convert("P") for c in (RED, BLUE)]
    animated = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    cases = {
        "mixed/jpeg.jpg": (solid(RED), RED),
        "mixed/camera.jpg": (encode(Image.new("RGB", (40, 40), RED), "MPO", save_all=True,
                                    append_images=[Image.new("RGB", (40, 40), BLUE)]), RED),
        "mixed/grey.jpeg": (encode(Image.new("L", (40, 40), 128)), (128, 128, 128)),
        "mixed/transparent.png": (encode(transparent, "PNG"), (255, 255, 255)),
        "mixed/grey_alpha.png": (encode(grey_alpha, "PNG"), (100, 100, 100)),
        "mixed/palette.png": (encode(palette, "PNG"), GREEN),
        "mixed/deep.png": (encode(Image.fromarray(deep), "PNG"), (63, 63, 63)),
        "mixed/photo.webp": (encode(Image.new("RGB", (40, 40), BLUE), "WEBP", quality=95), BLUE),
        "mixed/bitmap.bmp": (encode(Image.new("RGB", (40, 40), GREEN), "BMP"), GREEN),
        "mixed/animated.gif": (animated, RED),
        "mixed/cmyk.tiff": (encode(cmyk, "TIFF"), (255, 0, 0)),
        "mixed/rgb.tif": (encode(Image.new("RGB", (40, 40), BLUE), "TIFF", compression="tiff_lzw"), BLUE),
    }
    assert Image.open(io.BytesIO(cases["mixed/deep.png"][0])).mode == "I;16"
    files = {path: data for path, (data, _) in cases.items()} | image_folder({"other": GREEN}, per_class=2)

    dataset = ingest(settings, write_zip(tmp_path / "formats.zip", files))

    assert dataset.status == "ready", dataset.error
    assert dataset.rejected == []
    assert dataset.class_counts == {"mixed": len(cases), "other": 2}
    for path, (_, expected) in cases.items():
        assert close_to(pixel(settings, dataset.id, path), expected), (path, pixel(settings, dataset.id, path))


def test_exif_orientation_is_applied_before_caching(settings, tmp_path):
    # Stored 64x32: red left half, blue right half. Orientation 6 means "rotate 90 degrees clockwise to
    # view", which puts red on top; without it the top-right of the centre crop would be blue.
    stored = np.zeros((32, 64, 3), dtype=np.uint8)
    stored[:, :32], stored[:, 32:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {"phone/rotated.jpg": encode(Image.fromarray(stored), "JPEG", exif=exif.tobytes(), quality=95),
             **image_folder({"phone": RED, "other": GREEN}, per_class=2)}

    dataset = ingest(settings, write_zip(tmp_path / "exif.zip", files))

    assert dataset.status == "ready", dataset.error
    assert close_to(pixel(settings, dataset.id, "phone/rotated.jpg", row=4, col=28), RED)
    assert close_to(pixel(settings, dataset.id, "phone/rotated.jpg", row=28, col=4), BLUE)


def test_system_clutter_is_ignored_silently(settings, tmp_path):
    files = image_folder(TWO, per_class=2, prefix="pets/")
    clutter = ["__MACOSX/pets/cats/._000.jpg", "pets/.DS_Store", "pets/cats/.DS_Store", "Thumbs.db",
               "pets/dogs/Thumbs.db", "pets/desktop.ini", ".git/config", "pets/cats/.hidden.jpg", "pets/.cache/x.jpg"]
    files |= {name: solid(GREEN) for name in clutter}

    dataset = ingest(settings, write_zip(tmp_path / "mac.zip", files))

    assert dataset.status == "ready", dataset.error
    assert dataset.rejected == []
    assert dataset.class_counts == {"cats": 2, "dogs": 2}
