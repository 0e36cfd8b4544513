"""Loads trained models and runs inference for /predict. With ``api.images``, the only API module that
imports torch (lazily, never at import time).

Requests decode and crop their images in the request threadpool (``api.images.prepare_images``); one inference
thread (``Batcher``) owns every forward pass and gathers the work of concurrent requests into one batch.
"""

import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request

from api.errors import ApiError
from api.observability import observe_predict_batch
from shared.config import Settings
from shared.storage import model_dir, redact_paths

log = logging.getLogger(__name__)

# Inference shares the API's cores with request handling; OpenMP workers that spin between forward
# passes starve the request threads (bench/predict.py, 2 cores, c=64: 47 vs 26 img/s in one noisy run).
# Takes effect because torch is first imported after this module (lazily, by the predictor).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# How long the serving model id read from the database is trusted; a newer model shows up within this.
SERVING_REFRESH_S = 0.5
# A model whose background load failed is not retried on every request, only after this long.
RETRY_FAILED_LOAD_S = 30.0


@dataclass
class LoadedModel:
    model_id: str
    model: Any  # torch.nn.Module; typed loosely so this module imports without torch
    meta: dict[str, Any]
    device: Any

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def temperature(self) -> float:
        """Fitted on the validation split at the end of training; models trained before that have none (1)."""
        return float(self.meta.get("temperature", 1.0))

    def forward(self, batch: Any, *, chunk: int) -> Any:
        """Calibrated softmax probabilities (CPU float, N x classes) for a uint8 NCHW batch of eval crops.

        ``eval_transform`` is ``normalize_batch(eval_uint8(image))``: requests ran ``eval_uint8``, this
        runs ``normalize_batch`` on the device, so uint8 (4x fewer bytes) is what crosses to the GPU.
        """
        import torch

        from shared.modeling.transforms import normalize_batch

        cuda = self.device.type == "cuda"
        if cuda:
            batch = batch.pin_memory()
        outputs = []
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            for part in batch.split(chunk):
                x = normalize_batch(part.to(self.device, non_blocking=True), tuple(self.meta["mean"]),
                                    tuple(self.meta["std"]))
                logits = self.model(x.contiguous(memory_format=torch.channels_last))
                outputs.append(torch.softmax(logits.float() / self.temperature, dim=1))
        return torch.cat(outputs).cpu()


def load_model(directory: Path, model_id: str, device: Any) -> LoadedModel:
    import torch

    from shared.modeling import load_model_artifact

    model, meta = load_model_artifact(directory=directory, device=device)
    model = model.to(memory_format=torch.channels_last)
    loaded = LoadedModel(model_id=model_id, model=model, meta=meta, device=device)
    # One pass now so the first request after a swap does not pay for kernel selection.
    loaded.forward(torch.zeros(1, 3, loaded.image_size, loaded.image_size, dtype=torch.uint8), chunk=1)
    return loaded


@dataclass
class _Work:
    model: LoadedModel
    inputs: Any  # uint8 N x 3 x S x S
    future: Future[Any]


class Ticket:
    """An announced request; its ``submit`` also ends the announcement, in the same step."""

    def __init__(self, batcher: "Batcher") -> None:
        self.batcher = batcher
        self.submitted = False

    def submit(self, model: LoadedModel, inputs: Any) -> Future[Any]:
        self.submitted = True
        return self.batcher.submit(model, inputs, announced=True)


