"""PNG plots drawn with matplotlib's Agg canvas (no pyplot: no global state shared between threads)."""

import io
import re
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from api.auth import Principal, PrincipalDep
from api.deps import SettingsDep
from api.errors import ApiError
from api.services import jobs, models
from shared.db import get_sessionmaker
from shared.storage import model_dir

router = APIRouter(tags=["plots"])

PNG: dict[int | str, dict[str, Any]] = {200: {"content": {"image/png": {}}}}
NO_STORE = {"Cache-Control": "no-store"}


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def render_curves(history: list[dict[str, Any]], title: str) -> bytes:
    figure = _figure(9, 3.6)
    loss_ax, acc_ax = figure.subplots(1, 2)
    epochs = [h.get("epoch") for h in history]
    for ax, metric, label in ((loss_ax, "loss", "loss"), (acc_ax, "accuracy", "accuracy")):
        for split, style in (("train", "o-"), ("val", "s--")):
            values = [h.get(f"{split}_{metric}") for h in history]
            if any(v is not None for v in values):
                ax.plot(epochs, [float("nan") if v is None else v for v in values], style, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if history:
            ax.legend()
            ax.set_xticks(epochs)
        else:
            ax.text(0.5, 0.5, "no finished epoch yet", ha="center", va="center", transform=ax.transAxes)
    acc_ax.set_ylim(0, 1.02)
    figure.suptitle(title)
    return _png(figure)


def render_confusion(matrix: list[list[int]], classes: list[str], title: str) -> bytes:
    size = max(4.0, min(14.0, 1.0 + 0.45 * len(classes)))
    figure = _figure(size + 1.2, size)
    ax = figure.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    from matplotlib.ticker import MaxNLocator

    figure.colorbar(image, ax=ax, shrink=0.8, ticks=MaxNLocator(integer=True))
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max((max(row) for row in matrix if row), default=0)
    if len(classes) <= 30:
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                        color="white" if peak and value > peak / 2 else "black")
    ax.set_title(title)
    return _png(figure)


@router.get("/v1/jobs/{job_id}/plots/curves.png", response_class=Response, responses=PNG)
async def job_curves(job_id: str, principal: PrincipalDep) -> Response:
    def draw() -> bytes:  # database and matplotlib both block: neither runs on the event loop
        with get_sessionmaker()() as session:
            job = jobs.get(session=session, job_id=job_id, principal=principal)
            history = jobs.history(session=session, job_id=job_id)
        return render_curves(history, f"job {job_id[:8]} · {job.status} · {len(history)} epoch(s)")

    return Response(await run_in_threadpool(draw), media_type="image/png", headers=NO_STORE)


@router.get("/v1/models/{model_id}/plots/confusion.png", response_class=Response, responses=PNG)
async def model_confusion(model_id: str, principal: PrincipalDep) -> Response:
    return Response(await run_in_threadpool(_confusion_png, model_id, principal), media_type="image/png")


def _confusion_png(model_id: str, principal: Principal) -> bytes:
    with get_sessionmaker()() as session:
        model = models.get(session=session, model_id=model_id, principal=principal)
    matrix = ((model.metrics or {}).get("test") or {}).get("confusion_matrix")
    if not matrix:
        raise ApiError(404, "no_confusion_matrix",
                       f"model {model_id} has no test-split confusion matrix (its test split was empty); "
                       "train with test_fraction > 0")
    return render_confusion(matrix, list(model.classes), f"model {model_id[:8]} · test split")


@router.get("/v1/models/{model_id}/misclassified/{name}", response_class=FileResponse,
            responses={200: {"content": {"image/jpeg": {}, "image/png": {}}}})
def misclassified_image(model_id: str, name: str, settings: SettingsDep, principal: PrincipalDep) -> FileResponse:
    """A thumbnail the trainer saved under ``models/<id>/misclassified/`` (listed in metrics.test.misclassified)."""
    with get_sessionmaker()() as session:
        models.get(session=session, model_id=model_id, principal=principal)
    path = model_dir(settings, model_id) / "misclassified" / name
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}\.(jpg|png)", name) or name.startswith(".") or not path.is_file():
        raise ApiError(404, "image_not_found", f"model {model_id} has no misclassified example named '{name[:128]}'")
    return FileResponse(path, media_type="image/png" if name.endswith(".png") else "image/jpeg")
