"""Send a row's broker message after its commit, and record that it was sent.

If the send fails (broker down, or this process dies first), ``enqueued_at`` stays NULL and a
worker's reconciler sends it later; the row is never lost.
"""

import logging
from collections.abc import Callable

from sqlalchemy import update
from sqlalchemy.orm import Session

from shared.orm import BatchPrediction, Dataset, Job, utcnow

log = logging.getLogger(__name__)


def dispatch(*, session: Session, table: type[Job] | type[Dataset] | type[BatchPrediction], row_id: str,
             enqueue: Callable[[str], None]) -> None:
    try:
        enqueue(row_id)
    except Exception:
        log.warning("broker unavailable; %s %s will be sent by the reconciler", table.__tablename__, row_id)
        return
    session.execute(update(table).where(table.id == row_id, table.enqueued_at.is_(None))
                    .values(enqueued_at=utcnow()))
    session.commit()
