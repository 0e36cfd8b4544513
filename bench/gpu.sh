#!/usr/bin/env bash
# The one GPU run (issue 17): training, raw inference, /predict, torch.compile and ingestion at 224 px on the
# device machine (kind nvidia-h200: Python 3.12, torch 2.11 / torchvision 0.26 of its own, no network).
#
# THE DEVICE CALL (first prepare the wheels here, once per session:  bash bench/device-wheels.sh):
#   run  command:   bash bench/gpu.sh
#        carry:     [".whl"]
#        timeout_s: 540
# The run stops itself by TOTAL_LIMIT (450 s): < 8 minutes, so a ~10-minute lease (start included) leaves time
# to rerun one step at once, while the machine is still warm (30 s after a call):
#   run  command: STEPS=compile bash bench/gpu.sh   carry: [".whl"]   timeout_s: 300
# Then call give_back. Paste the final table (or gpu.json's rows) into your note.
#
# What it does, in order; every step is skipped unless named in STEPS (default: all, in this order of value):
#   setup    installs .whl/ into the device's own Python (pip --no-index --find-links .whl -r
#            .whl/requirements.txt: keeps what the image satisfies, so its torch 2.11 stays), records versions,
#            the package check and nvidia-smi in gpu.json, then imports the real modules (api.main,
#            worker.training.engine, worker.ingest, ...) and, on cuda, runs a bf16 channels_last conv:
#            any failure here stops the run (exit 2) before a minute of GPU time is spent on steps;
#   train    bench/train.py: ours (bf16, channels_last, batch BATCH, from the uint8 cache: producer thread,
#            pinned buffers + side-stream copies, device-side augmentation, fused AdamW, background checkpoint
#            writes), then the naive recipe (PIL per step, fp32, batch 32, NAIVE_WORKERS loader processes), EPOCHS
#            epochs of IMAGES, then the input path alone (no model: the most the loader can feed) and the
#            floor (ours' bare model step on one batch already on the GPU: the most training can reach);
#   infer    bench/infer.py: one forward pass at batch BATCH: ours eager, naive fp32;
#   predict  bench/predict.py: POST /predict over HTTP at CONCURRENCY, `tuneserve api --workers N` for N in
#            PREDICT_WORKERS (1,4; batching on): one process vs several batching into the one GPU;
#   compile  the torch.compile rows, apart because compiling is slow and may fail: bench/train.py --only
#            compiled (rate of the epochs after the compiling one) then bench/infer.py --only compiled;
#   ingest   bench/gpu_ingest.py: the worker's real ingestion of a zip of INGEST_IMAGES JPEGs.
# Every row is printed ("ROW | ...") and written into $OUT/gpu.json the moment it is measured (each epoch too),
# so a step killed by its limit keeps what it measured. $OUT holds at most 7 files: gpu.json (versions,
# nvidia-smi, packages, imports, steps, rows) and one log per step that ran (setup.log, train.log, ...).
#
# Each step's limit comes from an estimate written down here, for the H200 with 16 cores (and for the dry
# run on 2 shared CPU cores), and is cut to what is left of TOTAL_LIMIT:
#   step     H200 estimate                                                        est  limit | dry run est limit
#   setup    pip ~30 small wheels 8 s, torch+CUDA init and nvidia-smi 8 s, imports 6 s   25    90 |      30   120
#   train    20k JPEGs + cache 20 s (serial, ~1 ms/image), ours 2 x 14k images at         75   120 |      60   240
#            ~3k img/s 10 s + evals and cudnn autotune 10 s, naive 28k at ~1.2k img/s
#            (8 PIL workers) 25 s, imports 5 s, input path alone 28k at ~10k img/s 3 s
#   infer    CUDA init 6 s, 2 rows x (INFER_SECONDS 5 s + warm-up) 14 s                 20    45 |      20    90
#   predict  1 + 4 API processes 20 s, warm-up 8 s, 2 modes x PREDICT_SECONDS 8 s,      50    80 |      60   120
#            stop 5 s
#   compile  inductor on resnet50 fwd+bwd ~70 s cold, eval graph ~30 s, epoch 2 5 s;     155   190 |     240   420
#            inference graph ~35 s + 5 s
#   ingest   20k noisy JPEGs on 16 cores 5 s, ingestion at 1-2k img/s 10-20 s           30    50 |      20    90
#   total of estimates ~350 s (~6 min); TOTAL_LIMIT 450 s caps the sum of limits (600 s): the last steps
#   (compile, ingest) are the ones cut if the estimates are wrong.
#
#   bash bench/gpu.sh                                   # the GPU run: cuda, resnet50, 224 px, 20,000 images
#   DRY_RUN=1 PYTHON=.venv/bin/python bash bench/gpu.sh   # every step's code path on a CPU at tiny sizes
#   STEPS=train,infer bash bench/gpu.sh                 # some steps only (setup always runs)
#   LIMITS=compile=240 STEPS=compile bash bench/gpu.sh  # another limit for a step
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=${DRY_RUN:-0} LIMITS=${LIMITS:-}
if [ "$DRY_RUN" = 1 ]; then  # tiny sizes on a CPU: every code path, no meaningful figure
  : "${DEVICE:=cpu}" "${GPU_BENCH_IMAGES:=160}" "${JPEG_SIZE:=72}" "${IMAGE_SIZE:=64}" "${BATCH:=16}"
  : "${BASE_MODEL:=resnet18}" "${NAIVE_WORKERS:=0}" "${CONCURRENCY:=4}" "${PREDICT_SECONDS:=2}" "${PREDICT_WORKERS:=1,2}"
  : "${INFER_SECONDS:=1}" "${INGEST_IMAGES:=200}" "${TOTAL_LIMIT:=1200}"
  declare -A EST=([setup]=30 [train]=60 [infer]=20 [predict]=60 [compile]=240 [ingest]=20)
  declare -A LIMIT=([setup]=120 [train]=240 [infer]=90 [predict]=120 [compile]=420 [ingest]=90)
