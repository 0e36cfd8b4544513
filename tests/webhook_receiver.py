"""A webhook receiver on loopback for tests: checks each delivery's signature the way the README tells
users to, answers from a script of status codes, and counts the deliveries it accepted per event id."""

import hashlib
import hmac
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOLERANCE_SECONDS = 300


def verify(*, secret: str, signature: str, body: bytes, now: float | None = None) -> bool:
    """The README's receiver check: recompute HMAC-SHA256 over "<t>.<raw body>" and compare in constant
    time; refuse stale timestamps (replays)."""
    try:
        parts = dict(item.split("=", 1) for item in signature.split(","))
        timestamp = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs((now or time.time()) - timestamp) > TOLERANCE_SECONDS:
        return False
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts.get("v1", ""))


@dataclass
class Received:
    event_id: str
    signature: str
    body: bytes
    answered: int

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass
class Receiver:
    secret: str
    # Status codes to answer, in order; once used up, every request gets ``then``.
    script: list[int] = field(default_factory=list)
    then: int = 200
    requests: list[Received] = field(default_factory=list)
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self) -> int:
        with self.lock:
            return self.script.pop(0) if self.script else self.then

    def accepted(self) -> Counter:
        """Deliveries answered 2xx, per event id."""
        with self.lock:
            return Counter(r.event_id for r in self.requests if 200 <= r.answered < 300)

    def types(self) -> Counter:
        with self.lock:
            return Counter(r.payload["type"] for r in self.requests if 200 <= r.answered < 300)


@contextmanager
def receiving(secret: str, script: list[int] | None = None, then: int = 200) -> Iterator[Receiver]:
    receiver = Receiver(secret=secret, script=list(script or []), then=then)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            signature = self.headers.get("Tuneserve-Signature", "")
            # A bad signature is answered 401 whatever the script says: such a delivery never counts.
            status = receiver.answer() if verify(secret=receiver.secret, signature=signature, body=body) else 401
            with receiver.lock:
                receiver.requests.append(Received(event_id=self.headers.get("Tuneserve-Event-Id", ""),
                                                  signature=signature, body=body, answered=status))
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
