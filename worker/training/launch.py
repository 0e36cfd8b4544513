"""Data-parallel training over the GPUs of one host: ranks spawned from the job, DDP, NCCL (gloo on CPU).

The Celery task stays the parent: it keeps the lease heartbeat, forwards rank 0's progress and epochs to
the job row, turns a cancel or shutdown into a stop flag every rank sees, and publishes the model rank 0
leaves in the job directory. ``batch_size`` is per process, as in the torchvision references: each step
trains ``batch_size x gpus`` images, and the learning rate is not rescaled.

The helpers ``fit`` calls on every rank live below the loop, in ``ddp``.
"""

import os
import queue
import signal
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import start_processes

from shared.hyperparameters import Hyperparameters
from shared.modeling import build_model
from worker.training.checkpoint import load_checkpoint, save_checkpoint
from worker.training.data import load_cache
from worker.training.ddp import is_main
from worker.training.engine import FitResult, fit
from worker.training.features import uses_feature_cache
from worker.training.monitor import Reporter

RESULT = "result.pt"


class NotEnoughGpus(RuntimeError):
    code = "not_enough_gpus"


def process_count(hp: Hyperparameters, device: torch.device, *, allow_cpu: bool) -> int:
    """How many ranks ``hp.gpus`` means on this worker; raises NotEnoughGpus when the host has fewer."""
    if device.type == "cuda":
        available = torch.cuda.device_count()
        wanted = available if hp.gpus == "all" else hp.gpus
        if wanted > available:
            raise NotEnoughGpus(
                f"gpus={hp.gpus} asks for {wanted} GPUs but this worker's host has {available}; "
                f"send gpus={available} or \"all\", or run the job on a host with {wanted} GPUs")
    elif hp.gpus == "all":
        wanted = 1
    else:
        wanted = hp.gpus
        if wanted > 1 and not allow_cpu:
            raise NotEnoughGpus(
                f"gpus={wanted} asks for {wanted} GPUs but this worker trains on the CPU; send gpus=1, or run "
                "the job on a GPU worker (TUNESERVE_DDP_ON_CPU=1 runs CPU processes instead, for tests)")
    # A linear probe on cached features trains only the head: one process does that in seconds.
    return 1 if uses_feature_cache(hp) else max(1, wanted)


class RankReporter:
    """Rank 0 sends progress and epochs to the parent; every rank reads the parent's stop flag."""

    def __init__(self, events: Any, stop: Any) -> None:
        self.events, self.stop = events, stop

    def progress(self, progress: dict[str, Any]) -> None:
        if is_main():
            self.events.put(("progress", progress))

    def epoch_done(self, epoch: int, metrics: dict[str, Any]) -> None:
        if is_main():
            self.events.put(("epoch", epoch, metrics))

    def resumed_after(self, epoch: int, metrics: dict[str, Any]) -> None:
        if is_main():
            self.events.put(("resumed", epoch, metrics))

    def stop_requested(self) -> bool:
        return bool(self.stop.is_set())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank_main(rank_id: int, world: int, port: int, job: dict[str, Any], events: Any, stop: Any) -> None:
    # A SIGTERM to the worker's process group is the parent's to handle: it sets the stop flag and the job is
    # handed back from its last checkpoint. Should the parent die, torch sends the ranks SIGINT.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if job["device"] == "cuda":
        torch.cuda.set_device(rank_id)
        device, backend = torch.device("cuda", rank_id), "nccl"
    else:
        # The ranks share the host's cores rather than each starting one thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, rank=rank_id, world_size=world)
    try:
        work_dir = Path(job["work_dir"])
        result = fit(hp=Hyperparameters.model_validate(job["hp"]), data=load_cache(Path(job["cache_dir"])),
                     splits=job["splits"], device=device, work_dir=work_dir, weights_dir=job["weights_dir"],
                     reporter=RankReporter(events, stop), compile_model=job["compile_model"])
        if rank_id == 0:
            save_checkpoint(work_dir / RESULT, {
                "model": result.model.state_dict(), "history": result.history, "best_epoch": result.best_epoch,
                "stopped": result.stopped, "hp": result.hp.model_dump(), "val": result.val, "test": result.test,
                "calibration": result.calibration})
    finally:
        dist.destroy_process_group()


def _forward(events: Any, reporter: Any) -> None:
    while True:
        try:
            message = events.get_nowait()
        except queue.Empty:
            return
        if message[0] == "progress":
            reporter.progress(message[1])
        elif message[0] == "resumed":
            reporter.resumed_after(message[1], message[2])
        else:
            reporter.epoch_done(message[1], message[2])


def fit_distributed(
    *, world: int, hp: Hyperparameters, cache_dir: Path, classes: list[str], splits: np.ndarray,
    device: torch.device, work_dir: Path, weights_dir: Path | None, reporter: Reporter, compile_model: bool = False,
) -> FitResult:
    """``fit`` over ``world`` spawned ranks; returns rank 0's FitResult. A failed rank fails the job
    (its traceback in the exception) and the others are stopped."""
    context = mp.get_context("spawn")
    events, stop = context.Queue(), context.Event()
    (work_dir / RESULT).unlink(missing_ok=True)
    job = {"hp": hp.model_dump(), "cache_dir": str(cache_dir), "splits": splits, "device": device.type,
           "work_dir": str(work_dir), "weights_dir": weights_dir, "compile_model": compile_model}
    ranks = start_processes(_rank_main, args=(world, _free_port(), job, events, stop), nprocs=world,
                               join=False, start_method="spawn")
    while not ranks.join(timeout=0.5):
        _forward(events, reporter)
        if reporter.stop_requested():
            stop.set()
    _forward(events, reporter)
    state = load_checkpoint(work_dir / RESULT)
    if state is None:
        raise RuntimeError(f"rank 0 exited without writing {work_dir / RESULT}")
    model = build_model(base_model=hp.base_model, num_classes=len(classes), head=hp.head, dropout=hp.dropout)
    model.load_state_dict(state["model"])
    return FitResult(model=model, history=state["history"], best_epoch=state["best_epoch"], stopped=state["stopped"],
                     hp=Hyperparameters.model_validate(state["hp"]), val=state["val"], test=state["test"],
                     calibration=state.get("calibration", {}))