class Batcher:
    """The inference thread. Work for one model that is queued together runs as one forward pass.

    It only waits (up to ``max_wait_s``) for more work when the batch is not full and requests are
    still on their way (``expecting``), so a lone request never waits.
    """

    def __init__(self, *, max_batch: int, max_wait_s: float, max_pending: int = 1024) -> None:
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.max_wait_s = max_wait_s
        self.largest_batch = 0
        self._cond = threading.Condition()
        self._queue: deque[_Work] = deque()
        self._expected = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._thread.start()

    @contextmanager
    def expecting(self) -> Iterator["Ticket"]:
        """Announce a request that will submit work soon (it is still uploading or decoding); while any
        is announced, a batch that is not full waits for it (up to max_wait)."""
        ticket = Ticket(self)
        with self._cond:
            if self._expected + len(self._queue) >= self.max_pending:
                raise ApiError(503, "overloaded", f"{self.max_pending} prediction requests are already in flight "
                               "(TUNESERVE_PREDICT_MAX_PENDING); retry in a moment", headers={"Retry-After": "1"})
            self._expected += 1
        try:
            yield ticket
        finally:
            if not ticket.submitted:
                with self._cond:
                    self._expected -= 1
                    self._cond.notify()

    def submit(self, model: LoadedModel, inputs: Any, *, announced: bool = False) -> Future[Any]:
        future: Future[Any] = Future()
        with self._cond:
            if announced:
                self._expected -= 1
            if self._closed:
                raise ApiError(503, "shutting_down", "the server is shutting down; retry on another instance")
            self._queue.append(_Work(model, inputs, future))
            self._cond.notify()
        return future

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def _take(self, model: LoadedModel, batch: list[_Work], size: int) -> int:
        """Move queued work for ``model`` that still fits into ``batch``; the rest keeps its place."""
        keep: deque[_Work] = deque()
        while self._queue:
            work = self._queue.popleft()
            if work.model is model and size + len(work.inputs) <= self.max_batch:
                if work.future.set_running_or_notify_cancel():
                    batch.append(work)
                    size += len(work.inputs)
            else:
                keep.append(work)
        self._queue = keep
        return size

    def _next_batch(self) -> list[_Work] | None:
        with self._cond:
            while True:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return None
                head = self._queue.popleft()
                if head.future.set_running_or_notify_cancel():
                    break
            batch, size = [head], len(head.inputs)
            deadline = time.monotonic() + self.max_wait_s
            while size < self.max_batch:
                size = self._take(head.model, batch, size)
                remaining = deadline - time.monotonic()
                if size >= self.max_batch or self._expected == 0 or remaining <= 0:
                    break
                self._cond.wait(remaining)
            return batch

    def _run(self) -> None:
        import torch

        while (batch := self._next_batch()) is not None:
            started = time.perf_counter()
            try:
                inputs = batch[0].inputs if len(batch) == 1 else torch.cat([w.inputs for w in batch])
                probs = batch[0].model.forward(inputs, chunk=self.max_batch)
            except Exception as exc:  # the thread must outlive any one bad batch
                log.exception("inference failed for a batch of %d requests", len(batch))
                for work in batch:
                    work.future.set_exception(exc)
                continue
            observe_predict_batch(size=len(inputs), seconds=time.perf_counter() - started)
            self.largest_batch = max(self.largest_batch, len(inputs))
            for work, rows in zip(batch, probs.split([len(w.inputs) for w in batch]), strict=True):
                work.future.set_result(rows)