else
  declare -A EST=([setup]=25 [train]=75 [infer]=20 [predict]=50 [compile]=155 [ingest]=30)
  declare -A LIMIT=([setup]=90 [train]=120 [infer]=45 [predict]=80 [compile]=190 [ingest]=50)
fi
export DEVICE=${DEVICE:-cuda} GPU_BENCH_IMAGES=${GPU_BENCH_IMAGES:-20000} JPEG_SIZE=${JPEG_SIZE:-256}
export IMAGE_SIZE=${IMAGE_SIZE:-224} BATCH=${BATCH:-256} EPOCHS=${EPOCHS:-2} BASE_MODEL=${BASE_MODEL:-resnet50}
export NAIVE_WORKERS=${NAIVE_WORKERS:-8} CONCURRENCY=${CONCURRENCY:-64} PREDICT_SECONDS=${PREDICT_SECONDS:-8}
export PREDICT_WORKERS=${PREDICT_WORKERS:-1,4}
export INFER_SECONDS=${INFER_SECONDS:-5} INGEST_IMAGES=${INGEST_IMAGES:-$GPU_BENCH_IMAGES}
export TOTAL_LIMIT=${TOTAL_LIMIT:-450} STEPS=${STEPS:-train,infer,predict,compile,ingest} DRY_RUN
export PYTHON=${PYTHON:-python3} DATA_DIR=${DATA_DIR:-/tmp/gpu-bench-data}
for pair in ${LIMITS//,/ }; do LIMIT[${pair%%=*}]=${pair#*=}; done  # LIMITS="train=60,compile=120" overrides
OUT=${OUT:-./gpu-out}
mkdir -p "$OUT" "$DATA_DIR"
OUT=$(cd "$OUT" && pwd)
export GPU_JSON=$OUT/gpu.json PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
rm -f "$GPU_JSON"
status=0

# step NAME COMMAND...: run under min(its limit, what is left of TOTAL_LIMIT), log to $OUT/NAME.log, record
# its status in gpu.json; a failure or a timeout is recorded and the run goes on.
step() {
  local name=$1 limit=${LIMIT[$1]} estimate=${EST[$1]} left started rc verdict
  shift
  if [ "$name" != setup ] && [[ ",$STEPS," != *",$name,"* ]]; then
    return 0
  fi
  left=$((TOTAL_LIMIT - SECONDS - 5))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    echo "== $name SKIPPED: ${left}s left of TOTAL_LIMIT ${TOTAL_LIMIT}s"
    "$PYTHON" bench/gpu_report.py step "$name" skipped 0 0 "$estimate"
    status=1
    return 0
  fi
  echo "== $name (estimate ${estimate}s, limit ${limit}s) at $(date +%T)"
  started=$SECONDS
  timeout -k 5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) verdict=ok ;;
    124 | 137) verdict=timeout ;;
    *) verdict="failed" ;;
  esac
  echo "== $name $verdict (exit $rc) in $((SECONDS - started))s (estimate ${estimate}s, limit ${limit}s)"
  "$PYTHON" bench/gpu_report.py step "$name" "$verdict" $((SECONDS - started)) "$limit" "$estimate" || true
  [ "$rc" = 0 ] || status=1
  return "$rc"
}

