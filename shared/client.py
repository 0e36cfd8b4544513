"""A typed Python client for a running tuneserve API; the CLI's client verbs are built on it.

    client = Client("http://127.0.0.1:8000", api_key="ts_...", project="default")
    dataset = client.wait_for_dataset(client.upload_dataset(Path("flowers/"))["id"])
    job = client.create_job(dataset["id"], {"epochs": 5})
    for event in client.job_events(job["id"]):
        ...

Every method returns the API's JSON body as a typed dict (``total=False``: a newer server may add fields), and
every refusal raises one ``ApiError(status, code, detail)``; a server that cannot be reached is status 0, code
``unreachable``. Events stream through ``httpx-sse``.
"""

import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, TypedDict

import httpx
from httpx_sse import connect_sse

DEFAULT_PROJECT = "default"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# What one predict request carries at most: well inside the server's caps (256 files per request, a
# per-request pixel budget, TUNESERVE_MAX_UPLOAD_MB), so folders of any size go through in several requests.
PREDICT_BATCH_FILES = 32
PREDICT_BATCH_BYTES = 32 * 2**20


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{detail} ({code})")
        self.status, self.code, self.detail = status, code, detail


class Page(TypedDict, total=False):
    data: list[Any]
    count: int


class Dataset(TypedDict, total=False):
    id: str
    project: str
    name: str
    status: str
    classes: list[str] | None
    class_counts: dict[str, int] | None
    num_images: int
    rejected: list[dict[str, str]]
    error: str | None
    error_code: str | None
    created_at: str


class Job(TypedDict, total=False):
    id: str
    project: str
    dataset_id: str
    status: str
    hyperparameters: dict[str, Any]
    progress: dict[str, Any]
    history: list[dict[str, Any]]
    metrics: dict[str, Any] | None
    model_id: str | None
    attempts: int
    error: str | None
    error_code: str | None
    created_at: str


class Model(TypedDict, total=False):
    id: str
    project: str
    job_id: str
    dataset_id: str
    base_model: str
    classes: list[str]
    image_size: int
    metrics: dict[str, Any]
    pinned: bool
    serving: bool
    temperature: float
    min_score: float
    class_min_scores: dict[str, float] | None
    created_at: str


class Score(TypedDict):
    label: str
    score: float


class Prediction(TypedDict, total=False):
    filename: str
    label: str | None
    top: list[Score]


class Predictions(TypedDict, total=False):
    model_id: str
    predictions: list[Prediction]


class Batch(TypedDict, total=False):
    id: str
    project: str
    status: str
    source: str
    dataset_id: str | None
    model_id: str
    top_k: int
    progress: dict[str, Any]
    error: str | None
    error_code: str | None
    created_at: str


class Webhook(TypedDict, total=False):
    id: str
    project: str
    url: str
    events: list[str]
    created_at: str


class JobEvent(NamedTuple):
    id: str
    event: str
    data: dict[str, Any]


@contextmanager
def archive_of(path: Path) -> Iterator[Path]:
    """The archive to send: the file itself, or a zip of the folder written to a temp dir."""
    if path.is_file():
        yield path
        return
    if not path.is_dir():
        raise ApiError(0, "not_found", f"{path} is neither a folder nor a .zip/.tar.gz archive")
    with tempfile.TemporaryDirectory(prefix="tuneserve-") as tmp:
        target = Path(tmp) / f"{path.resolve().name or 'images'}.zip"
        with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as archive:  # images are compressed
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                archive.write(file, file.relative_to(path).as_posix())
        yield target


