"""Read archive entries without ever extracting them to disk, refusing hostile ones.

Nothing is written from an archive path, so zip-slip is impossible by construction; entries that
try it are still refused loudly because an upload carrying them is hostile or broken.
"""

import contextlib
import stat
import tarfile
import unicodedata
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from gzip import GzipFile
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO, cast

from shared.archives import archive_format
from shared.storage import redact_paths

IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}
ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
# tarfile reads pax and GNU long-name records whole; no honest one comes near this.
MAX_TAR_RECORD = 64 * 2**20
CHUNK = 1 << 20


class ArchiveError(ValueError):
    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Entry:
    path: str
    size: int


@dataclass(frozen=True)
class Member:
    """One file read from the archive: its bytes, or why it could not be read."""

    path: str
    data: bytes
    problem: str | None = None


def clean_name(raw: str) -> str:
    """The entry's path as stored in reports; raises ArchiveError for absolute or climbing paths."""
    # Non-UTF-8 tar names arrive with surrogates, which neither JSON nor Postgres can store; macOS
    # writes decomposed (NFD) names, which would not match the same name typed in labels.csv.
    text = raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace").replace("\x00", "\ufffd")
    text = unicodedata.normalize("NFC", text).replace("\\", "/")
    if text.startswith("/") or (len(text) > 1 and text[0].isalpha() and text[1] == ":"):
        raise ArchiveError(f"archive entry '{text}' has an absolute path", "unsafe_archive")
    parts = PurePosixPath(text).parts
    if ".." in parts:
        raise ArchiveError(f"archive entry '{text}' climbs out of the archive with '..'", "unsafe_archive")
    return "/".join(p for p in parts if p not in ("", "."))


def _zip_name(info: zipfile.ZipInfo) -> str:
    name = info.filename
    if not info.flag_bits & 0x800:
        # Most zip tools store UTF-8 names without setting the UTF-8 flag; zipfile then decodes cp437.
        with contextlib.suppress(UnicodeError):
            name = name.encode("cp437").decode("utf-8")
    return clean_name(name)


def is_ignored(path: str) -> bool:
    parts = path.split("/")
    return parts[0] == "__MACOSX" or parts[-1] in IGNORED_NAMES or any(p.startswith(".") for p in parts)


def zip_directory_entries(path: Path, *, stop_after: int) -> int:
    """How many entries the zip's central directory holds, counted record by record while streaming it
    (at most ``stop_after + 1``), before zipfile parses the whole directory into memory. The count in the
    end record is not trusted: a directory can hold far more records than it declares."""
    with path.open("rb") as handle:
        handle.seek(0, 2)
        size = handle.tell()
        handle.seek(max(0, size - (22 + 65535)))
        base = handle.tell()
        tail = handle.read()
        end = tail.rfind(b"PK\x05\x06")
        if end < 0 or len(tail) < end + 22:
            return 0  # not a zip zipfile can open either; it says why
        declared = int.from_bytes(tail[end + 10:end + 12], "little")
        directory_size = int.from_bytes(tail[end + 12:end + 16], "little")
        directory_end = base + end
        locator = end - 20
        if locator >= 0 and tail[locator:locator + 4] == b"PK\x06\x07":
            handle.seek(int.from_bytes(tail[locator + 8:locator + 16], "little"))
            record = handle.read(56)
            if record[:4] == b"PK\x06\x06":
                declared = max(declared, int.from_bytes(record[32:40], "little"))
                directory_size = int.from_bytes(record[40:48], "little")
                directory_end = base + locator - 56
        if declared > stop_after:
            return declared
        return _count_directory_records(handle, start=max(0, directory_end - directory_size), end=directory_end,
                                        stop_after=stop_after)


def _count_directory_records(handle: BinaryIO, *, start: int, end: int, stop_after: int) -> int:
    count, position = 0, start
    while position + 46 <= end and count <= stop_after:
        handle.seek(position)
        header = handle.read(46)
        if header[:4] != b"PK\x01\x02":
            break
        name, extra, comment = (int.from_bytes(header[i:i + 2], "little") for i in (28, 30, 32))
        position += 46 + name + extra + comment
        count += 1
    return count


class _CappedStream:
    """The decompressed tar stream, refusing to go past ``limit`` bytes before it produces them.

    tarfile reads headers, pax records and the members it skips through this, so every byte the
    archive expands to is counted, whatever its headers claim.
    """

    def __init__(self, raw: BinaryIO, limit: int, too_large: "ArchiveError") -> None:
        self.raw = raw
        self.limit = limit
        self.too_large = too_large
        self.position = 0

    def _allow(self, end: int) -> None:
        if end > self.limit:
            raise self.too_large

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            raise OSError("unbounded reads are not supported")
        if size > MAX_TAR_RECORD:
            raise ArchiveError(f"the archive asks to read a {size}-byte record in one piece; it is malformed "
                               "or hostile", "unsafe_archive")
        self._allow(self.position + size)
        data = self.raw.read(size)
        self.position += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence != 0:
            raise OSError("only absolute seeks are supported")
        self._allow(offset)
        self.position = self.raw.seek(offset)
        return self.position

    def tell(self) -> int:
        return self.position


