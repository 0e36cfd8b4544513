"""Checkpoint files, and a writer that keeps their serialisation and disk writes off the training loop.

Every file is written to a temporary name and renamed (``atomic_path``), so ``checkpoint.pt`` is always the
newest *complete* checkpoint: a process killed mid-write leaves the previous one, and resume finds it.
"""

import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from shared.storage import atomic_path


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state


def host_copy(value: Any) -> Any:
    """``value`` with every tensor copied to CPU memory: a snapshot the next optimiser step cannot change (on a
    CPU run ``.cpu()`` would return the live tensor itself, hence the explicit copy)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: host_copy(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(host_copy(item) for item in value)
    return value


class CheckpointWriter:
    """Writes checkpoints on a background thread, one batch of files in flight at a time.

    ``submit`` snapshots the states to CPU on the caller's thread (so training can go on changing the model),
    waits for the previous write to finish, then writes the files in the order given. ``then`` runs on the
    caller's thread once the files are on disk, from ``poll`` or ``wait``: an epoch is reported only when its
    checkpoint is there to resume from. An error in a write is raised by the next ``submit``, ``poll`` or ``wait``
    (leaving the with-block waits), so it is never lost; leaving the block because of another error still waits
    for the write in flight (a half-written temporary is never renamed) but runs no ``then``.
    """

    def __init__(self, may_write: Callable[[], bool] | None = None) -> None:
        # Asked on the writer thread just before a batch of files is written (after the wait for the one before):
        # False skips the batch, as a worker that lost its job must write nothing.
        self._may_write = may_write
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._then: Callable[[], None] | None = None

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if error is None:
            self.wait()
        else:
            self._join()  # the error already leaving the block is the one to report

    def submit(self, files: list[tuple[Path, dict[str, Any]]], then: Callable[[], None] | None = None) -> None:
        snapshot = [(path, host_copy(state)) for path, state in files]
        self.wait()
        self._then = then
        self._thread = threading.Thread(target=self._write, args=(snapshot,), name="checkpoint-writer",
                                        daemon=True)
        self._thread.start()

    def poll(self) -> bool:
        """True when no write is in flight (finishing one here: its error raised, its ``then`` run); never blocks."""
        if self._thread is not None and self._thread.is_alive():
            return False
        self.wait()
        return True

    def wait(self) -> None:
        """Block until the write in flight is on disk; raise its error if it failed, else run its ``then``."""
        self._join()
        error, self._error = self._error, None
        then, self._then = self._then, None
        if error is not None:
            raise error
        if then is not None:
            then()

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _write(self, files: list[tuple[Path, dict[str, Any]]]) -> None:
        if self._may_write is not None and not self._may_write():
            return
        try:
            for path, state in files:
                save_checkpoint(path, state)
        except BaseException as exc:  # raised on the training thread by the next submit or wait
            self._error = exc
