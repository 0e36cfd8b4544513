#!/usr/bin/env bash
# Times the README curl walk-through against a running `make run` (http://127.0.0.1:8000).
set -euo pipefail
U=http://127.0.0.1:8000
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$(mktemp -d)"
PYTHONPATH="$ROOT" "$ROOT/.venv/bin/python" -c "
from pathlib import Path
from tests.synthetic import make_zip, make_heldout
make_zip(Path('flowers.zip'), classes=['red','green','blue'], per_class=24, wrapper='flowers/')
open('rose.jpg','wb').write(make_heldout(['red'],1)[0][1])"
t0=$(date +%s.%N)
curl -s -F file=@rose.jpg $U/predict; echo
id=$(curl -s -F file=@flowers.zip $U/v1/datasets | python3 -c "import sys,json;print(json.load(sys.stdin)['id'])")
until curl -s $U/v1/datasets/$id | grep -q '"status":"ready"'; do sleep 0.2; done
t1=$(date +%s.%N); echo "dataset ready after $(echo "$t1-$t0" | bc) s"
jid=$(curl -s -H 'content-type: application/json' $U/v1/jobs -d "{\"dataset_id\":\"$id\",\"hyperparameters\":{\"epochs\":3,\"image_size\":32,\"weights\":\"none\"}}" | python3 -c "import sys,json;print(json.load(sys.stdin)['id'])")
until curl -s $U/v1/jobs/$jid | grep -qE '"status":"(succeeded|failed)"'; do sleep 0.5; done
t2=$(date +%s.%N); echo "job finished after $(echo "$t2-$t1" | bc) s"
curl -s $U/v1/jobs/$jid | python3 -c "import sys,json;j=json.load(sys.stdin);print(j['status'], j['metrics']['test']['accuracy'] if j['metrics'] else j['error'])"
curl -s -w "\n%{time_total}s\n" -F file=@rose.jpg $U/predict
