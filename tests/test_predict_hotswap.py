"""Hot swap on a live API process: a newer model appears in one project while clients keep calling
/predict for two projects; that project swaps without a failed request, the other never changes."""

import random
import time

from tests.helpers import project_row
from tests.model_rows import publish_model
from tests.predict_load import PredictLoad
from tests.processes import wait_for
from tests.synthetic import jpeg_bytes, make_image

CLIENTS = 2  # per project
URLS = {"default": "/predict", "alpha": "/v1/projects/alpha/predict"}


def test_a_new_model_is_swapped_in_under_load_without_a_failed_or_slow_request(migrated, start_service):
    project_row("alpha")
    first = publish_model(seed=1, age_s=60)
    other = publish_model(seed=3, age_s=60, project="alpha")
    service = start_service(migrated, workers=0)
    image = jpeg_bytes(make_image("red", random.Random(0)))
    with PredictLoad(service, [url for url in URLS.values() for _ in range(CLIENTS)], image) as load:
        wait_for(lambda: load.count(model_id=first, path=URLS["default"]) >= 10, 60, what="the first model")
        wait_for(lambda: load.count(model_id=other, path=URLS["alpha"]) >= 10, 60, what="alpha's model")
        warm = time.monotonic()  # both models loaded: the first requests waited for that, the swap must not
        second = publish_model(seed=2)  # artifact on disk, then the row: what a finishing job does
        wait_for(lambda: load.count(model_id=second, path=URLS["default"]) >= 10, 60, what="the second model")
    default = [a for a in load.answers if a.path == URLS["default"]]
    alpha = [a for a in load.answers if a.path == URLS["alpha"]]
    assert [a.status for a in load.answers] == [200] * len(load.answers), service.logs()
    assert {a.model_id for a in default} == {first, second}
    assert [a.model_id for a in sorted(default, key=lambda a: a.started)[-CLIENTS:]] == [second] * CLIENTS
    assert {a.model_id for a in alpha} == {other}  # a run in another project never reaches alpha
    slow = [a for a in load.answers if a.started > warm and a.finished - a.started >= 10]
    assert slow == [], slow
