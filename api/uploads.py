"""Multipart uploads streamed straight to disk, with the size limit enforced while bytes arrive."""

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from api.errors import ApiError

MAX_FIELD_BYTES = 64 * 1024


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


def too_large(limit_bytes: int) -> ApiError:
    return ApiError(413, "payload_too_large",
                    f"the upload is larger than the {limit_bytes // 2**20} MiB limit (TUNESERVE_MAX_UPLOAD_MB)")


class _Collector:
    def __init__(self, spool_dir: Path, limit: int, body_limit: int) -> None:
        self.form = ParsedForm()
        self.spool_dir = spool_dir
        self.limit = limit
        self.body_limit = body_limit
        self.total = 0
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
        self.headers, self.value, self.size = {}, bytearray(), 0

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
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
            if self.size > MAX_FIELD_BYTES:
                raise ApiError(413, "field_too_large", f"form field '{self.name}' is larger than 64 KiB")
            self.value += chunk

    def on_part_end(self) -> None:
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
                       body_limit_bytes: int | None = None) -> ParsedForm:
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
    collector = _Collector(spool_dir, limit_bytes, body_limit)
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
    except FormParserError as exc:
        collector.abort()
        raise ApiError(400, "malformed_multipart", f"the multipart body could not be parsed: {exc}") from exc
    except BaseException:
        collector.abort()
        raise
    return collector.form
