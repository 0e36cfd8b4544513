"""Read archive entries without ever extracting them to disk, refusing hostile ones.

Nothing is written from an archive path, so zip-slip is impossible by construction; entries that
try it are still refused loudly because an upload carrying them is hostile or broken.
"""

import stat
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}


class ArchiveError(ValueError):
    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Entry:
    path: str
    size: int


def detect_format(path: Path) -> str | None:
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        with tarfile.open(path, "r:*"):
            return "tar"
    except (tarfile.TarError, OSError, EOFError):
        return None


def _check_name(name: str) -> str:
    clean = name.replace("\\", "/")
    if clean.startswith("/") or (len(clean) > 1 and clean[1] == ":"):
        raise ArchiveError(f"archive entry '{name}' has an absolute path", "unsafe_archive")
    parts = PurePosixPath(clean).parts
    if ".." in parts:
        raise ArchiveError(f"archive entry '{name}' climbs out of the archive with '..'", "unsafe_archive")
    return "/".join(p for p in parts if p not in ("", "."))


def is_ignored(path: str) -> bool:
    parts = path.split("/")
    return parts[0] == "__MACOSX" or parts[-1] in IGNORED_NAMES or any(p.startswith(".") for p in parts)


class ArchiveReader:
    """Lists and reads the regular files of a zip or tar, with entry-count and byte caps.

    Bytes are counted as they are actually decompressed, since header sizes can lie.
    """

    def __init__(self, path: Path, *, max_entries: int, max_bytes: int) -> None:
        self.path = path
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes_read = 0
        fmt = detect_format(path)
        if fmt is None:
            raise ArchiveError("the upload is not a zip, tar or tar.gz archive", "not_an_archive")
        self.format = fmt

    def entries(self) -> list[Entry]:
        found: list[Entry] = []
        if self.format == "zip":
            with zipfile.ZipFile(self.path) as archive:
                infos = archive.infolist()
                self._check_count(len(infos))
                for info in infos:
                    name = _check_name(info.filename)
                    if info.flag_bits & 0x1:
                        raise ArchiveError(f"archive entry '{info.filename}' is encrypted", "unsafe_archive")
                    mode = info.external_attr >> 16
                    if stat.S_ISLNK(mode):
                        raise ArchiveError(f"archive entry '{info.filename}' is a symlink", "unsafe_archive")
                    if info.is_dir() or not name or is_ignored(name):
                        continue
                    found.append(Entry(name, info.file_size))
        else:
            with tarfile.open(self.path, "r:*") as archive:
                count = 0
                for member in archive:
                    count += 1
                    self._check_count(count)
                    name = _check_name(member.name)
                    if member.issym() or member.islnk():
                        raise ArchiveError(f"archive entry '{member.name}' is a link", "unsafe_archive")
                    if member.isdev():
                        raise ArchiveError(f"archive entry '{member.name}' is a device file", "unsafe_archive")
                    if not member.isfile() or not name or is_ignored(name):
                        continue
                    found.append(Entry(name, member.size))
        return found

    def _check_count(self, count: int) -> None:
        if count > self.max_entries:
            raise ArchiveError(
                f"the archive has more than {self.max_entries} entries (TUNESERVE_MAX_ARCHIVE_ENTRIES)",
                "archive_too_large",
            )

    def _take(self, chunk: bytes) -> None:
        self.bytes_read += len(chunk)
        if self.bytes_read > self.max_bytes:
            raise ArchiveError(
                f"the archive expands to more than {self.max_bytes // 2**20} MiB "
                "(TUNESERVE_MAX_ARCHIVE_MB); it may be a decompression bomb",
                "archive_too_large",
            )

    def _read_stream(self, stream) -> bytes:  # type: ignore[no-untyped-def]
        chunks = []
        while chunk := stream.read(1 << 20):
            self._take(chunk)
            chunks.append(chunk)
        return b"".join(chunks)

    def iter_files(self, wanted: set[str]) -> Iterator[tuple[str, bytes]]:
        """Yield (path, bytes) for each wanted regular file, in archive order."""
        if self.format == "zip":
            with zipfile.ZipFile(self.path) as archive:
                for info in archive.infolist():
                    name = _check_name(info.filename)
                    if name in wanted and not info.is_dir():
                        with archive.open(info) as stream:
                            yield name, self._read_stream(stream)
        else:
            with tarfile.open(self.path, "r:*") as archive:
                for member in archive:
                    name = _check_name(member.name)
                    if name in wanted and member.isfile():
                        stream = archive.extractfile(member)
                        if stream is not None:
                            yield name, self._read_stream(stream)
