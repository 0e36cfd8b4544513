"""What ``fit`` does after every optimizer step: report progress now and then, and decide (with the other
ranks) whether to stop."""

import time
from typing import Any, Protocol

from shared.hyperparameters import Hyperparameters
from shared.jobstate import StopReason
from worker.training import ddp
from worker.training.auto import batch_size_of
from worker.training.checkpoint import CheckpointWriter

REPORT_SECONDS = 2.0


class Reporter(Protocol):
    def progress(self, progress: dict[str, Any]) -> None: ...

    def epoch_done(self, epoch: int, metrics: dict[str, Any]) -> None: ...

    def resumed_after(self, epoch: int, metrics: dict[str, Any]) -> None:
        """A resumed run starts after its checkpoint's ``epoch``. That epoch's report waited for the next training
        step, so a worker killed in between left it only in the checkpoint: record it unless it already is."""

    def stop_requested(self) -> bool: ...


class StepMonitor:
    """Called as ``on_step(step, steps, images_seen)`` by ``train_one_epoch``; True stops the epoch. Why it
    stopped stays in ``stopped``: a user's cancel (or a shutdown), or the run's time budget."""

    def __init__(self, *, hp: Hyperparameters, reporter: Reporter, writer: CheckpointWriter,
                 deadline: float | None) -> None:
        self.hp, self.reporter, self.writer, self.deadline = hp, reporter, writer, deadline
        self.stopped: StopReason | None = None
        self.epoch, self.epoch_start, self.last_report = 0, 0.0, 0.0

    def start_epoch(self, epoch: int) -> float:
        self.epoch, self.epoch_start = epoch, time.monotonic()
        return self.epoch_start

    def __call__(self, step: int, steps: int, seen: int) -> bool:
        now = time.monotonic()
        # While the last epoch's checkpoint is being written its report waits (``poll``), and so does progress.
        if self.writer.poll() and (now - self.last_report >= REPORT_SECONDS or step == steps):
            self.last_report = now
            self._progress(step, steps, seen, now)
        if self.reporter.stop_requested():
            self.stopped = "cancelled"
        elif self.deadline is not None and now >= self.deadline:
            self.stopped = "max_minutes"
        self.stopped = ddp.agree_stop(self.stopped, step, steps)
        return self.stopped is not None

    def _progress(self, step: int, steps: int, seen: int, now: float) -> None:
        hp, world = self.hp, ddp.world_size()
        rate = seen * world / max(now - self.epoch_start, 1e-9)
        left = ((steps - step) + (hp.epochs - self.epoch) * steps) * batch_size_of(hp) * world
        self.reporter.progress({"epoch": self.epoch, "epochs": hp.epochs, "step": step, "steps": steps,
                                "images_per_second": round(rate, 2), "eta_seconds": round(left / rate, 1)})
