#!/usr/bin/env bash
# Two teams on one service, with curl only: starts `tuneserve dev` (embedded defaults, a bootstrap admin key)
# on a free port in a temp DATA_DIR, then walks what each team can and cannot do. Prints each call and its
# answer; exits non-zero if an answer is not the one expected.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY="$ROOT/.venv/bin/python"
WORK=$(mktemp -d)
PORT=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
U=http://127.0.0.1:$PORT
ADMIN=admin-$(openssl rand -hex 8)
export TUNESERVE_DATA_DIR=$WORK/data TUNESERVE_API_KEYS=$ADMIN TUNESERVE_DEVICE=cpu
unset TUNESERVE_DATABASE_URL TUNESERVE_BROKER_URL
(cd "$ROOT" && exec "$PY" -m shared.cli dev --port "$PORT" > "$WORK/service.log" 2>&1) &
SERVICE=$!
trap 'status=$?; kill $SERVICE 2>/dev/null; wait $SERVICE 2>/dev/null || true; rm -rf "$WORK"; exit $status' EXIT
until curl -sf "$U/healthz" > /dev/null; do sleep 0.5; done
cd "$WORK"
PYTHONPATH="$ROOT" "$PY" -c "
from pathlib import Path
from tests.synthetic import make_zip, make_heldout
make_zip(Path('a.zip'), classes=['red', 'green', 'blue'], per_class=24, size=32)
open('red.jpg', 'wb').write(make_heldout(['red'], 1, size=32)[0][1])"

json() { "$PY" -c "import sys, json; print(json.load(sys.stdin)$1)"; }
show() { echo "\$ $*" | sed -E "s/Bearer [A-Za-z0-9_-]+/Bearer …/g"; }
expect() {  # expect STATUS CODE-OR-EMPTY -- curl args...
  local want=$1 code=$2; shift 3
  show curl "$@"
  local out status
  out=$(curl -s -w '\n%{http_code}' "$@")
  status=${out##*$'\n'}
  out=${out%$'\n'*}
  echo "  -> $status ${out:0:160}"
  [ "$status" = "$want" ] || { echo "expected $want"; exit 1; }
  [ -z "$code" ] || echo "$out" | grep -q "\"code\":\"$code\"" || { echo "expected code $code"; exit 1; }
  LAST=$out
}
A="Authorization: Bearer $ADMIN"

echo "## the admin makes two projects and a member key for each"
expect 201 "" -- -H "$A" -H 'content-type: application/json' "$U/v1/projects" -d '{"name":"team-a","quota_mb":200}'
expect 201 "" -- -H "$A" -H 'content-type: application/json' "$U/v1/projects" -d '{"name":"team-b"}'
expect 201 "" -- -H "$A" -H 'content-type: application/json' "$U/v1/keys" \
  -d '{"name":"alice","role":"member","projects":["team-a"]}'
KA="Authorization: Bearer $(echo "$LAST" | json "['key']")"
expect 201 "" -- -H "$A" -H 'content-type: application/json' "$U/v1/keys" \
  -d '{"name":"bob","role":"member","projects":["team-b"]}'
KB_ID=$(echo "$LAST" | json "['id']")
KB="Authorization: Bearer $(echo "$LAST" | json "['key']")"

echo "## team A uploads and trains in its project"
expect 202 "" -- -H "$KA" -F file=@a.zip "$U/v1/datasets?project=team-a"
DS=$(echo "$LAST" | json "['id']")
until curl -s -H "$KA" "$U/v1/datasets/$DS" | grep -q '"status":"ready"'; do sleep 0.5; done
expect 202 "" -- -H "$KA" -H 'content-type: application/json' "$U/v1/jobs" \
  -d "{\"dataset_id\":\"$DS\",\"hyperparameters\":{\"base_model\":\"resnet18\",\"epochs\":5,\"image_size\":32,\"batch_size\":16,\"weights\":\"none\"}}"
JOB=$(echo "$LAST" | json "['id']")
until curl -s -H "$KA" "$U/v1/jobs/$JOB" | grep -qE '"status":"(succeeded|failed)"'; do sleep 1; done
expect 200 "" -- -H "$KA" "$U/v1/jobs/$JOB"
MODEL=$(echo "$LAST" | json "['model_id']")
expect 200 "" -- -H "$KA" -F file=@red.jpg "$U/v1/projects/team-a/predict"

echo "## team B sees none of it: 404 as if it did not exist; admin routes 403"
expect 404 dataset_not_found -- -H "$KB" "$U/v1/datasets/$DS"
expect 404 job_not_found -- -H "$KB" -X POST "$U/v1/jobs/$JOB/cancel"
expect 404 model_not_found -- -H "$KB" -X POST "$U/v1/models/$MODEL/promote"
expect 404 model_not_found -- -H "$KB" "$U/v1/models/$MODEL/artifact"
expect 404 project_not_found -- -H "$KB" -F file=@red.jpg "$U/v1/projects/team-a/predict"
expect 404 project_not_found -- -H "$KB" "$U/v1/jobs?project=team-a"
expect 200 "" -- -H "$KB" "$U/v1/jobs"
expect 503 no_model -- -H "$KB" -F file=@red.jpg "$U/v1/projects/team-b/predict"
expect 403 forbidden -- -H "$KB" "$U/v1/keys"

echo "## usage, revocation"
expect 200 "" -- -H "$KA" "$U/v1/projects/team-a"
echo "  usage: $(echo "$LAST" | json "['usage']")"
expect 204 "" -- -H "$A" -X DELETE "$U/v1/keys/$KB_ID"
expect 401 invalid_api_key -- -H "$KB" "$U/v1/jobs"
echo "all answers as expected"
