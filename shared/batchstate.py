"""Batch prediction states (the job states) and the only way they change: one guarded UPDATE.

Every state change of a batch goes through ``transition``, so anything that must react to one (webhook
events ``batch.succeeded`` / ``batch.failed``) has exactly one place to hook in.
"""

from typing import Any

from sqlalchemy import ColumnElement, update
from sqlalchemy.orm import Session

from shared.db import changed
from shared.jobstate import ALLOWED, FINAL, IllegalTransition, JobStatus
from shared.orm import BatchPrediction, utcnow
from shared.webhooks import batch_finished

BatchStatus = JobStatus


def transition(
    *, session: Session, batch_id: str, expected: BatchStatus, to: BatchStatus,
    also: ColumnElement[bool] | None = None, **fields: Any,
) -> bool:
    """Move a batch from ``expected`` to ``to`` (with ``fields``) in the caller's transaction.

    True if this caller made the change; False if the batch was not in ``expected`` (or ``also`` did
    not hold), in which case nothing changes.
    """
    if to not in ALLOWED[expected]:
        raise IllegalTransition(f"a batch prediction cannot go from {expected} to {to}")
    values: dict[str, Any] = {"status": to.value, "updated_at": utcnow(), **fields}
    if to in FINAL:
        values.setdefault("finished_at", utcnow())
    statement = update(BatchPrediction).where(BatchPrediction.id == batch_id,
                                              BatchPrediction.status == expected.value)
    if also is not None:
        statement = statement.where(also)
    won = changed(session, statement.values(**values)) == 1
    if won and to in FINAL:  # the webhook event commits (or rolls back) with the change itself
        batch_finished(session=session, batch_id=batch_id, status=to.value)
    return won
