"""jobs and datasets remember whether the broker got their message

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("jobs", "datasets"):
        with op.batch_alter_table(table) as batch_op:
            batch_op.add_column(sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True))
    # Rows that existed before this revision were sent when they were created.
    op.execute("UPDATE jobs SET enqueued_at = created_at")
    op.execute("UPDATE datasets SET enqueued_at = created_at")


def downgrade() -> None:
    for table in ("jobs", "datasets"):
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_column("enqueued_at")
