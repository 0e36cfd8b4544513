"""Work out labels and splits from whatever folder layout the user's archive has."""

import csv
import io
import unicodedata
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from worker.images import IMAGE_SUFFIXES

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
MANIFEST = "labels.csv"
# Hugging Face imagefolder: a header row with `file_name` (relative to the csv's folder) and `label`; one at
# the top or one per split folder (train/metadata.csv, test/metadata.csv).
HF_MANIFEST = "metadata.csv"
MANIFESTS = (MANIFEST, HF_MANIFEST)


@dataclass
class Layout:
    items: list[tuple[str, str, str | None]] = field(default_factory=list)  # (path, label, split)
    rejected: list[dict[str, str]] = field(default_factory=list)
    manifest: str | None = None
    error: str | None = None  # the archive's manifest cannot be used at all (a dataset error, not a row's)


def is_image_name(path: str) -> bool:
    return PurePosixPath(path).suffix.lower() in IMAGE_SUFFIXES


def _strip_wrappers(paths: list[str]) -> str:
    """The common top folder(s) that only wrap the real layout (e.g. ``flowers/roses/1.jpg``).

    Only images and a manifest decide it, so a stray README beside the wrapper changes nothing.
    """
    rel = [p for p in paths if is_image_name(p) or PurePosixPath(p).name in MANIFESTS]
    prefix = ""
    while rel and all("/" in p for p in rel):
        heads = {p.split("/", 1)[0] for p in rel}
        if len(heads) != 1:
            break
        head = heads.pop()
        rest = [p.split("/", 1)[1] for p in rel]
        # Stop when what is left is class/file: stripping again would turn classes into files.
        if all("/" not in p for p in rest) and not set(MANIFESTS) & set(rest):
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
    hf_manifests = sorted(p for p in paths if p.startswith(prefix) and PurePosixPath(p).name == HF_MANIFEST)
    if hf_manifests:
        return _from_hf_manifests(layout, paths, prefix, {p: read_manifest(p) for p in hf_manifests})
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


def _decode(data: bytes) -> str:
    return unicodedata.normalize("NFC", data.decode("utf-8-sig", errors="replace"))


def _list(layout: Layout, listed: set[str], known: set[str], *, path: str, label: str, split: str | None,
          name: str) -> None:
    """Add one manifest row's image, or say why it cannot be used."""
    if path not in known:
        layout.rejected.append({"path": path, "reason": f"listed in {name} but not in the archive"})
    elif path in listed:
        layout.rejected.append({"path": path, "reason": f"listed more than once in {name}"})
    else:
        listed.add(path)
        layout.items.append((path, label, split))


def _from_manifest(layout: Layout, paths: list[str], prefix: str, data: bytes) -> Layout:
    known = set(paths)
    text = _decode(data)
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
        _list(layout, listed, known, path=path, label=row[1].strip(), split=split, name=MANIFEST)
    for path in paths:
        if path not in listed and path != layout.manifest:
            layout.rejected.append({"path": path, "reason": f"not listed in {MANIFEST}"})
    return layout


def _from_hf_manifests(layout: Layout, paths: list[str], prefix: str, manifests: dict[str, bytes]) -> Layout:
    """Hugging Face imagefolder metadata: the split comes from the folder a csv sits in (train/, test/...)."""
    known, listed = set(paths), set[str]()
    for manifest, data in manifests.items():
        folder = manifest[:-len(HF_MANIFEST)]
        split = SPLIT_NAMES.get(folder[len(prefix):].split("/", 1)[0].lower())
        reader = csv.DictReader(io.StringIO(_decode(data)))
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in ("file_name", "label") if c not in columns]
        if missing:
            layout.error = (f"{manifest} has no {' or '.join(repr(c) for c in missing)} column (its columns: "
                            f"{', '.join(columns[:10]) or 'none'}); a Hugging Face metadata.csv needs a header "
                            "row with file_name,label")
            return layout
        reader.fieldnames = columns
        for row_no, row in enumerate(reader, start=2):
            name, label = (row.get("file_name") or "").strip(), (row.get("label") or "").strip()
            if not name and not label:
                continue
            if not name or not label:
                layout.rejected.append({"path": f"{manifest}:{row_no}", "reason": "row needs file_name,label"})
                continue
            path = folder + name.replace("\\", "/").removeprefix("./")
            _list(layout, listed, known, path=path, label=label, split=split, name=HF_MANIFEST)
    layout.rejected += [{"path": p, "reason": f"not listed in {HF_MANIFEST}"} for p in paths
                        if p not in listed and p not in manifests]
    return layout