class Predictor:
    """Loaded models (a bounded LRU) plus the inference thread. Each project has its own serving model;
    while a newer one loads in the background, that project's requests keep being served by the current
    one, and the swap is one reference assignment."""

    def __init__(self, settings: Settings, capacity: int | None = None) -> None:
        self.settings = settings
        self.capacity = capacity or settings.predict_max_models
        self.batcher = Batcher(max_batch=settings.predict_max_batch, max_wait_s=settings.predict_max_wait_ms / 1000,
                               max_pending=settings.predict_max_pending)
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Event] = {}
        self._swapping: set[str] = set()
        self._failed: dict[str, float] = {}
        self._serving_ids: dict[str, tuple[float, str | None]] = {}
        self.active: dict[str, str] = {}  # project -> the model its requests are served by now

    def close(self) -> None:
        self.batcher.close()

    def _device(self) -> Any:
        import torch

        want = self.settings.device
        return torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")

    def serving_id(self, project: str, lookup: Callable[[], str | None]) -> str | None:
        """The id ``project`` should serve, read through ``lookup`` at most every SERVING_REFRESH_S."""
        cached = self._serving_ids.get(project)
        now = time.monotonic()
        if cached is not None and now - cached[0] < SERVING_REFRESH_S:
            return cached[1]
        try:
            value = lookup()
        except Exception:
            if cached is None or cached[1] is None:
                raise
            log.warning("could not read the serving model id of %s; still serving %s", project, cached[1],
                        exc_info=True)
            return cached[1]
        if len(self._serving_ids) > 10_000:  # projects come and go; the cache must not grow forever
            self._serving_ids.clear()
        self._serving_ids[project] = (now, value)
        return value

    def forget_serving_id(self, project: str) -> None:
        """Promote/unpin/delete in this process take effect on the project's next request."""
        self._serving_ids.pop(project, None)

    def evict(self, model_id: str) -> None:
        with self._lock:
            self._models.pop(model_id, None)
            for project in [p for p, m in self.active.items() if m == model_id]:
                del self.active[project]

    def _make_room(self, keep: str) -> None:
        """Drop least recently used models past capacity: models no project serves first, then the
        serving models of the projects used least recently. Holds ``self._lock``."""
        while len(self._models) > self.capacity:
            serving = set(self.active.values())
            victim = next((k for k in self._models if k != keep and k not in serving), None)
            victim = victim or next((k for k in self._models if k != keep), None)
            if victim is None:
                return
            del self._models[victim]
            for project in [p for p, m in self.active.items() if m == victim]:
                del self.active[project]

    def get(self, model_id: str) -> LoadedModel:
        """The loaded model, loading it now if needed (blocking)."""
        with self._lock:
            if model_id in self._models:
                self._models.move_to_end(model_id)
                return self._models[model_id]
            event = self._loading.get(model_id)
            owner = event is None
            if owner:
                event = self._loading[model_id] = threading.Event()
        assert event is not None  # ours, or the loader's we wait for
        if not owner:
            event.wait()
            with self._lock:
                if model_id in self._models:
                    return self._models[model_id]
            raise ApiError(503, "model_unavailable", f"model {model_id} could not be loaded; see the server log")
        try:
            loaded = load_model(model_dir(self.settings, model_id), model_id, self._device())
        except FileNotFoundError as exc:
            raise ApiError(503, "model_unavailable", f"model {model_id}'s files are missing") from exc
        except Exception as exc:
            log.exception("loading model %s failed", model_id)
            raise ApiError(503, "model_unavailable", f"model {model_id} could not be loaded: "
                           f"{type(exc).__name__}: {redact_paths(str(exc))}") from exc
        else:
            with self._lock:
                self._models[model_id] = loaded
                self._make_room(keep=model_id)
        finally:
            with self._lock:
                self._loading.pop(model_id, None)
            event.set()
        return loaded

    def serving(self, project: str, wanted: str) -> LoadedModel:
        """The model to serve for ``project`` when ``wanted`` is its newest/pinned one: swap in only once
        it is loaded."""
        with self._lock:
            ready = wanted in self._models
            current_id = self.active.get(project)
            active = self._models.get(current_id) if current_id else None
            if active is not None and current_id is not None:
                self._models.move_to_end(current_id)
            start = not ready and active is not None and wanted not in self._swapping and (
                time.monotonic() - self._failed.get(wanted, -RETRY_FAILED_LOAD_S) >= RETRY_FAILED_LOAD_S)
            if start:
                self._swapping.add(wanted)
        if ready or active is None:
            loaded = self.get(wanted)
            self.active[project] = wanted
            return loaded
        if start:
            threading.Thread(target=self._swap_in, args=(project, wanted), daemon=True,
                             name=f"load-{wanted}").start()
        return active

    def _swap_in(self, project: str, model_id: str) -> None:
        try:
            self.get(model_id)
        except Exception:
            self._failed[model_id] = time.monotonic()
            log.exception("background load of model %s failed; %s still serves %s", model_id, project,
                          self.active.get(project))
        else:
            self.active[project] = model_id
            log.info("project %s now serves model %s", project, model_id)
        finally:
            with self._lock:
                self._swapping.discard(model_id)


def get_predictor(request: Request) -> Predictor:
    predictor: Predictor = request.app.state.predictor
    return predictor


PredictorDep = Annotated[Predictor, Depends(get_predictor)]
