#!/usr/bin/env bash
# One call on the GPU machine (<= 8 minutes): ingestion, training and inference throughput at 224 px.
#
#   1. ingest (bench/gpu_ingest.py): generates GPU_BENCH_IMAGES JPEGs (JPEG_SIZE px) as a zip upload on every
#      core and runs the worker's real ingestion on it (embedded SQLite), images/s;
#   2. train (bench/train.py): 224 px, batch 256 (naive recipe: batch 32), EPOCHS epochs: the naive recipe loop,
#      ours eager, ours torch.compile'd (rate of the epochs after the compiling one);
#   3. raw inference (bench/infer.py): one forward pass at batch 256, fp32 eager vs bf16 channels_last
#      eager and compiled;
#   4. /predict over HTTP (bench/predict.py) at concurrency 64, micro-batching on vs off.
# Prints each table, then a summary, and writes JSON (and logs) to $OUT (./gpu-out when unset).
#
#   bash bench/gpu.sh                                          # the GPU run: cuda, 20,000 images
#   DEVICE=cpu GPU_BENCH_IMAGES=200 IMAGE_SIZE=64 BATCH=16 JPEG_SIZE=72 PREDICT_SECONDS=2 \
#     INFER_SECONDS=1 BASE_MODEL=resnet18 bash bench/gpu.sh   # a dry run of every step on a CPU
#
# Packages: the GPU machine has torch and torchvision but no network. The script checks every runtime
# dependency of pyproject.toml (plus httpx for the client) first and stops, naming what is missing.
# Carry those as wheels (/work/.library/device/README.md): here, in the repo root,
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl NAME==VERSION            # each missing package and each of its missing Requires-Dist
# and run with carry [".whl"] and the command
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-./gpu-out}
DEVICE=${DEVICE:-cuda}
IMAGES=${GPU_BENCH_IMAGES:-20000}
JPEG_SIZE=${JPEG_SIZE:-256}
IMAGE_SIZE=${IMAGE_SIZE:-224}
BATCH=${BATCH:-256}
EPOCHS=${EPOCHS:-2}
BASE_MODEL=${BASE_MODEL:-resnet50}
NAIVE_WORKERS=${NAIVE_WORKERS:-8}
CONCURRENCY=${CONCURRENCY:-64}
PREDICT_SECONDS=${PREDICT_SECONDS:-8}
INFER_SECONDS=${INFER_SECONDS:-5}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" - <<'EOF' || exit 2
import importlib.metadata as metadata, re, sys, tomllib
names = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"] + ["httpx"]
missing = []
for requirement in names:
    name = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        missing.append(requirement)
if missing:
    sys.exit("bench/gpu.sh: missing Python packages: " + ", ".join(missing)
             + "\ncarry them as wheels: see the header of bench/gpu.sh")
print("packages: all", len(names), "present")
EOF
if [ "$DEVICE" = cuda ]; then
  "$PYTHON" -c 'import torch, sys; torch.cuda.is_available() or sys.exit("bench/gpu.sh: DEVICE=cuda but torch sees no GPU")'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true
fi

status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its log, carry on if it fails
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local started=$SECONDS
  if timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; then
    echo "== $name done in $((SECONDS - started)) s"
  else
    echo "== $name FAILED after $((SECONDS - started)) s (log: $OUT/$name.log)"
    status=1
  fi
}

step ingest "${INGEST_LIMIT:-75}" "$PYTHON" bench/gpu_ingest.py --images "$IMAGES" --size "$JPEG_SIZE" \
  --json "$OUT/ingest.json"
step train "${TRAIN_LIMIT:-240}" "$PYTHON" bench/train.py --device "$DEVICE" --base-model "$BASE_MODEL" \
  --images "$IMAGES" --jpeg-size "$JPEG_SIZE" --image-size "$IMAGE_SIZE" --batch-size "$BATCH" --epochs "$EPOCHS" \
  --naive-workers "$NAIVE_WORKERS" --only naive,ours,compiled --json "$OUT/train.json"
step infer "${INFER_LIMIT:-75}" "$PYTHON" bench/infer.py --device "$DEVICE" --base-model "$BASE_MODEL" \
  --image-size "$IMAGE_SIZE" --batch-size "$BATCH" --seconds "$INFER_SECONDS" --json "$OUT/infer.json"
step predict "${PREDICT_LIMIT:-80}" "$PYTHON" bench/predict.py --device "$DEVICE" --base-model "$BASE_MODEL" \
  --image-size "$IMAGE_SIZE" --concurrency "$CONCURRENCY" --seconds "$PREDICT_SECONDS" --rounds 2

"$PYTHON" - "$OUT" "$CONCURRENCY" <<'EOF'
import json, re, sys
from pathlib import Path
out, concurrency = Path(sys.argv[1]), sys.argv[2]
def load(name):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None
summary = {"ingest": load("ingest"), "train": load("train"), "infer": load("infer"), "predict": None}
log = out / "predict.log"
for line in log.read_text().splitlines() if log.is_file() else []:
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == 8 and cells[0] == concurrency:
        summary["predict"] = {"concurrency": int(concurrency), "batching_off_images_per_second": float(cells[1]),
                              "batching_on_images_per_second": float(cells[2]), "on_p50_p99_ms": cells[5]}
(out / "gpu.json").write_text(json.dumps(summary, indent=2))
rows = []
if summary["ingest"]:
    rows.append(("ingest (worker path, zip -> uint8 cache)", summary["ingest"]["ingest_images_per_second"], "-"))
for row in (summary["train"] or {}).get("rows", []):
    rows.append((f"train {row['run']}", row["images_per_second"], "5000 (ours)" if "ours" in row["run"] else "-"))
for name, rate in ((summary["infer"] or {}).get("rows") or {}).items():
    rows.append((f"raw inference {name}", rate, "-"))
if summary["predict"]:
    p = summary["predict"]
    rows.append((f"/predict HTTP c={p['concurrency']}, batching off", p["batching_off_images_per_second"], "-"))
    rows.append((f"/predict HTTP c={p['concurrency']}, batching on", p["batching_on_images_per_second"], "3000"))
print(f"\n| {'measure':<62} | images/s | target |\n|{'-' * 64}|----------|--------|")
for name, rate, target in rows:
    print(f"| {name:<62} | {rate:8.0f} | {target} |")
print(f"\nJSON: {out / 'gpu.json'}")
EOF
exit $status
