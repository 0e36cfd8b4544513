"""Work out labels and splits from whatever folder layout the user's archive has."""

import csv
import io
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


def _strip_wrappers(paths: list[str]) -> str:
    """The common top folder(s) that only wrap the real layout (e.g. ``flowers/roses/1.jpg``)."""
    prefix = ""
    rel = paths
    while rel and all("/" in p for p in rel):
        heads = {p.split("/", 1)[0] for p in rel}
        if len(heads) != 1:
            break
        head = heads.pop()
        rest = [p.split("/", 1)[1] for p in rel]
        # Stop when what is left is class/file: stripping again would turn classes into files.
        if all("/" not in p for p in rest if not p.endswith(MANIFEST)) and MANIFEST not in rest:
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
    rel = {p: p[len(prefix):] for p in paths}
    tops = {r.split("/", 1)[0].lower() for r in rel.values() if "/" in r}
    presplit = bool(tops) and tops <= set(SPLIT_NAMES)
    for path, relative in rel.items():
        parts = relative.split("/")
        if PurePosixPath(path).suffix.lower() not in IMAGE_SUFFIXES:
            layout.rejected.append({"path": path, "reason": "not an image file (by extension)"})
            continue
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
    text = data.decode("utf-8-sig", errors="replace")
    for row_no, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or (row_no == 1 and [c.strip().lower() for c in row[:2]] == ["filename", "label"]):
            continue
        if len(row) < 2 or not row[1].strip():
            layout.rejected.append({"path": f"{MANIFEST}:{row_no}", "reason": "row needs filename,label"})
            continue
        path = prefix + row[0].strip().lstrip("./")
        split = SPLIT_NAMES.get(row[2].strip().lower()) if len(row) > 2 and row[2].strip() else None
        if path not in known:
            layout.rejected.append({"path": path, "reason": f"listed in {MANIFEST} but not in the archive"})
            continue
        layout.items.append((path, row[1].strip(), split))
    return layout