setup() {
  set -e
  if [ -f .whl/requirements.txt ]; then
    echo "installing what the image lacks from .whl/ ($(find .whl -name '*.whl' | wc -l) wheels)"
    "$PYTHON" -m pip install -q --no-index --find-links .whl --no-cache-dir --disable-pip-version-check \
      -r .whl/requirements.txt
  else
    echo "no .whl/requirements.txt: nothing installed (bash bench/device-wheels.sh makes it; carry [\".whl\"])"
  fi
  "$PYTHON" bench/gpu_report.py init
  if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
  "$PYTHON" - <<'EOF'
import importlib, os, time, traceback

from bench import gpu_report

MODULES = ["torch", "torchvision", "torchvision.ops", "onnx", "api.main", "api.predictor", "worker.tasks",
           "worker.ingest", "worker.training.engine", "worker.training.job", "worker.training.launch",
           "shared.cli", "shared.modeling", "shared.modeling.export", "shared.migrate",
           "bench.train", "bench.infer", "bench.predict", "bench.gpu_ingest"]
result, failed = {}, []
for name in MODULES:
    started = time.perf_counter()
    try:
        importlib.import_module(name)
        result[name] = f"ok {time.perf_counter() - started:.2f}s"
    except Exception:
        result[name] = traceback.format_exc(limit=3)
        failed.append(name)
if os.environ["DEVICE"] == "cuda" and not failed:
    import torch
    try:
        conv = torch.nn.Conv2d(3, 64, 7, stride=2).cuda().to(memory_format=torch.channels_last)
        x = torch.randn(8, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            conv(x).float().sum().item()
        result["cuda bf16 channels_last conv"] = "ok"
    except Exception:
        result["cuda bf16 channels_last conv"] = traceback.format_exc(limit=3)
        failed.append("cuda")
doc = gpu_report.load()
doc["imports"] = result
gpu_report.save(doc)
print(f"imports: {len(MODULES) - len([f for f in failed if f != 'cuda'])}/{len(MODULES)} modules ok"
      + (f"; FAILED: {', '.join(failed)}" if failed else ""))
for name in failed:
    print(f"--- {name}\n{result.get(name, result.get('cuda bf16 channels_last conv'))}")
raise SystemExit(2 if failed else 0)
EOF
}
export -f setup

train() {
  "$PYTHON" bench/train.py --step train --only ours,naive,loader,floor --device "$DEVICE" --base-model "$BASE_MODEL" \
    --images "$GPU_BENCH_IMAGES" --jpeg-size "$JPEG_SIZE" --image-size "$IMAGE_SIZE" --batch-size "$BATCH" \
    --epochs "$EPOCHS" --naive-workers "$NAIVE_WORKERS" --data-dir "$DATA_DIR"
}
infer() {
  "$PYTHON" bench/infer.py --step infer --only eager,naive --device "$DEVICE" --base-model "$BASE_MODEL" \
    --image-size "$IMAGE_SIZE" --batch-size "$BATCH" --seconds "$INFER_SECONDS"
}
predict() {
  "$PYTHON" bench/predict.py --step predict --device "$DEVICE" --base-model "$BASE_MODEL" \
    --image-size "$IMAGE_SIZE" --concurrency "$CONCURRENCY" --seconds "$PREDICT_SECONDS" --rounds 2 \
    --workers "$PREDICT_WORKERS"
}
compiled() {
  local rc=0
  "$PYTHON" bench/train.py --step compile --only compiled --device "$DEVICE" --base-model "$BASE_MODEL" \
    --images "$GPU_BENCH_IMAGES" --jpeg-size "$JPEG_SIZE" --image-size "$IMAGE_SIZE" --batch-size "$BATCH" \
    --epochs "$EPOCHS" --data-dir "$DATA_DIR" || rc=$?
  "$PYTHON" bench/infer.py --step compile --only compiled --device "$DEVICE" --base-model "$BASE_MODEL" \
    --image-size "$IMAGE_SIZE" --batch-size "$BATCH" --seconds "$INFER_SECONDS" || rc=$?
  return $rc
}
ingest() {
  "$PYTHON" bench/gpu_ingest.py --step ingest --images "$INGEST_IMAGES" --size "$JPEG_SIZE"
}
export -f train infer predict compiled ingest

echo "bench/gpu.sh: DEVICE=$DEVICE STEPS=$STEPS TOTAL_LIMIT=${TOTAL_LIMIT}s OUT=$OUT (DRY_RUN=$DRY_RUN)"
if ! step setup bash -c setup; then
  echo "bench/gpu.sh: setup failed: see $OUT/setup.log and gpu.json (packages, imports); no step run"
  exit 2
fi
step train bash -c train
step infer bash -c infer
step predict bash -c predict
step compile bash -c compiled
step ingest bash -c ingest
"$PYTHON" bench/gpu_report.py table
echo "bench/gpu.sh: $((SECONDS))s in all (TOTAL_LIMIT ${TOTAL_LIMIT}s); files in $OUT: $(ls "$OUT" | wc -l)"
exit $status
