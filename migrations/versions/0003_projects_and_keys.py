"""projects own datasets, jobs and models; API keys are principals stored in the database

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

OWNED = ("datasets", "jobs", "models")


def upgrade() -> None:
    projects = op.create_table(
        "projects",
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("quota_mb", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.bulk_insert(projects, [{"name": "default", "description": "", "quota_mb": None,
                               "created_at": datetime.now(UTC)}])
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("projects", sa.JSON(), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_hash"),
    )
    # Every existing row lands in `default` through the server default.
    for table in OWNED:
        with op.batch_alter_table(table) as batch_op:
            batch_op.add_column(sa.Column("project", sa.String(length=63), nullable=False, server_default="default"))
            batch_op.create_index(f"ix_{table}_project", ["project"], unique=False)
            batch_op.create_foreign_key(f"fk_{table}_project", "projects", ["project"], ["name"])
    # Owners and Idempotency-Keys are now scoped by principal; bootstrap keys are principals "env-<hash>".
    op.execute("UPDATE jobs SET owner = 'env-' || owner WHERE owner IS NOT NULL")
    op.execute("UPDATE jobs SET idempotency_key = substr(COALESCE(owner, 'open') || ':' || idempotency_key, 1, 255) "
               "WHERE idempotency_key IS NOT NULL")


def downgrade() -> None:
    for table in OWNED:
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_constraint(f"fk_{table}_project", type_="foreignkey")
            batch_op.drop_index(f"ix_{table}_project")
            batch_op.drop_column("project")
    op.execute("UPDATE jobs SET owner = substr(owner, 5) WHERE owner LIKE 'env-%'")
    op.drop_table("api_keys")
    op.drop_table("projects")
