"""Slow or many clients must not hold the API: event streams are capped per key and in all and end after
their time limits, and /healthz answers while every request thread waits on a locked table."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest

from tests.helpers import job_row, ready_dataset
from tests.processes import Service, wait_for
from tests.synthetic import make_zip

KEY = "streams-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def service(migrated, start_service):
    return start_service({**migrated, "TUNESERVE_API_KEYS": KEY, "TUNESERVE_SSE_MAX_STREAMS_PER_KEY": "2",
                          "TUNESERVE_SSE_IDLE_SECONDS": "3"}, workers=0)


def test_event_streams_are_capped_per_key_and_end_when_idle(service: Service):
    job_id = job_row(ready_dataset())  # queued with no worker: its stream would otherwise never end
    opened = threading.Barrier(3, timeout=20)  # broken, not hung, if a watcher fails before it
    ends: list[tuple[float, str]] = []

    def watch() -> None:
        started = time.monotonic()
        with httpx.stream("GET", f"{service.url}/v1/jobs/{job_id}/events", headers=AUTH, timeout=30) as response:
            assert response.status_code == 200
            opened.wait()
            for line in response.iter_lines():
                if line.startswith("data:") and "time limit" in line:
                    ends.append((time.monotonic() - started, line))

    with ThreadPoolExecutor(max_workers=2) as pool:
        watchers = [pool.submit(watch) for _ in range(2)]
        opened.wait()
        third = httpx.get(f"{service.url}/v1/jobs/{job_id}/events", headers=AUTH, timeout=10)
        assert (third.status_code, third.json()["code"]) == (429, "too_many_streams")
        assert third.headers["retry-after"] == "10"
        for watcher in watchers:
            watcher.result(timeout=30)  # re-raises what failed in the watcher
    assert len(ends) == 2 and all(2.5 <= seconds < 15 for seconds, _ in ends), ends
    # The slots came back when the streams ended.
    with httpx.stream("GET", f"{service.url}/v1/jobs/{job_id}/events", headers=AUTH, timeout=30) as again:
        assert again.status_code == 200


def test_healthz_answers_while_every_request_thread_waits_on_a_locked_table(service: Service, tmp_path):
    archive = make_zip(tmp_path / "d.zip", classes=["red", "blue"], per_class=5, size=32).read_bytes()
    url = service.env["TUNESERVE_DATABASE_URL"].replace("+psycopg", "")
    with psycopg.connect(url) as locker:
        locker.execute("LOCK TABLE projects IN ACCESS EXCLUSIVE MODE")
        pool = ThreadPoolExecutor(max_workers=60)
        with httpx.Client(base_url=service.url, headers=AUTH, timeout=60) as client:
            waiting = [pool.submit(client.get, "/v1/projects/default") for _ in range(50)]
            waiting += [pool.submit(client.post, "/v1/datasets?project=default",
                                    files={"file": ("d.zip", archive)}) for _ in range(5)]
            time.sleep(2)  # they are all inside the API now, blocked on the lock
            latencies = []
            for _ in range(5):
                started = time.monotonic()
                assert httpx.get(f"{service.url}/healthz", timeout=10).status_code == 200
                latencies.append(time.monotonic() - started)
            assert not any(f.done() for f in waiting)
            locker.rollback()  # releases the lock
            statuses = [f.result(timeout=60).status_code for f in waiting]
        pool.shutdown()
    assert max(latencies) < 1.0, latencies
    assert statuses == [200] * 50 + [202] * 5
    wait_for(lambda: httpx.get(f"{service.url}/readyz", timeout=5).status_code == 200, 10, what="readiness")
