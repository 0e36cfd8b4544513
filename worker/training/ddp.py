"""DistributedDataParallel helpers that the training loop calls: rank, shards, the wrapped model, collective
stop decisions and totals. Each is an identity in a single process, so ``gpus=1`` runs exactly the path it
always did. The launcher that spawns the ranks (``launch``) sits above the loop and imports it, never the
other way round.
"""

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from shared.jobstate import StopReason

# Ranks agree on stopping every this many steps (one tiny all-reduce), not every step: no per-step sync.
STOP_CHECK_STEPS = 8
STOP_CODES: tuple[StopReason | None, ...] = (None, "max_minutes", "cancelled")  # the highest code wins


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def shard_size(count: int) -> int:
    return count // world_size() if active() else count


def shard(indices: np.ndarray, *, seed: int | None = None) -> np.ndarray:
    """This rank's disjoint share of ``indices``; with ``seed``, of one permutation every rank draws alike.
    Every rank gets the same count (the remainder is left out), so all take the same number of steps."""
    if not active():
        return indices
    if seed is not None:
        indices = indices[torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed)).numpy()]
    return indices[:shard_size(len(indices)) * world_size()][rank()::world_size()]


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    if not active():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def agree_stop(stopped: StopReason | None, step: int, steps: int) -> StopReason | None:
    """One stop decision for all ranks (a rank that leaves the loop alone hangs the others' all-reduce)."""
    if not active():
        return stopped
    if step % STOP_CHECK_STEPS and step != steps:
        return None
    flag = torch.tensor([STOP_CODES.index(stopped)], device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return STOP_CODES[int(flag.item())]


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank, so validation scores the same model everywhere."""
    if not active():
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def epoch_totals(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Loss sum, correct count and images summed over ranks."""
    if not active():
        return loss_sum, correct, seen
    totals = torch.stack([loss_sum.float(), correct.float(), torch.tensor(float(seen), device=loss_sum.device)])
    totals = totals.to(_collective_device())
    dist.all_reduce(totals)
    return totals[0], totals[1], int(totals[2].item())


def gather(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's share of an evaluation, joined on every rank (identical arrays, identical decisions)."""
    if not active():
        return probs, labels
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, (probs, labels))
    return np.concatenate([p for p, _ in parts]), np.concatenate([lab for _, lab in parts])
