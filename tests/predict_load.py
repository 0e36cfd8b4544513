"""Client threads that call /predict in a loop against a live service and keep every answer.

An exception in a client thread (a timeout, a refused connection, a body that is not JSON) is kept and
raised when the load stops: a test never passes because the thread that saw the failure died quietly.
"""

import threading
import time
from dataclasses import dataclass
from types import TracebackType

import httpx

from tests.processes import Service


@dataclass(frozen=True)
class Answer:
    path: str
    status: int
    model_id: str | None
    process: str | None  # the API process that answered (X-Tuneserve-Process)
    started: float  # time.monotonic() when the request was sent
    finished: float


class PredictLoad:
    """``with PredictLoad(service, paths, image) as load:`` one thread per entry of ``paths``, each POSTing
    ``image`` to its path until the block ends. ``fresh_connections`` opens a connection per request, so
    the kernel spreads the requests over every process that accepts on the port."""

    def __init__(self, service: Service, paths: list[str], image: bytes, *, fresh_connections: bool = False,
                 timeout: float = 60) -> None:
        self.service = service
        self.image = image
        self.answers: list[Answer] = []
        self.errors: list[BaseException] = []
        self._limits = httpx.Limits(max_keepalive_connections=0) if fresh_connections else httpx.Limits()
        self._timeout = timeout
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, args=(path,), name=f"client-{i}")
                         for i, path in enumerate(paths)]

    def _loop(self, path: str) -> None:
        try:
            with httpx.Client(base_url=self.service.url, timeout=self._timeout, limits=self._limits) as client:
                while not self._stop.is_set():
                    started = time.monotonic()
                    response = client.post(path, files={"file": ("image.jpg", self.image, "image/jpeg")})
                    answer = Answer(path=path, status=response.status_code, model_id=response.json().get("model_id"),
                                    process=response.headers.get("x-tuneserve-process"), started=started,
                                    finished=time.monotonic())
                    with self._lock:
                        self.answers.append(answer)
        except BaseException as exc:  # kept for the test to raise: see the module docstring
            with self._lock:
                self.errors.append(exc)

    def snapshot(self) -> list[Answer]:
        with self._lock:
            return list(self.answers)

    def count(self, *, model_id: str, path: str | None = None, process: str | None = None,
              after: float = 0.0) -> int:
        """Answers from ``model_id`` (for requests sent after ``after``), optionally of one path or process."""
        return sum(a.model_id == model_id and a.started > after and path in (None, a.path)
                   and process in (None, a.process) for a in self.snapshot())

    def __enter__(self) -> "PredictLoad":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self._timeout + 30)
        stuck = [t.name for t in self._threads if t.is_alive()]
        if kind is None:  # a failure inside the block is the one to report; these would hide it
            assert not stuck, f"client threads still running: {stuck}"
            if self.errors:
                raise AssertionError(f"{len(self.errors)} client thread(s) failed; the first: "
                                     f"{self.errors[0]!r}\n{self.service.logs()}") from self.errors[0]
