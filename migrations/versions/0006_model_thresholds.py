"""models carry an abstain threshold: predictions whose calibrated top score is under it get label null

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch_op:
        # 0: never abstain, which is what every model trained before this did.
        batch_op.add_column(sa.Column("min_score", sa.Float(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("class_min_scores", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch_op:
        batch_op.drop_column("class_min_scores")
        batch_op.drop_column("min_score")
