"""Request and response bodies. Routes return these, never ORM rows."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shared.hyperparameters import Hyperparameters


class Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class RejectedFile(BaseModel):
    path: str
    reason: str


class DatasetPublic(Public):
    id: str
    name: str
    status: str
    filename: str
    size_bytes: int
    classes: list[str] | None
    class_counts: dict[str, int] | None
    splits: dict[str, dict[str, int]] | None
    num_images: int
    rejected: list[RejectedFile]
    report: dict[str, Any]
    progress: dict[str, Any]
    error: str | None
    error_code: str | None
    created_at: datetime
    updated_at: datetime


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    count: int


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_id: str = Field(min_length=1, max_length=64)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class JobProgress(BaseModel):
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    images_per_second: float | None = None
    eta_seconds: float | None = None


class JobPublic(Public):
    id: str
    dataset_id: str
    status: str
    hyperparameters: dict[str, Any]
    progress: JobProgress
    history: list[dict[str, Any]] = []
    metrics: dict[str, Any] | None
    error: str | None
    error_code: str | None
    model_id: str | None
    attempts: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int


class ModelPublic(Public):
    id: str
    job_id: str
    dataset_id: str
    base_model: str
    classes: list[str]
    image_size: int
    metrics: dict[str, Any]
    pinned: bool
    serving: bool = False
    created_at: datetime


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    count: int


class Score(BaseModel):
    label: str
    score: float


class Prediction(BaseModel):
    filename: str
    top: list[Score]


class PredictResponse(BaseModel):
    model_id: str
    predictions: list[Prediction]


class Health(BaseModel):
    status: str
    checks: dict[str, str] = {}
