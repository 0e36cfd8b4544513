"""Multipart uploads streamed straight to disk, with the size limit enforced while bytes arrive."""

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from api.errors import ApiError

MAX_FIELD_BYTES = 64 * 1024
# All non-file fields of one request together, and parts of any kind: a form is a few fields and files.
MAX_FIELDS_BYTES = 256 * 1024
MAX_PARTS = 300
MAX_HEADER_BYTES = 8 * 1024


@dataclass
class SavedFile:
    field: str
    filename: str
    path: Path
    size: int


@dataclass
class ParsedForm:
    fields: dict[str, str] = field(default_factory=dict)
    files: list[SavedFile] = field(default_factory=list)

    def cleanup(self) -> None:
        for saved in self.files:
            saved.path.unlink(missing_ok=True)

    def validated(self, model: type["FormT"], defaults: dict[str, str] | None = None) -> "FormT":
        """The form's fields (over ``defaults``, e.g. the same names from the query string) as ``model``: a
        422 validation_error naming the field otherwise, as for a JSON body. An empty field counts as absent."""
        values = {k: v for source in (defaults or {}, self.fields) for k, v in source.items() if v != ""}
        try:
            return model.model_validate(values)
        except ValidationError as exc:
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from exc


FormT = TypeVar("FormT", bound=BaseModel)


def sweep_stale(spool_dir: Path, *, older_than_s: float) -> int:
    """Remove spooled uploads a crashed process left behind (another replica's live ones are younger)."""
    removed = 0
    cutoff = time.time() - older_than_s
    for path in spool_dir.glob(".upload-*") if spool_dir.is_dir() else []:
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def refuse_if_disk_low(request: Request, *, data_dir: Path, reserve_gb: float) -> None:
    """507 before the body is read when what the request declares would eat into the disk reserve."""
    length = request.headers.get("content-length", "")
    declared = int(length) if length.isdigit() else 0
    free = shutil.disk_usage(data_dir).free
    reserve = int(reserve_gb * 2**30)
    if free - declared < reserve:
        raise ApiError(507, "insufficient_storage", f"the server has {free // 2**20} MiB free and keeps "
                       f"{reserve // 2**20} MiB in reserve (TUNESERVE_MIN_FREE_DISK_GB); try again later")


def too_large(limit_bytes: int) -> ApiError:
    return ApiError(413, "payload_too_large",
                    f"the upload is larger than the {limit_bytes // 2**20} MiB limit (TUNESERVE_MAX_UPLOAD_MB)")


class _Collector:
    def __init__(self, spool_dir: Path, limit: int, body_limit: int, max_files: int) -> None:
        self.form = ParsedForm()
        self.spool_dir = spool_dir
        self.limit = limit
        self.body_limit = body_limit
        self.max_files = max_files
        self.total = 0
        self.parts = 0
        self.field_bytes = 0
        self.header_bytes = 0
        self.in_part = False
        self.header_field = b""
        self.header_value = b""
        self.headers: dict[bytes, bytes] = {}
        self.name = ""
        self.filename: str | None = None
        self.value = bytearray()
        self.handle: BinaryIO | None = None
        self.path: Path | None = None
        self.size = 0

    def on_part_begin(self) -> None:
        self.headers, self.value, self.size, self.header_bytes = {}, bytearray(), 0, 0
        self.parts += 1
        self.in_part = True
        if self.parts > MAX_PARTS:
            raise ApiError(413, "too_many_parts", f"a form may have at most {MAX_PARTS} parts")

    def _header_bytes(self, count: int) -> None:
        self.header_bytes += count
        if self.header_bytes > MAX_HEADER_BYTES:
            raise ApiError(413, "field_too_large", f"a part's headers may be at most {MAX_HEADER_BYTES // 1024} KiB")

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_bytes(end - start)
        self.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_bytes(end - start)
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[self.header_field.lower()] = self.header_value
        self.header_field, self.header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        self.name = options.get(b"name", b"").decode("utf-8", "replace")
        raw_filename = options.get(b"filename")
        self.filename = None if raw_filename is None else raw_filename.decode("utf-8", "replace")
        if self.filename is not None:
            if len(self.form.files) >= self.max_files:  # refused before a byte of it is written
                raise ApiError(413, "too_many_files", f"send at most {self.max_files} files per request")
            fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=self.spool_dir)
            self.handle, self.path = os.fdopen(fd, "wb"), Path(tmp)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        self.size += len(chunk)
        self.total += len(chunk)
        if self.total > self.body_limit:
            raise too_large(self.body_limit)
        if self.handle is not None:
            if self.size > self.limit:
                raise too_large(self.limit)
            self.handle.write(chunk)
        else:
            self.field_bytes += len(chunk)
            if self.size > MAX_FIELD_BYTES:
                raise ApiError(413, "field_too_large", f"form field '{self.name[:64]}' is larger than 64 KiB")
            if self.field_bytes > MAX_FIELDS_BYTES:
                raise ApiError(413, "field_too_large", f"form fields may total at most {MAX_FIELDS_BYTES // 1024} KiB")
            self.value += chunk

    def on_part_end(self) -> None:
        self.in_part = False
        if self.handle is not None and self.path is not None:
            self.handle.close()
            self.form.files.append(SavedFile(self.name, os.path.basename(self.filename or ""), self.path, self.size))
            self.handle, self.path = None, None
        else:
            self.form.fields[self.name] = self.value.decode("utf-8", "replace")

    def abort(self) -> None:
        if self.handle is not None:
            self.handle.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        self.form.cleanup()


async def receive_form(request: Request, *, spool_dir: Path, limit_bytes: int,
                       body_limit_bytes: int | None = None, max_files: int = 1) -> ParsedForm:
    """Parse a multipart body chunk by chunk; files land in ``spool_dir``. 413 as soon as a file
    passes ``limit_bytes`` or all parts together pass ``body_limit_bytes`` (default: ``limit_bytes``),
    or at once when Content-Length already says so."""
    body_limit = body_limit_bytes or limit_bytes
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise ApiError(415, "unsupported_media_type", "send the upload as multipart/form-data with a 'file' part")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > body_limit + 1024 * 1024:
        raise too_large(body_limit)
    spool_dir.mkdir(parents=True, exist_ok=True)
    collector = _Collector(spool_dir, limit_bytes, body_limit, max_files)
    parser = MultipartParser(params[b"boundary"], {
        "on_part_begin": collector.on_part_begin, "on_part_data": collector.on_part_data,
        "on_part_end": collector.on_part_end, "on_header_field": collector.on_header_field,
        "on_header_value": collector.on_header_value, "on_header_end": collector.on_header_end,
        "on_headers_finished": collector.on_headers_finished,
    })
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
        if collector.in_part:
            raise ApiError(400, "incomplete_upload", "the multipart body ended before its closing boundary; "
                           "the upload was cut short: send it again")
    except FormParserError as exc:
        collector.abort()
        raise ApiError(400, "malformed_multipart", f"the multipart body could not be parsed: {exc}") from exc
    except BaseException:
        collector.abort()
        raise
    return collector.form
