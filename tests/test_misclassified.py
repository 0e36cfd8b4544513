"""A finished job lists the test images its model gets most confidently wrong and saves their thumbnails
beside the model, named as GET /v1/models/{id}/misclassified/{name} accepts them."""

import re

import numpy as np
from PIL import Image

from shared.config import get_settings
from shared.db import session_scope
from shared.orm import Dataset, Model
from shared.storage import dataset_cache, model_dir, read_json
from tests.training_helpers import load, queue, write_cache
from worker.training.job import run_training_job

CLASSES = ["red", "green", "blue"]


def test_job_on_partly_mislabelled_data_records_its_mistakes_with_thumbnails(migrated):
    with session_scope() as session:
        dataset = Dataset(name="noisy", status="ready", filename="noisy.zip", classes=CLASSES)
        session.add(dataset)
        session.flush()
        dataset_id = dataset.id
    cache = write_cache(dataset_cache(get_settings(), dataset_id), classes=CLASSES, per_class=12)
    labels = np.load(cache / "labels.npy")
    labels[::3] = (labels[::3] + 1) % 3  # a third of the labels contradict the colour: no model learns them
    np.save(cache / "labels.npy", labels)

    job_id = queue(dataset_id, epochs=2)
    run_training_job(job_id)
    job = load(job_id)
    assert job.status == "succeeded"
    test = job.metrics["test"]
    mistakes = test["misclassified"]
    matrix = np.array(test["confusion_matrix"])
    wrong = int(matrix.sum() - np.trace(matrix))
    assert wrong >= 1 and len(mistakes) == min(24, wrong)
    # Every (true, pred) pair is one off-diagonal cell of the confusion matrix, most confident first.
    pairs = np.zeros_like(matrix)
    for m in mistakes:
        pairs[CLASSES.index(m["true"]), CLASSES.index(m["pred"])] += 1
    assert (pairs == matrix - np.diag(np.diag(matrix))).all()
    scores = [m["score"] for m in mistakes]
    assert scores == sorted(scores, reverse=True) and all(1 / 3 <= s <= 1 for s in scores)

    folder = model_dir(get_settings(), job.model_id) / "misclassified"
    assert sorted(p.name for p in folder.iterdir()) == sorted(m["image"] for m in mistakes)
    for rank, m in enumerate(mistakes):
        assert re.fullmatch(r"[A-Za-z0-9_.-]{1,128}\.(jpg|png)", m["image"]) and m["image"].startswith(f"{rank:02d}-")
        row = int(m["image"][3:-4])
        assert m["true"] == CLASSES[labels[row]] != m["pred"]
        with Image.open(folder / m["image"]) as image:
            assert (image.format, image.size) == ("JPEG", (40, 40))
    with session_scope() as session:
        assert session.get(Model, job.model_id).metrics["test"]["misclassified"] == mistakes
    assert read_json(folder.parent / "model.json")["metrics"]["test"]["misclassified"] == mistakes
    assert not [p.name for p in folder.parent.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
