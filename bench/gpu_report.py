"""bench/gpu.sh's record: every measured row goes to stdout and into $GPU_JSON the moment it is measured, so a
step killed by its time limit (or a run cut short) keeps what it had measured. gpu.json holds the versions,
nvidia-smi's output, the package check, each step's status against its limit and estimate, and the rows.

    GPU_JSON=out/gpu.json python bench/gpu_report.py init      # versions, nvidia-smi, packages (gpu.sh does it)
    GPU_JSON=out/gpu.json python bench/gpu_report.py step train ok 81 110 75
    GPU_JSON=out/gpu.json python bench/gpu_report.py table     # the summary table
Bench scripts call ``emit(step, measure, value)``; without GPU_JSON it only prints.
"""

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def _path() -> Path | None:
    value = os.environ.get("GPU_JSON")
    return Path(value) if value else None


def load() -> dict[str, Any]:
    path = _path()
    if path is None or not path.is_file():
        return {"rows": [], "steps": {}}
    return json.loads(path.read_text())


def save(doc: dict[str, Any]) -> None:
    path = _path()
    if path is None:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(path)  # atomic: a kill mid-write leaves the previous whole file


def emit(step: str, measure: str, value: float, unit: str = "images/s", **extra: Any) -> None:
    """One measured row: printed and recorded at once. ``target=`` marks a headline row with issue 17's goal."""
    print(f"ROW | {step:<8} | {measure:<58} | {value:10.1f} {unit}", flush=True)
    if _path() is None:
        return
    doc = load()
    doc.setdefault("rows", []).append({"step": step, "measure": measure, "value": round(float(value), 3),
                                       "unit": unit, "at": time.strftime("%H:%M:%S"), **extra})
    save(doc)


def _run(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable: {exc}"


def init() -> None:
    import importlib.metadata as metadata
    import tomllib

    from pip._vendor.packaging.requirements import Requirement

    doc = load()
    packages: dict[str, Any] = {}
    for text in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(text)
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            version = None
        packages[req.name] = {"wants": str(req.specifier), "has": version,
                              "ok": version is not None and req.specifier.contains(version, prereleases=True)}
    versions: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable,
                                "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        import torch
        import torchvision

        versions.update(torch=torch.__version__, torchvision=torchvision.__version__, cuda=torch.version.cuda,
                        cudnn=torch.backends.cudnn.version(), cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            versions.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                            capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)
    except Exception as exc:  # recorded, not fatal: the import check says what breaks
        versions["torch_error"] = repr(exc)
    commit = _run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    doc.update(started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), commit=commit or None, versions=versions,
               packages=packages, nvidia_smi=_run(["nvidia-smi"]) or None,
               config={k: v for k, v in os.environ.items() if k in _CONFIG})
    doc.setdefault("rows", [])
    doc.setdefault("steps", {})
    save(doc)
    bad = {name: p for name, p in packages.items() if not p["ok"] and name not in ("torch", "torchvision")}
    print(f"python {versions['python']}, torch {versions.get('torch')}, torchvision {versions.get('torchvision')}, "
          f"cuda {versions.get('cuda')}, {versions.get('gpu', 'no GPU')}; packages off pyproject's bounds: "
          + (", ".join(f"{n} {p['has']} (wants {p['wants']})" for n, p in bad.items()) or "none")
          + "".join(f"; {n} {p['has']} is not our pin {p['wants']} (the image's own: expected)"
                    for n, p in packages.items() if n in ("torch", "torchvision") and not p["ok"]))


_CONFIG = {"DEVICE", "STEPS", "GPU_BENCH_IMAGES", "JPEG_SIZE", "IMAGE_SIZE", "BATCH", "EPOCHS", "BASE_MODEL",
           "NAIVE_WORKERS", "CONCURRENCY", "PREDICT_SECONDS", "INFER_SECONDS", "TOTAL_LIMIT", "DRY_RUN"}


def step(name: str, status: str, seconds: str, limit: str, estimate: str) -> None:
    doc = load()
    doc.setdefault("steps", {})[name] = {"status": status, "seconds": int(seconds), "limit": int(limit),
                                         "estimate": int(estimate)}
    save(doc)


def table() -> None:
    doc = load()
    print(f"\n| {'step':<8} | {'measure':<58} | {'value':>10} | unit      | target |")
    print(f"|{'-' * 10}|{'-' * 60}|{'-' * 12}|-----------|--------|")
    for row in doc.get("rows", []):
        target = row.get("target", "")  # issue 17's H200 targets (224 px, bf16), on the rows they apply to
        print(f"| {row['step']:<8} | {row['measure']:<58} | {row['value']:10.1f} | {row['unit']:<9} | {target:>6} |")
    print("\n| step     | status  | seconds | limit | estimate |\n|----------|---------|---------|-------|----------|")
    for name, s in doc.get("steps", {}).items():
        print(f"| {name:<8} | {s['status']:<7} | {s['seconds']:7d} | {s['limit']:5d} | {s['estimate']:8d} |")
    versions = doc.get("versions", {})
    print(f"\n{versions.get('gpu', 'cpu')}; torch {versions.get('torch')}, python {versions.get('python')}; "
          f"JSON: {_path()}")


if __name__ == "__main__":
    command, *rest = sys.argv[1:] or ["table"]
    commands: dict[str, Callable[..., None]] = {"init": init, "step": step, "table": table}
    commands[command](*rest)
