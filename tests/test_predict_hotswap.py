"""Hot swap on a live API process: a newer model appears in one project while clients keep calling
/predict for two projects; that project swaps without a failed request, the other never changes."""

import random
import threading
import time

from tests.conftest import wait_for
from tests.helpers import project_row
from tests.model_rows import publish_model
from tests.synthetic import jpeg_bytes, make_image

CLIENTS = 2  # per project
URLS = {"default": "/predict", "alpha": "/v1/projects/alpha/predict"}


def test_a_new_model_is_swapped_in_under_load_without_a_failed_or_slow_request(migrated, start_service):
    project_row("alpha")
    first = publish_model(seed=1, age_s=60)
    other = publish_model(seed=3, age_s=60, project="alpha")
    service = start_service(migrated, workers=0)
    image = jpeg_bytes(make_image("red", random.Random(0)))
    results: dict[str, list[tuple[int, str | None, float]]] = {p: [] for p in URLS}  # (status, model, seconds)
    stop = threading.Event()

    def client_loop(project: str) -> None:
        with service.client() as client:
            while not stop.is_set():
                started = time.monotonic()
                response = client.post(URLS[project], files={"file": ("red.jpg", image, "image/jpeg")})
                results[project].append((response.status_code, response.json().get("model_id"),
                                         time.monotonic() - started))

    threads = [threading.Thread(target=client_loop, args=(p,)) for p in URLS for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: sum(r[1] == first for r in results["default"]) >= 10, 60, what="the first model")
        wait_for(lambda: sum(r[1] == other for r in results["alpha"]) >= 10, 60, what="alpha's model")
        second = publish_model(seed=2)  # artifact on disk, then the row: what a finishing job does
        wait_for(lambda: sum(r[1] == second for r in results["default"]) >= 10, 60, what="the second model")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert all(t.is_alive() is False for t in threads)
    default, alpha = results["default"], results["alpha"]
    assert [s for s, _, _ in default + alpha] == [200] * (len(default) + len(alpha)), service.logs()
    assert {model_id for _, model_id, _ in default} == {first, second}
    assert [model_id for _, model_id, _ in default[-CLIENTS:]] == [second] * CLIENTS
    assert {model_id for _, model_id, _ in alpha} == {other}  # a run in another project never reaches alpha
    assert max(seconds for _, _, seconds in default + alpha) < 10
