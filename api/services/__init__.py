"""Plain functions behind the routes, one module per resource."""

import uuid
from typing import TypeVar

from sqlalchemy.orm import Session

from api.errors import not_found

Row = TypeVar("Row")


def get_or_404(session: Session, table: type[Row], kind: str, item_id: str) -> Row:
    """The row with this id, or a 404 that names it; ids that are not UUIDs never reach the database."""
    try:
        uuid.UUID(item_id)
    except ValueError:
        raise not_found(kind, item_id) from None
    row = session.get(table, item_id)
    if row is None:
        raise not_found(kind, item_id)
    return row
