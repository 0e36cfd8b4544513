"""Published models without a worker: a real artifact on disk (random weights, which give
non-degenerate probabilities) plus the dataset, job and model rows a succeeded training job writes."""

from datetime import UTC, datetime, timedelta

import torch

from shared.config import get_settings
from shared.db import session_scope
from shared.modeling import IMAGENET_MEAN, IMAGENET_STD, build_model, resize_size_for, save_model_artifact
from shared.orm import Dataset, Job, Model, new_id
from shared.storage import model_dir

CLASSES = ["blue", "green", "red"]


def write_artifact(model_id: str, *, classes: list[str] = CLASSES, base_model: str = "resnet18",
                   image_size: int = 32, seed: int = 0) -> None:
    torch.manual_seed(seed)
    model = build_model(base_model=base_model, num_classes=len(classes), head="linear")
    meta = {"model_id": model_id, "base_model": base_model, "head": "linear", "dropout": 0.0, "classes": classes,
            "image_size": image_size, "resize_size": resize_size_for(image_size), "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD)}
    save_model_artifact(directory=model_dir(get_settings(), model_id), model=model, meta=meta)


def insert_rows(model_id: str, *, classes: list[str] = CLASSES, base_model: str = "resnet18", image_size: int = 32,
                age_s: float = 0.0, metrics: dict | None = None, project: str = "default") -> tuple[str, str]:
    """Rows as a succeeded job leaves them, ``age_s`` seconds in the past; returns (job_id, dataset_id)."""
    created = datetime.now(UTC) - timedelta(seconds=age_s)
    dataset_id, job_id = new_id(), new_id()
    with session_scope() as session:
        session.add(Dataset(id=dataset_id, project=project, name="shapes", status="ready", filename="shapes.zip",
                            classes=classes, num_images=30, created_at=created))
        session.flush()
        session.add(Job(id=job_id, project=project, dataset_id=dataset_id, status="succeeded", model_id=model_id,
                        attempts=1, hyperparameters={"base_model": base_model, "image_size": image_size},
                        created_at=created))
        session.flush()
        session.add(Model(id=model_id, project=project, job_id=job_id, dataset_id=dataset_id, base_model=base_model,
                          classes=classes, image_size=image_size, created_at=created,
                          metrics=metrics or {"test": {"accuracy": 0.5}}))
    return job_id, dataset_id


def publish_model(*, classes: list[str] = CLASSES, base_model: str = "resnet18", image_size: int = 32,
                  seed: int = 0, age_s: float = 0.0, project: str = "default") -> str:
    model_id = new_id()
    write_artifact(model_id, classes=classes, base_model=base_model, image_size=image_size, seed=seed)
    insert_rows(model_id, classes=classes, base_model=base_model, image_size=image_size, age_s=age_s,
                project=project)
    return model_id