class ArchiveReader:
    """Lists and reads the regular files of a zip or tar, with entry-count and byte caps.

    Bytes are counted as they are actually decompressed, since header sizes can lie.
    """

    def __init__(self, path: Path, *, max_entries: int, max_bytes: int) -> None:
        self.path = path
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes_read = 0
        fmt = archive_format(path)
        if fmt is None:
            raise ArchiveError("the upload is not a zip, tar or tar.gz archive", "not_an_archive")
        self.format = fmt

    def _too_large(self) -> ArchiveError:
        return ArchiveError(f"the archive expands to more than {self.max_bytes // 2**20} MiB "
                            "(TUNESERVE_MAX_ARCHIVE_MB); it may be a decompression bomb", "archive_too_large")

    def _check_count(self, count: int) -> None:
        if count > self.max_entries:
            raise ArchiveError(f"the archive has more than {self.max_entries} entries "
                               "(TUNESERVE_MAX_ARCHIVE_ENTRIES); split it into smaller uploads", "archive_too_large")

    def entries(self) -> list[Entry]:
        """Every regular file, minus system clutter; raises ArchiveError on the first unsafe entry."""
        return list(self._zip_entries() if self.format == "zip" else self._tar_entries())

    def _open_zip(self) -> zipfile.ZipFile:
        self._check_count(zip_directory_entries(self.path, stop_after=self.max_entries))
        try:
            archive = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise ArchiveError(f"the zip archive is corrupt: {redact_paths(str(exc))}", "corrupt_archive") from exc
        self._check_count(len(archive.infolist()))
        return archive

    def _zip_entries(self) -> Iterator[Entry]:
        with self._open_zip() as archive:
            for info in archive.infolist():
                name = _zip_name(info)
                if info.flag_bits & 0x1:
                    raise ArchiveError(f"archive entry '{name}' is encrypted", "unsafe_archive")
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise ArchiveError(f"archive entry '{name}' is a symlink", "unsafe_archive")
                if info.is_dir() or not name or is_ignored(name):
                    continue
                if info.compress_type not in ZIP_METHODS:
                    raise ArchiveError(f"archive entry '{name}' uses zip compression method {info.compress_type}, "
                                       "which is not supported; re-create the archive with standard zip (deflate)",
                                       "unsupported_archive")
                yield Entry(name, info.file_size)

    def _open_tar(self) -> tarfile.TarFile:
        raw = cast(BinaryIO, GzipFile(self.path)) if self.format == "tar.gz" else self.path.open("rb")
        try:  # tarfile needs only read() of its file object, which _CappedStream has
            return tarfile.open(fileobj=cast(IO[bytes], _CappedStream(raw, self.max_bytes, self._too_large())),
                                mode="r:")
        except (tarfile.TarError, EOFError, OSError) as exc:
            raw.close()
            raise ArchiveError(f"the tar archive is corrupt: {redact_paths(str(exc))}", "corrupt_archive") from exc
        except BaseException:
            raw.close()
            raise

    def _walk_tar(self) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
        archive = self._open_tar()
        try:
            for count, member in enumerate(archive, 1):
                self._check_count(count)
                yield archive, member
        except (tarfile.TarError, EOFError, OSError) as exc:  # truncated or corrupt gzip / tar stream
            raise ArchiveError(f"the tar archive is corrupt or truncated: {redact_paths(str(exc))}",
                               "corrupt_archive") from exc
        finally:
            archive.close()
            cast(_CappedStream, archive.fileobj).raw.close()

    def _tar_entries(self) -> Iterator[Entry]:
        for _, member in self._walk_tar():
            name = clean_name(member.name)
            if member.issym() or member.islnk():
                raise ArchiveError(f"archive entry '{name}' is a link", "unsafe_archive")
            if member.isdev():
                raise ArchiveError(f"archive entry '{name}' is a device file", "unsafe_archive")
            if member.isfile() and name and not is_ignored(name):
                yield Entry(name, member.size)

    def _read_stream(self, stream: BinaryIO, limit: int) -> bytes | None:
        """The whole member, or None once it passes ``limit`` (its header may have claimed less)."""
        chunks, size = [], 0
        while chunk := stream.read(CHUNK):
            size += len(chunk)
            self.bytes_read += len(chunk)
            if self.bytes_read > self.max_bytes:
                raise self._too_large()
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    def _member(self, name: str, declared: int, stream_opener, limit: int) -> Member:  # type: ignore[no-untyped-def]
        too_big = f"larger than {limit // 2**20} MiB (TUNESERVE_MAX_IMAGE_MB)"
        if declared > limit:
            return Member(name, b"", too_big)
        with stream_opener() as stream:
            data = self._read_stream(stream, limit)
        return Member(name, b"", too_big) if data is None else Member(name, data)

    def read_files(self, wanted: set[str], *, max_file_bytes: int) -> Iterator[Member]:
        """Each wanted regular file once, in archive order; files over ``max_file_bytes`` are not read."""
        seen: set[str] = set()
        if self.format == "zip":
            with self._open_zip() as archive:
                for info in archive.infolist():
                    name = _zip_name(info)
                    if name not in wanted or name in seen or info.is_dir():
                        continue
                    seen.add(name)
                    try:
                        yield self._member(name, info.file_size, lambda i=info: archive.open(i), max_file_bytes)
                    except ArchiveError:
                        raise
                    except Exception as exc:  # bad CRC, broken deflate/bzip2/lzma data: only this entry is lost
                        yield Member(name, b"", f"corrupt archive entry: {exc}")
            return
        for tar, member in self._walk_tar():
            name = clean_name(member.name)
            if name not in wanted or name in seen or not member.isfile():
                continue
            seen.add(name)
            yield self._member(name, member.size, lambda m=member, t=tar: t.extractfile(m), max_file_bytes)

    def read_file(self, path: str, *, max_file_bytes: int) -> Member:
        return next(self.read_files({path}, max_file_bytes=max_file_bytes))
