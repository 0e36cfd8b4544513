"""Alembic is the only way the schema changes: it must go up and down cleanly and match the ORM."""

import uuid

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from shared.db import make_engine
from shared.migrate import downgrade, upgrade
from shared.orm import Base
from tests.conftest import PG_ADMIN

TABLES = {"datasets", "jobs", "job_epochs", "models", "alembic_version"}


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_url(request, tmp_path, pg_url):  # type: ignore[no-untyped-def]
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
