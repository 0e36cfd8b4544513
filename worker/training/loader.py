"""Batch assembly off the training thread: a producer thread gathers each batch from the cache into one of two
reusable host buffers (pinned on CUDA) and copies it to the device on a side stream, while the main thread runs
the model on the batch before. On a CPU the thread still overlaps the uint8 gather (memmap reads, page faults)
with the model's compute, which releases the GIL.

Training batches are all ``batch_size`` (static shapes for cudnn autotuning, torch.compile and CUDA graphs):
``batch_count`` decides how many there are, and the ragged last batch it keeps is padded with the first images
of the epoch's order (a few images are seen twice that epoch); the one it drops (under 8 images) is left out.
Each epoch draws a new order, so no image is left out every epoch. A split smaller than one batch is one batch of
its own size. Evaluation batches are never padded: the last is ragged.
"""

import queue
import threading
from collections.abc import Iterator
from types import TracebackType

import numpy as np
import torch

from worker.training.data import CachedDataset, batch_count

# How long the producer waits on a queue before looking at the stop flag again.
_POLL_SECONDS = 0.05


def plan_batches(order: np.ndarray, batch_size: int, *, pad: bool) -> list[np.ndarray]:
    """The index chunks an epoch trains (``pad``) or evaluates on, in ``order``."""
    count = len(order)
    if count == 0:
        return []
    chunks = [order[start:start + batch_size]
              for start in range(0, batch_count(count, batch_size, drop_last=pad) * batch_size, batch_size)]
    chunks = [chunk for chunk in chunks if len(chunk)]
    if pad and len(chunks) > 1 and len(chunks[-1]) < batch_size:
        chunks[-1] = np.concatenate([chunks[-1], order[:batch_size - len(chunks[-1])]])
    return chunks


class _Slot:
    """One reusable host buffer pair; on CUDA, the event of the last copy out of it."""

    def __init__(self, data: CachedDataset, batch_size: int, pin: bool) -> None:
        self.images = torch.empty((batch_size, *data.images.shape[1:]),
                                  dtype=torch.from_numpy(np.empty(0, data.images.dtype)).dtype, pin_memory=pin)
        self.labels = torch.empty(batch_size, dtype=torch.int64, pin_memory=pin)
        self.copied: torch.cuda.Event | None = None


class BatchProducer:
    """Iterate (images, labels) on ``device`` for ``chunks`` (see ``plan_batches``), assembled by a thread.

    Use it as a context manager: leaving the block (a break, an exception) stops and joins the thread. A batch
    stays valid until the next one is asked for; its host buffer is then refilled. An error in the thread is
    raised in the consumer at the batch it would have produced.
    """

    def __init__(self, data: CachedDataset, chunks: list[np.ndarray], *, device: torch.device) -> None:
        self.data, self.chunks, self.device = data, chunks, device
        self.cuda = device.type == "cuda"
        size = max((len(chunk) for chunk in chunks), default=0)
        self.slots = [_Slot(data, size, self.cuda) for _ in range(2 if chunks else 0)]
        self.free: queue.Queue[int] = queue.Queue()
        for index in range(len(self.slots)):
            self.free.put(index)
        # Capacity 2: both slots can be full while the consumer still holds neither.
        self.ready: queue.Queue[tuple[int, torch.Tensor, torch.Tensor, torch.cuda.Event | None] | BaseException
                                | None] = queue.Queue(maxsize=2)
        self.stop = threading.Event()
        self.stream = torch.cuda.Stream(device) if self.cuda else None  # type: ignore[no-untyped-call]
        self.thread = threading.Thread(target=self._produce, name="batch-producer", daemon=True)
        self.started = False

    def __enter__(self) -> "BatchProducer":
        self.thread.start()
        self.started = True
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.stop.set()
        if self.started:
            self.thread.join()

    def _put(self, item: tuple[int, torch.Tensor, torch.Tensor, torch.cuda.Event | None] | BaseException | None
             ) -> bool:
        while not self.stop.is_set():
            try:
                self.ready.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def _take_slot(self) -> int | None:
        while not self.stop.is_set():
            try:
                return self.free.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                continue
        return None

    def _produce(self) -> None:
        try:
            for chunk in self.chunks:
                index = self._take_slot()
                if index is None:
                    return
                slot = self.slots[index]
                if slot.copied is not None:
                    slot.copied.synchronize()  # the last copy out of this buffer has finished
                count = len(chunk)
                # Sorted reads are sequential on the memmap; labels are taken in the same order. "clip" (the
                # rows are in range) lets take write straight into the buffer instead of through a temporary.
                rows = np.sort(chunk)
                np.take(self.data.images, rows, axis=0, out=slot.images[:count].numpy(), mode="clip")
                np.take(self.data.labels, rows, out=slot.labels[:count].numpy(), mode="clip")
                images, labels, event = slot.images[:count], slot.labels[:count], None
                if self.stream is not None:
                    with torch.cuda.stream(self.stream):
                        images = images.to(self.device, non_blocking=True)
                        labels = labels.to(self.device, non_blocking=True)
                        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                        event.record(self.stream)
                    slot.copied = event
                if not self._put((index, images, labels, event)):
                    return
            self._put(None)
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(exc)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.started:
            raise RuntimeError("BatchProducer is iterated inside its with-block")
        held: int | None = None
        while True:
            if held is not None:
                self.free.put(held)  # the consumer is done with the previous batch
                held = None
            item = self.ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            held, images, labels, event = item
            if event is not None:
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(event)
                images.record_stream(stream)  # allocated on the side stream, used on this one
                labels.record_stream(stream)
            yield images, labels
