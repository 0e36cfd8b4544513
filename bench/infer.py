"""Raw model inference, no HTTP: images/s of one forward pass over a fixed batch, naive vs ours.

  naive: fp32, NCHW, eager;  ours: autocast (bf16 on GPUs, where the CPU has fast bf16), channels_last,
  eager and torch.compile'd. Random weights and inputs: the cost of a forward pass does not depend on them.

    python bench/infer.py                                     # resnet50, 64 px, batch 32, CPU
    python bench/infer.py --device cuda --image-size 224 --batch-size 256 --json out.json
    python bench/infer.py --only compiled --step compile     # bench/gpu.sh: the compiled row is its own step
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, cast

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_report import emit  # noqa: E402
from shared.hyperparameters import Hyperparameters  # noqa: E402
from shared.modeling import build_model  # noqa: E402
from worker.training.optim import amp_dtype  # noqa: E402


def images_per_second(model: torch.nn.Module, batch: torch.Tensor, *, dtype: torch.dtype | None, seconds: float,
                      warmup: int) -> float:
    device = batch.device

    def step() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                    enabled=dtype is not None):
            model(batch)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        done += 1
        if device.type == "cuda":
            torch.cuda.synchronize()  # per batch: a server answers each batch before the next
    return done * batch.shape[0] / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="resnet50")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per row")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--only", default="naive,eager,compiled", help="rows to run, of naive, eager, compiled")
    parser.add_argument("--step", default="", help="bench/gpu.sh step name: record each row under it")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    device = torch.device(args.device)
    model = build_model(base_model=args.base_model, num_classes=10, head="mlp", dropout=0.0).eval().to(device)
    batch = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    dtype = amp_dtype(Hyperparameters(), device)
    only = set(args.only.split(",")) - ({"compiled"} if args.no_compile else set())
    rows: dict[str, float] = {}
    target = {"target": 10000} if device.type == "cuda" and args.image_size == 224 and args.batch_size == 256 else {}

    def add(label: str, rate: float, **extra: Any) -> None:
        rows[label] = rate
        if args.step:
            emit(args.step, f"raw inference {label}, batch {args.batch_size}", rate, **extra)

    if "naive" in only:
        add("naive: fp32, NCHW, eager", images_per_second(model, batch, dtype=None, seconds=args.seconds, warmup=3))
    fast = model.to(memory_format=torch.channels_last)
    fast_batch = batch.contiguous(memory_format=torch.channels_last)
    if "eager" in only:
        add(f"ours: {dtype}, channels_last, eager", images_per_second(fast, fast_batch, dtype=dtype,
                                                                      seconds=args.seconds, warmup=3), **target)
    if "compiled" in only:
        started = time.perf_counter()
        compiled = cast(torch.nn.Module, torch.compile(fast))
        rate = images_per_second(compiled, fast_batch, dtype=dtype, seconds=args.seconds, warmup=3)
        add(f"ours: {dtype}, channels_last, compiled", rate, wall=round(time.perf_counter() - started, 1), **target)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"\n{args.base_model}, batch {args.batch_size}, {args.image_size} px, {name}\n")
    print(f"| {'raw inference':<44} | img/s | vs naive |\n|{'-' * 46}|-------|----------|")
    base = rows.get("naive: fp32, NCHW, eager") or next(iter(rows.values()))
    for label, rate in rows.items():
        print(f"| {label:<44} | {rate:5.0f} | {rate / base:7.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "base_model": args.base_model, "batch_size": args.batch_size,
                                         "image_size": args.image_size, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
