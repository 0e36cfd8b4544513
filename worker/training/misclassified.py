"""The test images a trained model gets most confidently wrong, as thumbnails beside the model.

The web UI lists ``metrics.test.misclassified`` and fetches each ``image`` from
``models/<id>/misclassified/`` (GET /v1/models/{id}/misclassified/{name}).
"""

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from shared.storage import atomic_dir

FOLDER = "misclassified"
LIMIT = 24
THUMBNAIL = 128


def pick_misclassified(
    *, indices: np.ndarray, probs: np.ndarray, labels: np.ndarray, classes: list[str], limit: int = LIMIT,
) -> list[dict[str, Any]]:
    """Up to ``limit`` wrong predictions, most confident first. ``image`` is "<rank>-<cache row>.jpg": the
    name carries the row, so the entries alone say which thumbnails to write, even from another process."""
    if len(labels) == 0:
        return []
    pred = probs.argmax(1)
    score = probs[np.arange(len(pred)), pred]
    wrong = np.flatnonzero(pred != labels)
    # Stable sort on -score: ties keep cache order, so the same run names the same files.
    ranked = wrong[np.argsort(-score[wrong], kind="stable")][:limit]
    return [{"image": f"{rank:02d}-{int(indices[i]):07d}.jpg", "true": classes[int(labels[i])],
             "pred": classes[int(pred[i])], "score": round(float(score[i]), 4)} for rank, i in enumerate(ranked)]


def cache_row(name: str) -> int:
    return int(name.split("-", 1)[1].removesuffix(".jpg"))


def write_thumbnails(*, directory: Path, images: np.ndarray, picks: list[dict[str, Any]]) -> None:
    """~128 px JPEGs of ``picks`` from the uint8 cache, in one atomic step into ``directory``/misclassified."""
    if not picks:
        return
    with atomic_dir(directory / FOLDER) as tmp:
        for pick in picks:
            image = Image.fromarray(np.asarray(images[cache_row(pick["image"])]))
            if image.width > THUMBNAIL:
                image = image.resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BILINEAR, reducing_gap=None)
            image.save(tmp / pick["image"], format="JPEG", quality=85)
