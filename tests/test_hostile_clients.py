"""Clients that try to make one API process hold too much: large bodies before and after auth, uploads cut
short, forms with too many parts or files. Each gets a clear 4xx, the process's memory stays flat (peak
RSS read from /proc), nothing is left on disk, and the service keeps answering."""

import os
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from tests.helpers import files_under
from tests.processes import Service

KEY = "hostile-test-key"
MiB = 2**20


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


def settled_peak_rss_mb(service: Service) -> float:
    """The API's RSS once start-up work is done, with its peak reset to it: the inference thread imports
    torch in the background after start, which must not be counted against the attack that follows."""
    httpx.get(f"{service.url}/v1/jobs", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    httpx.get(f"{service.url}/v1/jobs", timeout=30)
    pid = service.processes[0].pid
    deadline = time.monotonic() + 120
    while "libtorch_cpu" not in Path(f"/proc/{pid}/maps").read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    last = -1.0
    while time.monotonic() < deadline:
        now = rss_mb(pid)
        if abs(now - last) < 2:
            break
        last = now
        time.sleep(2)
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak starts again from the current RSS
    return rss_mb(pid)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc status")


def raw_request(service: Service, head: str, body_chunks: list[bytes] | None = None, timeout: float = 20
                ) -> tuple[int, bytes]:
    """Send ``head`` (request line + headers) and then ``body_chunks`` as far as the server reads them;
    returns (status, response bytes). The server may answer and close before the body is sent."""
    url = urlparse(service.url)
    with socket.create_connection((url.hostname, url.port), timeout=timeout) as sock:
        sock.sendall(head.encode() + b"\r\n")
        try:
            for chunk in body_chunks or []:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = b""
        try:
            while b"\r\n\r\n" not in response or len(response) < response.index(b"\r\n\r\n") + 4 + 10:
                data = sock.recv(65536)
                if not data:
                    break
                response += data
        except (ConnectionResetError, TimeoutError):
            pass
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response[9:12]), response


@pytest.fixture
def service(migrated, start_service):
    stale = Path(migrated["TUNESERVE_DATA_DIR"]) / "tmp" / ".upload-left-by-a-crash"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"x" * 1000)
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    return start_service({**migrated, "TUNESERVE_API_KEYS": KEY}, workers=0)


def healthy(service: Service) -> bool:
    return httpx.get(f"{service.url}/healthz", timeout=5).status_code == 200


def test_a_stale_spooled_upload_is_swept_at_start(service: Service):
    assert files_under(Path(service.env["TUNESERVE_DATA_DIR"]) / "tmp") == []


def test_a_huge_body_without_a_key_is_refused_before_it_is_read(service: Service):
    api = service.processes[0].pid
    before = settled_peak_rss_mb(service)
    started = time.monotonic()
    status, response = raw_request(service, "POST /v1/jobs HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                                            f"content-length: {100 * MiB}\r\n", [b"[" + b"1," * (MiB // 2)] * 100)
    assert status == 401 and b'"missing_api_key"' in response
    assert time.monotonic() - started < 10
    assert peak_rss_mb(api) - before < 30
    assert healthy(service)


def test_a_huge_json_body_with_a_key_is_413_while_it_streams(service: Service):
    api = service.processes[0].pid
    before = settled_peak_rss_mb(service)
    declared, _ = raw_request(service, "POST /v1/jobs HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                                       f"authorization: Bearer {KEY}\r\ncontent-length: {100 * MiB}\r\n")
    assert declared == 413
    chunk = b"[" + b"1," * (MiB // 2)
    chunked = [f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"] * 100 + [b"0\r\n\r\n"]
    status, response = raw_request(service, "POST /v1/jobs HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                                            f"authorization: Bearer {KEY}\r\ntransfer-encoding: chunked\r\n", chunked)
    assert status == 413 and b'"payload_too_large"' in response
    assert peak_rss_mb(api) - before < 50
    assert healthy(service)


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "b0und", close: bool = True) -> bytes:
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return body + (f"--{boundary}--\r\n".encode() if close else b"")


def post_form(service: Service, path: str, body: bytes) -> tuple[int, bytes]:
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nauthorization: Bearer {KEY}\r\n"
            f"content-type: multipart/form-data; boundary=b0und\r\ncontent-length: {len(body)}\r\n")
    return raw_request(service, head, [body])


def test_an_upload_cut_short_is_400_and_leaves_no_file(service: Service):
    body = multipart([("file", "d.zip", b"PK\x03\x04" + b"\0" * MiB)], close=False)
    status, response = post_form(service, "/v1/datasets", body)
    assert status == 400 and b'"incomplete_upload"' in response
    data_dir = Path(service.env["TUNESERVE_DATA_DIR"])
    assert files_under(data_dir / "tmp") == [] and files_under(data_dir / "datasets") == []
    assert healthy(service)


@pytest.mark.parametrize(("path", "parts", "code"), [
    ("/v1/predict", [("file", f"{i}.jpg", b"\xff\xd8") for i in range(300)], "too_many_files"),
    ("/v1/datasets", [("file", "a.zip", b"PK"), ("file", "b.zip", b"PK")], "too_many_files"),
    ("/v1/predict", [(f"f{i}", None, b"x") for i in range(400)], "too_many_parts"),
    ("/v1/predict", [(f"f{i}", None, b"x" * 60_000) for i in range(10)], "field_too_large"),
])
def test_forms_with_too_many_parts_files_or_field_bytes_are_413(service: Service, path, parts, code):
    status, response = post_form(service, path, multipart(parts))
    assert status == 413 and f'"{code}"'.encode() in response, response[-300:]
    assert files_under(Path(service.env["TUNESERVE_DATA_DIR"]) / "tmp") == []
    assert healthy(service)


def test_every_answer_carries_security_headers_and_the_ui_a_content_policy(service: Service):
    page = httpx.get(f"{service.url}/", timeout=10)
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    for answer in (page, httpx.get(f"{service.url}/v1/jobs", timeout=10), httpx.get(f"{service.url}/healthz")):
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["x-frame-options"] == "DENY"
    assert httpx.get(f"{service.url}/openapi.json", timeout=10).status_code == 401
    assert httpx.get(f"{service.url}/metrics", timeout=10).status_code == 401
    assert httpx.get(f"{service.url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_error_bodies_name_no_server_paths():
    from shared.storage import redact_paths

    message = "[Errno 2] No such file or directory: '/srv/data/datasets/3f2c/upload'"
    assert redact_paths(message) == "[Errno 2] No such file or directory: '<path>'"
    assert redact_paths("cannot identify image file 'cats/001.jpg'") == "cannot identify image file 'cats/001.jpg'"
