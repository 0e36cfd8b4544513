"""Job states and the only way they change: one guarded UPDATE per transition."""

from enum import StrEnum
from typing import Any, Final, Literal

from sqlalchemy import ColumnElement, update
from sqlalchemy.orm import Session

from shared.db import changed
from shared.orm import Job, utcnow
from shared.webhooks import job_finished


class DatasetStatus(StrEnum):
    processing = "processing"
    ready = "ready"
    failed = "failed"


# A dataset deleted while finished jobs still name it keeps its row under this status: never listed, answers 404,
# so it is no DatasetStatus a client can see or filter on.
DATASET_DELETED: Final = "deleted"

# Why training ended before its last epoch (metrics.stopped); None when it ran them all.
StopReason = Literal["max_minutes", "cancelled", "early_stopping"]


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    cancelling = "cancelling"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


FINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})
ACTIVE = frozenset({JobStatus.queued, JobStatus.running, JobStatus.cancelling})

ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.queued: frozenset({JobStatus.running, JobStatus.cancelled, JobStatus.failed}),
    JobStatus.running: frozenset(
        {JobStatus.succeeded, JobStatus.failed, JobStatus.cancelling, JobStatus.queued}
    ),
    JobStatus.cancelling: frozenset({JobStatus.cancelled, JobStatus.failed}),
    JobStatus.succeeded: frozenset(),
    JobStatus.failed: frozenset(),
    JobStatus.cancelled: frozenset(),
}


class IllegalTransition(ValueError):
    pass


def transition(
    *, session: Session, job_id: str, expected: JobStatus, to: JobStatus, also: ColumnElement[bool] | None = None,
    **fields: Any,
) -> bool:
    """Move a job from ``expected`` to ``to``.

    True if this caller made the change; False if the job was not in ``expected`` (someone else
    moved it first), in which case nothing changes.
    """
    if to not in ALLOWED[expected]:
        raise IllegalTransition(f"a job cannot go from {expected} to {to}")
    values: dict[str, Any] = {"status": to.value, "updated_at": utcnow(), **fields}
    if to in FINAL:
        values.setdefault("finished_at", utcnow())
    statement = update(Job).where(Job.id == job_id, Job.status == expected.value)
    if also is not None:
        statement = statement.where(also)
    won = changed(session, statement.values(**values)) == 1
    if won and to in FINAL:  # the webhook event commits (or rolls back) with the change itself
        job_finished(session=session, job_id=job_id, status=to.value)
    return won
