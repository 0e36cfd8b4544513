"""Work out labels and splits from whatever folder layout the user's archive has."""

import csv
import io
import unicodedata
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from worker.images import IMAGE_SUFFIXES

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
MANIFEST = "labels.csv"


@dataclass
class Layout:
    items: list[tuple[str, str, str | None]] = field(default_factory=list)  # (path, label, split)
    rejected: list[dict[str, str]] = field(default_factory=list)
    manifest: str | None = None


def is_image_name(path: str) -> bool:
    return PurePosixPath(path).suffix.lower() in IMAGE_SUFFIXES


def _strip_wrappers(paths: list[str]) -> str:
    """The common top folder(s) that only wrap the real layout (e.g. ``flowers/roses/1.jpg``).

    Only images and a manifest decide it, so a stray README beside the wrapper changes nothing.
    """
    rel = [p for p in paths if is_image_name(p) or PurePosixPath(p).name == MANIFEST]
    prefix = ""
    while rel and all("/" in p for p in rel):
        heads = {p.split("/", 1)[0] for p in rel}
        if len(heads) != 1:
            break
        head = heads.pop()
        rest = [p.split("/", 1)[1] for p in rel]
        # Stop when what is left is class/file: stripping again would turn classes into files.
        if all("/" not in p for p in rest) and MANIFEST not in rest:
            break
        prefix += head + "/"
        rel = rest
    return prefix


def resolve_layout(paths: list[str], read_manifest) -> Layout:  # type: ignore[no-untyped-def]
    """Map archive paths to (path, label, split); ``read_manifest(path)`` returns its bytes."""
    layout = Layout()
    prefix = _strip_wrappers(paths)
    manifest_path = prefix + MANIFEST
    if manifest_path in paths:
        layout.manifest = manifest_path
        return _from_manifest(layout, paths, prefix, read_manifest(manifest_path))
    images = [p for p in paths if is_image_name(p)]
    layout.rejected = [{"path": p, "reason": "not an image file (by extension)"} for p in paths
                       if not is_image_name(p)]
    rel = {p: p[len(prefix):] for p in images}
    tops = {r.split("/", 1)[0].lower() for r in rel.values() if "/" in r}
    presplit = bool(tops) and tops <= set(SPLIT_NAMES)
    for path, relative in rel.items():
        parts = relative.split("/")
        if presplit:
            if len(parts) < 3:
                layout.rejected.append({"path": path, "reason": "not inside a split/class folder"})
                continue
            layout.items.append((path, parts[1], SPLIT_NAMES[parts[0].lower()]))
        elif len(parts) < 2:
            layout.rejected.append({"path": path, "reason": "not inside a class folder"})
        else:
            layout.items.append((path, parts[0], None))
    return layout


def _from_manifest(layout: Layout, paths: list[str], prefix: str, data: bytes) -> Layout:
    known = set(paths)
    text = unicodedata.normalize("NFC", data.decode("utf-8-sig", errors="replace"))
    first_line = text.split("\n", 1)[0]
    # Spreadsheets in many locales save CSV with semicolons.
    delimiter = ";" if ";" in first_line and "," not in first_line else ","
    listed: set[str] = set()
    for row_no, row in enumerate(csv.reader(io.StringIO(text), delimiter=delimiter), start=1):
        if not row or not any(cell.strip() for cell in row):
            continue
        if row_no == 1 and not is_image_name(row[0].strip()):
            continue  # a header such as filename,label
        if len(row) < 2 or not row[1].strip():
            layout.rejected.append({"path": f"{MANIFEST}:{row_no}", "reason": "row needs filename,label"})
            continue
        path = prefix + row[0].strip().replace("\\", "/").removeprefix("./")
        split = SPLIT_NAMES.get(row[2].strip().lower()) if len(row) > 2 and row[2].strip() else None
        if path not in known:
            layout.rejected.append({"path": path, "reason": f"listed in {MANIFEST} but not in the archive"})
            continue
        if path in listed:
            layout.rejected.append({"path": path, "reason": f"listed more than once in {MANIFEST}"})
            continue
        listed.add(path)
        layout.items.append((path, row[1].strip(), split))
    for path in paths:
        if path not in listed and path != layout.manifest:
            layout.rejected.append({"path": path, "reason": f"not listed in {MANIFEST}"})
    return layout
