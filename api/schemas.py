"""Request and response bodies. Routes return these, never ORM rows."""

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field

from shared.apikeys import Role
from shared.hyperparameters import Hyperparameters
from shared.jobstate import DatasetStatus, JobStatus
from shared.orm import Job, Model
from shared.webhooks import DeliveryStatus, WebhookEventType

PROJECT_NAME = r"^[a-z0-9][a-z0-9-]{0,62}$"
BATCH_MAX_TOP_K = 100


class Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class RejectedFile(BaseModel):
    path: str
    reason: str


class DatasetPublic(Public):
    id: str
    project: str
    name: str
    status: DatasetStatus
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
    project: str
    dataset_id: str
    status: JobStatus
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

    @classmethod
    def from_row(cls, job: Job, history: list[dict[str, Any]] | None = None) -> "JobPublic":
        """The job row with its per-epoch ``history`` (stored in other rows: jobs.history reads them)."""
        public = cls.model_validate(job)
        public.history = history or []
        return public


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int


class ModelPublic(Public):
    id: str
    project: str
    job_id: str
    dataset_id: str
    base_model: str
    classes: list[str]
    image_size: int
    metrics: dict[str, Any]
    pinned: bool
    serving: bool = False
    min_score: float = Field(description="predictions whose calibrated top score is under this get label null")
    class_min_scores: dict[str, float] | None = Field(description="per-label thresholds that override min_score")
    created_at: datetime

    @computed_field  # type: ignore[prop-decorator]
    @property
    def temperature(self) -> float:
        """Logits are divided by it before the softmax (fitted on the validation split; 1 for older models)."""
        return float((self.metrics.get("calibration") or {}).get("temperature", 1.0))

    @classmethod
    def from_row(cls, model: Model, serving: set[str]) -> "ModelPublic":
        """The model row; ``serving`` holds the ids of the models its project serves (models.serving_ids)."""
        public = cls.model_validate(model)
        public.serving = model.id in serving
        return public


class ModelUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_score: float | None = Field(None, ge=0, le=1, description="abstain under this calibrated top score; "
                                                                  "null or 0: never")
    class_min_scores: dict[str, Annotated[float, Field(ge=0, le=1)]] | None = Field(
        None, description="per-label thresholds (labels must be the model's classes); null clears them")


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    count: int


class ProjectCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=PROJECT_NAME, description="lower-case letters, digits and '-'; at most 63")
    description: str = Field("", max_length=2000)
    quota_mb: int | None = Field(None, ge=1, le=2**31 - 1, description="disk the project may hold; none: unlimited")


class ProjectUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str | None = Field(None, max_length=2000)
    quota_mb: int | None = Field(None, ge=1, le=2**31 - 1)


class Usage(BaseModel):
    datasets: int
    jobs: int
    models: int
    bytes: int


class ProjectPublic(Public):
    name: str
    description: str
    quota_mb: int | None
    serving_model_id: str | None = None
    usage: Usage
    created_at: datetime


class ProjectsPublic(BaseModel):
    data: list[ProjectPublic]
    count: int


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    role: Role = Role.member
    projects: list[Annotated[str, Field(pattern=PROJECT_NAME)]] = Field(default_factory=list, max_length=1000)


class KeyPublic(Public):
    id: str
    name: str
    role: Role
    projects: list[str]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class KeyCreated(KeyPublic):
    key: str = Field(description="the secret: shown only in this response, stored only as a hash")


class KeysPublic(BaseModel):
    data: list[KeyPublic]
    count: int


class PredictForm(BaseModel):
    """The multipart fields (or query parameters) of a prediction besides its images (``file``)."""

    top_k: int = Field(5, ge=1, description="clamped to the model's class count")
    min_score: float = Field(0.0, ge=0, le=1, description="label is null when the calibrated top score is under this")
    model_id: str | None = Field(None, max_length=64, description="default: the model the project serves")
    project: str | None = Field(None, pattern=PROJECT_NAME, description="whose model serves the request (default "
                                                                        "'default')")


class DatasetForm(BaseModel):
    """The multipart fields of POST /v1/datasets besides the archive (``file``)."""

    project: str | None = Field(None, pattern=PROJECT_NAME)
    name: str | None = None  # stored cut to 255 characters, as the archive's name is


class Score(BaseModel):
    label: str
    score: float


class Prediction(BaseModel):
    filename: str
    label: str | None = Field(description="the top label, or null when its calibrated score is under the "
                                          "threshold (the model's min_score or the request's)")
    top: list[Score]


class PredictResponse(BaseModel):
    model_id: str
    predictions: list[Prediction]


class BatchPredictionCreate(BaseModel):
    """The JSON form of POST /v1/batch-predictions: a ready dataset's images (an archive goes as multipart)."""

    model_config = ConfigDict(extra="forbid")

    dataset_id: str = Field(min_length=1, max_length=64)
    project: str | None = Field(None, pattern=PROJECT_NAME, description="must be the dataset's, when given")
    top_k: int = Field(5, ge=1, le=BATCH_MAX_TOP_K, description="clamped to the model's class count")
    model_id: str | None = Field(None, min_length=1, max_length=64,
                                 description="a model of the project; default: the one it serves now")


class BatchPredictionForm(BaseModel):
    """The multipart fields of POST /v1/batch-predictions besides the archive (``file``)."""

    project: str | None = Field(None, pattern=PROJECT_NAME)
    top_k: int = Field(5, ge=1, le=BATCH_MAX_TOP_K)
    model_id: str | None = Field(None, max_length=64)
    dataset_id: str | None = Field(None, max_length=64)


class BatchProgress(BaseModel):
    total: int | None = Field(description="files in the archive; null until the worker has listed them")
    done: int = Field(description="files with a result row so far (predicted or rejected)")
    rejected: int = Field(description="files that could not be predicted; their rows say why")


class BatchPredictionPublic(Public):
    id: str
    project: str
    status: JobStatus
    source: Literal["archive", "dataset"]
    dataset_id: str | None
    filename: str | None
    size_bytes: int
    model_id: str
    top_k: int
    progress: BatchProgress
    error: str | None
    error_code: str | None
    attempts: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class BatchPredictionsPublic(BaseModel):
    data: list[BatchPredictionPublic]
    count: int


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = {}


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2048, description="http(s) URL the events are POSTed to")
    secret: str = Field(min_length=16, max_length=256, description="signs every delivery; never shown again")
    events: list[WebhookEventType] | None = Field(None, min_length=1, max_length=20, description="default: all")
    project: str | None = Field(None, pattern=PROJECT_NAME, description="default 'default' (or ?project=)")


class WebhookPublic(Public):
    id: str
    project: str
    url: str
    events: list[str]
    created_at: datetime


class WebhooksPublic(BaseModel):
    data: list[WebhookPublic]
    count: int


class WebhookDeliveryPublic(BaseModel):
    event_id: str
    type: str
    status: DeliveryStatus
    attempts: int
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    next_attempt_at: datetime | None


class WebhookDeliveriesPublic(BaseModel):
    data: list[WebhookDeliveryPublic]
    count: int
