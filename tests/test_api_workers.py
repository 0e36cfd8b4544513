"""`tuneserve api --workers 2`: two real API processes behind one port, each with its own predictor.

Both swap to a newly published model and back to a promoted one while clients predict, without a failed
request; /metrics from either process counts the requests of both; SIGTERM stops them all; API-wide caps
held in memory are split between the processes."""

import os
import random
import re
import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

import shared.cli  # noqa: F401  (registers the verbs on the app)
from api.auth import OPEN
from api.errors import ApiError
from api.routes.events import StreamSlots
from shared.cli_app import app
from shared.config import Settings
from tests.compose_files import env_of, interpolate
from tests.model_rows import publish_model
from tests.predict_load import Answer, PredictLoad
from tests.processes import REPO_ROOT, Service, wait_for
from tests.synthetic import jpeg_bytes, make_image

WORKERS = 2
CLIENTS = 4
# From the change in the database to the first answer from the new model, in each process: the serving
# id is re-read every 0.5 s and a resnet18 at 32 px loads in well under a second, but the test machine
# may be two busy cores.
SWAP_BOUND_S = 30.0


def two_workers(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    (tmp_path / "tmp").mkdir(exist_ok=True)  # TMPDIR: where the CLI keeps the metrics files of its processes
    return {**env, "TUNESERVE_API_WORKERS": str(WORKERS), "TMPDIR": str(tmp_path / "tmp")}


def processes_serving(load: PredictLoad, model_id: str, after: float) -> set[str | None]:
    return {a.process for a in load.snapshot() if a.model_id == model_id and a.started > after}


def switch_time(answers: list[Answer], process: str, model_id: str, after: float) -> float:
    """When ``process`` first answered from ``model_id`` a request sent after ``after``; every request it
    was sent later (until the next change) must be answered from that model too."""
    return min(a.finished for a in answers if a.process == process and a.model_id == model_id and a.started > after)


def test_both_processes_swap_to_a_published_then_a_promoted_model_without_a_failed_request(
        migrated, start_service, tmp_path):
    first = publish_model(seed=1, age_s=60)
    service = start_service(two_workers(migrated, tmp_path), workers=0)
    image = jpeg_bytes(make_image("red", random.Random(0)))
    with PredictLoad(service, ["/predict"] * CLIENTS, image, fresh_connections=True) as load:
        wait_for(lambda: len(processes_serving(load, first, 0)) == WORKERS, 120, what="both processes serving")
        published_at = time.monotonic()
        second = publish_model(seed=2)  # artifact on disk, then the row: what a finishing job does
        wait_for(lambda: len(processes_serving(load, second, published_at)) == WORKERS, 90,
                 what="both processes serving the published model")
        promoted_at = time.monotonic()
        with service.client() as client:
            promoted = client.post(f"/v1/models/{first}/promote")
        assert promoted.status_code == 200, promoted.text
        wait_for(lambda: len(processes_serving(load, first, promoted_at)) == WORKERS, 90,
                 what="both processes serving the promoted model")
    answers = load.answers
    assert [a.status for a in answers] == [200] * len(answers), service.logs()
    processes = {a.process for a in answers}
    assert len(processes) == WORKERS
    for process in processes:
        mine = [a for a in answers if a.process == process]
        to_second = switch_time(mine, process, second, published_at)
        to_first = switch_time(mine, process, first, promoted_at)
        assert to_second - published_at < SWAP_BOUND_S and to_first - promoted_at < SWAP_BOUND_S
        # Once a process has answered from the new model it never goes back to the old one.
        assert {a.model_id for a in mine if to_second < a.started < promoted_at} == {second}
        assert {a.model_id for a in mine if a.started > to_first} == {first}


def requests_counted(text: str, route: str) -> float:
    pattern = rf'^tuneserve_http_requests_total{{method="GET",route="{re.escape(route)}",status="200"}} (\S+)$'
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_metrics_sum_every_process_and_sigterm_stops_them_all(migrated, start_service, tmp_path):
    service: Service = start_service(two_workers(migrated, tmp_path), workers=0)
    answered: Counter[str] = Counter()
    with httpx.Client(base_url=service.url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        while len(answered) < WORKERS or answered.total() < 40:
            assert answered.total() < 2000, f"one process answered every request: {answered}"
            response = client.get("/v1/models")
            assert response.status_code == 200
            answered[response.headers["x-tuneserve-process"]] += 1
        scrapes = [client.get("/metrics") for _ in range(8)]
    assert {r.status_code for r in scrapes} == {200}
    assert [requests_counted(r.text, "/v1/models") for r in scrapes] == [answered.total()] * len(scrapes)
    pids = [int(p) for p in answered]
    assert all(alive(pid) for pid in pids) and len(list((tmp_path / "tmp").glob("tuneserve-metrics-*"))) == 1

    supervisor = service.processes[0]
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=60) == 0, service.logs()
    assert [pid for pid in pids if alive(pid)] == []
    assert list((tmp_path / "tmp").glob("tuneserve-metrics-*")) == []  # the supervisor cleans up its files


def test_event_stream_caps_are_split_between_api_processes():
    slots = StreamSlots()
    settings = Settings(api_workers=2, sse_max_streams=10, sse_max_streams_per_key=3)
    slots.take(OPEN, settings)
    slots.take(OPEN, settings)  # ceil(3 / 2) = 2 per key in this process
    with pytest.raises(ApiError) as refused:
        slots.take(OPEN, settings)
    assert (refused.value.status_code, refused.value.code) == (429, "too_many_streams")
    assert "split between 2 API processes" in refused.value.detail
    assert (slots.total, slots.by_principal[OPEN.id]) == (2, 2)


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.cpu.yml"])
def test_compose_hands_tuneserve_api_workers_to_the_api_only(name: str):
    compose = yaml.safe_load((REPO_ROOT / name).read_text())
    default = interpolate(compose, {})["services"]
    chosen = interpolate(compose, {"TUNESERVE_API_WORKERS": "4"})["services"]
    assert (env_of(default["api"])["TUNESERVE_API_WORKERS"], env_of(chosen["api"])["TUNESERVE_API_WORKERS"]) == (
        "1", "4")
    assert env_of(default["api"])["TUNESERVE_DATABASE_URL"] == env_of(default["worker"])["TUNESERVE_DATABASE_URL"]
    assert "TUNESERVE_API_WORKERS" not in env_of(default["worker"])


@pytest.mark.parametrize("workers", ["0", "65", "two"])
def test_api_refuses_a_worker_count_out_of_range_before_starting(workers: str):
    result = CliRunner().invoke(app, ["api", "--workers", workers])
    assert result.exit_code == 2
    assert "Invalid value for '--workers'" in result.output
