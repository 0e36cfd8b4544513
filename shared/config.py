"""The one place settings are read: environment variables prefixed ``TUNESERVE_``."""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNESERVE_", extra="ignore")

    data_dir: Path = Path("./var")
    database_url: str | None = None
    broker_url: str | None = None
    # Lets several deployments (or test runs) share one Redis without stealing each other's tasks.
    broker_key_prefix: str = ""
    api_keys: str = ""
    max_upload_mb: int = Field(2048, gt=0)
    max_image_mb: int = Field(20, gt=0)
    # JSON (any non-multipart) request bodies; uploads stream to disk under MAX_UPLOAD_MB instead.
    max_json_kb: int = Field(1024, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Tests only: gpus=N on a CPU worker runs N gloo processes instead of failing with not_enough_gpus.
    ddp_on_cpu: bool = False
    weights_dir: Path | None = None
    # POST /v1/jobs answers 422 weights_unavailable when the weights are not where this process looks
    # (TORCH_HOME, WEIGHTS_DIR). Turn off when workers run on hosts whose caches the API cannot see.
    check_weights: bool = True
    cache_size: int = Field(256, ge=32, le=1024)
    min_images_per_class: int = Field(5, ge=1)
    max_archive_entries: int = Field(200_000, gt=0)
    max_archive_mb: int = Field(20_480, gt=0)
    max_image_pixels: int = Field(64_000_000, gt=0)
    min_image_side: int = Field(16, ge=1)
    predict_max_batch: int = Field(32, ge=1)
    predict_max_wait_ms: float = Field(5.0, ge=0)
    # Predict: decoded pixels one request may ask for, and requests in flight before 503 overloaded.
    predict_max_request_megapixels: int = Field(256, ge=1)
    predict_max_pending: int = Field(128, ge=1)
    # Models the API keeps loaded: the serving models of the most recently used projects come first.
    predict_max_models: int = Field(4, ge=1)
    job_max_attempts: int = Field(3, ge=1)
    # Ingestion: deliveries that may start before a dataset that keeps killing its worker fails, and
    # the wall time one ingestion may take (checked between images).
    ingest_max_attempts: int = Field(3, ge=1)
    ingest_max_minutes: float = Field(120.0, gt=0)
    # Batch predictions: images one batch may hold (more fails it before any is decoded), and images per
    # results chunk (a killed worker redoes at most one chunk).
    batch_max_images: int = Field(100_000, ge=1)
    batch_chunk_images: int = Field(256, ge=1, le=4096)
    # Disk left free whatever an upload or its decoded cache would take (507 / dataset failed otherwise).
    min_free_disk_gb: float = Field(2.0, ge=0)
    heartbeat_seconds: float = Field(5.0, gt=0)
    lease_timeout_seconds: float = Field(60.0, gt=0)
    reconcile_interval_seconds: float = Field(10.0, gt=0)
    max_active_jobs_per_key: int = Field(20, ge=1)
    # Redis redelivers unacked tasks after this long, whether or not the worker is alive; the DB
    # lease (heartbeat) is what stops a second worker from running a job that is still training.
    visibility_timeout_seconds: int = Field(12 * 3600, gt=0)
    cors_origins: str = ""
    # API processes `tuneserve api` runs (uvicorn workers), each with its own predictor. Per-process caps
    # that are meant for the whole API (event streams) are split between them.
    api_workers: int = Field(1, ge=1, le=64)
    # Connections one API process holds at once (503 past it), and server-sent event streams.
    http_max_connections: int = Field(1000, ge=10)
    sse_max_streams: int = Field(200, ge=1)
    sse_max_streams_per_key: int = Field(20, ge=1)
    sse_max_seconds: float = Field(3600.0, gt=0)
    sse_idle_seconds: float = Field(900.0, gt=0)
    # With keys set, /metrics needs an admin key unless this opens it to a scraper that cannot send one.
    metrics_open: bool = False
    # Webhooks: hooks a project may hold; per-POST timeout; attempts before a delivery is marked failed,
    # waiting backoff * 2^(attempt-1) (capped, with jitter) between them; how often workers look for due
    # deliveries. Private, loopback and link-local targets are refused unless allowed (make run, tests).
    webhook_max_per_project: int = Field(20, ge=1)
    webhook_timeout_seconds: float = Field(5.0, gt=0, le=60)
    webhook_max_attempts: int = Field(12, ge=1)
    webhook_backoff_seconds: float = Field(10.0, gt=0)
    webhook_backoff_max_seconds: float = Field(3600.0, gt=0)
    webhook_poll_seconds: float = Field(1.0, gt=0)
    webhook_allow_private: bool = False
    # Events whose deliveries all finished (delivered or failed) are removed after this long.
    webhook_retention_days: float = Field(30.0, gt=0)

    @field_validator("data_dir", mode="after")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'tuneserve.db'}"

    @property
    def broker(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def weights_path(self) -> Path:
        return (self.weights_dir or self.data_dir / "weights").expanduser().resolve()

    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]


@lru_cache
def get_settings() -> Settings:
    return Settings()