def image_files(paths: Iterable[Path]) -> list[Path]:
    """Files as given, and the images under folders (recursively, by suffix, sorted)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise ApiError(0, "not_found", f"{path} is neither an image nor a folder")
    return found


def batches(files: list[Path], *, max_files: int, max_bytes: int) -> Iterator[list[Path]]:
    """Consecutive groups of ``files``, each at most ``max_files`` long and ``max_bytes`` big (a bigger file
    goes alone; the server says whether it takes it)."""
    group: list[Path] = []
    size = 0
    for file in files:
        length = file.stat().st_size
        if group and (len(group) >= max_files or size + length > max_bytes):
            yield group
            group, size = [], 0
        group.append(file)
        size += length
    if group:
        yield group


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, project: str = DEFAULT_PROJECT, *,
                 timeout: float = 60, transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.project = project
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, transport=transport,
                                 timeout=httpx.Timeout(timeout, read=max(timeout, 300)))

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(0, "unreachable", f"cannot reach {self.http.base_url}: {exc}") from exc
        _raise_for(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._send(method, path, **kwargs).json()

    def _project(self, project: str | None) -> str:
        return project or self.project

    # Datasets
    def upload_dataset(self, path: Path, *, name: str | None = None, project: str | None = None) -> Dataset:
        """Upload an archive, or a folder of class sub-folders (zipped on the way)."""
        with archive_of(path) as archive, archive.open("rb") as handle:
            # In the URL, not the form: the server knows the project (and its quota) before the body streams.
            return self._json("POST", "/v1/datasets", params={"project": self._project(project)},
                              files={"file": (archive.name, handle, "application/zip")},
                              data={"name": name} if name else {})

    def get_dataset(self, dataset_id: str) -> Dataset:
        return self._json("GET", f"/v1/datasets/{dataset_id}")

    def list_datasets(self, *, project: str | None = None, limit: int = 100, offset: int = 0) -> Page:
        return self._json("GET", "/v1/datasets", params={"project": self._project(project), "limit": limit,
                                                         "offset": offset})

    def delete_dataset(self, dataset_id: str) -> None:
        self._send("DELETE", f"/v1/datasets/{dataset_id}")

    def wait_for_dataset(self, dataset_id: str, *, poll_s: float = 0.5, timeout_s: float = 3600) -> Dataset:
        """The dataset once it is no longer processing."""
        return self._wait(lambda: self.get_dataset(dataset_id), lambda d: d["status"] != "processing", poll_s,
                          timeout_s, f"dataset {dataset_id}")

    # Jobs
    def create_job(self, dataset_id: str, hyperparameters: dict[str, Any] | None = None, *,
                   idempotency_key: str | None = None) -> Job:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json("POST", "/v1/jobs", headers=headers,
                          json={"dataset_id": dataset_id, "hyperparameters": hyperparameters or {}})

    def get_job(self, job_id: str) -> Job:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def list_jobs(self, *, project: str | None = None, status: str | None = None, limit: int = 100,
                  offset: int = 0) -> Page:
        params = {"project": self._project(project), "limit": limit, "offset": offset}
        return self._json("GET", "/v1/jobs", params=params | ({"status": status} if status else {}))

    def cancel_job(self, job_id: str) -> Job:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def delete_job(self, job_id: str) -> None:
        self._send("DELETE", f"/v1/jobs/{job_id}")

    def job_events(self, job_id: str, *, last_event_id: str | None = None) -> Iterator[JobEvent]:
        """The job's server-sent events (a snapshot first) until the server ends the stream at a final state."""
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        try:
            with connect_sse(self.http, "GET", f"/v1/jobs/{job_id}/events", headers=headers) as source:
                if source.response.status_code >= 400:
                    source.response.read()
                    _raise_for(source.response)
                for sse in source.iter_sse():
                    if sse.data:
                        yield JobEvent(sse.id, sse.event, sse.json())
        except httpx.TransportError as exc:  # refused, or dropped mid-stream: resume with the last event's id
            raise ApiError(0, "unreachable", f"lost the event stream of {self.http.base_url}: {exc}") from exc

    # Models
    def list_models(self, *, project: str | None = None, limit: int = 100, offset: int = 0) -> Page:
        return self._json("GET", "/v1/models", params={"project": self._project(project), "limit": limit,
                                                       "offset": offset})

    def get_model(self, model_id: str) -> Model:
        return self._json("GET", f"/v1/models/{model_id}")

    def promote_model(self, model_id: str) -> Model:
        return self._json("POST", f"/v1/models/{model_id}/promote")

    def set_thresholds(self, model_id: str, *, min_score: float | None = None,
                       class_min_scores: dict[str, float] | None = None) -> Model:
        body: dict[str, Any] = {} if min_score is None else {"min_score": min_score}
        return self._json("PATCH", f"/v1/models/{model_id}",
                          json=body | ({"class_min_scores": class_min_scores} if class_min_scores else {}))

    def export_model(self, model_id: str, destination: Path, *, format: str = "safetensors") -> Path:
        """Download the model's artifact to ``destination`` (a folder: named ``<id>.<suffix>`` inside it)."""
        return self._download(f"/v1/models/{model_id}/artifact", {"format": format}, destination,
                              f"{model_id}.{'pt' if format == 'torchscript' else format}")

    # Predictions
    def predict(self, files: list[Path], *, top_k: int | None = None, model_id: str | None = None,
                min_score: float | None = None, project: str | None = None) -> Predictions:
        """One request: ``files`` in order, top_k and min_score left to the server's defaults unless given."""
        data = {k: str(v) for k, v in (("top_k", top_k), ("model_id", model_id), ("min_score", min_score))
                if v is not None}
        upload = [("file", (p.name, p.read_bytes(), "application/octet-stream")) for p in files]
        return self._json("POST", f"/v1/projects/{self._project(project)}/predict", files=upload, data=data)

    def predict_paths(self, paths: Iterable[Path], *, max_files: int = PREDICT_BATCH_FILES,
                      max_bytes: int = PREDICT_BATCH_BYTES, **options: Any) -> Iterator[tuple[list[Path], Predictions]]:
        """Images and folders of images (recursively), as several requests within the per-request caps;
        yields (the files of one request, its answer)."""
        for group in batches(image_files(paths), max_files=max_files, max_bytes=max_bytes):
            yield group, self.predict(group, **options)

    # Batch predictions
    def create_batch(self, *, path: Path | None = None, dataset_id: str | None = None, top_k: int | None = None,
                     model_id: str | None = None, project: str | None = None) -> Batch:
        """A batch over an archive or folder of images (``path``), or over a dataset's images."""
        options = {k: v for k, v in (("top_k", top_k), ("model_id", model_id)) if v is not None}
        if path is None:
            return self._json("POST", "/v1/batch-predictions", params={"project": self._project(project)},
                              json={"dataset_id": dataset_id, **options})
        with archive_of(path) as archive, archive.open("rb") as handle:
            return self._json("POST", "/v1/batch-predictions", params={"project": self._project(project)},
                              files={"file": (archive.name, handle, "application/zip")},
                              data={k: str(v) for k, v in options.items()})

    def get_batch(self, batch_id: str) -> Batch:
        return self._json("GET", f"/v1/batch-predictions/{batch_id}")

    def list_batches(self, *, project: str | None = None, limit: int = 100, offset: int = 0) -> Page:
        return self._json("GET", "/v1/batch-predictions", params={"project": self._project(project), "limit": limit,
                                                                  "offset": offset})

    def cancel_batch(self, batch_id: str) -> Batch:
        return self._json("POST", f"/v1/batch-predictions/{batch_id}/cancel")

    def wait_for_batch(self, batch_id: str, *, poll_s: float = 0.5, timeout_s: float = 3600) -> Batch:
        return self._wait(lambda: self.get_batch(batch_id),
                          lambda b: b["status"] in ("succeeded", "failed", "cancelled"), poll_s, timeout_s,
                          f"batch {batch_id}")

    def batch_results(self, batch_id: str, destination: Path, *, format: str = "csv") -> Path:
        return self._download(f"/v1/batch-predictions/{batch_id}/results", {"format": format}, destination,
                              f"batch-{batch_id}.{format}")

    # Webhooks
    def create_webhook(self, url: str, secret: str, *, events: list[str] | None = None,
                       project: str | None = None) -> Webhook:
        body = {"url": url, "secret": secret} | ({"events": events} if events else {})
        return self._json("POST", "/v1/webhooks", params={"project": self._project(project)}, json=body)

    def list_webhooks(self, *, project: str | None = None, limit: int = 100, offset: int = 0) -> Page:
        return self._json("GET", "/v1/webhooks", params={"project": self._project(project), "limit": limit,
                                                         "offset": offset})

    def delete_webhook(self, hook_id: str) -> None:
        self._send("DELETE", f"/v1/webhooks/{hook_id}")

    def webhook_deliveries(self, hook_id: str, *, limit: int = 100, offset: int = 0) -> Page:
        return self._json("GET", f"/v1/webhooks/{hook_id}/deliveries", params={"limit": limit, "offset": offset})

    def _download(self, path: str, params: dict[str, str], destination: Path, name: str) -> Path:
        target = destination / name if destination.is_dir() else destination
        partial = target.with_name(target.name + ".part")
        try:
            with self.http.stream("GET", path, params=params) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for(response)
                with partial.open("wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
        except httpx.TransportError as exc:
            partial.unlink(missing_ok=True)
            raise ApiError(0, "unreachable", f"cannot reach {self.http.base_url}: {exc}") from exc
        partial.replace(target)
        return target

    @staticmethod
    def _wait(get: Any, done: Any, poll_s: float, timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while not done(body := get()):
            if time.monotonic() > deadline:
                raise ApiError(0, "timeout", f"{what} is still {body['status']} after {timeout_s:.0f}s")
            time.sleep(poll_s)
        return body


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ApiError(response.status_code, f"http_{response.status_code}", response.text[:300])
    raise ApiError(response.status_code, str(body.get("code", f"http_{response.status_code}")),
                   str(body.get("detail", response.text[:300])))
