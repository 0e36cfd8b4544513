"""Alembic is the only way the schema changes: it must go up and down cleanly and match the ORM."""

import uuid
from datetime import UTC, datetime

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from shared.db import make_engine
from shared.migrate import downgrade, upgrade
from shared.orm import Base
from tests.processes import PG_ADMIN

WEBHOOK_TABLES = {"webhooks", "webhook_events", "webhook_deliveries"}  # from 0007 on
TABLES = {"datasets", "jobs", "job_epochs", "models", "projects", "api_keys", "batch_predictions",
          "alembic_version"} | WEBHOOK_TABLES


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_url(request, tmp_path, pg_url):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'm.db'}"
        return
    name = f"tuneserve_mig_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield pg_url.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_creates_a_schema_that_matches_the_orm(fresh_url):
    upgrade(fresh_url)
    assert tables(fresh_url) == TABLES
    engine = make_engine(fresh_url)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    engine.dispose()
    assert diff == []


def test_downgrade_to_base_and_up_again(fresh_url):
    upgrade(fresh_url)
    downgrade(fresh_url, "0001")
    assert "enqueued_at" not in {c["name"] for c in inspect(make_engine(fresh_url)).get_columns("jobs")}
    downgrade(fresh_url, "base")
    assert tables(fresh_url) == {"alembic_version"}
    upgrade(fresh_url)
    assert tables(fresh_url) == TABLES


def test_0005_adds_and_drops_batch_predictions_only(fresh_url):
    upgrade(fresh_url, "0004")
    assert tables(fresh_url) == TABLES - WEBHOOK_TABLES - {"batch_predictions"}
    upgrade(fresh_url, "0005")
    assert tables(fresh_url) == TABLES - WEBHOOK_TABLES
    engine = make_engine(fresh_url)
    columns = {c["name"] for c in inspect(engine).get_columns("batch_predictions")}
    engine.dispose()
    assert {"project", "owner", "status", "model_id", "top_k", "total", "done", "rejected", "attempts",
            "enqueued_at"} <= columns
    downgrade(fresh_url, "0004")
    assert tables(fresh_url) == TABLES - WEBHOOK_TABLES - {"batch_predictions"}


def test_0007_adds_and_drops_the_webhook_tables_only(fresh_url):
    upgrade(fresh_url, "0006")
    assert tables(fresh_url) == TABLES - WEBHOOK_TABLES
    upgrade(fresh_url, "0007")
    assert tables(fresh_url) == TABLES
    downgrade(fresh_url, "0006")
    assert tables(fresh_url) == TABLES - WEBHOOK_TABLES


def test_0002_era_rows_move_into_project_default(fresh_url):
    """A database written before projects (revision 0002) upgrades with every row in `default`,
    owners and Idempotency-Keys re-scoped to the bootstrap principal, and the rows still usable."""
    upgrade(fresh_url, "0002")
    now = datetime.now(UTC)
    engine = make_engine(fresh_url)
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO datasets (id, name, status, filename, size_bytes, num_images, rejected, report, progress, "
            "created_at, updated_at, enqueued_at) VALUES ('d1', 'old', 'ready', 'old.zip', 10, 10, '[]', '{}', "
            "'{}', :now, :now, :now)"), {"now": now})
        connection.execute(text(
            "INSERT INTO jobs (id, dataset_id, status, hyperparameters, progress, attempts, idempotency_key, "
            "owner, created_at, updated_at, enqueued_at) VALUES ('j1', 'd1', 'succeeded', '{}', '{}', 1, 'k-1', "
            "'abcdef0123456789', :now, :now, :now)"), {"now": now})
        connection.execute(text(
            "INSERT INTO models (id, job_id, dataset_id, base_model, classes, image_size, metrics, pinned, "
            "created_at) VALUES ('m1', 'j1', 'd1', 'resnet18', '[\"a\", \"b\"]', 32, '{}', true, :now)"),
            {"now": now})
    engine.dispose()

    upgrade(fresh_url)
    engine = make_engine(fresh_url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT name FROM projects")).scalars().all() == ["default"]
        for table in ("datasets", "jobs", "models"):
            assert connection.execute(text(f"SELECT project FROM {table}")).scalars().all() == ["default"]
        assert connection.execute(text("SELECT owner, idempotency_key FROM jobs")).one() == (
            "env-abcdef0123456789", "env-abcdef0123456789:k-1")
        assert connection.execute(text("SELECT pinned FROM models")).scalar() in (True, 1)
    engine.dispose()

    downgrade(fresh_url, "0002")
    engine = make_engine(fresh_url)
    with engine.connect() as connection:
        assert "project" not in {c["name"] for c in inspect(connection).get_columns("jobs")}
        assert connection.execute(text("SELECT owner FROM jobs")).scalar() == "abcdef0123456789"
        assert connection.execute(text("SELECT count(*) FROM models")).scalar() == 1
    engine.dispose()


def test_a_url_quoted_password_reaches_alembic_intact(pg_url):
    """Compose passes passwords URL-quoted ('%40' for '@'); Alembic's config must not read '%' as interpolation."""
    name = f"tuneserve_mig_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = pg_url.rsplit("/", 1)[0] + f"/{name}"
        user = url.split("://", 1)[1].split("@", 1)[0]
        upgrade(url.replace(f"{user}@", f"{user}:p%40ss%3Aw%2Frd%25@"))  # trust auth ignores the password
        assert tables(url) == TABLES
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
