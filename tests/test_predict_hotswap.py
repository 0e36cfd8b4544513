"""Hot swap on a live API process: a newer model appears while clients keep calling /predict."""

import random
import threading
import time

from tests.conftest import wait_for
from tests.model_rows import publish_model
from tests.synthetic import jpeg_bytes, make_image

CLIENTS = 3


def test_a_new_model_is_swapped_in_under_load_without_a_failed_or_slow_request(migrated, start_service):
    first = publish_model(seed=1, age_s=60)
    service = start_service(migrated, workers=0)
    image = jpeg_bytes(make_image("red", random.Random(0)))
    results: list[tuple[int, str | None, float]] = []  # (status, model_id, seconds), in completion order
    stop = threading.Event()

    def client_loop() -> None:
        with service.client() as client:
            while not stop.is_set():
                started = time.monotonic()
                response = client.post("/predict", files={"file": ("red.jpg", image, "image/jpeg")})
                body = response.json()
                results.append((response.status_code, body.get("model_id"), time.monotonic() - started))

    threads = [threading.Thread(target=client_loop) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: sum(r[1] == first for r in results) >= 10, 60, what="answers from the first model")
        second = publish_model(seed=2)  # artifact on disk, then the row: what a finishing job does
        wait_for(lambda: sum(r[1] == second for r in results) >= 10, 60, what="answers from the second model")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    statuses = [status for status, _, _ in results]
    assert statuses == [200] * len(results), service.logs()
    assert {model_id for _, model_id, _ in results} == {first, second}
    assert [model_id for _, model_id, _ in results[-CLIENTS:]] == [second] * CLIENTS
    assert max(seconds for _, _, seconds in results) < 10
