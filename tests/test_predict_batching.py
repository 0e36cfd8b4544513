"""The inference thread: concurrent work shares one forward pass, a lone request never waits, and a
batch that fails does not stop the thread."""

import time
from collections.abc import Iterator

import pytest
import torch

from api.predictor import Batcher, LoadedModel, load_model
from shared.config import get_settings
from shared.orm import new_id
from shared.storage import model_dir
from tests.model_rows import write_artifact


@pytest.fixture
def loaded(env_for) -> LoadedModel:
    env_for()
    model_id = new_id()
    write_artifact(model_id)
    return load_model(model_dir(get_settings(), model_id), model_id, torch.device("cpu"))


@pytest.fixture
def patient() -> Iterator[Batcher]:
    """Waits up to 5 s for expected work, so gathering does not depend on timing."""
    batcher = Batcher(max_batch=8, max_wait_s=5.0)
    yield batcher
    batcher.close()


def images(count: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, 32, 32), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def test_work_from_concurrent_requests_runs_as_one_forward_pass(loaded, patient):
    first, second = images(1, 1), images(2, 2)
    with patient.expecting() as later:  # the second request is still decoding when the first submits
        with patient.expecting() as sooner:
            one = sooner.submit(loaded, first)
        time.sleep(0.2)
        two = later.submit(loaded, second)
    assert one.result(timeout=30).shape == (1, 3)
    assert two.result(timeout=30).shape == (2, 3)
    assert patient.largest_batch == 3
    alone = loaded.forward(torch.cat([first, second]), chunk=1)
    assert torch.allclose(torch.cat([one.result(), two.result()]), alone, atol=1e-5)


def test_a_lone_request_does_not_wait_for_company(loaded, patient):
    patient.submit(loaded, images(1, 0)).result(timeout=30)  # first pass pays for kernel selection
    started = time.monotonic()
    patient.submit(loaded, images(1, 0)).result(timeout=30)
    assert time.monotonic() - started < 2.5  # max_wait is 5 s; it was not spent
    assert patient.largest_batch == 1


def test_a_batch_that_fails_does_not_stop_the_inference_thread(loaded, patient):
    wrong = torch.zeros(1, 2, 32, 32, dtype=torch.uint8)  # two channels: normalisation raises
    with pytest.raises(RuntimeError):
        patient.submit(loaded, wrong).result(timeout=30)
    assert patient.submit(loaded, images(2, 5)).result(timeout=30).shape == (2, 3)
