"""What kind of archive a file is, by its magic bytes rather than the name a client chose."""

from pathlib import Path


def archive_format(path: Path) -> str | None:
    """``zip``, ``tar.gz`` or ``tar``; None for anything else."""
    with path.open("rb") as handle:
        head = handle.read(262)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    return None
